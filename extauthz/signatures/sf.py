"""Structured Field Values (RFC 8941 / RFC 9651) for the fields request signatures use.

Why our own parser rather than a library: it is small, it enforces hard size limits *while*
parsing (a 10,000-parameter ``Signature-Input`` stops at the limit instead of being built), it is
strict where RFC 9421 needs strictness (duplicate dictionary keys and duplicate parameters are
errors, not silent overwrites, so two signers cannot disagree on which label or ``created`` counts),
and it keeps the interoperability tests honest: the independent implementation we test against
(``http-message-signatures``) parses with ``http-sf``, so a shared parsing bug cannot cancel out.

Only what signatures need is modelled: Dictionaries, Lists, Inner Lists, Items and their
Parameters, with Integer, Decimal, String, Token, Byte Sequence and Boolean bare items.
Serialization is the canonical one of RFC 8941 section 4 (what RFC 9421 signs).

Two parsers, one grammar: ``_Parser`` walks the text step by step and is the reference (it also
reports every error, with its offset). Dictionaries -- the three fields read on every signed request
-- first go through a regex scanner that takes whole items and parameters in single matches, reuses
the parsed items of an inner list it has seen before (a client covers the same components on every
request) and remembers the text of an inner list that was already canonical, so the signature base
need not serialize it again. Whenever the scanner meets anything it does not fully handle (an
error, a limit, an unusual form), it gives up and the reference parser runs from the start; a
property test checks that both always agree.
"""

from __future__ import annotations

import base64
import binascii
import decimal
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

__all__ = [
    "BareItem",
    "InnerList",
    "Item",
    "Limits",
    "Member",
    "Params",
    "StructuredFieldError",
    "Token",
    "parse_dictionary",
    "parse_item",
    "parse_list",
    "serialize_bare_item",
    "serialize_dictionary",
    "serialize_inner_list",
    "serialize_item",
    "serialize_list",
    "serialize_member",
    "serialize_params",
]


class StructuredFieldError(ValueError):
    """The text is not a valid structured field (or exceeds a limit)."""


class Token(str):
    """An sf-token: a string that serializes without quotes."""

    __slots__ = ()


BareItem = int | decimal.Decimal | str | Token | bytes | bool
Params = tuple[tuple[str, BareItem], ...]


@dataclass(frozen=True, slots=True)
class Item:
    value: BareItem
    params: Params = ()

    def param(self, key: str, default: BareItem | None = None) -> BareItem | None:
        for name, value in self.params:
            if name == key:
                return value
        return default


@dataclass(frozen=True, slots=True)
class InnerList:
    items: tuple[Item, ...]
    params: Params = ()
    #: The text this list was parsed from when that text is already its canonical serialization
    #: (set by the parser only; a list built or replaced in code has None and is serialized).
    serialized: str | None = field(default=None, init=False, repr=False, compare=False)

    def param(self, key: str, default: BareItem | None = None) -> BareItem | None:
        for name, value in self.params:
            if name == key:
                return value
        return default


Member = Item | InnerList


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds applied while parsing; exceeding one is an error, never a truncation."""

    max_length: int = 16384
    max_members: int = 64
    max_inner_items: int = 64
    max_params: int = 32


DEFAULT_LIMITS = Limits()

_LCALPHA = frozenset("abcdefghijklmnopqrstuvwxyz")
_DIGITS = frozenset("0123456789")
_ALPHA = _LCALPHA | frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_B64_RE = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_MAX_INT = 999_999_999_999_999
# Regular expressions do the per-character scanning (much faster in CPython than a Python loop).
_KEY_RE = re.compile(r"[a-z*][a-z0-9_\-.*]*")
_STRING_RE = re.compile(r'"((?:[ !#-\[\]-~]|\\["\\])*)"')
_STRING_OK = re.compile(r"[ -~]*")
_TOKEN_RE = re.compile(r"[A-Za-z*][A-Za-z0-9!#$%&'*+\-.^_`|~:/]*")
_NUMBER_RE = re.compile(r"-?[0-9]+(?:\.[0-9]*)?")
_UNESCAPE = re.compile(r"\\(.)")


class _Parser:
    __slots__ = ("limits", "pos", "text")

    def __init__(self, text: str, limits: Limits) -> None:
        if len(text) > limits.max_length:
            raise StructuredFieldError(f"field is longer than {limits.max_length} characters")
        if not text.isascii():
            raise StructuredFieldError("field contains non-ASCII characters")
        self.text = text.strip(" ")  # leading/trailing SP are discarded (RFC 8941 4.2)
        self.pos = 0
        self.limits = limits

    def fail(self, what: str) -> StructuredFieldError:
        return StructuredFieldError(f"{what} at offset {self.pos}")

    def peek(self) -> str:
        return self.text[self.pos : self.pos + 1]

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def skip_sp(self) -> None:
        while self.peek() == " ":
            self.pos += 1

    def skip_ows(self) -> None:
        while self.peek() in (" ", "\t") and not self.at_end():
            self.pos += 1

    # --- top-level types ------------------------------------------------------------------------
    def dictionary(self) -> list[tuple[str, Member]]:
        members: list[tuple[str, Member]] = []
        seen: set[str] = set()
        while not self.at_end():
            key = self.key()
            if key in seen:
                raise self.fail(f"duplicate dictionary key {key!r}")
            seen.add(key)
            if self.peek() == "=":
                self.pos += 1
                member = self.member()
            else:
                member = Item(True, self.params())
            members.append((key, member))
            if len(members) > self.limits.max_members:
                raise self.fail(f"more than {self.limits.max_members} members")
            if not self.comma():
                break
        return members

    def list(self) -> list[Member]:
        members: list[Member] = []
        while not self.at_end():
            members.append(self.member())
            if len(members) > self.limits.max_members:
                raise self.fail(f"more than {self.limits.max_members} members")
            if not self.comma():
                break
        return members

    def comma(self) -> bool:
        """After a member: True if another member follows; error on trailing garbage/comma."""
        self.skip_ows()
        if self.at_end():
            return False
        if self.peek() != ",":
            raise self.fail("expected ',' between members")
        self.pos += 1
        self.skip_ows()
        if self.at_end():
            raise self.fail("trailing ','")
        return True

    def member(self) -> Member:
        if self.peek() == "(":
            return self.inner_list()
        return self.item()

    def inner_list(self) -> InnerList:
        self.pos += 1  # "("
        items: list[Item] = []
        while True:
            self.skip_sp()
            if self.peek() == ")":
                self.pos += 1
                return InnerList(tuple(items), self.params())
            if self.at_end():
                raise self.fail("unterminated inner list")
            items.append(self.item())
            if len(items) > self.limits.max_inner_items:
                raise self.fail(f"inner list has more than {self.limits.max_inner_items} items")
            if self.peek() not in (" ", ")"):
                raise self.fail("expected ' ' or ')' in inner list")

    def item(self) -> Item:
        value = self.bare_item()
        return Item(value, self.params())

    def params(self) -> Params:
        params: list[tuple[str, BareItem]] = []
        seen: set[str] = set()
        while self.peek() == ";":
            self.pos += 1
            self.skip_sp()
            key = self.key()
            if key in seen:
                raise self.fail(f"duplicate parameter {key!r}")
            seen.add(key)
            value: BareItem = True
            if self.peek() == "=":
                self.pos += 1
                value = self.bare_item()
            params.append((key, value))
            if len(params) > self.limits.max_params:
                raise self.fail(f"more than {self.limits.max_params} parameters")
        return tuple(params)

    def key(self) -> str:
        match = _KEY_RE.match(self.text, self.pos)
        if match is None:
            raise self.fail("expected a key (lower-case letter or '*')")
        self.pos = match.end()
        return match.group()

    # --- bare items ---------------------------------------------------------------------------------
    def bare_item(self) -> BareItem:
        c = self.peek()
        if c == "-" or (c and c in _DIGITS):
            return self.number()
        if c == '"':
            return self.string()
        if c == ":":
            return self.byte_sequence()
        if c == "?":
            return self.boolean()
        if c and (c in _ALPHA or c == "*"):
            return self.token()
        raise self.fail("expected an item")

    def number(self) -> int | decimal.Decimal:
        match = _NUMBER_RE.match(self.text, self.pos)
        if match is None:
            raise self.fail("number without digits")
        number = match.group()
        self.pos = match.end()
        integral, dot, fraction = number.lstrip("-").partition(".")
        if not dot:
            if len(integral) > 15:
                raise self.fail("integer has more than 15 digits")
            return int(number)
        if len(integral) > 12 or not fraction or len(fraction) > 3:
            raise self.fail("decimal out of range")
        return decimal.Decimal(number)

    def string(self) -> str:
        match = _STRING_RE.match(self.text, self.pos)
        if match is None:
            raise self.fail("invalid string (unterminated, bad escape or control character)")
        self.pos = match.end()
        value = match.group(1)
        return _UNESCAPE.sub(r"\1", value) if "\\" in value else value

    def token(self) -> Token:
        match = _TOKEN_RE.match(self.text, self.pos)
        assert match is not None  # bare_item checked the first character
        self.pos = match.end()
        return Token(match.group())

    def byte_sequence(self) -> bytes:
        self.pos += 1
        end = self.text.find(":", self.pos)
        if end < 0:
            raise self.fail("unterminated byte sequence")
        encoded = self.text[self.pos:end]
        if _B64_RE.fullmatch(encoded) is None:
            raise self.fail("byte sequence is not base64")
        self.pos = end + 1
        padded = encoded + "=" * (-len(encoded) % 4)  # parsers should accept missing padding
        try:
            return base64.b64decode(padded, validate=True)
        except (binascii.Error, ValueError):
            raise self.fail("byte sequence is not valid base64") from None

    def boolean(self) -> bool:
        self.pos += 1
        c = self.peek()
        if c not in ("0", "1") or not c:
            raise self.fail("boolean must be ?0 or ?1")
        self.pos += 1
        return c == "1"


# --- the scanner: dictionaries of well-formed input in few regex matches ---------------------------------------


def _bare_pattern(capture: bool) -> str:
    """A bare item; with ``capture``, one group per type, in this order: number, string content
    (escapes kept), byte sequence content, boolean digit, token. Quantifiers are possessive, so a
    match is the one the step-by-step parser makes (no backtracking into a shorter number/token)."""
    g = "(" if capture else "(?:"
    return (
        g + r"-?[0-9]++(?:\.[0-9]*+)?+)"
        + '|"' + g + r'[ !#-\[\]-~]*+(?:\\["\\][ !#-\[\]-~]*+)*+)"'
        + "|:" + g + r"[A-Za-z0-9+/]*+={0,2}+):"
        + r"|\?" + g + "[01])"
        + "|" + g + r"[A-Za-z*][A-Za-z0-9!#$%&'*+\-.^_`|~:/]*+)"
    )


_KEY_PATTERN = r"[a-z*][a-z0-9_\-.*]*+"
#: One parameter: group 1 the spaces after ';', group 2 the key, groups 3-7 the value (_bare_pattern).
#: A '=' must be followed by a bare item (else no match), so a bad value is never skipped over.
_PARAM_RE = re.compile(r";( *+)(" + _KEY_PATTERN + r")(?:=(?:" + _bare_pattern(True) + r")|(?!=))")
_ITEM_PATTERN = "(?:" + _bare_pattern(False) + r")(?:; *+" + _KEY_PATTERN + "(?:=(?:" + _bare_pattern(False) + "))?+)*+"
#: An inner list up to its ')' (items are checked for separators when parsed).
_INNER_RE = re.compile(r"\((?: |" + _ITEM_PATTERN + r")*+\)")
#: A Dictionary member up to its parameters: group 1 the key, then either nothing (a bare key: true),
#: groups 2-6 a bare item (_bare_pattern), or group 7 the '(' opening an inner list.
_MEMBER_RE = re.compile("(" + _KEY_PATTERN + ")(?:=(?:" + _bare_pattern(True) + r"|(\())|(?!=))")
_COMMA_RE = re.compile(r"[ \t]*+,[ \t]*+")
#: The scanner takes inner lists up to this long (a Signature-Input's is a few hundred characters);
#: longer ones, hostile or not, go to the reference parser, which stops at the first limit.
_SCANNED_INNER_LENGTH = 1024


class _NotSimple(Exception):
    """The scanner leaves this text to the step-by-step parser (an error, a limit, a rare form)."""


def _bare_value(raw: str, kind: int) -> BareItem:
    """The value of group ``kind`` (0-4) of _bare_pattern, checked as the reference parser does."""
    if kind == 1:  # string
        return _UNESCAPE.sub(r"\1", raw) if "\\" in raw else raw
    if kind == 0:
        integral, dot, fraction = raw.lstrip("-").partition(".")
        if not dot:
            if len(integral) > 15:
                raise _NotSimple
            return int(raw)
        if len(integral) > 12 or not fraction or len(fraction) > 3:
            raise _NotSimple
        return decimal.Decimal(raw)
    if kind == 2:
        padded = raw + "=" * (-len(raw) % 4)  # parsers should accept missing padding
        try:
            return binascii.a2b_base64(padded, strict_mode=True)  # what b64decode(validate=True) does
        except (binascii.Error, ValueError):
            raise _NotSimple from None
    if kind == 3:
        return raw == "1"
    return Token(raw)


def _scan_params(text: str, pos: int, limits: Limits) -> tuple[Params, int, bool]:
    """(parameters, end offset, whether their text is canonical). Strings, small integers and
    tokens -- what signature parameters are made of -- are read inline; the rest by _bare_value."""
    if not text.startswith(";", pos):
        return (), pos, True
    params: list[tuple[str, BareItem]] = []
    keys: list[str] = []
    canonical = True
    while True:
        match = _PARAM_RE.match(text, pos)
        if match is None:
            raise _NotSimple
        spaces, key, number, string, byte_sequence, boolean, token = match.groups()
        if key in keys or len(keys) >= limits.max_params:
            raise _NotSimple
        keys.append(key)
        value: BareItem
        if string is not None:  # always canonical: the only escapes accepted are the canonical ones
            value = _UNESCAPE.sub(r"\1", string) if "\\" in string else string
        elif number is not None and len(number) <= 15 and "." not in number:
            value = int(number)
            if number[0] in "-0":  # "-0", "007" are not canonical
                canonical = canonical and str(value) == number
        elif token is not None:
            value = Token(token)
        elif number is None and byte_sequence is None and boolean is None:
            value = True
        else:
            kind = 0 if number is not None else 2 if byte_sequence is not None else 3
            raw: str = number if kind == 0 else byte_sequence if kind == 2 else boolean
            value = _bare_value(raw, kind)
            canonical = canonical and _is_canonical(value, raw, kind)
        if spaces:
            canonical = False
        params.append((key, value))
        pos = match.end()
        if not text.startswith(";", pos):
            return tuple(params), pos, canonical


def _is_canonical(value: BareItem, raw: str, kind: int) -> bool:
    """Whether a number (kind 0), byte sequence (2, ``raw`` without its colons) or boolean (3, "0"
    or "1") parameter value was written canonically; ";a=?1" is canonically ";a"."""
    if kind == 2:
        return serialize_bare_item(value) == ":" + raw + ":"
    if kind == 3:
        return value is False
    return serialize_bare_item(value) == raw


@functools.lru_cache(maxsize=256)
def _inner_items(region: str, max_items: int, max_params: int) -> tuple[tuple[Item, ...], str | None]:
    """The items of an inner list "(...)" (without its parameters), by the reference parser, and
    ``region`` itself when it is canonical. Remembered: clients repeat their covered components."""
    parser = _Parser(region, Limits(len(region), 1, max_items, max_params))
    try:
        inner = parser.inner_list()
    except StructuredFieldError:
        raise _NotSimple from None
    if not parser.at_end():
        raise _NotSimple
    try:
        canonical = serialize_inner_list(inner) == region
    except StructuredFieldError:
        canonical = False
    return inner.items, (region if canonical else None)


def _scan_inner_list(text: str, pos: int, limits: Limits) -> tuple[InnerList, int]:
    # A match cut short by the end bound can only fail, never end elsewhere: the ')' must be in view.
    match = _INNER_RE.match(text, pos, pos + _SCANNED_INNER_LENGTH)
    if match is None:
        raise _NotSimple
    items, canonical = _inner_items(match.group(), limits.max_inner_items, limits.max_params)
    params, end, canonical_params = _scan_params(text, match.end(), limits)
    inner = InnerList(items, params)
    if canonical is not None and canonical_params:
        object.__setattr__(inner, "serialized", text[pos:end])
    return inner, end


def _scan_dictionary(text: str, limits: Limits) -> list[tuple[str, Member]]:
    """What _Parser.dictionary() returns for ``text`` (already stripped), or _NotSimple."""
    members: list[tuple[str, Member]] = []
    keys: set[str] = set()
    pos, end = 0, len(text)
    while pos < end:
        match = _MEMBER_RE.match(text, pos)
        if match is None:
            raise _NotSimple
        key = match.group(1)
        if key in keys or len(keys) >= limits.max_members:
            raise _NotSimple
        keys.add(key)
        kind: int = match.lastindex  # type: ignore[assignment]
        member: Member
        if kind == 7:  # "=(": an inner list
            member, pos = _scan_inner_list(text, match.end() - 1, limits)
        else:
            value = True if kind == 1 else _bare_value(match.group(kind), kind - 2)
            pos = match.end()
            params: Params = ()
            if text.startswith(";", pos):
                params, pos, _ = _scan_params(text, pos, limits)
            member = Item(value, params)
        members.append((key, member))
        if pos == end:
            break
        match = _COMMA_RE.match(text, pos)
        if match is None or match.end() == end:
            raise _NotSimple
        pos = match.end()
    return members


def _done(parser: _Parser) -> None:
    if not parser.at_end():
        raise parser.fail("unexpected characters")


#: A Dictionary of one byte-sequence member without parameters: the shape of a Signature field
#: ("sig1=:...:") and of most Content-Digest fields ("sha-256=:...:"), read with one match.
_ONE_BYTES_MEMBER_RE = re.compile("(" + _KEY_PATTERN + r")=:([A-Za-z0-9+/]*+={0,2}+):")


def parse_dictionary(text: str, limits: Limits = DEFAULT_LIMITS) -> list[tuple[str, Member]]:
    """Parse a Dictionary, keeping member order; duplicate keys are an error."""
    if len(text) <= limits.max_length and text.isascii():
        stripped = text.strip(" ")
        try:
            match = _ONE_BYTES_MEMBER_RE.fullmatch(stripped)
            if match is not None and limits.max_members:
                return [(match.group(1), Item(_bare_value(match.group(2), 2)))]
            return _scan_dictionary(stripped, limits)
        except _NotSimple:
            pass  # the reference parser decides, and explains any error
    parser = _Parser(text, limits)
    result = parser.dictionary()
    _done(parser)
    return result


def parse_list(text: str, limits: Limits = DEFAULT_LIMITS) -> list[Member]:
    parser = _Parser(text, limits)
    result = parser.list()
    _done(parser)
    return result


def parse_item(text: str, limits: Limits = DEFAULT_LIMITS) -> Item:
    parser = _Parser(text, limits)
    if parser.at_end():
        raise StructuredFieldError("empty item")
    result = parser.item()
    _done(parser)
    return result


# --- serialization (RFC 8941 section 4.1) ---------------------------------------------------------------


def serialize_bare_item(value: BareItem) -> str:
    kind = type(value)
    if kind is str:  # the common case (component names, keyid, nonce, tag): checked first
        text = cast(str, value)
        if _STRING_OK.fullmatch(text) is None:
            raise StructuredFieldError("string has characters outside printable ASCII")
        if '"' in text or "\\" in text:
            return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return '"' + text + '"'
    if kind is int:
        if abs(cast(int, value)) > _MAX_INT:
            raise StructuredFieldError("integer out of range")
        return str(value)
    if isinstance(value, bool):
        return "?1" if value else "?0"
    if isinstance(value, int):
        if abs(value) > _MAX_INT:
            raise StructuredFieldError("integer out of range")
        return str(value)
    if isinstance(value, decimal.Decimal):
        rounded = value.quantize(decimal.Decimal("0.001"), rounding=decimal.ROUND_HALF_EVEN)
        negative = rounded.is_signed() and rounded != 0
        text = f"{abs(rounded):f}"
        integral, _, fraction = text.partition(".")
        if len(integral) > 12:
            raise StructuredFieldError("decimal out of range")
        fraction = fraction.rstrip("0") or "0"
        return f"{'-' if negative else ''}{integral}.{fraction}"
    if isinstance(value, Token):
        if _TOKEN_RE.fullmatch(value) is None:
            raise StructuredFieldError(f"invalid token {value!r}")
        return str(value)
    if isinstance(value, str):
        if _STRING_OK.fullmatch(value) is None:
            raise StructuredFieldError("string has characters outside printable ASCII")
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bytes):
        return ":" + base64.b64encode(value).decode("ascii") + ":"
    raise StructuredFieldError(f"cannot serialize {type(value).__name__}")


def _serialize_key(key: str) -> str:
    if _KEY_RE.fullmatch(key) is None:
        raise StructuredFieldError(f"invalid key {key!r}")
    return key


def serialize_params(params: Iterable[tuple[str, BareItem]]) -> str:
    out = []
    for key, value in params:
        out.append(";" + _serialize_key(key))
        if value is not True:
            out.append("=" + serialize_bare_item(value))
    return "".join(out)


def serialize_item(item: Item) -> str:
    return serialize_bare_item(item.value) + serialize_params(item.params)


def serialize_inner_list(inner: InnerList) -> str:
    if inner.serialized is not None:
        return inner.serialized
    return "(" + " ".join(serialize_item(i) for i in inner.items) + ")" + serialize_params(inner.params)


def serialize_member(member: Member) -> str:
    return serialize_inner_list(member) if isinstance(member, InnerList) else serialize_item(member)


def serialize_list(members: Iterable[Member]) -> str:
    return ", ".join(serialize_member(m) for m in members)


def serialize_dictionary(members: Iterable[tuple[str, Member]]) -> str:
    out = []
    for key, member in members:
        if isinstance(member, Item) and member.value is True:
            out.append(_serialize_key(key) + serialize_params(member.params))
        else:
            out.append(_serialize_key(key) + "=" + serialize_member(member))
    return ", ".join(out)
