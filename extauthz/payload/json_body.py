"""JSON bodies: parsed once with orjson, after a pre-scan that bounds what the parse can cost.

Why this way (measured on the project's 2-core machine, 64 KiB bodies; ``bench/payload_bench.py``):
orjson parses a 64 KiB document in 0.05-2.5 ms depending on how many values it holds, ijson's C
backend takes 3-8 ms for the same documents (a Python event per token), and Python's ``json`` with an
``object_pairs_hook`` is 10x slower than orjson on ordinary bodies. The cost of a parse, and of the one
walk over the result that measures its shape, grows with the number of values, not with the size: so
before parsing, three byte counts (commas and opening brackets: C speed, no objects) bound the number
of values, and a body above the ceiling is refused without being parsed. Within the ceiling the walk
measures the exact shape (depth, members per object, items per array, string lengths, duplicate keys),
which each consumer compares with its own :class:`JsonLimits`.

Duplicate keys cannot be seen in orjson's result (the last one wins), so they are found by counting:
the colons of the raw text that are outside strings must equal the members the walk counted.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import re2

from extauthz.payload.problems import BodyProblem

__all__ = [
    "PARSE_MAX_BYTES",
    "PARSE_MAX_VALUES",
    "JsonDocument",
    "JsonLimits",
    "JsonShape",
    "escape_pointer_token",
    "parse_json",
]

#: Bodies larger than this are not parsed at all (Envoy's ``max_request_bytes`` is usually far less).
PARSE_MAX_BYTES = 1 << 20
#: A document with more values than this (counted from commas and brackets before parsing) is
#: refused unparsed: parse and walk cost grow with the number of values, and this bounds them.
PARSE_MAX_VALUES = 10_000
#: Number tokens shorter than this are never reported: policies set ``maxNumberLength`` >= it.
NUMBER_LENGTH_FLOOR = 16

_ESCAPED_COLONS = (b"\\u003a", b"\\u003A")


@dataclass(frozen=True, slots=True)
class JsonLimits:
    """What a consumer accepts of a JSON document. Every count is inclusive (``max_depth=32``
    accepts depth 32). Consumers compare them with a document's :class:`JsonShape`."""

    max_depth: int = 32
    #: Members of one object.
    max_members: int = 1000
    #: Items of one array.
    max_items: int = 10_000
    #: Characters of one string, keys included (after JSON escapes are decoded).
    max_string_length: int = 1 << 20
    #: Characters of one number token as sent (at least NUMBER_LENGTH_FLOOR).
    max_number_length: int = 64
    #: Values in the whole document (containers and scalars; keys not counted).
    max_values: int = PARSE_MAX_VALUES
    allow_duplicate_keys: bool = False


@dataclass(frozen=True, slots=True)
class JsonShape:
    """What the walk measured of a document: the figures limits are compared with."""

    depth: int
    max_members: int
    max_items: int
    max_string_length: int
    values: int
    members: int


@dataclass(slots=True)
class JsonDocument:
    """A parsed document, with what consumers ask of it computed on first use.

    ``text`` is the document as text with every string on a line of its own (the quotes that delimit
    strings turned into line breaks, JSON escapes decoded): an inspector scans every key and value in
    one pass, the punctuation and numbers between them on lines of their own keep a match from
    running from one value into the next, and :meth:`find` spells pointers only when something
    matched. ``shape`` is exact but costs a walk over the value: :meth:`problem` first compares the
    limits with bounds counted from the raw bytes, and walks only when a bound is over.
    """

    value: Any
    raw: bytes = field(repr=False)
    _structure: tuple[int, int, int, int] | None = field(default=None, repr=False)
    _outside: bytes | None = field(default=None, repr=False)
    _text: str | None = field(default=None, repr=False)
    _shape: JsonShape | None = field(default=None, repr=False)
    _duplicates: bool | None = field(default=None, repr=False)
    _long_numbers: dict[int, bool] = field(default_factory=dict, repr=False)

    @property
    def text(self) -> str:
        """Every string (keys included), decoded, on a line of its own; between them, lines of
        punctuation, numbers and literals (a string's own newlines stay)."""
        if self._text is None:
            self._text = _document_text(self.raw)
        return self._text

    @property
    def outside(self) -> bytes:
        """The raw text outside strings (structure, numbers, literals, whitespace)."""
        if self._outside is None:
            self._outside = b"".join(_split_strings(self.raw, b"\\" in self.raw)[0::2])
        return self._outside

    @property
    def structure(self) -> tuple[int, int, int, int]:
        """Commas, colons, '[' and '{' outside strings: exact counts, no walk."""
        if self._structure is None:
            outside = self.outside
            self._structure = (outside.count(b","), outside.count(b":"), outside.count(b"["), outside.count(b"{"))
        return self._structure

    @property
    def shape(self) -> JsonShape:
        """The exact shape (a walk over the whole value, remembered). Duplicate keys are not part of
        it: orjson's value cannot show them (see :meth:`has_duplicate_keys`)."""
        if self._shape is None:
            self._shape = _walk(self.value)
        return self._shape

    def _shape_without_strings(self) -> JsonShape:
        """The shape without string lengths (0): when the whole body is shorter than the string limit,
        no string can be over it, and measuring them is most of the walk's cost."""
        return self._shape if self._shape is not None else _walk(self.value, strings=False)

    def has_duplicate_keys(self) -> bool:
        """Whether an object repeats a key (orjson kept the last).

        orjson's re-serialisation of the value holds each kept member once, with its key and value,
        and writes every colon of a string as ':'; ``text`` holds every member as sent, escapes
        decoded. Without a dropped member both have the same colons; a dropped member takes at least
        its own colon with it."""
        if self._duplicates is None:
            raw = self.raw
            self._duplicates = raw.count(b":") > 1 and orjson.dumps(self.value).count(b":") != self.text.count(":")
        return self._duplicates

    def problem(self, limits: JsonLimits) -> BodyProblem | None:
        """The first limit the document exceeds, with the pointer of the offending value; None if none."""
        raw = self.raw
        # Bounds first, from the raw bytes (commas and brackets inside strings included): an
        # ordinary body is within every one and needs neither the exact counts nor the walk.
        bounds = (raw.count(b","), raw.count(b"["), raw.count(b"{"))
        if not self._within(*bounds, limits):
            commas, _, arrays, objects = self.structure
            bounds = (commas, arrays, objects)
        if self._within(*bounds, limits) and len(raw) <= limits.max_string_length:
            shape = None  # every bound holds: no walk needed
        else:
            shape = self.shape if len(raw) > limits.max_string_length else self._shape_without_strings()
        if shape is not None:
            exceeded = self._exceeded(shape, limits)
            if exceeded is not None:
                return exceeded
        if self.number_longer_than(limits.max_number_length):
            return BodyProblem("body_limit_exceeded", 413,
                               f"a JSON number is longer than {limits.max_number_length} characters", "",
                               "number_length")
        if not limits.allow_duplicate_keys and self.has_duplicate_keys():
            return BodyProblem("body_duplicate_key", 400, "a JSON object has the same key twice",
                               _duplicate_pointer(self.raw) or "", "duplicate_keys")
        return None

    @staticmethod
    def _within(commas: int, arrays: int, objects: int, limits: JsonLimits) -> bool:
        """Whether the counts prove every limit but string lengths holds: no container is deeper than
        there are containers, none holds more members or items than there are commas, plus one."""
        return (arrays + objects <= limits.max_depth and commas + arrays + objects + 1 <= limits.max_values
                and (not objects or commas + 1 <= limits.max_members)
                and (not arrays or commas + 1 <= limits.max_items))  # fmt: skip

    def _exceeded(self, shape: JsonShape, limits: JsonLimits) -> BodyProblem | None:
        if shape.values > limits.max_values:
            return BodyProblem("body_limit_exceeded", 413, f"the JSON body has more than {limits.max_values} values",
                               "", "values")
        if shape.depth > limits.max_depth:
            return self._locate("depth", f"the JSON body is nested deeper than {limits.max_depth} levels",
                                lambda node, depth: depth >= limits.max_depth and isinstance(node, dict | list))
        if shape.max_members > limits.max_members:
            return self._locate("members", f"a JSON object has more than {limits.max_members} members",
                                lambda node, _: isinstance(node, dict) and len(node) > limits.max_members)
        if shape.max_items > limits.max_items:
            return self._locate("items", f"a JSON array has more than {limits.max_items} items",
                                lambda node, _: isinstance(node, list) and len(node) > limits.max_items)
        if shape.max_string_length > limits.max_string_length:
            too_long = limits.max_string_length
            for pointer in self.find(lambda key: len(key) > too_long, keys=True):
                return BodyProblem("body_limit_exceeded", 413, f"a JSON key is longer than {too_long} characters",
                                   pointer, "string_length")
            return self._locate("string_length", f"a JSON string is longer than {too_long} characters",
                                lambda node, _: isinstance(node, str) and len(node) > too_long)
        return None

    def number_longer_than(self, length: int) -> bool:
        """Whether a number token outside strings is longer than ``length`` characters (>= the floor).

        One linear-time pass (RE2) over the text outside strings, remembered per length; the parsed
        value cannot tell (orjson turns long numbers into floats).
        """
        length = max(length, NUMBER_LENGTH_FLOOR - 1)
        known = self._long_numbers.get(length)
        # A valid JSON number has at most four characters that are not digits (-1.5e+3), so its
        # digits come in at most three runs: without a run of (length - 4) / 3 digits anywhere in the
        # body, strings included, no number can be longer (one scan, no split).
        if known is None and b"1" * max((length - 4) // 3, 1) not in self.raw.translate(_DIGITS_AS_ONES):
            known = False
        if known is None:
            outside = self.outside
            if len(outside) <= 8192:  # small: split into tokens (RE2's call costs more than this)
                known = max(map(len, outside.translate(_TOKEN_SPACES).split()), default=0) > length
            else:
                known = _long_number_pattern(length).search(outside) is not None
            self._long_numbers[length] = known
        return known

    def find(self, keep: Callable[[str], bool], *, keys: bool = False) -> Iterator[str]:
        """JSON pointers of the strings (or, with ``keys``, of the members whose key) ``keep`` accepts,
        in document order. A pointer is only spelt for what matched."""
        value = self.value
        if type(value) is str:
            if keep(value):
                yield ""
            return
        if type(value) is not dict and type(value) is not list:
            return
        # A stack of (pointer of the container, iterator over its (token, child)): no per-child tuples.
        stack: list[tuple[str, Iterator[tuple[Any, Any]]]] = [("", _children(value))]
        while stack:
            pointer, children = stack[-1]
            for token, child in children:
                if keys and type(token) is str and keep(token):
                    yield f"{pointer}/{escape_pointer_token(token)}"
                kind = type(child)
                if kind is str:
                    if keep(child):
                        yield f"{pointer}/{escape_pointer_token(token)}"
                elif kind is dict or kind is list:
                    stack.append((f"{pointer}/{escape_pointer_token(token)}", _children(child)))
                    break
            else:
                stack.pop()

    def _locate(self, limit: str, message: str, offends: Callable[[Any, int], bool]) -> BodyProblem:
        for pointer, node, depth in _nodes(self.value, False):
            if offends(node, depth):
                return BodyProblem("body_limit_exceeded", 413, message, pointer, limit)
        return BodyProblem("body_limit_exceeded", 413, message, "", limit)


@dataclass(frozen=True, slots=True)
class _Key:
    name: str


def escape_pointer_token(token: str | int) -> str:
    """One RFC 6901 reference token."""
    if type(token) is int:
        return str(token)
    return str(token).replace("~", "~0").replace("/", "~1")


def _nodes(value: Any, keys: bool) -> Iterator[tuple[str, Any, int]]:
    """(pointer, node, depth) of every node, depth first in document order; with ``keys``, each member's
    key too (as a _Key at the member's pointer). Iterative: depth is bounded only by orjson's limit."""
    stack: list[tuple[str, Any, int]] = [("", value, 0)]
    while stack:
        pointer, node, depth = stack.pop()
        yield pointer, node, depth
        if type(node) is dict:
            below = depth + 1
            children: list[tuple[str, Any, int]] = []
            for key, child in node.items():
                child_pointer = f"{pointer}/{escape_pointer_token(key)}"
                if keys:
                    children.append((child_pointer, _Key(key), below))
                children.append((child_pointer, child, below))
            stack.extend(reversed(children))
        elif type(node) is list:
            stack.extend(reversed([(f"{pointer}/{i}", v, depth + 1) for i, v in enumerate(node)]))


def _children(node: Any) -> Iterator[tuple[Any, Any]]:
    return iter(node.items()) if type(node) is dict else enumerate(node)


def _walk(value: Any, *, strings: bool = True) -> JsonShape:
    """The exact shape: one iterative pass, containers only on the stack; per-value work in
    comprehensions (C loops), not in Python statements."""
    kind = type(value)
    if kind is str:
        return JsonShape(0, 0, 0, len(value), 1, 0)
    if kind is not dict and kind is not list:
        return JsonShape(0, 0, 0, 0, 1, 0)
    level_nodes: list[Any] = [value]
    depth = max_members = max_items = members = longest = 0
    values = 1
    while level_nodes:  # breadth first: one level at a time
        depth += 1
        below: list[Any] = []
        for node in level_nodes:
            count = len(node)
            values += count
            if type(node) is dict:
                members += count
                if count > max_members:
                    max_members = count
                if count and strings:
                    longest = max(longest, max(map(len, node)))
                children: Any = node.values()
            else:
                if count > max_items:
                    max_items = count
                children = node
            kinds = set(map(type, children))  # C loop; most containers hold only scalars
            if dict in kinds or list in kinds:
                below += [c for c in children if type(c) is dict or type(c) is list]
            if strings and str in kinds:
                if len(kinds) == 1:
                    longest = max(longest, max(map(len, children)))
                else:
                    longest = max(longest, max([len(c) for c in children if type(c) is str]))
        level_nodes = below
    return JsonShape(depth, max_members, max_items, longest, values, members)


def parse_json(raw: bytes) -> JsonDocument | BodyProblem:
    """Parse ``raw`` within the ceilings, or say why not (without building the document when it is
    over a ceiling)."""
    if len(raw) > PARSE_MAX_BYTES:
        return BodyProblem("body_limit_exceeded", 413, f"the JSON body is larger than {PARSE_MAX_BYTES} bytes",
                           "", "size")
    # Every value takes at least two bytes but the last: a shorter body cannot be over the ceiling.
    if len(raw) > 2 * PARSE_MAX_VALUES and raw.count(b",") + raw.count(b"[") + raw.count(b"{") >= PARSE_MAX_VALUES:
        outside = b"".join(_split_strings(raw, b"\\" in raw)[0::2])
        if outside.count(b",") + outside.count(b"[") + outside.count(b"{") >= PARSE_MAX_VALUES:
            return BodyProblem("body_limit_exceeded", 413, f"the JSON body has more than {PARSE_MAX_VALUES} values",
                               "", "values")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        message = str(exc)
        if "depth" in message or "recursion" in message:
            return BodyProblem("body_limit_exceeded", 413, "the JSON body is nested too deeply", "", "depth")
        if "infinity" in message:
            return BodyProblem("body_limit_exceeded", 413, "the JSON body has a number out of range", "",
                               "number_length")
        # orjson's message names a position and a reason, never the text itself.
        return BodyProblem("body_malformed", 400, f"the JSON body is malformed: {message}", "", "")
    return JsonDocument(value, raw)


def _split_strings(raw: bytes, escaped: bool) -> list[bytes]:
    """The raw text split at the quotes that delimit strings: even pieces outside, odd ones inside.
    Escaped backslashes and quotes become \\x01 and \\x02 first (never raw in valid JSON; over a
    text that is not JSON yet the split is only a bound). C-speed byte operations whatever the input."""
    if escaped:
        raw = raw.replace(b"\\\\", b"\x01").replace(b'\\"', b"\x02")
    return raw.split(b'"')


#: The escapes of valid JSON other than \\, \" and \uXXXX, each undone by one C-speed replace.
_SIMPLE_ESCAPES = ((b"\\/", b"/"), (b"\\b", b"\b"), (b"\\f", b"\f"), (b"\\n", b"\n"), (b"\\r", b"\r"), (b"\\t", b"\t"))
#: A \u escape of the first half of a surrogate pair (orjson refused lone surrogates).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abAB]")


def _document_text(raw: bytes) -> str:
    """The raw text with the quotes that delimit strings turned into line breaks and escapes decoded
    (one left-to-right reading: "\\\\u0041" stays "\\u0041"). Valid JSON only (orjson said so).

    Every step is a C loop, whatever the number of escapes: a body of 64 KiB can hold 16,000 of
    them, and a Python call per escape (or per run of \\u escapes) costs milliseconds."""
    if b"\\" not in raw:
        return raw.replace(b'"', b"\n").decode("utf-8")
    # Escaped backslashes and quotes are spelt as \u escapes (read left to right by replace, so that
    # "\\u0041" keeps its "u0041"), then the delimiting quotes become line breaks and the other
    # short escapes their characters: what is left is \u escapes only, for one codec pass.
    data = raw.replace(b"\\\\", b"\\u005c").replace(b'\\"', b"\\u0022").replace(b'"', b"\n")
    for escape, char in _SIMPLE_ESCAPES:
        if escape in data:
            data = data.replace(escape, char)
    text = data.decode("utf-8")
    if "\\" in text:
        # The codec that reads \u escapes only; characters beyond Latin-1 are spelt as such escapes
        # first (backslashreplace) and read back with the rest. Surrogate pairs come out as two
        # halves, joined through UTF-16.
        text = text.encode("latin-1", "backslashreplace").decode("raw_unicode_escape")
        if _SURROGATE_ESCAPE.search(raw) is not None:
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "surrogatepass")
    return text


_LONG_NUMBER_PATTERNS: dict[int, Any] = {}
#: Every digit to "1", every other byte to " ": a run of digits becomes a run of "1" (C speed;
#: Python's regular-expression engine takes ten times as long to find ``[0-9]{20}``).
_DIGITS_AS_ONES = bytes(0x31 if 0x30 <= i <= 0x39 else 0x20 for i in range(256))
#: Outside strings, only numbers and the literals true/false/null are not punctuation or space.
_TOKEN_SPACES = bytes.maketrans(b",:[]{}", b"      ")


def _long_number_pattern(length: int) -> Any:
    """``length + 1`` number characters in a row (over the text outside strings). RE2: one linear
    pass whatever the input (a backtracking engine rescans every run for every start)."""
    pattern = _LONG_NUMBER_PATTERNS.get(length)
    if pattern is None:
        pattern = _LONG_NUMBER_PATTERNS[length] = re2.compile(f"[-+0-9.eE]{{{length + 1}}}".encode())
    return pattern


#: Bodies up to this size get the pointer of the object with a duplicate key (a slower parse).
_DUPLICATE_POINTER_MAX_BYTES = 16384


def _duplicate_pointer(raw: bytes) -> str | None:
    """The pointer of the first object with a repeated key (None if there is none, "" when unknown).
    Slow (Python's json with a hook): only run when the counts say a member went missing, and only on
    bodies of at most 16 KiB (a larger one is refused without the pointer)."""
    import json

    if len(raw) > _DUPLICATE_POINTER_MAX_BYTES:
        return ""

    found: list[dict[str, Any]] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen = dict(items)
        if len(seen) != len(items):
            found.append(seen)
        return seen

    try:
        value = json.loads(raw, object_pairs_hook=pairs)
    except (ValueError, RecursionError):
        return ""
    if not found:
        return None
    for pointer, node, _ in _nodes(value, False):
        if node is found[0]:  # the innermost first: hooks run as objects close
            return pointer
    return ""
