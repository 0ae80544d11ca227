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
    "CLIENT_HEADER",
    "ENVOY_HEADER",
    "ENVOY_HEADERS",
    "ENVOY_OPTIONAL_HEADERS",
    "ENVOY_VALUE_PREFIX",
    "HOP_HEADER",
    "BadRequest",
    "HttpOrigin",
    "HttpParts",
    "Peer",
    "Request",
    "header_kind",
    "normalize_host",
    "normalize_path",
    "request_from_check",
    "request_from_http",
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

    def __init__(self, reason: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.reason = reason
        #: 400, or 500 when the fault is the configuration in front of us (see request_from_http).
        self.status = status


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
    # ``attributes`` is Envoy's AttributeContext (gRPC), an HttpOrigin (Envoy's HTTP ext_authz
    # protocol, see request_from_http) or None; each property below reads either.
    @property
    def id(self) -> str:
        """Envoy's stream id (``x-request-id`` is the id Envoy's logs and the upstream see)."""
        attrs = self.attributes
        if attrs is None:
            return ""
        return attrs.id if type(attrs) is HttpOrigin else attrs.request.http.id

    @property
    def scheme(self) -> str:
        attrs = self.attributes
        if attrs is None:
            return ""
        return attrs.scheme if type(attrs) is HttpOrigin else attrs.request.http.scheme

    @property
    def protocol(self) -> str:
        attrs = self.attributes
        if attrs is None:
            return ""
        return attrs.protocol if type(attrs) is HttpOrigin else attrs.request.http.protocol

    @property
    def fragment(self) -> str:
        attrs = self.attributes
        return "" if attrs is None or type(attrs) is HttpOrigin else attrs.request.http.fragment

    @property
    def size(self) -> int:
        """The request size in bytes; -1 when Envoy does not know it (always in HTTP mode)."""
        attrs = self.attributes
        return -1 if attrs is None or type(attrs) is HttpOrigin else attrs.request.http.size

    @property
    def timestamp(self) -> float:
        """When Envoy received the request, in seconds since the epoch (0.0 when not sent)."""
        attrs = self.attributes
        if attrs is None or type(attrs) is HttpOrigin:
            return 0.0
        stamp = attrs.request.time
        return stamp.seconds + stamp.nanos / 1e9

    @property
    def sni(self) -> str:
        attrs = self.attributes
        if attrs is None:
            return ""
        return attrs.sni if type(attrs) is HttpOrigin else attrs.tls_session.sni

    @property
    def tls_version(self) -> str:
        """The downstream TLS version ("TLSv1.3"): only Envoy's HTTP mode sends it ("" otherwise)."""
        attrs = self.attributes
        return attrs.tls_version if type(attrs) is HttpOrigin else ""

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
        attrs = self.attributes
        if attrs is None:
            return ""
        if type(attrs) is HttpOrigin:
            return _split_address(attrs.peer_address)[0]
        address = attrs.source.address
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


def _source_peer(attrs: Any) -> Peer:
    if type(attrs) is HttpOrigin:
        return attrs.source()
    return _peer(attrs.source)


def _destination_peer(attrs: Any) -> Peer:
    if type(attrs) is HttpOrigin:
        return attrs.destination()
    return _peer(attrs.destination)


def _context_extensions(attrs: Any) -> Mapping[str, str]:
    if type(attrs) is HttpOrigin:
        return _EMPTY  # Envoy's HTTP mode has no context extensions
    return dict(attrs.context_extensions) if attrs.context_extensions else _EMPTY


def _filter_metadata(attrs: Any) -> Mapping[str, Any]:
    if type(attrs) is HttpOrigin:
        return _EMPTY  # nor metadata_context
    filter_metadata = attrs.metadata_context.filter_metadata
    if not filter_metadata:
        return _EMPTY
    return {name: json_format.MessageToDict(struct) for name, struct in filter_metadata.items()}


# --- Envoy's HTTP ext_authz protocol -------------------------------------------------------------
#
# In HTTP mode Envoy sends the client's method, path (after its ``path_prefix``), body and the
# headers its ``allowed_headers`` let through; the Host it sends is the authorization cluster's.
# Everything else a policy may read about the request and its connection arrives in headers Envoy
# adds itself (``authorization_request.headers_to_add``), and those are trusted as Envoy's word:
#
# - Envoy's headers_to_add overwrite a client's header of the same name, but only when the value is
#   not empty: with no client certificate, %DOWNSTREAM_PEER_URI_SAN% is empty and a client's own
#   x-extauthz-peer-uri-san (when allowed_headers lets it through) would arrive untouched. So every
#   value is configured as ``v1:`` followed by the formatter: never empty, always Envoy's.
# - A request where any of them is missing or lacks ``v1:`` is refused (500, which Envoy turns into
#   its status_on_error): the configuration does not set it, and then a client could. Every honest
#   request shows such a mistake at once.
#
# docs/http-mode.md has the table and the Envoy configuration.

#: Every value Envoy's headers_to_add give starts with this (see above).
ENVOY_VALUE_PREFIX = "v1:"
#: Header -> the Envoy formatter after ENVOY_VALUE_PREFIX in its value (authorization_request.headers_to_add).
ENVOY_HEADERS: Mapping[str, str] = MappingProxyType({
    "x-extauthz-authority": "%REQ(:AUTHORITY)%",
    "x-extauthz-scheme": "%REQ(:SCHEME)%",
    "x-extauthz-protocol": "%PROTOCOL%",
    "x-extauthz-stream-id": "%STREAM_ID%",
    "x-extauthz-peer-address": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "x-extauthz-local-address": "%DOWNSTREAM_LOCAL_ADDRESS%",
    "x-extauthz-peer-uri-san": "%DOWNSTREAM_PEER_URI_SAN%",
    "x-extauthz-peer-subject": "%DOWNSTREAM_PEER_SUBJECT%",
    "x-extauthz-peer-cert": "%DOWNSTREAM_PEER_CERT%",
    "x-extauthz-sni": "%REQUESTED_SERVER_NAME%",
    "x-extauthz-tls-version": "%DOWNSTREAM_TLS_VERSION%",
})
#: Headers Envoy should add too, but whose absence only leaves the view with less (the same
#: "v1:" rule when present). Envoy never forwards the client's own content-length; without it a
#: request whose body Envoy does not forward (no with_request_body) shows no sign of one, where the
#: gRPC mode's headers do (signature and OpenAPI body checks read it).
ENVOY_OPTIONAL_HEADERS: Mapping[str, str] = MappingProxyType({
    "x-extauthz-content-length": "%REQ(CONTENT-LENGTH)%",
})
_ENVOY_HEADER_NAMES = tuple(ENVOY_HEADERS)
_CONTENT_LENGTH = "x-extauthz-content-length"
_PREFIX_LENGTH = len(ENVOY_VALUE_PREFIX)
#: Headers of the hop between Envoy and us, not of the client's request: dropped from the view.
#: (Envoy sends content-length for the body it forwards, never the client's own; Host names us.)
_HOP_HEADERS = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "keep-alive", "x-envoy-internal",
    "x-envoy-expected-rq-timeout-ms",
})


def _split_address(text: str) -> tuple[str, int]:
    """"10.0.0.1:5000" / "[::1]:5000" -> (address, port), as Envoy's SocketAddress would hold them."""
    if not text:
        return "", 0
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return text, 0  # a pipe path, or no port
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _first_dns_san(certificate: str) -> str:
    """The certificate's first DNS SAN ("" without one, or when it does not parse)."""
    if not certificate:
        return ""
    from extauthz.identity.certs import CertificateError, peer_certificate  # identity imports this module

    try:
        names = peer_certificate(certificate).dns_names
    except CertificateError:
        return ""
    return names[0] if names else ""


class HttpOrigin:
    """What Envoy's HTTP mode says about the request beyond the request itself, from ENVOY_HEADERS.

    Request.attributes in HTTP mode (the gRPC mode has Envoy's AttributeContext there). It keeps the
    headers as they came (checked, "v1:" included) and reads a field when asked, as the gRPC mode
    reads its message: most requests need two of the eleven. Never changed once built.
    """

    __slots__ = ("_sent",)

    def __init__(self, sent: Mapping[str, str]) -> None:
        #: ENVOY_HEADERS by name, each value starting with ENVOY_VALUE_PREFIX (request_from_http checked).
        self._sent = sent

    def _get(self, name: str) -> str:
        return self._sent[name][_PREFIX_LENGTH:]

    @property
    def id(self) -> str:
        return self._get("x-extauthz-stream-id")

    @property
    def scheme(self) -> str:
        return self._get("x-extauthz-scheme")

    @property
    def protocol(self) -> str:
        return self._get("x-extauthz-protocol")

    @property
    def sni(self) -> str:
        return self._get("x-extauthz-sni")

    @property
    def tls_version(self) -> str:
        return self._get("x-extauthz-tls-version")

    @property
    def peer_address(self) -> str:
        return self._get("x-extauthz-peer-address")

    def source(self) -> Peer:
        address, port = _split_address(self.peer_address)
        encoded = self._get("x-extauthz-peer-cert")
        certificate = unquote_to_bytes(encoded).decode("utf-8", "replace") if encoded else ""
        # As Envoy's gRPC mode: the first URI SAN, else the first DNS SAN, else the subject. The DNS
        # SAN is read from the certificate itself (parsed once per certificate, shared with the
        # mtls check), so Envoy needs no header more for the rare certificate without a URI SAN.
        principal = (self._get("x-extauthz-peer-uri-san").split(",", 1)[0].strip() or _first_dns_san(certificate)
                     or self._get("x-extauthz-peer-subject"))
        if not (address or principal or certificate):
            return _NO_PEER
        return Peer(address, port, principal, certificate)

    def destination(self) -> Peer:
        address, port = _split_address(self._get("x-extauthz-local-address"))
        return Peer(address, port) if address else _NO_PEER


class HttpParts(NamedTuple):
    """One authorization request as the HTTP listener parsed it (extauthz.wire.http_authz)."""

    method: str
    #: The request target as sent ("/prefix/path?query").
    target: str
    #: Lower-case names; a header sent more than once is joined with ",". Consumed by request_from_http.
    headers: dict[str, str]
    body: bytes = b""
    #: Values that are not UTF-8, by name (decoded as Latin-1 in ``headers``).
    raw_headers: Mapping[str, bytes] = _EMPTY
    #: Every line of a header sent more than once.
    header_lines: Mapping[str, tuple[str, ...]] = _EMPTY
    #: ENVOY_HEADERS as sent, when the listener already filed them apart (see header_kind): then
    #: ``headers`` holds neither them nor the hop's own headers. None: request_from_http does it.
    envoy: dict[str, str] | None = None


#: header_kind's answers.
CLIENT_HEADER, ENVOY_HEADER, HOP_HEADER = 0, 1, 2


def header_kind(name: str) -> int:
    """Whether a (lower-case) header name is the client's, one of ENVOY_HEADERS, or of the hop itself."""
    if name in ENVOY_HEADERS or name in ENVOY_OPTIONAL_HEADERS:
        return ENVOY_HEADER
    return HOP_HEADER if name in _HOP_HEADERS else CLIENT_HEADER


_startswith = str.startswith
_PREFIXES = (ENVOY_VALUE_PREFIX,) * len(ENVOY_HEADERS)


def _refuse_envoy_headers(envoy: Mapping[str, str | None], which: Mapping[str, str] = ENVOY_HEADERS) -> None:
    """Raise for the first of ``which`` missing or without the prefix."""
    for name, formatter in which.items():
        value = envoy.get(name)
        if value is None or not value.startswith(ENVOY_VALUE_PREFIX):
            what = "not sent" if value is None else f"sent without the {ENVOY_VALUE_PREFIX!r} prefix"
            raise BadRequest("envoy_header_missing", f"{name} {what}: Envoy's ext_authz http_service must set it "
                             f"in authorization_request.headers_to_add as '{ENVOY_VALUE_PREFIX}{formatter}' "
                             f"(docs/http-mode.md)", 500)


def request_from_http(parts: HttpParts, path_prefix: str = "") -> Request:
    """Build the request view from Envoy's HTTP authorization request, or raise BadRequest.

    The same view as request_from_check gives for the same client request: the path without
    Envoy's ``path_prefix``, ``:authority`` from Host, the pseudo-headers a policy may read, the
    connection facts from ENVOY_HEADERS (removed from ``headers``), and the headers of this hop
    itself (content-length...) dropped. ``parts.headers`` is taken over, not copied.
    """
    headers = parts.headers
    lines = parts.header_lines
    envoy = parts.envoy
    if envoy is None:
        envoy = {name: headers.pop(name) for name in (*_ENVOY_HEADER_NAMES, _CONTENT_LENGTH) if name in headers}
        for name in _HOP_HEADERS:
            if name in headers:
                del headers[name]
    sent: list[Any] = list(map(envoy.get, _ENVOY_HEADER_NAMES))  # C loops: this runs for every request
    if None in sent or False in map(_startswith, sent, _PREFIXES):
        _refuse_envoy_headers(envoy)
    if lines:
        for name in (*_ENVOY_HEADER_NAMES, _CONTENT_LENGTH):
            if name in lines:
                raise BadRequest("duplicate_header", f"{name} appears more than once")
    content_length = envoy.get(_CONTENT_LENGTH)
    if content_length is not None:
        if not content_length.startswith(ENVOY_VALUE_PREFIX):
            _refuse_envoy_headers(envoy, ENVOY_OPTIONAL_HEADERS)
        if len(content_length) > _PREFIX_LENGTH:
            headers["content-length"] = content_length[_PREFIX_LENGTH:]
    origin = HttpOrigin(envoy)
    authority = envoy["x-extauthz-authority"][_PREFIX_LENGTH:]
    scheme = envoy["x-extauthz-scheme"][_PREFIX_LENGTH:]
    host = _normalized(authority, True)
    if "," in authority:
        raise BadRequest("duplicate_header", ":authority appears more than once")

    raw_path = parts.target
    if path_prefix:
        if not raw_path.startswith(path_prefix):
            raise BadRequest("invalid_path", "path does not start with the configured path prefix")
        raw_path = raw_path[len(path_prefix):]
    path_part, _, raw_query = raw_path.partition("?")
    path_part = path_part.partition("#")[0]
    method = parts.method
    path = "*" if method == "CONNECT" and not path_part else _normalized(path_part, False)
    # The pseudo-headers Envoy's gRPC mode shows a policy (request.headers[':path']...).
    headers[":authority"] = authority
    headers[":path"] = raw_path
    headers[":method"] = method
    if scheme:
        headers[":scheme"] = scheme

    raw_headers = parts.raw_headers
    if raw_headers:
        raw_headers = {name: value for name, value in raw_headers.items() if name in headers}
    if lines:
        lines = {name: value for name, value in lines.items() if name in headers}
    return Request(
        method,
        host,
        path,
        raw_path,
        raw_query,
        headers,
        parts.body,
        headers.get("x-envoy-auth-partial-body") == "true",
        raw_headers or _EMPTY,
        lines or _EMPTY,
        origin,
        {},
    )
