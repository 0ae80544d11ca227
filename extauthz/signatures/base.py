"""The RFC 9421 signature base (section 2.5), built from a request as Envoy delivers it.

Derived components come from the request target *as sent* (Envoy's ``:path``), never from the
normalized path policies match on: a signature is over bytes, and normalizing would both break
honest signatures and let two different targets share one. Header values are the ones Envoy
forwards: Envoy already strips surrounding whitespace, and joins a header sent on several lines
with "," (RFC 9421 combines with ", "), so a covered header must be sent once unless Envoy is
configured with ``encode_raw_headers`` (then every line is kept and combined as the RFC says).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import quote, unquote_plus

from extauthz.request import Request
from extauthz.signatures.sf import (
    InnerList,
    Item,
    Limits,
    StructuredFieldError,
    parse_dictionary,
    parse_list,
    serialize_dictionary,
    serialize_inner_list,
    serialize_item,
    serialize_list,
    serialize_member,
)

__all__ = ["DERIVED_COMPONENTS", "ComponentError", "Message", "message_from_request", "signature_base"]

#: Derived components that apply to requests, plus @status for responses (tests of RFC examples).
DERIVED_COMPONENTS = frozenset({
    "@method", "@target-uri", "@authority", "@scheme", "@request-target", "@path", "@query", "@query-param",
    "@status",
})
#: Fields whose structured type we know, for the ``sf`` and ``key`` parameters.
DICTIONARY_FIELDS = frozenset({
    "signature", "signature-input", "accept-signature", "content-digest", "repr-digest", "want-content-digest",
    "want-repr-digest", "priority", "example-dict",
})
LIST_FIELDS = frozenset({"cache-status", "proxy-status", "accept-ch"})
_FIELD_PARAMS = frozenset({"sf", "key", "bs"})
_DEFAULT_PORTS = {"http": "80", "https": "443"}
_LIMITS = Limits(max_length=16384, max_members=256, max_inner_items=64, max_params=32)
_EMPTY: Mapping[str, tuple[str, ...]] = MappingProxyType({})


class ComponentError(ValueError):
    """A covered component cannot be resolved against the message (absent, malformed, unsupported).

    ``missing`` tells "the message does not have it" apart from "the identifier is not usable".
    """

    def __init__(self, message: str, *, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


@dataclass(frozen=True, slots=True)
class Message:
    """What a signature base is built from: the request (or, for RFC examples, a response)."""

    method: str = ""
    scheme: str = ""
    #: The authority as received (Host / :authority), before normalization.
    authority: str = ""
    #: The request target as sent: origin form "/path?query", "*", or authority form.
    target: str = ""
    #: Lower-case field name -> combined value (as Envoy forwards it).
    fields: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    #: Lower-case field name -> each field line's value, when known (Envoy ``encode_raw_headers``).
    field_lines: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: _EMPTY)
    #: Response status (only for signing/verifying response examples).
    status: int | None = None

    def lines(self, name: str) -> tuple[str, ...] | None:
        if name in self.field_lines:
            return self.field_lines[name]
        value = self.fields.get(name)
        return None if value is None else (value,)


def message_from_request(request: Request) -> Message:
    headers = request.headers
    authority = headers.get(":authority") or headers.get("host") or ""
    lines = getattr(request, "header_lines", None) or _EMPTY
    return Message(
        method=request.method,
        scheme=(request.scheme or headers.get(":scheme", "")),
        authority=authority,
        target=request.raw_path,
        fields=headers,
        field_lines=lines,
    )


def _normalized_authority(message: Message) -> str:
    """Lower-case host, default port dropped (RFC 9421 2.2.3, HTTP 4.2.3)."""
    authority = message.authority.strip().lower()
    if authority.startswith("["):
        end = authority.find("]")
        host, port = authority[: end + 1], authority[end + 2 :] if authority[end + 1 : end + 2] == ":" else ""
    else:
        host, _, port = authority.partition(":")
    if port and port == _DEFAULT_PORTS.get(message.scheme.lower()):
        return host
    return authority


def _split_target(target: str) -> tuple[str, str | None]:
    """(path, query or None) of an origin-form target; the fragment (never sent) is dropped."""
    target = target.partition("#")[0]
    path, sep, query = target.partition("?")
    return path, (query if sep else None)


def _form_encode(text: str) -> str:
    """application/x-www-form-urlencoded "percent-encode after encoding" (WHATWG URL), space as %20.

    RFC 9421 2.2.8 re-encodes parsed names and values; its own example shows spaces as "%20".
    """
    return quote(text, safe="*-._")


def _query_param(message: Message, name: str) -> str:
    _, query = _split_target(message.target)
    values = []
    for part in (query or "").split("&"):
        if not part:
            continue
        raw_name, _, raw_value = part.partition("=")
        if _form_encode(unquote_plus(raw_name)) == name:
            values.append(_form_encode(unquote_plus(raw_value)))
    if not values:
        raise ComponentError(f'query parameter "{name}" is not in the request', missing=True)
    if len(values) > 1:
        raise ComponentError(f'query parameter "{name}" occurs more than once; it cannot be signed alone')
    return values[0]


def _derived(message: Message, name: str, item: Item) -> str:
    params = dict(item.params)
    allowed = {"name"} if name == "@query-param" else set()
    unknown = set(params) - allowed
    if "req" in unknown:
        raise ComponentError(f"{name};req applies to responses only")
    if unknown:
        raise ComponentError(f"{name} does not take parameter(s) {', '.join(sorted(unknown))}")
    if name == "@method":
        return message.method
    if name == "@authority":
        return _normalized_authority(message)
    if name == "@scheme":
        return message.scheme.lower()
    if name == "@target-uri":
        target = message.target.partition("#")[0]
        if not target.startswith("/"):
            return target
        return f"{message.scheme.lower()}://{_normalized_authority(message)}{target}"
    if name == "@request-target":
        return message.target.partition("#")[0]
    if name == "@path":
        path, _ = _split_target(message.target)
        return path or "/"
    if name == "@query":
        _, query = _split_target(message.target)
        return "?" + (query or "")
    if name == "@query-param":
        query_name = params.get("name")
        if not isinstance(query_name, str) or isinstance(query_name, bool):
            raise ComponentError('@query-param needs a string parameter "name"')
        return _query_param(message, query_name)
    if name == "@status":
        if message.status is None:
            raise ComponentError("@status applies to responses only")
        return f"{message.status:03d}"
    raise ComponentError(f"unknown derived component {name}")


def _field(message: Message, name: str, item: Item) -> str:
    params = dict(item.params)
    unknown = set(params) - _FIELD_PARAMS
    if "req" in unknown or "tr" in unknown:
        raise ComponentError(f'"{name}": the req and tr parameters are not supported for requests')
    if unknown:
        raise ComponentError(f'"{name}": unknown parameter(s) {", ".join(sorted(unknown))}')
    if "bs" in params and ("sf" in params or "key" in params):
        raise ComponentError(f'"{name}": bs cannot be combined with sf or key')
    lines = message.lines(name)
    if lines is None:
        raise ComponentError(f'header "{name}" is not in the request', missing=True)
    lines = tuple(" ".join(line.strip(" \t").split("\r\n")) for line in lines)
    if "bs" in params:
        return serialize_list(Item(line.encode("latin-1", "replace")) for line in lines)
    combined = ", ".join(lines)
    if "key" in params:
        key = params["key"]
        if not isinstance(key, str) or isinstance(key, bool):
            raise ComponentError(f'"{name}": key must be a string')
        if name not in DICTIONARY_FIELDS:
            raise ComponentError(f'"{name}" is not a known Dictionary field; key cannot be used')
        try:
            members = dict(parse_dictionary(combined, _LIMITS))
        except StructuredFieldError as exc:
            raise ComponentError(f'"{name}" is not a valid Dictionary: {exc}') from None
        if key not in members:
            raise ComponentError(f'"{name}" has no member "{key}"', missing=True)
        return serialize_member(members[key])
    if "sf" in params:
        try:
            if name in DICTIONARY_FIELDS:
                return serialize_dictionary(parse_dictionary(combined, _LIMITS))
            if name in LIST_FIELDS:
                return serialize_list(parse_list(combined, _LIMITS))
        except StructuredFieldError as exc:
            raise ComponentError(f'"{name}" is not a valid structured field: {exc}') from None
        raise ComponentError(f'"{name}" is not a structured field known to extauthz; sf cannot be used')
    return combined


def _identifier_key(item: Item) -> tuple[str, frozenset[tuple[str, object]]]:
    """Component identity for duplicate detection: name plus parameters, order-insensitive."""
    return str(item.value), frozenset(item.params)


def signature_base(message: Message, covered: InnerList) -> bytes:
    """The signature base for ``covered`` (the parsed Signature-Input member), or ComponentError."""
    lines: list[str] = []
    seen: set[tuple[str, frozenset[tuple[str, object]]]] = set()
    for item in covered.items:
        name = item.value
        if type(name) is not str:  # an sf-string, not a token or another type
            raise ComponentError("component identifiers must be strings")
        if name != name.lower() or not name:
            raise ComponentError(f"component name {name!r} must be lower-case")
        key = _identifier_key(item)
        if key in seen:
            raise ComponentError(f"component {serialize_item(item)} is covered twice")
        seen.add(key)
        if name == "@signature-params":
            raise ComponentError("@signature-params cannot be a covered component")
        value = _derived(message, name, item) if name.startswith("@") else _field(message, name, item)
        if "\n" in value or "\r" in value:
            raise ComponentError(f"component {name} has a line break")
        lines.append(f"{serialize_item(item)}: {value}")
    lines.append(f'"@signature-params": {serialize_inner_list(covered)}')
    text = "\n".join(lines)
    if not text.isascii():
        raise ComponentError("signature base has non-ASCII characters (use the bs parameter for such fields)")
    return text.encode("ascii")
