"""Parameters: from the text of a path segment, query string, header or cookie to typed values.

Each parameter is deserialized per its ``style`` and ``explode`` (OpenAPI 3.x, RFC 6570 shapes), then
its text values are turned into the types its schema allows (``"42"`` becomes 42 where the schema
says integer), and only then validated against the schema, so a constraint such as ``maximum`` is
checked on the number. A value that does not fit the shape (``a,b`` for a single integer) is left
as text and the schema refuses it with a ``type`` error.

Supported styles: path ``simple`` and ``label``; query ``form``, ``spaceDelimited``,
``pipeDelimited`` and ``deepObject``; header ``simple``; cookie ``form``. Path ``matrix`` is refused
at load: the sidecar drops ``;parameters`` from path segments before any policy sees the path (see
docs/policy.md, "Paths"), so matrix values never reach it. Parameters with ``content`` (a JSON value
in a query parameter) are parsed as JSON.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, unquote_plus

__all__ = [
    "BadParameter",
    "Coercer",
    "Parameter",
    "coercer_for",
    "decode_text",
    "deserialize",
    "members_of",
    "parse_cookies",
    "parse_query",
    "reader_for",
    "schema_shape",
]

#: Text to typed value for one parameter (and for its items or properties).
Coercer = Callable[[str], Any]

_INT = re.compile(r"-?(?:0|[1-9][0-9]*)")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
#: Default style per location (OpenAPI 3.x).
DEFAULT_STYLES = {"path": "simple", "query": "form", "header": "simple", "cookie": "form"}
ALLOWED_STYLES = {
    "path": ("simple", "label"),
    "query": ("form", "spaceDelimited", "pipeDelimited", "deepObject"),
    "header": ("simple",),
    "cookie": ("form",),
}


class BadParameter(ValueError):
    """A parameter's text cannot be read (not UTF-8, given twice where once is allowed, bad JSON)."""

    def __init__(self, constraint: str, detail: str) -> None:
        super().__init__(detail)
        self.constraint = constraint
        self.detail = detail


def _text(value: str) -> str:
    return value


@dataclass(frozen=True, slots=True)
class Shape:
    """What a parameter's schema allows, as far as deserialization needs it."""

    kind: str  # "primitive", "array" or "object"
    coerce: Coercer = _text
    items: Coercer = _text
    properties: Mapping[str, Coercer] | None = None
    other: Coercer = _text

    def property_coercer(self, name: str) -> Coercer:
        if self.properties is not None:
            found = self.properties.get(name)
            if found is not None:
                return found
        return self.other


@dataclass(frozen=True, slots=True)
class Parameter:
    name: str
    location: str
    required: bool
    style: str
    explode: bool
    shape: Shape
    #: The compiled validator (jsonschema-rs), or None when the parameter has no schema.
    validator: Any
    #: ``content: {application/json: ...}`` instead of a schema: the value is JSON text.
    json_content: bool = False
    #: ``allowEmptyValue``: an empty query value means the parameter was not sent.
    allow_empty: bool = False
    #: The def of its schema in the spec's schema document (to explain a failure).
    schema_name: str = ""
    #: Text to value, chosen once for its location, style and shape (see ``reader_for``): path and
    #: header parameters take their one text, query and cookie parameters the list of their texts.
    read: Callable[[Any], Any] | None = None

    @property
    def where(self) -> str:
        return f"{self.location} parameter {self.name}"


# --- the shapes and coercions a schema implies --------------------------------------------------------
def _resolve(schema: Any, defs: Mapping[str, Any]) -> Any:
    for _ in range(32):
        if isinstance(schema, dict) and "$ref" in schema and len(schema) <= 2:
            name = schema["$ref"].rsplit("/", 1)[-1].replace("~1", "/").replace("~0", "~")
            schema = defs.get(name, {})
        else:
            break
    return schema


def members_of(schema: Any, defs: Mapping[str, Any], depth: int = 0) -> list[dict[str, Any]]:
    """The schema and the schemas that apply to the same value ($ref, allOf/anyOf/oneOf)."""
    if depth > 16 or not isinstance(schema, dict):
        return []
    found = [schema]
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1].replace("~1", "/").replace("~0", "~")
        found += members_of(defs.get(name), defs, depth + 1)
    for key in ("allOf", "anyOf", "oneOf"):
        for member in schema.get(key, ()) or ():
            found += members_of(member, defs, depth + 1)
    return found


def _types(schema: Any, defs: Mapping[str, Any]) -> set[str]:
    types: set[str] = set()
    for member in members_of(schema, defs):
        declared = member.get("type")
        if isinstance(declared, str):
            types.add(declared)
        elif isinstance(declared, list):
            types.update(t for t in declared if isinstance(t, str))
        if "properties" in member:
            types.add("object")
        if "items" in member or "prefixItems" in member:
            types.add("array")
    return types


def coercer_for(schema: Any, defs: Mapping[str, Any]) -> Coercer:
    """Text to the narrowest type the schema allows: integer, number, boolean, else the text."""
    types = _types(schema, defs)
    integer = "integer" in types
    number = "number" in types
    boolean = "boolean" in types
    null = "null" in types
    if not (integer or number or boolean or null):
        return _text

    def coerce(text: str) -> Any:
        if (integer or number) and _INT.fullmatch(text):
            return int(text)
        if number and _NUMBER.fullmatch(text):
            value = float(text)
            return value if value == value and value not in (float("inf"), float("-inf")) else text
        if boolean and text in ("true", "false"):
            return text == "true"
        if null and text == "null" and "string" not in types:
            return None
        return text

    return coerce


def schema_shape(schema: Any, defs: Mapping[str, Any]) -> Shape:
    types = _types(schema, defs)
    if "array" in types and not (types - {"array", "null"}):
        items: Any = {}
        for member in members_of(schema, defs):
            if isinstance(member.get("items"), dict):
                items = member["items"]
                break
        return Shape("array", items=coercer_for(items, defs))
    if "object" in types and not (types - {"object", "null"}):
        properties: dict[str, Coercer] = {}
        other: Any = {}
        for member in members_of(schema, defs):
            for name, sub in (member.get("properties") or {}).items():
                properties.setdefault(name, coercer_for(sub, defs))
            if isinstance(member.get("additionalProperties"), dict):
                other = member["additionalProperties"]
        return Shape("object", properties=properties, other=coercer_for(other, defs))
    return Shape("primitive", coerce=coercer_for(schema, defs))


# --- reading the request's text -------------------------------------------------------------------------
def decode_text(raw: str, plus: bool) -> str:
    """Percent-decode (``+`` as space in query strings and forms), refusing what is not UTF-8."""
    if "%" not in raw and (not plus or "+" not in raw):
        return raw
    try:
        return unquote_plus(raw, errors="strict") if plus else unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise BadParameter("encoding", "is not valid UTF-8 once percent-decoded") from None


def parse_query(raw_query: str) -> list[tuple[str, str]]:
    """``a=1&b=x%2Cy`` as (decoded name, raw value) pairs, in order; values are decoded by the
    parameter that reads them (its style says how)."""
    pairs: list[tuple[str, str]] = []
    if not raw_query:
        return pairs
    for part in raw_query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        try:
            pairs.append((decode_text(name, True), value))
        except BadParameter:
            raise BadParameter("encoding", "a query parameter name is not valid UTF-8 once percent-decoded") from None
    return pairs


def parse_cookies(header: str) -> list[tuple[str, str]]:
    """The ``cookie`` header as (name, value) pairs (RFC 6265: ``a=1; b=2``)."""
    pairs: list[tuple[str, str]] = []
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name:
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            pairs.append((name, value))
    return pairs


def _pairs_to_object(items: list[str], shape: Shape) -> dict[str, Any]:
    if len(items) % 2:
        raise BadParameter("style", "has an odd number of name and value items")
    return {items[i]: shape.property_coercer(items[i])(items[i + 1]) for i in range(0, len(items), 2)}


def _assignments_to_object(items: list[str], shape: Shape) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise BadParameter("style", "has an item without '='")
        out[name] = shape.property_coercer(name)(value)
    return out


def _split(text: str, separator: str, shape: Shape) -> list[Any]:
    return [shape.items(part) for part in text.split(separator)] if text else []


def deserialize_simple(param: Parameter, raw: str, plus: bool = False) -> Any:
    """``simple`` (path, header) and ``form`` with one value (query, cookie): comma-separated.

    The text is percent-decoded before it is split: a delimiter sent as ``%2C`` separates too, as
    most clients send and most servers read it (RFC 6570 would keep it in the value)."""
    shape = param.shape
    text = decode_text(raw, plus)
    if shape.kind == "array":
        return _split(text, ",", shape)
    if shape.kind == "object":
        items = text.split(",") if text else []
        if param.explode and param.style == "simple":
            return _assignments_to_object(items, shape)
        return _pairs_to_object(items, shape)
    return shape.coerce(text)


def deserialize_label(param: Parameter, raw: str) -> Any:
    text = decode_text(raw, False)
    if not text.startswith("."):
        raise BadParameter("style", "must start with '.' (label style)")
    shape = param.shape
    body = text[1:]
    if shape.kind == "array":
        return _split(body, "." if param.explode else ",", shape)
    if shape.kind == "object":
        if param.explode:
            return _assignments_to_object(body.split("."), shape)
        return _pairs_to_object(body.split(","), shape)
    return shape.coerce(body)


def deserialize_json(raw_text: str) -> Any:
    try:
        return json.loads(raw_text)
    except (ValueError, RecursionError):
        raise BadParameter("content", "is not valid JSON") from None


def reader_for(param: Parameter) -> Callable[[Any], Any]:
    """The fastest correct way to read this parameter, decided at load: most parameters are one
    primitive value, read with one decode and one coercion."""
    location = param.location
    if location in ("query", "cookie"):
        shape = param.shape
        if shape.kind == "primitive" and not param.json_content:
            coerce = shape.coerce
            plus = location == "query"

            def read_one(values: list[str]) -> Any:
                if len(values) != 1:
                    raise BadParameter("style", "is given more than once")
                return coerce(decode_text(values[0], plus))

            return read_one
        return lambda values: deserialize(param, values)
    if param.json_content:
        return lambda raw: deserialize_json(decode_text(raw, False))
    if location == "path" and param.style == "label":
        return lambda raw: deserialize_label(param, raw)
    if param.shape.kind == "primitive":
        coerce = param.shape.coerce
        if location == "header":
            return lambda raw: coerce(raw.strip())
        return lambda raw: coerce(decode_text(raw, False))
    if location == "header":
        return lambda raw: deserialize_simple(param, ",".join(part.strip() for part in raw.split(",")))
    return lambda raw: deserialize_simple(param, raw)


def deserialize(param: Parameter, values: list[str]) -> Any:
    """Query and cookie parameters: ``values`` are the raw texts given for the name, in order."""
    plus = param.location == "query"
    if param.json_content:
        if len(values) != 1:
            raise BadParameter("style", "is given more than once")
        return deserialize_json(decode_text(values[0], plus))
    shape = param.shape
    style = param.style
    if shape.kind == "array":
        if style == "form" and param.explode:
            return [shape.items(decode_text(v, plus)) for v in values]
        if len(values) != 1:
            raise BadParameter("style", "is given more than once")
        text = decode_text(values[0], plus)
        if style == "spaceDelimited":
            return _split(text, " ", shape)
        if style == "pipeDelimited":
            return _split(text, "|", shape)
        return _split(text, ",", shape)
    if len(values) != 1:
        raise BadParameter("style", "is given more than once")
    return deserialize_simple(param, values[0], plus)
