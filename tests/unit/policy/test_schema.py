"""The JSON Schema (schema/extauthz.schema.json) and the loader agree.

- The committed schema is what ``extauthz schema`` prints today, and it leaves no field undescribed.
- Every bundled document validates (with check-jsonschema, as CI or a pre-commit hook would run it)
  and names the schema on its first line for editors.
- Documents generated from the schema alone (not from the generator's notes) load without a
  structural error: no unknown field, wrong type, missing field, bad choice or bound. The loader
  may still refuse them for what a schema cannot say (CEL that does not compile, a file that does
  not exist, a malformed host).
- Single mutations of valid documents (an unknown field, a value of the wrong type, an integer out
  of bounds, an empty list that must not be) are refused by both, at that field.

tests/conftest.py also checks, at the end of every run, that each policy a test loaded validates.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extauthz.policy.build import PROBE, FieldPath, Services
from extauthz.policy.compiler import compile_documents
from extauthz.policy.loader import is_openapi_spec, policy_files
from extauthz.policy.model import Document, PolicyError, PolicySetError, format_field, parse_documents
from extauthz.policytest import check_tests

ROOT = Path(__file__).resolve().parents[3]
SCHEMA_FILE = ROOT / "schema" / "extauthz.schema.json"
POLICIES = ROOT / "policies"
POLICY_KINDS = ("AuthPolicy", "LayerPolicy")
KINDS = (*POLICY_KINDS, "PolicyTest")


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_FILE.read_text())


@pytest.fixture(scope="module")
def validator(schema: dict[str, Any]) -> jsonschema.Draft7Validator:
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_committed_schema_is_current_every_field_is_described_and_no_reader_crashes(
        capsys: pytest.CaptureFixture[str]) -> None:
    """``extauthz schema`` prints the committed file. A field a check reads without a Spec
    accessor would take any value in the schema: read it through an accessor (or add one to
    Spec) so that editors check it too. A reader that raises on a made-up document is a loader
    bug (a bad policy must be an error, never a crash)."""
    from extauthz.cli import main

    assert main(["schema", "--report"]) == 0
    out, err = capsys.readouterr()
    assert out == SCHEMA_FILE.read_text(), (
        "schema/extauthz.schema.json is stale: run  extauthz schema > schema/extauthz.schema.json")
    assert "undescribed (read without an accessor: any value): 0\n" in err, err
    assert "readers that raised on a made-up document: 0\n" in err, err


def test_every_check_section_is_described(schema: dict[str, Any]) -> None:
    from extauthz.checks import kinds

    for kind in POLICY_KINDS:
        spec = _resolve(schema, schema["definitions"][kind]["properties"]["spec"])
        assert set(kinds()) <= set(spec["properties"]), kind
        for section in kinds():
            assert _resolve(schema, spec["properties"][section]).get("description"), section


# --- the bundled documents ------------------------------------------------------------------------------
def _bundled() -> list[Path]:
    """The bundled policy and PolicyTest files (an OpenAPI spec kept beside them is not one)."""
    return [path for path in policy_files(POLICIES) if not is_openapi_spec(path.read_bytes())]


def _documents(path: Path) -> list[dict[str, Any]]:
    documents, errors = parse_documents(path.read_text(), path.name)
    assert not errors, errors
    return [json.loads(json.dumps(doc.body, default=str)) for doc in documents]


def test_bundled_documents_validate_with_check_jsonschema(tmp_path: Path) -> None:
    """check-jsonschema reads one document per file: each document of each file is written apart."""
    files = []
    for path in _bundled():
        for i, body in enumerate(_documents(path)):
            out = tmp_path / f"{path.stem}-{i}.json"
            out.write_text(json.dumps(body))
            files.append(str(out))
    assert len(files) >= 10
    run = subprocess.run([sys.executable, "-m", "check_jsonschema", "--schemafile", str(SCHEMA_FILE), *files],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def _describes(kind: str) -> bool:
    return kind in json.loads(SCHEMA_FILE.read_text())["definitions"]


@pytest.mark.parametrize("path", _bundled(), ids=lambda p: p.name)
def test_bundled_files_name_the_schema(path: Path) -> None:
    """The first line tells yaml-language-server (VS Code's YAML extension, and editors using it
    through LSP) which schema to complete and check with, by a path that works in a checkout.
    Every file whose documents the schema describes has it."""
    if not all(_describes(body["kind"]) for body in _documents(path)):
        pytest.skip("holds a kind the schema does not describe yet")
    first = path.read_text().splitlines()[0]
    prefix = "# yaml-language-server: $schema="
    assert first.startswith(prefix), first
    assert (path.parent / first.removeprefix(prefix)).resolve() == SCHEMA_FILE


# --- documents from the schema load without a structural error -----------------------------------------
class _Refusals:
    """A probe that keeps only the accessors' refusals (structural errors) of a load."""

    def __init__(self) -> None:
        self.paths: list[FieldPath] = []

    def saw(self, path: FieldPath, shape: str, facts: Any) -> None:
        pass

    def refused(self, path: FieldPath) -> None:
        self.paths.append(path)


#: Where made-up documents are loaded: their file names resolve under an empty folder.
_NOWHERE = Path(tempfile.mkdtemp(prefix="extauthz-schema-test-"))


def _load(body: dict[str, Any], folder: Path = _NOWHERE) -> tuple[list[FieldPath], list[PolicyError]]:
    """(structural refusals, every error) of loading one document."""
    metadata = body.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else ""
    document = Document("p.yaml", 1, str(body.get("kind", "")), str(name or ""), body, {})
    refusals = _Refusals()
    token = PROBE.set(refusals)
    try:
        compile_documents([document], folder, Services(settings={"offline": True, "check_tests": check_tests}))
    except PolicySetError as exc:
        return refusals.paths, exc.errors
    finally:
        PROBE.reset(token)
    return refusals.paths, []


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
    return node


def _strategy(schema: dict[str, Any], node: dict[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    """Values valid under ``node``, for the keywords the generator writes."""
    node = _resolve(schema, node)
    if "anyOf" in node:
        return st.one_of([_strategy(schema, alternative, depth) for alternative in node["anyOf"]])
    if "enum" in node:
        return st.sampled_from(node["enum"])
    if "const" in node:
        return st.just(node["const"])
    types = node.get("type")
    if isinstance(types, list):
        return st.one_of([_strategy(schema, {**node, "type": kind}, depth) for kind in types])
    if types == "object":
        return _object(schema, node, depth)
    if types == "array":
        return st.lists(_strategy(schema, node.get("items", {}), depth + 1), min_size=node.get("minItems", 0),
                        max_size=max(node.get("minItems", 0), 2 if depth < 6 else 0) or 1)
    if types == "string":
        if "pattern" in node:
            return st.from_regex(node["pattern"])
        return st.text(max_size=12)
    if types == "integer":
        return st.integers(node.get("minimum", -(2**40)), node.get("maximum", 2**40))
    if types == "number":
        return st.floats(node.get("minimum", -1e9), 1e9, allow_nan=False) | st.integers(node.get("minimum", -1000), 10**6)
    if types == "boolean":
        return st.booleans()
    if types == "null":
        return st.none()
    raise AssertionError(f"a schema the generator does not write: {node}")


def _object(schema: dict[str, Any], node: dict[str, Any], depth: int) -> st.SearchStrategy[dict[str, Any]]:
    properties = node.get("properties", {})
    required = set(node.get("required", ()))
    groups = [group for group in node.get("allOf", [node]) if "oneOf" in group or "not" in group]
    grouped = {key for group in groups for key in _group_keys(group)}

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        keys = set(required)
        for key in sorted(set(properties) - required - grouped):
            if depth < 6 and draw(st.booleans()):
                keys.add(key)
        for group in groups:
            options = _group_keys(group)
            if "oneOf" in group or draw(st.booleans()):
                keys.add(draw(st.sampled_from(options)))
        value = {key: draw(_strategy(schema, properties[key], depth + 1)) for key in sorted(keys)}
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=10)
            more = draw(st.dictionaries(names, _strategy(schema, extra, depth + 1),
                                        min_size=node.get("minProperties", 0), max_size=2))
            value.update({k: v for k, v in more.items() if k not in properties})
        return value

    return build()


def _group_keys(group: dict[str, Any]) -> list[str]:
    if "oneOf" in group:
        return [option["required"][0] for option in group["oneOf"]]
    return sorted({key for pair in group["not"]["anyOf"] for key in pair["required"]})


def _lenient(schema: dict[str, Any], node: dict[str, Any], path: FieldPath) -> bool:
    """Whether the schema marks the field at ``path`` lenient (``x-lenient``: its being required,
    its bounds or choices depend on another field, which the loader checks and the schema does not)."""
    node = _resolve(schema, node)
    if not path:
        return bool(node.get("x-lenient"))
    head, rest = path[0], path[1:]
    options = node.get("anyOf", [node])
    for option in options:
        option = _resolve(schema, option)
        if isinstance(head, int) and isinstance(option.get("items"), dict):
            child = option["items"]
        elif isinstance(head, str) and head in option.get("properties", {}):
            child = option["properties"][head]
        elif isinstance(head, str) and isinstance(option.get("additionalProperties"), dict):
            child = option["additionalProperties"]
        else:
            continue
        if _lenient(schema, child, rest):
            return True
    return False


@pytest.mark.parametrize("kind", KINDS)
def test_documents_valid_under_the_schema_have_no_structural_error(schema: dict[str, Any], validator: Any,
                                                                   kind: str) -> None:
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(_strategy(schema, schema["definitions"][kind]))
    def loads(body: dict[str, Any]) -> None:
        body = json.loads(json.dumps(body))
        assert not list(validator.iter_errors(body)), "the strategy made a document the schema refuses"
        refusals, errors = _load(body)
        strict = [path for path in refusals if not _lenient(schema, schema["definitions"][kind], path)]
        assert strict == [], [str(e) for e in errors]

    loads()


# --- single mutations are refused by both --------------------------------------------------------------
def _mutations(schema: dict[str, Any], node: dict[str, Any], value: Any,
               path: FieldPath) -> Iterator[tuple[str, FieldPath, Any]]:
    """(what, where, new value at where) for each mutation of ``value`` and everything in it."""
    node = _resolve(schema, node)
    if "anyOf" in node:
        fitting = [n for n in node["anyOf"] if jsonschema.Draft7Validator(_with_definitions(schema, n)).is_valid(value)]
        if fitting:
            yield from _mutations(schema, fitting[0], value, path)
        yield "wrong type", path, _wrong_type(schema, node)
        return
    if isinstance(value, dict) and "properties" in node:
        if node.get("additionalProperties") is False:
            yield "unknown field", (*path, "unknownField"), 1
        for key, item in value.items():
            if key in node["properties"]:
                yield from _mutations(schema, node["properties"][key], item, (*path, key))
    elif isinstance(value, dict) and isinstance(node.get("additionalProperties"), dict):
        for key, item in value.items():
            yield from _mutations(schema, node["additionalProperties"], item, (*path, key))
    if isinstance(value, list) and isinstance(node.get("items"), dict):
        for i, item in enumerate(value):
            yield from _mutations(schema, node["items"], item, (*path, i))
    if node.get("minItems") or node.get("minProperties"):
        yield "empty", path, [] if isinstance(value, list | str) else {}
    if node.get("type") == "integer":
        if "minimum" in node:
            yield "below the minimum", path, node["minimum"] - 1
        if "maximum" in node:
            yield "above the maximum", path, node["maximum"] + 1
    if "enum" in node:
        yield "not a choice", path, "not-a-choice"
    if path[:1] == ("spec",) or path[:1] == ("metadata",):
        yield "wrong type", path, _wrong_type(schema, node)


def _with_definitions(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    return {"definitions": schema["definitions"], **node}


def _wrong_type(schema: dict[str, Any], node: dict[str, Any]) -> Any:
    check = jsonschema.Draft7Validator(_with_definitions(schema, node))
    return next(v for v in ({"wrong": 1}, 1234567, "wrong", [{"wrong": 1}]) if not check.is_valid(v))


def _at(body: Any, path: FieldPath, value: Any) -> Any:
    body = copy.deepcopy(body)
    node = body
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return body


_MUTATIONS = 60


def _bundled_documents() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{path.name}:{body['metadata']['name']}", body) for path in _bundled() for body in _documents(path)]


@pytest.mark.parametrize(("where", "body"), _bundled_documents(), ids=lambda v: v if isinstance(v, str) else "")
def test_single_mutations_are_refused_by_schema_and_loader(schema: dict[str, Any], validator: Any, where: str,
                                                          body: dict[str, Any]) -> None:
    assert _load(body, POLICIES) == ([], []), "a bundled document must load"
    mutations = list(_mutations(schema, schema["definitions"][body["kind"]], body, ()))
    # At most _MUTATIONS per document, spread over it: a PolicyTest that signs with RSA keys takes
    # a tenth of a second to load, and has hundreds.
    count = 0
    for what, path, value in mutations[::-(-len(mutations) // _MUTATIONS)]:
        mutant = _at(body, path, value)
        assert not validator.is_valid(mutant), f"{what} at {path}: the schema accepts {value!r}"
        refusals, errors = _load(mutant, POLICIES)
        # An accessor refused it there (or where it sits), or the loader's own rule did (a kind it
        # does not know is refused by the compiler, not by an accessor).
        at = format_field(path)
        assert any(r[: len(path)] == path or path[: len(r)] == r for r in refusals) or any(
            e.field == at or e.field.startswith(at + ".") for e in errors), (
            f"{what} at {path} ({value!r}): the loader says {[str(e) for e in errors]}")
        count += 1
    assert count >= 5
