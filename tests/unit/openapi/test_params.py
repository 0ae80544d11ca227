"""Parameters: style/explode deserialization and typing by schema, before validation."""

from __future__ import annotations

import pytest

from extauthz.openapi.params import (
    BadParameter,
    Parameter,
    Shape,
    coercer_for,
    deserialize,
    deserialize_label,
    deserialize_simple,
    parse_cookies,
    parse_query,
    schema_shape,
)

INT_ARRAY = {"type": "array", "items": {"type": "integer"}}
OBJECT = {"type": "object", "properties": {"role": {"type": "string"}, "age": {"type": "integer"}}}


def _param(schema, location="query", style="form", explode=None, **kw) -> Parameter:
    explode = style == "form" if explode is None else explode
    return Parameter("p", location, False, style, explode, schema_shape(schema, {}), None, **kw)


def test_coercion_picks_the_narrowest_type_the_schema_allows():
    assert coercer_for({"type": "integer"}, {})("42") == 42
    assert coercer_for({"type": "integer"}, {})("4.2") == "4.2"  # the schema then refuses the text
    assert coercer_for({"type": "number"}, {})("4.5") == 4.5
    assert coercer_for({"type": "number"}, {})("nan") == "nan"
    assert coercer_for({"type": "boolean"}, {})("true") is True
    assert coercer_for({"type": "boolean"}, {})("1") == "1"
    assert coercer_for({"type": "string"}, {})("42") == "42"
    assert coercer_for({"type": ["integer", "null"]}, {})("null") is None
    assert coercer_for({"oneOf": [{"type": "integer"}, {"type": "string"}]}, {})("7") == 7
    assert coercer_for({"$ref": "#/$defs/N"}, {"N": {"type": "integer"}})("7") == 7


def test_query_values_are_decoded_then_split():
    assert parse_query("a=1&b=x%2Cy&c=&d&a=2") == [("a", "1"), ("b", "x%2Cy"), ("c", ""), ("d", ""), ("a", "2")]
    array = _param(INT_ARRAY, explode=False)
    assert deserialize(array, ["1,2,3"]) == [1, 2, 3]
    # An encoded comma separates too, as most clients send it (openapi-core reads it the same way).
    strings = _param({"type": "array", "items": {"type": "string"}}, explode=False)
    assert deserialize(strings, ["a%2Cb,c"]) == ["a", "b", "c"]
    with pytest.raises(BadParameter):
        parse_query("%ff=1")


@pytest.mark.parametrize("style, explode, values, expected", [
    ("form", True, ["1", "2"], [1, 2]),
    ("form", False, ["1,2"], [1, 2]),
    ("spaceDelimited", False, ["1%202"], [1, 2]),
    ("spaceDelimited", False, ["1+2"], [1, 2]),
    ("pipeDelimited", False, ["1|2"], [1, 2]),
    ("pipeDelimited", False, ["1%7C2"], [1, 2]),
])
def test_query_array_styles(style, explode, values, expected):
    assert deserialize(_param(INT_ARRAY, style=style, explode=explode), values) == expected


def test_a_single_value_given_twice_is_refused():
    with pytest.raises(BadParameter, match="more than once"):
        deserialize(_param({"type": "integer"}), ["1", "2"])
    with pytest.raises(BadParameter, match="more than once"):
        deserialize(_param(INT_ARRAY, explode=False), ["1", "2"])


def test_query_plus_is_a_space_and_utf8_is_required():
    assert deserialize(_param({"type": "string"}), ["a+b%C3%A9"]) == "a bé"
    with pytest.raises(BadParameter, match="UTF-8"):
        deserialize(_param({"type": "string"}), ["%ff"])


def test_simple_style_in_path_and_header():
    path = _param(INT_ARRAY, location="path", style="simple", explode=False)
    assert deserialize_simple(path, "3,4") == [3, 4]
    obj = _param(OBJECT, location="path", style="simple", explode=False)
    assert deserialize_simple(obj, "role,admin,age,3") == {"role": "admin", "age": 3}
    exploded = _param(OBJECT, location="path", style="simple", explode=True)
    assert deserialize_simple(exploded, "role=admin,age=3") == {"role": "admin", "age": 3}
    with pytest.raises(BadParameter):
        deserialize_simple(obj, "role,admin,age")
    primitive = _param({"type": "string"}, location="path", style="simple", explode=False)
    assert deserialize_simple(primitive, "a%20b") == "a b"  # path segments: + is a plus
    assert deserialize_simple(primitive, "a+b") == "a+b"


def test_label_style():
    assert deserialize_label(_param({"type": "integer"}, location="path", style="label"), ".5") == 5
    assert deserialize_label(_param(INT_ARRAY, location="path", style="label", explode=False), ".1,2") == [1, 2]
    assert deserialize_label(_param(INT_ARRAY, location="path", style="label", explode=True), ".1.2") == [1, 2]
    with pytest.raises(BadParameter, match="label"):
        deserialize_label(_param({"type": "integer"}, location="path", style="label"), "5")


def test_json_content_parameters():
    param = Parameter("f", "query", False, "form", True, Shape("primitive"), None, json_content=True)
    assert deserialize(param, ['%7B%22a%22%3A1%7D']) == {"a": 1}
    with pytest.raises(BadParameter, match="JSON"):
        deserialize(param, ["%7B"])


def test_cookies():
    assert parse_cookies('a=1; b="two"; junk; c=') == [("a", "1"), ("b", "two"), ("c", "")]
