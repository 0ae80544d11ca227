"""The one YAML loader: no anchors or aliases, bounded depth, node count and size, clear errors."""

from __future__ import annotations

import datetime
import tracemalloc

import pytest
import yaml

from extauthz.safe_yaml import MAX_INPUT_BYTES, SafeYamlLoader, YamlInputError, load_single


def test_a_billion_laughs_is_refused_at_its_first_anchor_before_anything_is_built(yaml_bomb) -> None:
    """Ten levels of nine aliases stand for 9**10 strings; the loader stops at the first '&'."""
    bomb = yaml_bomb(levels=10)
    loader = SafeYamlLoader(bomb)
    tracemalloc.start()
    try:
        with pytest.raises(yaml.YAMLError) as info:
            loader.get_single_data()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "anchors are not allowed (found &a)" in str(info.value)
    assert loader.nodes <= 3  # the document's mapping, the key "a", the anchored list: nothing expanded
    assert peak < 1024 * 1024
    with pytest.raises(YamlInputError) as error:
        load_single(bomb, "bomb.yaml")
    assert str(error.value) == ("bomb.yaml:1: YAML anchors are not allowed (found &a); write the value out in full")


@pytest.mark.parametrize(("text", "line", "problem"), [
    ("base: {x: 1}\nother: *base\n", 2, "aliases are not allowed (found *base)"),
    ("a: 1\nb: &here 2\n", 2, "anchors are not allowed (found &here)"),
    ("defaults: &d {x: 1}\nuse: {<<: *d}\n", 1, "anchors are not allowed"),  # merge keys need an anchor
    ("list:\n  - ok\n  - &item [1]\n", 3, "anchors are not allowed (found &item)"),
])
def test_anchors_and_aliases_anywhere_are_refused_with_their_line(text: str, line: int, problem: str) -> None:
    with pytest.raises(YamlInputError) as info:
        load_single(text, "f.yaml")
    assert (info.value.source, info.value.line) == ("f.yaml", line)
    assert problem in info.value.problem


def test_depth_and_node_count_are_capped() -> None:
    with pytest.raises(YamlInputError, match=r"f\.yaml:1: nested deeper than 64 levels"):
        load_single("[" * 65 + "]" * 65, "f.yaml")
    assert load_single("[" * 63 + "]" * 63, "f.yaml") is not None
    loader = SafeYamlLoader("[" + "1, " * 100 + "]", max_nodes=50)
    with pytest.raises(yaml.YAMLError, match="more than 50 YAML nodes"):
        loader.get_single_node()
    assert loader.nodes == 51


def test_oversized_and_undecodable_inputs_are_refused() -> None:
    with pytest.raises(YamlInputError, match=rf"big\.yaml: larger than {MAX_INPUT_BYTES} bytes"):
        load_single(b"#" * (MAX_INPUT_BYTES + 1), "big.yaml")
    with pytest.raises(YamlInputError, match=r"bin.yaml: not valid UTF-8 \(byte 3\)"):
        load_single(b"a: \xff", "bin.yaml")


@pytest.mark.parametrize(("text", "problem"), [
    ("when: 2024-02-30\n", "cannot read this timestamp value (day is out of range for month)"),
    ("n: " + "1" * 5000 + "\n", "cannot read this int value (Exceeds the limit (4300 digits)"),
    ("x: !!python/object:os.system ls\n", "could not determine a constructor"),
])
def test_values_python_cannot_build_are_yaml_errors_not_crashes(text: str, problem: str) -> None:
    with pytest.raises(YamlInputError) as info:
        load_single(text, "f.yaml")
    assert info.value.line == 1 and problem in info.value.problem


def test_errors_never_quote_the_input() -> None:
    """PyYAML's own messages quote the offending line; key files are read here."""
    secret = "a" * 64
    with pytest.raises(YamlInputError) as info:
        load_single(f"- {{id: k, sha256: {secret}\n", "keys.yaml")
    assert secret not in str(info.value)


def test_ordinary_yaml_and_json_still_load() -> None:
    expected = {"a": [1, {"b": "c"}], "d": datetime.date(2024, 1, 1)}
    assert load_single("a: [1, {b: c}]\nd: 2024-01-01\n", "f.yaml") == expected
    assert load_single(b'{"method": "GET", "headers": {"x": "1"}}', "r.json") == {"method": "GET",
                                                                                 "headers": {"x": "1"}}
    assert load_single("", "empty.yaml") is None
    assert load_single("# only a comment\n", "c.yaml") is None
