"""Content types: what the client says its body is, parsed strictly and once."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType

__all__ = ["BodyKind", "MediaType", "body_kind", "parse_media_type"]

_EMPTY: Mapping[str, str] = MappingProxyType({})
_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")


class BodyKind(enum.Enum):
    """How the body is read: the structure consumers see."""

    #: No body bytes (and Envoy did not say it cut any).
    NONE = "none"
    #: ``application/json`` or ``application/*+json``: parsed into ``BodyView.json``.
    JSON = "json"
    #: ``application/x-www-form-urlencoded``: ``BodyView.fields``.
    FORM = "form"
    #: ``multipart/form-data``: ``BodyView.parts`` (and the text fields in ``BodyView.fields``).
    MULTIPART = "multipart"
    #: ``text/*``, XML, or no content type at all: ``BodyView.text`` when it is UTF-8.
    TEXT = "text"
    #: Anything else (images, archives, protobuf, octet-stream): not parsed.
    BINARY = "binary"


class MediaType(tuple[str, Mapping[str, str]]):
    """``(type/subtype, parameters)``: lower-case type and parameter names, parameter values as sent."""

    __slots__ = ()

    @property
    def essence(self) -> str:
        return self[0]

    @property
    def parameters(self) -> Mapping[str, str]:
        return self[1]


_NO_TYPE = MediaType(("", _EMPTY))


def parse_media_type(header: str | None) -> MediaType | None:
    """Parse a Content-Type value (RFC 9110 8.3.1); None when it is malformed.

    An absent or empty header gives ``("", {})``. A repeated header (Envoy joins repeats with ",")
    or a parameter given twice is malformed: two readers could pick different ones.
    """
    if header is None or not header.strip():
        return _NO_TYPE
    essence, _, rest = header.partition(";")
    essence = essence.strip().lower()
    main, slash, sub = essence.partition("/")
    if not slash or not main or not sub or not set(main) <= _TOKEN or not set(sub) <= _TOKEN:
        return None
    parameters: dict[str, str] = {}
    while rest:
        item, rest = _next_parameter(rest)
        if item is None:
            return None
        if not item[0]:
            continue
        if item[0] in parameters:
            return None
        parameters[item[0]] = item[1]
    return MediaType((essence, MappingProxyType(parameters) if parameters else _EMPTY))


def _next_parameter(text: str) -> tuple[tuple[str, str] | None, str]:
    """One ``name=value`` (value a token or a quoted string) and the text after its ';'."""
    text = text.lstrip(" \t")
    if not text:
        return ("", ""), ""
    name, eq, rest = text.partition("=")
    name = name.strip().lower()
    if not eq or not name or not set(name) <= _TOKEN:
        return None, ""
    if rest.startswith('"'):
        value_chars: list[str] = []
        i = 1
        while i < len(rest):
            char = rest[i]
            if char == "\\" and i + 1 < len(rest):
                value_chars.append(rest[i + 1])
                i += 2
                continue
            if char == '"':
                break
            value_chars.append(char)
            i += 1
        else:
            return None, ""
        after = rest[i + 1 :].lstrip(" \t")
        if after and not after.startswith(";"):
            return None, ""
        return (name, "".join(value_chars)), after[1:]
    value, _, after = rest.partition(";")
    value = value.strip(" \t")
    if not value or "," in value or '"' in value:
        return None, ""
    return (name, value), after


def body_kind(essence: str) -> BodyKind:
    """The structure a media type announces (``essence`` as parse_media_type returns it)."""
    if essence == "application/json" or (essence.startswith("application/") and essence.endswith("+json")):
        return BodyKind.JSON
    if essence == "application/x-www-form-urlencoded":
        return BodyKind.FORM
    if essence == "multipart/form-data":
        return BodyKind.MULTIPART
    if not essence or essence.startswith("text/") or essence.endswith("/xml") or essence.endswith("+xml"):
        return BodyKind.TEXT
    if essence in ("application/graphql", "application/javascript", "application/x-yaml", "application/yaml"):
        return BodyKind.TEXT
    return BodyKind.BINARY
