"""JSON bodies: the parse, the bounds, the exact shape, duplicate keys, and the strings text."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extauthz.payload import PARSE_MAX_VALUES, BodyProblem, JsonDocument, JsonLimits
from extauthz.payload.json_body import parse_json


def parsed(raw: bytes) -> JsonDocument:
    document = parse_json(raw)
    assert isinstance(document, JsonDocument), document
    return document


def problem(raw: bytes, **limits: object) -> BodyProblem | None:
    result = parse_json(raw)
    if isinstance(result, BodyProblem):
        return result
    return result.problem(JsonLimits(**limits))  # type: ignore[arg-type]


def test_an_ordinary_body_is_within_the_default_limits_and_its_strings_are_one_text() -> None:
    raw = orjson.dumps({"user": {"name": "O'Brien", "tags": ["a", "b"]}, "price": 9.99, "at": "10:30"})
    document = parsed(raw)
    assert document.problem(JsonLimits()) is None
    # Every string on a line of its own (odd lines), punctuation and numbers between them.
    assert document.text.split("\n")[1::2] == ["user", "name", "O'Brien", "tags", "a", "b", "price", "at", "10:30"]
    assert set("".join(document.text.split("\n")[0::2])) <= set('{}[]:, 9.')
    assert document.shape.depth == 3
    assert document.structure == (4, 5, 1, 2)


def test_escapes_are_decoded_in_the_text() -> None:
    raw = rb'{"q": "a\"b\\c\u0041\n\ud83d\ude00\/", "k\u00e9": "\\u0024"}'
    assert parsed(raw).text == '{\nq\n: \na"b\\cA\n\U0001f600/\n, \nk\u00e9\n: \n\\u0024\n}'


@pytest.mark.parametrize(
    ("raw", "pointer"),
    [
        (b'{"a": 1, "a": 2}', ""),
        (b'{"a": {"b": 1, "b": 2}}', "/a"),
        (b'[{"x": 1}, {"x": 1, "y": 2, "x": 3}]', "/1"),
        (b'{"c": "\\u003a", "a": 1, "a": 2}', ""),  # an escaped colon cannot hide the duplicate
        (b'{"a:b": 1, "a:b": 2}', ""),
    ],
)
def test_duplicate_keys_are_refused_with_the_pointer_of_the_object(raw: bytes, pointer: str) -> None:
    found = problem(raw)
    assert found is not None and (found.reason, found.status, found.pointer) == ("body_duplicate_key", 400, pointer)
    assert problem(raw, allow_duplicate_keys=True) is None


@pytest.mark.parametrize("raw", [b'{"a": "x:y", "b": "10:30:00"}', b'[{"a": 1}, {"a": 2}]', b'{"\\u003a": ":"}'])
def test_colons_in_strings_and_repeated_keys_across_objects_are_not_duplicates(raw: bytes) -> None:
    assert problem(raw) is None


def test_each_limit_names_itself_and_the_pointer() -> None:
    deep = b"[" * 40 + b"]" * 40
    found = problem(deep)
    assert found is not None and (found.limit, found.status) == ("depth", 413)
    assert found.pointer == "/0" * 32
    assert problem(deep, max_depth=40) is None
    wide = orjson.dumps({"list": list(range(20)), "obj": {str(i): i for i in range(20)}})
    items, members = problem(wide, max_items=10), problem(wide, max_members=10)
    assert items is not None and (items.limit, items.pointer) == ("items", "/list")
    assert members is not None and (members.limit, members.pointer) == ("members", "/obj")
    long_string = problem(orjson.dumps({"a": {"b": "x" * 100}}), max_string_length=50)
    assert long_string is not None and (long_string.limit, long_string.pointer) == ("string_length", "/a/b")
    long_key = problem(orjson.dumps({"k" * 100: 1}), max_string_length=50)
    assert long_key is not None and long_key.limit == "string_length"
    values = problem(orjson.dumps([[1, 2], [3, 4]]), max_values=5)
    assert values is not None and values.limit == "values"


def test_long_numbers_are_seen_in_the_raw_text_not_in_strings() -> None:
    number = b"1" * 70
    found = problem(b'{"n": ' + number + b"}")
    assert found is not None and found.limit == "number_length"
    assert problem(b'{"n": "' + number + b'"}') is None  # a string of digits is a string
    assert problem(b'{"n": 1.' + b"0" * 40 + b"}") is None
    assert problem(b'{"n": 1.' + b"0" * 40 + b"}", max_number_length=20) is not None


@pytest.mark.parametrize(
    ("raw", "reason", "limit"),
    [
        (b'{"a": ', "body_malformed", ""),
        (b"[1,]", "body_malformed", ""),
        (b'"\\ud800"', "body_malformed", ""),
        (b'{"a": NaN}', "body_malformed", ""),
        (b"[" * 2000 + b"]" * 2000, "body_limit_exceeded", "depth"),
        (b"1e999", "body_limit_exceeded", "number_length"),
        (b"[" + b",".join([b"0"] * PARSE_MAX_VALUES) + b"]", "body_limit_exceeded", "values"),
        (b"[" + b",".join([b"[]"] * PARSE_MAX_VALUES) + b"]", "body_limit_exceeded", "values"),
    ],
)
def test_malformed_and_over_the_ceiling_bodies_are_problems(raw: bytes, reason: str, limit: str) -> None:
    found = parse_json(raw)
    assert isinstance(found, BodyProblem) and (found.reason, found.limit) == (reason, limit)


def test_commas_inside_strings_do_not_count_as_values() -> None:
    csv = orjson.dumps({"csv": ",".join(["1"] * (PARSE_MAX_VALUES + 10))})
    assert problem(csv) is None


def test_find_yields_pointers_of_matching_strings_and_keys() -> None:
    document = parsed(orjson.dumps({"a/b": ["x", {"~k": "x"}], "x": "y"}))
    assert list(document.find(lambda s: s == "x")) == ["/a~1b/0", "/a~1b/1/~0k"]
    assert list(document.find(lambda s: s == "x", keys=True)) == ["/a~1b/0", "/a~1b/1/~0k", "/x"]


def _reference_strings(value: object) -> list[str]:
    out: list[str] = []
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            out.append(key)
            out.extend(_reference_strings(item))
    elif isinstance(value, list):
        for item in value:
            out.extend(_reference_strings(item))
    return out


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(json_values, st.booleans())
def test_text_holds_every_string_of_the_document(value: object, ascii_only: bool) -> None:
    raw = json.dumps(value, ensure_ascii=ascii_only).encode()
    document = parsed(raw)
    for string in _reference_strings(orjson.loads(raw)):
        assert "\n" + string + "\n" in document.text
    assert document.has_duplicate_keys() is False


_TRICKY = st.lists(st.sampled_from(['"', "\\", "/", "u", "0", "0041", "005c", "\x01", "\x02", "\n", "\t", "a", "\u00e9",
                                    "\u4e2d", "\U0001f600", "\ue000", "'"]), max_size=12).map("".join)


@settings(max_examples=400, deadline=None)
@given(st.lists(_TRICKY | st.text(max_size=12).filter(lambda s: not any("\ud800" <= c <= "\udfff" for c in s)),
                max_size=6), st.booleans())
def test_text_decodes_every_escape_exactly(strings: list[str], ascii_only: bool) -> None:
    # The exact text for an array of strings: each decoded on a line of its own, ", " between them.
    raw = json.dumps(strings, ensure_ascii=ascii_only).encode()
    assert parsed(raw).text == "[" + ", ".join(f"\n{string}\n" for string in strings) + "]"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.text(alphabet='{}[],:"\\ 0123456789.eEtrufalsn-u', max_size=200).map(str.encode))
def test_any_input_is_a_document_or_a_problem_never_an_exception(raw: bytes) -> None:
    result = parse_json(raw)
    if isinstance(result, JsonDocument):
        result.problem(JsonLimits())
        assert isinstance(result.text, str)
