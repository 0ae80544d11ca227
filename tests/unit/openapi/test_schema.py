"""Schema Objects as JSON Schema 2020-12: 3.0 and 3.1 semantics, request-only rules, safe messages."""

from __future__ import annotations

from typing import Any

import jsonschema_rs
import pytest

from extauthz.openapi.document import Location, SpecError, SpecFiles
from extauthz.openapi.schema import SchemaOptions, SchemaTranslator


@pytest.fixture
def schema(spec_file):
    """``schema(node, components=None, version="3.1", **options)`` -> (validator, explain(error))."""

    def build(node: Any, components: dict[str, Any] | None = None, version: str = "3.1", **options: Any):
        document = {"openapi": "3.1.0" if version == "3.1" else "3.0.3", "components": {"schemas": components or {}},
                    "x-root": node}
        files = SpecFiles(spec_file(document))
        files.load_root()
        translator = SchemaTranslator(files, SchemaOptions(version=version, **options))
        name = translator.root(node, Location("api.yaml", "/x-root"), "root")
        schemas = translator.compile()
        return schemas.validator(name), (lambda error: schemas.explain(error, name))

    return build


def _violation(validator, explain, instance):
    with pytest.raises(jsonschema_rs.ValidationError) as caught:
        validator.validate(instance)
    return explain(caught.value)


def test_nullable_in_30_adds_null_only_with_a_type(schema):
    validator, _ = schema({"type": "string", "nullable": True}, version="3.0")
    assert validator.is_valid(None) and validator.is_valid("a") and not validator.is_valid(1)
    validator, _ = schema({"nullable": True, "minLength": 2}, version="3.0")  # no type: nullable does nothing
    assert validator.is_valid(None) and validator.is_valid(5)
    # 3.0.3: other constraints keep their meaning, so an enum without null refuses null
    validator, _ = schema({"type": "string", "nullable": True, "enum": ["a"]}, version="3.0")
    assert not validator.is_valid(None)
    validator, _ = schema({"type": "string", "nullable": True}, version="3.1")  # not a 3.1 keyword
    assert not validator.is_valid(None)


def test_exclusive_bounds_30_boolean_form(schema):
    validator, _ = schema({"type": "integer", "minimum": 1, "exclusiveMinimum": True, "maximum": 5,
                           "exclusiveMaximum": False}, version="3.0")
    assert not validator.is_valid(1) and validator.is_valid(2) and validator.is_valid(5)
    validator, _ = schema({"type": "integer", "exclusiveMinimum": 1}, version="3.1")
    assert not validator.is_valid(1) and validator.is_valid(2)
    with pytest.raises(SpecError, match=r"boolean in OpenAPI 3\.0"):
        schema({"exclusiveMinimum": 1}, version="3.0")


def test_ref_siblings_are_ignored_in_30_and_apply_in_31(schema):
    components = {"S": {"type": "string"}}
    node = {"$ref": "#/components/schemas/S", "maxLength": 2}
    validator, _ = schema(node, components, version="3.0")
    assert validator.is_valid("long")
    validator, _ = schema(node, components, version="3.1")
    assert not validator.is_valid("long") and validator.is_valid("ok")


def test_boolean_schemas_are_31_only(schema):
    validator, _ = schema({"type": "object", "properties": {"a": False}})
    assert not validator.is_valid({"a": 1})
    with pytest.raises(SpecError, match="must be an object"):
        schema({"type": "object", "properties": {"a": False}}, version="3.0")


CARD = {"type": "object", "required": ["method", "token"], "properties": {"method": {"type": "string"},
                                                                          "token": {"type": "string"}}}
INVOICE = {"type": "object", "required": ["method"], "properties": {"method": {"type": "string"},
                                                                     "po": {"type": "string"}}}


@pytest.mark.parametrize("version", ["3.0", "3.1"])
def test_discriminator_dispatches_on_the_property(schema, version):
    node = {"oneOf": [{"$ref": "#/components/schemas/Card"}, {"$ref": "#/components/schemas/Invoice"}],
            "discriminator": {"propertyName": "method", "mapping": {"card": "#/components/schemas/Card"}}}
    validator, schemas = schema(node, {"Card": CARD, "Invoice": INVOICE}, version=version)
    assert validator.is_valid({"method": "card", "token": "t"})
    # Without the discriminator this is valid against both alternatives, and oneOf would refuse it.
    assert validator.is_valid({"method": "Invoice", "token": "t"})  # implicit mapping: the component name
    assert not validator.is_valid({"method": "card"})  # the Card schema applies: token is required
    found = _violation(validator, schemas, {"method": "cash"})
    assert found.constraint == "discriminator" and "cash" not in found.detail
    found = _violation(validator, schemas, {"token": "t"})
    assert (found.constraint, found.detail) == ("required", "property 'method' is required")


def test_discriminator_on_a_base_schema_is_an_annotation(schema):
    validator, _ = schema({"type": "object", "discriminator": {"propertyName": "kind"}})
    assert validator.is_valid({"anything": 1})


def test_discriminator_mapping_to_nowhere_is_a_load_error(schema):
    node = {"oneOf": [{"$ref": "#/components/schemas/Card"}],
            "discriminator": {"propertyName": "method", "mapping": {"x": "#/components/schemas/Gone"}}}
    with pytest.raises(SpecError, match="does not exist"):
        schema(node, {"Card": CARD})


def test_read_only_properties_are_refused_and_not_required(schema):
    components = {"Id": {"type": "string", "readOnly": True}}
    node = {"type": "object", "required": ["id", "status", "name"], "properties": {
        "id": {"$ref": "#/components/schemas/Id"}, "status": {"type": "string", "readOnly": True},
        "name": {"type": "string"}}}
    validator, schemas = schema(node, components)
    assert validator.is_valid({"name": "x"})  # required readOnly properties are not required in requests
    found = _violation(validator, schemas, {"name": "x", "status": "paid"})
    assert (found.pointer, found.constraint) == ("/status", "readOnly")
    found = _violation(validator, schemas, {"name": "x", "id": "1"})
    assert (found.pointer, found.constraint) == ("/id", "readOnly")
    validator, _ = schema(node, components, refuse_read_only=False)
    assert validator.is_valid({"name": "x", "status": "paid"})


def test_strict_mode_closes_objects_through_allof_and_refs(schema):
    components = {"Base": {"type": "object", "properties": {"id": {"type": "integer"}}},
                  "Named": {"allOf": [{"$ref": "#/components/schemas/Base"},
                                      {"properties": {"name": {"type": "string"}}}]}}
    node = {"type": "object", "properties": {"thing": {"$ref": "#/components/schemas/Named"},
                                             "free": {"type": "object"},
                                             "open": {"type": "object", "properties": {"a": {}},
                                                      "additionalProperties": True}}}
    validator, schemas = schema(node, components, strict=True)
    assert validator.is_valid({"thing": {"id": 1, "name": "n"}, "free": {"any": 1}, "open": {"z": 1}})
    found = _violation(validator, schemas, {"thing": {"id": 1, "admin": True}})
    assert found.pointer == "/thing" and found.constraint == "unevaluatedProperties"
    assert "'admin'" in found.detail
    assert not validator.is_valid({"other": 1})
    declared, _ = schema(node, components, strict=False)
    assert declared.is_valid({"thing": {"id": 1, "admin": True}, "other": 1})


def test_formats_are_asserted_with_openapi_integer_ranges(schema):
    validator, _ = schema({"type": "object", "properties": {
        "n": {"type": "integer", "format": "int32"}, "id": {"type": "string", "format": "uuid"},
        "b": {"type": "string", "format": "byte"}, "x": {"type": "string", "format": "custom"}}})
    assert validator.is_valid({"n": 2**31 - 1, "id": "3f1c6a2e-7d4b-4e0f-9a51-2b8c5d6e7f80", "b": "aGk=", "x": "?"})
    assert not validator.is_valid({"n": 2**31})
    assert not validator.is_valid({"id": "not-a-uuid"})
    assert not validator.is_valid({"b": "not base64!"})
    lax, _ = schema({"type": "string", "format": "uuid"}, formats=False)
    assert lax.is_valid("not-a-uuid")


def test_patterns_have_ecma_262_semantics(schema):
    digits, _ = schema({"type": "string", "pattern": "^\\d+$"})
    assert digits.is_valid("123")
    assert not digits.is_valid("١٢٣")  # Arabic-Indic digits: \d is ASCII in ECMA-262
    assert not digits.is_valid("123\n")  # $ does not match before a final newline
    word, _ = schema({"type": "string", "pattern": "^\\w+$"})
    assert not word.is_valid("é")


def test_an_invalid_pattern_is_a_load_error_at_its_pointer(schema):
    with pytest.raises(SpecError) as caught:
        schema({"type": "object", "properties": {"a": {"type": "string", "pattern": "(unclosed"}}})
    assert caught.value.pointer == "/x-root/properties/a/pattern"
    assert "regular expression" in caught.value.message


def test_recursive_schemas(schema):
    components = {"Node": {"type": "object", "properties": {"children": {
        "type": "array", "items": {"$ref": "#/components/schemas/Node"}}, "v": {"type": "integer"}}}}
    validator, schemas = schema({"$ref": "#/components/schemas/Node"}, components)
    assert validator.is_valid({"children": [{"children": [{"v": 1}]}]})
    found = _violation(validator, schemas, {"children": [{"children": [{"v": "x"}]}]})
    assert found.pointer == "/children/0/children/0/v" and found.constraint == "type"


@pytest.mark.parametrize("node, instance", [
    ({"type": "string", "maxLength": 3}, "secret-value"),
    ({"type": "string", "pattern": "^a$"}, "secret-value"),
    ({"type": "string", "enum": ["a", "b"]}, "secret-value"),
    ({"type": "integer"}, "secret-value"),
    ({"type": "string", "format": "email"}, "secret-value"),
    ({"type": "object", "additionalProperties": False}, {"k": "secret-value"}),
    ({"not": {"type": "string"}}, "secret-value"),
    ({"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, "secret-value"),
    ({"const": "x"}, "secret-value"),
])
def test_explanations_never_quote_the_value(schema, node, instance):
    validator, schemas = schema(node)
    found = _violation(validator, schemas, instance)
    assert "secret" not in found.detail and "secret" not in found.pointer


def test_unsupported_keywords_are_load_errors(schema):
    with pytest.raises(SpecError, match=r"\$dynamicRef is not supported"):
        schema({"$dynamicRef": "#meta"})
    with pytest.raises(SpecError, match="items must be a Schema Object"):
        schema({"type": "array", "items": [{"type": "string"}]}, version="3.0")
