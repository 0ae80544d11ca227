"""Structured fields: canonical round trips, strictness, limits, and agreement with http-sf."""

from __future__ import annotations

import contextlib
import dataclasses
import decimal

import http_sf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extauthz.signatures import sf
from extauthz.signatures.sf import (
    InnerList,
    Item,
    Limits,
    StructuredFieldError,
    Token,
    parse_dictionary,
    parse_item,
    parse_list,
    serialize_dictionary,
    serialize_inner_list,
)


def test_rfc9421_example_dict_reserialization() -> None:
    assert serialize_dictionary(parse_dictionary("a=1,    b=2;x=1;y=2,   c=(a   b   c)")) == "a=1, b=2;x=1;y=2, c=(a b c)"


def test_bare_item_types() -> None:
    members = dict(parse_dictionary('i=-12, d=1.50, s="a \\"q\\" \\\\", t=tok/en:x, b=:aGk=:, y, n=?0'))
    assert members["i"] == Item(-12)
    assert members["d"] == Item(decimal.Decimal("1.50"))
    assert members["s"] == Item('a "q" \\')
    assert members["t"] == Item(Token("tok/en:x"))
    assert members["b"] == Item(b"hi")
    assert members["y"] == Item(True)
    assert members["n"] == Item(False)
    assert serialize_dictionary(list(members.items())) == 'i=-12, d=1.5, s="a \\"q\\" \\\\", t=tok/en:x, b=:aGk=:, y, n=?0'


def test_inner_list_with_parameters() -> None:
    ((_, inner),) = parse_dictionary('sig=("@method" "x";key="a");created=1;keyid="k"')
    assert isinstance(inner, InnerList)
    assert inner.items[1] == Item("x", (("key", "a"),))
    assert inner.param("created") == 1 and inner.param("keyid") == "k"


@pytest.mark.parametrize("text", [
    "a=1,", "a=1,,b=2", "A=1", "a=(1", 'a="x', 'a="\\x"', "a=1 b=2", "a=1;", "a=1;B", "a=:###:", "a=?2",
    "a=1234567890123456", "a=1.2345", "a=1., b=2", 'a="\x01"', "a=1, a=2", "a=1;p;p", "a=é",
])
def test_invalid_fields_are_rejected(text: str) -> None:
    with pytest.raises(StructuredFieldError):
        parse_dictionary(text)


def test_limits_stop_parsing_early() -> None:
    huge = "a=1" + "".join(f";p{i}" for i in range(10_000))
    with pytest.raises(StructuredFieldError, match="more than 32 parameters"):
        parse_dictionary(huge, Limits(max_length=1_000_000))
    with pytest.raises(StructuredFieldError, match="longer than"):
        parse_dictionary(huge)
    with pytest.raises(StructuredFieldError, match="members"):
        parse_list(", ".join(["1"] * 100))


def test_missing_base64_padding_is_accepted() -> None:
    assert parse_item(":aGk:").value == b"hi"


_keys = st.from_regex(r"[a-z*][a-z0-9_\-.*]{0,6}", fullmatch=True)
_bare = st.one_of(
    st.integers(-999_999_999_999_999, 999_999_999_999_999),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12),
    st.from_regex(r"[A-Za-z*][A-Za-z0-9!#$%&'*+\-.^_`|~:/]{0,8}", fullmatch=True).map(Token),
    st.binary(max_size=12),
    st.booleans(),
)
_params = st.lists(st.tuples(_keys, _bare), max_size=3, unique_by=lambda kv: kv[0]).map(tuple)
_items = st.builds(Item, _bare, _params)
_members = st.one_of(_items, st.builds(InnerList, st.lists(_items, max_size=3).map(tuple), _params))
_dicts = st.lists(st.tuples(_keys, _members), min_size=1, max_size=4, unique_by=lambda kv: kv[0])


@settings(max_examples=200, deadline=None)
@given(_dicts)
def test_our_serialization_round_trips_and_http_sf_agrees(members) -> None:
    text = serialize_dictionary(members)
    assert serialize_dictionary(parse_dictionary(text)) == text
    # An independent implementation reads the same structure and writes the same text.
    assert http_sf.ser(http_sf.parse(text.encode(), tltype="dictionary")) == text


# --- the scanner (parse_dictionary's fast path) against the step-by-step reference parser --------------------

_SMALL = Limits(max_length=96, max_members=2, max_inner_items=2, max_params=2)
_NOISE = st.sampled_from([
    *' \t"();=,:?*-.\\/+0129aAz', "?1", "?0", ";a", "=(", '"x"', ":aGk:", ":aGk=:", ":aGl=:", "00", "-0", "1.50",
    ", ", "  ", ";created=1", ";a=?1", "; b", "( ", " )", "=", "é",
])


@st.composite
def _texts(draw: st.DrawFn) -> str:
    """A serialized Dictionary, then a few random insertions, deletions and replacements."""
    text = serialize_dictionary(draw(_dicts))
    for _ in range(draw(st.integers(0, 3))):
        op, i, noise = draw(st.sampled_from("idr")), draw(st.integers(0, len(text))), draw(_NOISE)
        text = text[:i] + (noise if op != "d" else "") + text[i + (op != "i") :]
    return text


def _typed(value: object) -> object:
    """Structure with the type of every value made explicit (True == 1 in Python, not here)."""
    if isinstance(value, InnerList):
        return ("inner", [_typed(i) for i in value.items], _typed(value.params))
    if isinstance(value, Item):
        return ("item", _typed(value.value), _typed(value.params))
    if isinstance(value, list | tuple):
        return [_typed(v) for v in value]
    return (type(value).__name__, value)


def _reference(text: str, limits: Limits) -> list:
    parser = sf._Parser(text, limits)
    result = parser.dictionary()
    sf._done(parser)
    return result


def _outcome(parse, text: str, limits: Limits) -> tuple[str, object]:
    try:
        return "ok", _typed(parse(text, limits))
    except StructuredFieldError as exc:
        return "error", str(exc)


@settings(max_examples=600, deadline=None)
@given(_texts(), st.sampled_from([sf.DEFAULT_LIMITS, _SMALL]))
def test_scanner_and_reference_parser_agree(text: str, limits: Limits) -> None:
    assert _outcome(parse_dictionary, text, limits) == _outcome(_reference, text, limits)
    with contextlib.suppress(StructuredFieldError):
        members = parse_dictionary(text, limits)
        canonical_text = text == serialize_dictionary(members)
        for _, member in members:
            if isinstance(member, InnerList):
                fresh = serialize_inner_list(InnerList(member.items, member.params))
                # The kept text is always the canonical one, and canonical input is always kept.
                assert member.serialized in ((fresh, None) if not canonical_text else (fresh,))


@pytest.mark.parametrize("text", [
    "sig1=:aGk=:", "sig1=:aGk:", "sig1=:aGl=:", "sig1=::", "sig1=:a:", "sig1=:a===:", "sig1=:aGk=:;p=1",
    "  sha-256=:aGk=:  ", "sig1=:aGk=: ", "sig1=:aGk=:,", "sig1=:aGk=:, sig2=:aGk=:", "Sig1=:aGk=:", "*x=:aGk=:",
    "sig1=:aG k=:", "sig1=:aGk=", "sig1=:+/+/:", "sig1=:-_-_:", "s" * 70 + "=:aGk=:",
])  # fmt: skip
@pytest.mark.parametrize("limits", [sf.DEFAULT_LIMITS, _SMALL, Limits(max_length=96, max_members=0)])
def test_one_byte_sequence_member_is_read_as_the_reference_parser_reads_it(text: str, limits: Limits) -> None:
    """The Signature / Content-Digest shape has a one-match path of its own."""
    assert _outcome(parse_dictionary, text, limits) == _outcome(_reference, text, limits)


@pytest.mark.parametrize("text", [
    'sig1=( "@method" "@path");created=1', 'sig1=("@method"  "@path");created=1', 'sig1=("@method" );created=1',
    'sig1=("@method");created=01', 'sig1=("@method");created=-0', 'sig1=("@method");x=1.50',
    'sig1=("@method");x=?1', 'sig1=("@method"); created=1', 'sig1=("@method");b=:aGk:', 'sig1=("@method";sf=?1)',
    'sig1=("@method");b=:aGl=:',
])
def test_non_canonical_inner_lists_are_reserialized(text: str) -> None:
    ((_, inner),) = parse_dictionary(text)
    assert isinstance(inner, InnerList) and inner.serialized is None
    canonical = serialize_inner_list(inner)
    assert canonical != text[5:]
    assert http_sf.ser(http_sf.parse(f"sig1={canonical}".encode(), tltype="dictionary")) == f"sig1={canonical}"


def test_canonical_inner_list_keeps_its_text_until_changed_in_code() -> None:
    text = '("@method" "x";key="a" "y";sf);created=1;nonce="n \\"q\\"";keyid="k";b=:aGk=:;f=?0;t=tok'
    ((_, inner),) = parse_dictionary("sig1=" + text)
    assert isinstance(inner, InnerList) and inner.serialized == text
    assert serialize_inner_list(inner) == text
    changed = dataclasses.replace(inner, params=(("created", 2),))
    assert changed.serialized is None and serialize_inner_list(changed) == '("@method" "x";key="a" "y";sf);created=2'
    assert changed == InnerList(inner.items, (("created", 2),))


def test_same_covered_text_gives_the_same_items() -> None:
    """The scanner remembers the items of an inner list it has seen (the signature base relies on it)."""
    ((_, a),) = parse_dictionary('sig1=("@method" "@path");created=1;keyid="a"')
    ((_, b),) = parse_dictionary('sig1=("@method" "@path");created=2;keyid="b"')
    assert a.items is b.items  # type: ignore[union-attr]
