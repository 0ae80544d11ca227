"""Spec files: parsing, JSON pointers and $ref resolution (local, beside the spec, never beyond)."""

from __future__ import annotations

import pytest

from extauthz.openapi.document import Location, SpecError, SpecFiles, pointer_of


def test_pointers_escape_slash_and_tilde():
    assert pointer_of("paths", "/a/{b}", "get") == "/paths/~1a~1{b}/get"
    assert pointer_of("x~y") == "/x~0y"


def test_yaml_is_read_as_json_sees_it(spec_file):
    text = "openapi: 3.1.0\nx: 2024-01-02\nresponses:\n  200: {description: ok}\n  true: 1\n" \
           "enum: [NO, yes, off, true, False, 1, 1.5, ~]\n"
    document = SpecFiles(spec_file(text)).load_root()
    assert document["x"] == "2024-01-02"  # dates stay strings
    assert set(document["responses"]) == {"200", "true"}  # keys are strings
    # YAML 1.2 booleans only: the Norway problem of YAML 1.1 does not turn NO into false
    assert document["enum"] == ["NO", "yes", "off", True, False, 1, 1.5, None]


def test_json_specs_are_read_as_json(spec_file):
    files = SpecFiles(spec_file({"openapi": "3.0.3", "n": 1}, name="api.json"))
    assert files.load_root() == {"openapi": "3.0.3", "n": 1}


def test_invalid_yaml_names_the_file_and_line(spec_file):
    with pytest.raises(SpecError) as caught:
        SpecFiles(spec_file("openapi: 3.1.0\npaths: [unclosed\n")).load_root()
    assert caught.value.file == "api.yaml" and "line" in caught.value.message


def test_local_and_sibling_references(spec_file):
    path = spec_file({"a": {"$ref": "#/b"}, "b": {"$ref": "common/schemas.yaml#/Thing"}},
                     files={"common/schemas.yaml": {"Thing": {"type": "string"}, "Other": {"$ref": "#/Thing"}}})
    files = SpecFiles(path)
    node, where = files.deref(files.load_root()["a"], Location("api.yaml", "/a"))
    assert node == {"type": "string"}
    assert where == Location("common/schemas.yaml", "/Thing")
    # a reference inside the other file is relative to that file
    other, at = files.deref({"$ref": "schemas.yaml#/Other"}, Location("common/schemas.yaml", "/x"))
    assert other == {"type": "string"} and at.file == "common/schemas.yaml"
    assert [p.name for p in files.files] == ["api.yaml", "schemas.yaml"]


@pytest.mark.parametrize("ref, problem", [
    ("https://example.com/schemas.yaml#/A", "URL"),
    ("//example.com/a.yaml", "URL"),
    ("/etc/passwd", "relative paths"),
    ("../outside.yaml#/A", "leaves the spec's folder"),
    ("#anchor", "anchors are not supported"),
    ("#/nowhere", "does not exist"),
    ("missing.yaml#/A", "cannot be read"),
])
def test_references_that_are_refused(spec_file, ref, problem):
    files = SpecFiles(spec_file({"a": {"$ref": ref}}, name="specs/api.yaml"))
    files.load_root()
    with pytest.raises(SpecError) as caught:
        files.deref({"$ref": ref}, Location("api.yaml", "/a"))
    assert problem in str(caught.value)


def test_reference_loops_are_refused(spec_file):
    files = SpecFiles(spec_file({"a": {"$ref": "#/b"}, "b": {"$ref": "#/a"}}))
    with pytest.raises(SpecError, match="loops"):
        files.deref(files.load_root()["a"], Location("api.yaml", "/a"))


def test_percent_encoded_pointers(spec_file):
    files = SpecFiles(spec_file({"paths": {"/a/{id}": {"get": {}}}}))
    files.load_root()
    target = files.target("#/paths/~1a~1%7Bid%7D/get", Location("api.yaml", ""))
    assert files.node(target) == {}
