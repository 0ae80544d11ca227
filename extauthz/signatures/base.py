"""The RFC 9421 signature base (section 2.5), built from a request as Envoy delivers it.

Derived components come from the request target *as sent* (Envoy's ``:path``), never from the
normalized path policies match on: a signature is over bytes, and normalizing would both break
honest signatures and let two different targets share one. Header values are the ones Envoy
forwards: Envoy already strips surrounding whitespace, and joins a header sent on several lines
with "," (RFC 9421 combines with ", "), so a covered header must be sent once unless Envoy is
configured with ``encode_raw_headers`` (then every line is kept and combined as the RFC says).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple
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

__all__ = [
    "DERIVED_COMPONENTS",
    "ComponentError",
    "CoveredComponents",
    "Message",
    "covered_components",
    "message_from_request",
    "signature_base",
]

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


class Message(NamedTuple):
    """What a signature base is built from: the request (or, for RFC examples, a response).

    A NamedTuple (built for every signed request): immutable like a frozen dataclass, built in a
    fraction of the time. ``message._replace(...)`` makes a changed copy.
    """

    method: str = ""
    scheme: str = ""
    #: The authority as received (Host / :authority), before normalization.
    authority: str = ""
    #: The request target as sent: origin form "/path?query", "*", or authority form.
    target: str = ""
    #: Lower-case field name -> combined value (as Envoy forwards it).
    fields: Mapping[str, str] = MappingProxyType({})
    #: Lower-case field name -> each field line's value, when known (Envoy ``encode_raw_headers``).
    field_lines: Mapping[str, tuple[str, ...]] = _EMPTY
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
    return Message(
        method=request.method,
        scheme=(request.scheme or headers.get(":scheme", "")),
        authority=authority,
        target=request.raw_path,
        fields=headers,
        field_lines=request.header_lines,
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


def _method(message: Message) -> str:
    return message.method


def _scheme(message: Message) -> str:
    return message.scheme.lower()


def _target_uri(message: Message) -> str:
    target = message.target.partition("#")[0]
    if not target.startswith("/"):
        return target
    return f"{message.scheme.lower()}://{_normalized_authority(message)}{target}"


def _request_target(message: Message) -> str:
    return message.target.partition("#")[0]


def _path(message: Message) -> str:
    return message.target.partition("#")[0].partition("?")[0] or "/"


def _query(message: Message) -> str:
    return "?" + message.target.partition("#")[0].partition("?")[2]


def _status(message: Message) -> str:
    if message.status is None:
        raise ComponentError("@status applies to responses only")
    return f"{message.status:03d}"


#: Derived components that take no parameter -> their value.
_DERIVED_VALUES: dict[str, Callable[[Message], str]] = {
    "@method": _method, "@authority": _normalized_authority, "@scheme": _scheme, "@target-uri": _target_uri,
    "@request-target": _request_target, "@path": _path, "@query": _query, "@status": _status,
}


def _derived(message: Message, name: str, item: Item) -> str:
    params = dict(item.params)
    allowed = {"name"} if name == "@query-param" else set()
    unknown = set(params) - allowed
    if "req" in unknown:
        raise ComponentError(f"{name};req applies to responses only")
    if unknown:
        raise ComponentError(f"{name} does not take parameter(s) {', '.join(sorted(unknown))}")
    if name == "@query-param":
        query_name = params.get("name")
        if not isinstance(query_name, str) or isinstance(query_name, bool):
            raise ComponentError('@query-param needs a string parameter "name"')
        return _query_param(message, query_name)
    value = _DERIVED_VALUES.get(name)
    if value is None:
        raise ComponentError(f"unknown derived component {name}")
    return value(message)


def _plain_field(message: Message, name: str) -> str:
    """A field covered without parameters: what _field computes for it, minus the parameter checks."""
    if message.field_lines and name in message.field_lines:
        lines: tuple[str, ...] | None = message.field_lines[name]
    else:
        value = message.fields.get(name)
        lines = None if value is None else (value,)
    if lines is None:
        raise ComponentError(f'header "{name}" is not in the request', missing=True)
    if len(lines) == 1:
        line = lines[0].strip(" \t")
        return " ".join(line.split("\r\n")) if "\r\n" in line else line
    return ", ".join(" ".join(line.strip(" \t").split("\r\n")) for line in lines)


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


def _value(message: Message, item: Item) -> str:
    name: str = item.value  # type: ignore[assignment]
    return _derived(message, name, item) if name.startswith("@") else _field(message, name, item)


def _lines_step_by_step(message: Message, items: tuple[Item, ...]) -> list[str]:
    """The component lines of the signature base, every check made per request (the reference)."""
    lines: list[str] = []
    seen: set[tuple[str, frozenset[tuple[str, object]]]] = set()
    for item in items:
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
        value = _value(message, item)
        if "\n" in value or "\r" in value:
            raise ComponentError(f"component {name} has a line break")
        lines.append(f"{serialize_item(item)}: {value}")
    return lines


def _raise(error: str) -> Callable[[Message], str]:
    def fail(message: Message) -> str:
        raise ComponentError(error)

    return fail


@dataclass(frozen=True, slots=True)
class _Line:
    """One covered component: its name, the line's start ('"@path": ') and how to get its value."""

    name: str
    start: str
    value: Callable[[Message], str]


@dataclass(frozen=True, slots=True)
class CoveredComponents:
    """A covered-components list worked out once: every check that does not depend on the message
    (types, lower case, duplicates, parameters), each identifier serialized, each value's getter.

    ``lines`` gives exactly what the step-by-step reference gives, failures included and in the same
    order: a list that fails a static check keeps a line that raises where the reference would.
    """

    #: The serialized identifiers, or None when one cannot be serialized (a list built in code).
    identifiers: tuple[str, ...] | None
    #: (name, frozenset(params)) of each string-named component, for coverage requirements.
    keys: frozenset[tuple[str, frozenset[tuple[str, object]]]]
    _lines: tuple[_Line, ...]
    _items: tuple[Item, ...]

    @classmethod
    def of(cls, items: tuple[Item, ...]) -> CoveredComponents:
        keys = frozenset(_identifier_key(i) for i in items if type(i.value) is str)
        try:
            identifiers: tuple[str, ...] | None = tuple(serialize_item(i) for i in items)
        except StructuredFieldError:
            return cls(None, keys, (), items)  # lines() takes the step-by-step way
        assert identifiers is not None
        lines: list[_Line] = []
        seen: set[tuple[str, frozenset[tuple[str, object]]]] = set()
        for item, identifier in zip(items, identifiers, strict=True):
            name = item.value
            if type(name) is not str:
                lines.append(_Line("", "", _raise("component identifiers must be strings")))
                break
            if name != name.lower() or not name:
                lines.append(_Line(name, "", _raise(f"component name {name!r} must be lower-case")))
                break
            key = _identifier_key(item)
            if key in seen:
                lines.append(_Line(name, "", _raise(f"component {identifier} is covered twice")))
                break
            seen.add(key)
            if name == "@signature-params":
                lines.append(_Line(name, "", _raise("@signature-params cannot be a covered component")))
                break
            lines.append(_Line(name, identifier + ": ", _getter(name, item)))
        return cls(identifiers, keys, tuple(lines), items)

    def lines(self, message: Message) -> list[str]:
        if self.identifiers is None:
            return _lines_step_by_step(message, self._items)
        out: list[str] = []
        for line in self._lines:
            value = line.value(message)
            if "\n" in value or "\r" in value:
                raise ComponentError(f"component {line.name} has a line break")
            out.append(line.start + value)
        return out


def _getter(name: str, item: Item) -> Callable[[Message], str]:
    """The value of a component whose identifier passed the static checks."""
    if not item.params:
        if not name.startswith("@"):
            return functools.partial(_plain_field, name=name)
        if name in _DERIVED_VALUES:
            return _DERIVED_VALUES[name]
    elif name == "@query-param" and len(item.params) == 1 and item.params[0][0] == "name":
        query_name = item.params[0][1]
        if isinstance(query_name, str) and not isinstance(query_name, bool):
            return functools.partial(_query_param, name=query_name)
    return functools.partial(_value, item=item)  # the general path: checks its parameters every time


_COVERED_CACHE_SIZE = 256
#: id(items) -> (items, compiled). Holding ``items`` keeps its id from being reused while cached; the
#: parser hands out the same items tuple for the same Signature-Input text, so a client's repeated
#: covered list is compiled once. Cleared when full (bounded, and a churning client costs no more
#: than compiling every time).
_COVERED: dict[int, tuple[tuple[Item, ...], CoveredComponents]] = {}


def covered_components(items: tuple[Item, ...]) -> CoveredComponents:
    """The compiled form of a covered-components list (remembered for the same tuple object)."""
    entry = _COVERED.get(id(items))
    if entry is not None and entry[0] is items:
        return entry[1]
    compiled = CoveredComponents.of(items)
    if len(_COVERED) >= _COVERED_CACHE_SIZE:
        _COVERED.clear()
    _COVERED[id(items)] = (items, compiled)
    return compiled


def signature_base(message: Message, covered: InnerList, components: CoveredComponents | None = None) -> bytes:
    """The signature base for ``covered`` (the parsed Signature-Input member), or ComponentError.

    ``components`` is ``covered_components(covered.items)`` when the caller already has it.
    """
    if components is None:
        components = covered_components(covered.items)
    lines = components.lines(message)
    lines.append('"@signature-params": ' + serialize_inner_list(covered))
    text = "\n".join(lines)
    if not text.isascii():
        raise ComponentError("signature base has non-ASCII characters (use the bs parameter for such fields)")
    return text.encode("ascii")
