"""The request view: one immutable object per Check, built once from what Envoy sent.

Everything a policy matches on is normalized here, once, so that no check can be tricked by a
spelling of the same request that another component reads differently. Anything ambiguous is
refused with a 400 rather than guessed at.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, unquote_to_bytes

from google.protobuf import json_format

from extauthz.api.envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2

__all__ = [
    "BadRequest",
    "Peer",
    "Request",
    "normalize_host",
    "normalize_path",
    "request_from_check",
]

_EMPTY: Mapping[str, Any] = MappingProxyType({})

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")
# RFC 3986 pchar plus "/" (and "%" for escapes): anything else in a path is refused.
_PATH_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*")
# reg-name / IPv4 / bracketed IPv6 hosts, optionally with a port. No "%": see normalize_host.
_HOST_RE = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=]*)(?::[0-9]*)?")


class BadRequest(ValueError):
    """The request cannot be interpreted without guessing; it is denied with 400.

    ``reason`` is a stable machine-readable code, ``str(exc)`` a human explanation.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def normalize_path(raw: str) -> str:
    """Return the canonical form of a request path (no query), or raise BadRequest.

    Steps, in this order: reject characters outside RFC 3986; decode percent-escapes of
    unreserved characters only (keeping every other escape, upper-cased); refuse escapes that
    would change the path structure (%2F, %5C), %00 and malformed escapes; drop ``;params``
    from each segment (some servers ignore them, so ``/admin;x`` is ``/admin``); remove dot
    segments (RFC 3986 5.2.4); merge repeated slashes.
    """
    if not raw.startswith("/"):
        if raw == "*":
            return "*"
        raise BadRequest("invalid_path", "path must start with '/'")
    if _PATH_CHARS.fullmatch(raw) is None:
        raise BadRequest("invalid_path", "path contains characters that are not allowed in a URL path")
    if "%" in raw:
        raw = _decode_unreserved(raw)
    segments = raw.split("/")
    out: list[str] = []
    last = len(segments) - 1
    for i, segment in enumerate(segments):
        if ";" in segment:
            segment = segment.split(";", 1)[0]
        if segment == "..":
            if out:
                out.pop()
            if i == last:
                out.append("")
            continue
        if segment == ".":
            if i == last:
                out.append("")
            continue
        if segment == "" and i != last:
            continue  # repeated, leading slashes
        out.append(segment)
    return "/" + "/".join(out)


def _decode_unreserved(raw: str) -> str:
    parts = raw.split("%")
    out = [parts[0]]
    for part in parts[1:]:
        code = part[:2]
        if len(code) < 2 or code[0] not in _HEX or code[1] not in _HEX:
            raise BadRequest("invalid_path", "path has a malformed percent-escape")
        byte = int(code, 16)
        if byte in (0x2F, 0x5C):
            raise BadRequest("invalid_path", "path has an encoded '/' or '\\'")
        if byte == 0:
            raise BadRequest("invalid_path", "path has an encoded NUL")
        if byte in _UNRESERVED:
            out.append(chr(byte) + part[2:])
        else:
            out.append("%" + code.upper() + part[2:])
    return "".join(out)


def normalize_host(raw: str) -> str:
    """Lower-case the host, drop the port and one trailing dot; raise BadRequest when malformed.

    A percent-escape is refused rather than decoded: no DNS name or address needs one, Envoy passes
    ``admin%2eexample.com`` through as it is, and a WHATWG URL parser in the upstream decodes it
    back to ``admin.example.com``, a host the policies never saw.
    """
    if not raw:
        return ""
    if "%" in raw:
        raise BadRequest("invalid_host", "host has a percent-escape ('%'); hosts are never percent-encoded")
    if _HOST_RE.fullmatch(raw) is None:
        raise BadRequest("invalid_host", "host header is malformed")
    if raw.startswith("["):
        host = raw[: raw.index("]") + 1]
    else:
        host = raw.rsplit(":", 1)[0] if ":" in raw else raw
    host = host.lower()
    if host.endswith("."):
        host = host[:-1]
        if host.endswith("."):
            raise BadRequest("invalid_host", "host has more than one trailing dot")
    return host


class Peer(NamedTuple):
    """One end of the connection as Envoy saw it (source or destination).

    A NamedTuple, like Request and for the same reason: built on the request path, never mutated.
    """

    address: str = ""
    port: int = 0
    principal: str = ""
    #: The PEM certificate, URL-decoded from what Envoy sends; empty when not sent.
    certificate: str = ""
    service: str = ""
    labels: Mapping[str, str] = _EMPTY


_NO_PEER = Peer()


class Request(NamedTuple):
    """What a policy sees of one HTTP request. Built once per Check, never mutated.

    A NamedTuple rather than a frozen dataclass: just as immutable (checks are plugins and must not
    be able to change what later checks see), but built in a third of the time -- a frozen
    dataclass sets each field through ``object.__setattr__``. The fields are what every Check
    reads; the rest of what Envoy sent (request id, scheme, protocol, fragment, size, time, SNI,
    context extensions, metadata, the peers) is read from Envoy's message when a policy asks: most
    never do, and through Envoy every field read on every Check showed up in the throughput.
    """

    method: str
    #: Lower-cased, without port or trailing dot.
    host: str
    #: Normalized path without query: what policies match on. Case-sensitive.
    path: str
    #: The path exactly as the client sent it, query included: what signatures cover.
    raw_path: str
    #: The raw query string, without '?'.
    raw_query: str
    #: Header names are lower-case (Envoy's convention); pseudo-headers (":path") included.
    headers: Mapping[str, str]
    body: bytes = b""
    #: True when Envoy sent only the first bytes of a larger body (x-envoy-auth-partial-body).
    partial_body: bool = False
    #: Headers whose value is not valid text, by name; only filled from Envoy's raw header_map.
    raw_headers: Mapping[str, bytes] = _EMPTY
    #: Each line of a header sent more than once, by name; only filled from Envoy's raw header_map.
    header_lines: Mapping[str, tuple[str, ...]] = _EMPTY
    #: Envoy's AttributeContext (read-only), for the fields below; None for an empty request.
    attributes: Any = None
    #: What was derived from ``attributes`` once read (peers, maps): give each Request its own dict
    #: (None: no caching). Only remembers what was derived; the view itself stays immutable.
    derived: dict[Any, Any] | None = None

    # Plain properties (mypy allows no other class attributes in a NamedTuple).
    @property
    def id(self) -> str:
        """Envoy's stream id (``x-request-id`` is the id Envoy's logs and the upstream see)."""
        return "" if self.attributes is None else self.attributes.request.http.id

    @property
    def scheme(self) -> str:
        return "" if self.attributes is None else self.attributes.request.http.scheme

    @property
    def protocol(self) -> str:
        return "" if self.attributes is None else self.attributes.request.http.protocol

    @property
    def fragment(self) -> str:
        return "" if self.attributes is None else self.attributes.request.http.fragment

    @property
    def size(self) -> int:
        """The request size in bytes; -1 when Envoy does not know it."""
        return -1 if self.attributes is None else self.attributes.request.http.size

    @property
    def timestamp(self) -> float:
        """When Envoy received the request, in seconds since the epoch (0.0 when not sent)."""
        if self.attributes is None:
            return 0.0
        stamp = self.attributes.request.time
        return stamp.seconds + stamp.nanos / 1e9

    @property
    def sni(self) -> str:
        return "" if self.attributes is None else self.attributes.tls_session.sni

    @property
    def context_extensions(self) -> Mapping[str, str]:
        """The route's ext_authz context extensions."""
        return self._derive("context_extensions", _context_extensions, _EMPTY)

    @property
    def metadata(self) -> Mapping[str, Any]:
        """metadata_context.filter_metadata as plain dicts."""
        return self._derive("metadata", _filter_metadata, _EMPTY)

    def _derive(self, key: Any, build: Callable[[Any], Any], absent: Any) -> Any:
        """``build(attributes)`` once per Request (``absent`` without attributes), remembered in ``derived``."""
        derived = self.derived
        value = derived.get(key) if derived is not None else None
        if value is None:
            value = absent if self.attributes is None else build(self.attributes)
            if derived is not None:
                derived[key] = value
        return value

    @property
    def source(self) -> Peer:
        """The downstream peer. Built on first read: most policies never look at it."""
        return self._derive(0, _source_peer, _NO_PEER)

    @property
    def source_address(self) -> str:
        """``source.address`` without building the peer (spans and logs want only this)."""
        derived = self.derived
        peer = derived.get(0) if derived is not None else None
        if peer is not None:
            return peer.address
        if self.attributes is None:
            return ""
        address = self.attributes.source.address
        return address.socket_address.address or address.pipe.path

    @property
    def destination(self) -> Peer:
        """The local peer (the address Envoy received the request on)."""
        return self._derive(1, _destination_peer, _NO_PEER)

    @property
    def query(self) -> Mapping[str, str]:
        """Query parameters, first value per name. Parsed when read: most policies never do."""
        first: dict[str, str] = {}
        for name, value in _query_pairs(self.raw_query):
            first.setdefault(name, value)
        return first

    @property
    def query_all(self) -> Mapping[str, tuple[str, ...]]:
        """Query parameters with every value, in order."""
        every: dict[str, list[str]] = {}
        for name, value in _query_pairs(self.raw_query):
            every.setdefault(name, []).append(value)
        return {name: tuple(values) for name, values in every.items()}

    @property
    def time(self) -> datetime.datetime | None:
        """When Envoy received the request, or None when it did not say."""
        return datetime.datetime.fromtimestamp(self.timestamp, datetime.UTC) if self.timestamp else None

    @property
    def body_text(self) -> str | None:
        """The body as UTF-8 text, or None when it is not valid UTF-8."""
        try:
            return self.body.decode("utf-8")
        except UnicodeDecodeError:
            return None


def _query_pairs(raw_query: str) -> list[tuple[str, str]]:
    return parse_qsl(raw_query, keep_blank_values=True) if raw_query else []


def _peer(msg: attribute_context_pb2.AttributeContext.Peer) -> Peer:
    sock = msg.address.socket_address
    address = sock.address or msg.address.pipe.path
    principal = msg.principal
    certificate = msg.certificate
    if not (address or principal or certificate or msg.service or msg.labels):
        return _NO_PEER
    if certificate:
        certificate = unquote_to_bytes(certificate).decode("utf-8", "replace")
    labels = msg.labels
    return Peer(address, sock.port_value, principal, certificate, msg.service, dict(labels) if labels else _EMPTY)


def _headers(
    http: attribute_context_pb2.AttributeContext.HttpRequest,
) -> tuple[Mapping[str, str], dict[str, bytes], dict[str, tuple[str, ...]]]:
    """Headers as one value per lower-case name, raw values that are not text, and the lines of
    headers sent more than once.

    Envoy fills either ``headers`` (duplicates already joined with ",") or, with
    ``encode_raw_headers``, ``header_map`` with one entry per occurrence and raw bytes. Policies see
    the ","-joined value either way; the separate lines (``encode_raw_headers`` only) let a signature
    cover a repeated header as RFC 9421 combines it. A duplicated pseudo-header is ambiguous and
    refused. The common case reuses the message's own map, read-only, instead of copying it.
    """
    if not http.HasField("header_map"):
        return http.headers, {}, {}
    joined: dict[str, str] = {}
    raw: dict[str, bytes] = {}
    every: dict[str, list[str]] = {}
    for entry in http.header_map.headers:
        name = entry.key.lower()
        value_bytes = entry.raw_value if entry.raw_value else entry.value.encode()
        try:
            value = value_bytes.decode("utf-8")
        except UnicodeDecodeError:
            value = value_bytes.decode("latin-1")
            raw[name] = value_bytes
        if name in joined:
            if name.startswith(":"):
                raise BadRequest("duplicate_header", f"pseudo-header {name} appears more than once")
            joined[name] = joined[name] + "," + value
            every[name].append(value)
        else:
            joined[name] = value
            every[name] = [value]
    return joined, raw, {name: tuple(values) for name, values in every.items() if len(values) > 1}


#: Normalized hosts and paths by their raw text: a service sees the same few over and over, and
#: normalizing costs about a microsecond each. Bounded: short texts only, cleared when full.
_NORMALIZED: dict[tuple[bool, str], str] = {}
_MEMO_ENTRIES, _MEMO_TEXT = 4096, 256


def _normalized(raw: str, is_host: bool) -> str:
    key = (is_host, raw)
    done = _NORMALIZED.get(key)
    if done is None:
        done = normalize_host(raw) if is_host else normalize_path(raw)  # raises BadRequest: not remembered
        if len(raw) <= _MEMO_TEXT:
            if len(_NORMALIZED) >= _MEMO_ENTRIES:
                _NORMALIZED.clear()
            _NORMALIZED[key] = done
    return done


def request_from_check(check: external_auth_pb2.CheckRequest) -> Request:
    """Build the request view from a CheckRequest, or raise BadRequest."""
    attrs = check.attributes
    http = attrs.request.http
    headers, raw_headers, header_lines = _headers(http)

    authority = headers.get(":authority", http.host)
    host_header = headers.get("host")
    host = _normalized(authority or host_header or "", True)
    if host_header is not None and authority and _normalized(host_header, True) != host:
        raise BadRequest("ambiguous_host", ":authority and host headers disagree")
    if "," in authority:
        raise BadRequest("duplicate_header", ":authority appears more than once")

    raw_path = http.path or headers.get(":path", "")
    path_part, _, raw_query = raw_path.partition("?")
    path_part = path_part.partition("#")[0]
    method = http.method or headers.get(":method", "")
    path = "*" if method == "CONNECT" and not path_part else _normalized(path_part, False)

    body = http.raw_body
    if not body and http.body:
        body = http.body.encode("utf-8")

    return Request(  # positional, in field order: keyword binding of a NamedTuple costs more
        method,
        host,
        path,
        raw_path,
        raw_query,
        headers,
        body,
        headers.get("x-envoy-auth-partial-body") == "true",
        raw_headers or _EMPTY,
        header_lines or _EMPTY,
        attrs,
        {},
    )


def _source_peer(attrs: attribute_context_pb2.AttributeContext) -> Peer:
    return _peer(attrs.source)


def _destination_peer(attrs: attribute_context_pb2.AttributeContext) -> Peer:
    return _peer(attrs.destination)


def _context_extensions(attrs: attribute_context_pb2.AttributeContext) -> Mapping[str, str]:
    return dict(attrs.context_extensions) if attrs.context_extensions else _EMPTY


def _filter_metadata(attrs: attribute_context_pb2.AttributeContext) -> Mapping[str, Any]:
    filter_metadata = attrs.metadata_context.filter_metadata
    if not filter_metadata:
        return _EMPTY
    return {name: json_format.MessageToDict(struct) for name, struct in filter_metadata.items()}
