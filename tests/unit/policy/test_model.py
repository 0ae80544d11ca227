"""Policy documents from YAML: the event reader gives exactly what composing nodes gives, errors
included, and leaves what it does not handle to the composer."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from extauthz.policy.model import _parse_composed, _read_documents, _Unusual, parse_documents
from extauthz.safe_yaml import SafeYamlLoader

ROOT = Path(__file__).resolve().parents[3]
HEAD = "apiVersion: extauthz.dev/v1\nkind: AuthPolicy\nmetadata: {name: p}\n"

CASES = {
    "policy": HEAD + "spec:\n  rules:\n    - {name: r, decision: allow, when: 'request.method == \"GET\"'}\n",
    "several documents": HEAD + "spec: {}\n---\n" + HEAD.replace("name: p", "name: q") + "spec: {mode: dry-run}\n",
    "empty documents": "---\n---\n" + HEAD + "spec: {}\n---\n",
    "only comments": "# nothing\n",
    "empty": "",
    "scalars": HEAD + "spec:\n  a: 1\n  b: -2.5e3\n  c: true\n  d: null\n  e: ~\n  f: 0x1F\n  g: 0o17\n  h: .inf\n"
               "  i: 2024-02-29\n  j: 2024-02-29T10:00:00Z\n  k: '1'\n  l: \"yes\"\n  m: yes\n  n: off\n  o: 1_000\n",
    "block scalars": HEAD + "spec:\n  a: |\n    line one\n    line two\n  b: >-\n    folded\n    text\n",
    "non-string keys": HEAD + "spec:\n  200: ok\n  true: t\n  null: n\n  1.5: f\n",
    "nested": HEAD + "spec:\n  a:\n    - b: [1, {c: [d, e]}]\n      f: {}\n    - []\n    - - x\n      - y\n",
    "duplicate key": HEAD + "spec:\n  a: 1\n  b: {c: 1, c: 2}\n",
    "duplicate after a bad value": HEAD + "spec:\n  a: 2024-02-30\n  a: 1\n",
    "duplicate at the top": "apiVersion: extauthz.dev/v1\napiVersion: extauthz.dev/v1\n",
    "bad date": HEAD + "spec:\n  when: 2024-02-30\n",
    "huge int": HEAD + "spec:\n  n: " + "9" * 5000 + "\n",
    "bad date as a key": HEAD + "spec:\n  2024-02-30: x\n",
    "syntax error": HEAD + "spec: [\n",
    "syntax error in the second document": HEAD + "spec: {}\n---\n" + HEAD + "spec: {a: [}\n",
    "syntax error after a duplicate": HEAD + "spec:\n  a: 1\n  a: 2\n  b: [\n",
    "tab indentation": HEAD + "spec:\n\ta: 1\n",
    "a list": "- a\n- b\n",
    "a scalar": "just text\n",
    "no api version": "kind: AuthPolicy\nmetadata: {name: p}\nspec: {}\n",
    "no kind": "apiVersion: extauthz.dev/v1\nmetadata: {name: p}\n",
    "anchor": HEAD + "spec:\n  a: &x 1\n",
    "alias": HEAD + "spec:\n  a: *x\n",
    "anchored mapping": HEAD + "spec: &s {a: 1}\n",
    "deep": HEAD + "spec: " + "[" * 70 + "]" * 70 + "\n",
    "just deep enough": HEAD + "spec: " + "[" * 62 + "]" * 62 + "\n",
    "unicode": HEAD + "spec:\n  message: \"caf\\u00e9 \U0001F600\"\n  plain: café\n",
    "quoted keys": HEAD + "spec:\n  'a b': 1\n  \"c\": 2\n",
    "flow mapping at the top": "{apiVersion: extauthz.dev/v1, kind: AuthPolicy, metadata: {name: p}, spec: {}}\n",
    "explicit document end": HEAD + "spec: {}\n...\n---\n" + HEAD + "spec: {}\n",
    "directive": "%YAML 1.1\n---\n" + HEAD + "spec: {}\n",
}
UNUSUAL = {
    "explicit tag": HEAD + "spec:\n  a: !!str 123\n",
    "custom tag": HEAD + "spec:\n  a: !custom x\n",
    "merge key": HEAD + "spec:\n  <<: {a: 1}\n  b: 2\n",
    "value key": HEAD + "spec:\n  =: 1\n",
    "complex key": HEAD + "spec:\n  ? [a, b]\n  : c\n",
    "mapping as key": HEAD + "spec:\n  ? {a: 1}\n  : c\n",
    "set": HEAD + "spec: !!set {a, b}\n",
}


def _events(text: str) -> tuple[list, list]:
    documents: list = []
    errors: list = []
    loader = SafeYamlLoader(text)
    try:
        _read_documents(loader, "f.yaml", documents, errors)
    finally:
        loader.dispose()
    return documents, errors


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_event_reader_gives_what_the_composer_gives(name: str) -> None:
    assert _events(CASES[name]) == _parse_composed(CASES[name], "f.yaml")


@pytest.mark.parametrize("name", sorted(UNUSUAL))
def test_what_the_event_reader_leaves_is_composed(name: str) -> None:
    with pytest.raises(_Unusual):
        _events(UNUSUAL[name])
    assert parse_documents(UNUSUAL[name], "f.yaml") == _parse_composed(UNUSUAL[name], "f.yaml")


def test_every_bundled_policy_file_reads_the_same_both_ways() -> None:
    files = sorted((ROOT / "policies").glob("*.yaml")) + sorted((ROOT / "examples").rglob("*.yaml"))
    assert files
    for path in files:
        text = path.read_text()
        assert _events(text) == _parse_composed(text, "f.yaml"), path


def test_the_node_cap_counts_every_document() -> None:
    text = "---\n".join([HEAD + "spec: {a: [1, 2, 3]}\n"] * 3)  # 13 nodes each
    loader = SafeYamlLoader(text, max_nodes=25)
    documents: list = []
    errors: list = []
    _read_documents(loader, "f.yaml", documents, errors)
    assert len(documents) == 1
    assert [(e.document, e.message) for e in errors] == [(2, "more than 25 YAML nodes; split the file")]


_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=12),
    st.sampled_from(["yes", "No", "on", "~", "null", "0x10", "1e3", "2024-01-01", "=", "<<", "", " a", "-"]),
)
_values = st.recursive(
    _scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), children, max_size=4)),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(_values, st.booleans(), st.sampled_from([None, '"', "'"]))
def test_generated_yaml_reads_the_same_both_ways(value, flow: bool, style) -> None:
    text = yaml.safe_dump({"apiVersion": "extauthz.dev/v1", "kind": "AuthPolicy", "metadata": {"name": "g"},
                           "spec": value}, default_flow_style=flow, default_style=style, allow_unicode=True)
    try:
        fast = _events(text)
    except _Unusual:
        fast = None
    composed = _parse_composed(text, "f.yaml")
    assert parse_documents(text, "f.yaml") == composed
    if fast is not None:
        assert fast == composed
