"""Per-request evaluation state shared by the checks of one policy, and how CEL reads it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from extauthz.cel import MISSING, Accessor
from extauthz.client_ip import client_ip
from extauthz.request import Peer, Request

if TYPE_CHECKING:
    from extauthz.policy.compiler import CompiledPolicy

__all__ = ["ANONYMOUS", "CheckContext", "Denial", "accessor_for"]

#: The identity of a request that no identity source recognised (or of a policy without any).
ANONYMOUS: Mapping[str, Any] = {"kind": "anonymous", "source": "", "subject": "", "claims": {}, "scopes": []}


@dataclass(frozen=True, slots=True)
class Denial:
    """Why a check refused the request. ``reason`` is a stable, documented code."""

    status: int
    reason: str
    message: str
    #: Headers for the client (e.g. WWW-Authenticate, Retry-After).
    headers: tuple[tuple[str, str], ...] = ()
    #: Which check/rule denied, for logs and explain output.
    rule: str = ""
    #: The request itself is malformed or ambiguous (two credentials where one is read): refused even
    #: by a dry-run policy or layer, as a malformed path is refused before any policy is chosen. A
    #: dry-run lets a request through to learn what enforcing would do, not to forward a forgery.
    malformed: bool = False


@dataclass(slots=True)
class CheckContext:
    """Mutable state of one Check as it goes through a policy's checks."""

    request: Request
    policy: CompiledPolicy | None = None
    identity: Mapping[str, Any] = field(default_factory=lambda: ANONYMOUS)
    #: The rule that decided, once the rules check ran.
    rule: str = ""
    #: Headers to set on the upstream request on allow (name, value).
    upstream_headers: list[tuple[str, str]] = field(default_factory=list)
    #: Client-supplied headers to strip from the upstream request on allow.
    remove_headers: list[str] = field(default_factory=list)
    #: Headers for the client's response, on allow and deny (e.g. RateLimit).
    client_headers: list[tuple[str, str]] = field(default_factory=list)
    #: Extra attributes for the decision log, metrics and trace (no secrets).
    attributes: dict[str, Any] = field(default_factory=dict)
    #: When set (explain, policy tests), checks append human-readable steps here.
    steps: list[str] | None = None
    #: The API operation the request is (``request.operation``), once the openapi check found it: a
    #: map, or a function that builds it when a rule first reads it (most policies never do).
    operation: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None
    #: Work a check left for a later check of its policy to carry in its own store call, so both
    #: share one round trip: the detect check's ops, which the quota check sends with its charge
    #: (``rider``) and then settles (``await pending.wait()``).
    pending: Any = None

    def note(self, text: str) -> None:
        if self.steps is not None:
            self.steps.append(text)


def _peer_field(peer_of: Callable[[Request], Peer], name: str) -> Callable[[CheckContext], Any]:
    if name == "client_ip":  # source only: the peer, or x-forwarded-for with --xff-trusted-hops
        # source_address: the peer's address without building the whole peer (certificate and all).
        return lambda ctx: client_ip(ctx.request.source_address, ctx.request.headers.get("x-forwarded-for"))

    def get(ctx: CheckContext) -> Any:
        value = getattr(peer_of(ctx.request), name)
        if name == "labels":
            return dict(value)
        return value

    return get


_REQUEST_FIELDS: dict[str, Callable[[Request], Any]] = {
    "method": lambda r: r.method,
    "host": lambda r: r.host,
    "path": lambda r: r.path,
    "raw_path": lambda r: r.raw_path,
    "query": lambda r: dict(r.query),
    "query_all": lambda r: {k: list(v) for k, v in r.query_all.items()},
    "headers": lambda r: dict(r.headers),
    "body": lambda r: MISSING if r.body_text is None else r.body_text,
    "raw_body": lambda r: r.body,
    "id": lambda r: r.id,
    "scheme": lambda r: r.scheme,
    "protocol": lambda r: r.protocol,
    "size": lambda r: r.size,
    "partial_body": lambda r: r.partial_body,
    "fragment": lambda r: r.fragment,
}


def _operation(ctx: CheckContext) -> Any:
    operation = ctx.operation
    if operation is None:
        return MISSING
    if callable(operation):
        operation = ctx.operation = operation()
    return operation


def _whole_request(ctx: CheckContext) -> dict[str, Any]:
    fields = {name: get(ctx.request) for name, get in _REQUEST_FIELDS.items()}
    if ctx.operation is not None:
        fields["operation"] = _operation(ctx)
    return fields


def _root(path: tuple[str, ...]) -> tuple[Callable[[CheckContext], Any], int]:
    """The getter for the fixed part of a path, and how many path parts it consumed."""
    var = path[0]
    if var == "request":
        if len(path) == 1:
            return _whole_request, 1
        if path[1] == "operation":
            return _operation, 2
        get_field = _REQUEST_FIELDS[path[1]]
        return (lambda ctx: get_field(ctx.request)), 2
    if var in ("source", "destination"):
        def peer_of(r: Request) -> Peer:
            return r.source if var == "source" else r.destination

        if len(path) == 1:
            names: tuple[str, ...] = ("address", "port", "principal", "certificate", "service", "labels")
            names += ("client_ip",) if var == "source" else ()
            getters = {name: _peer_field(peer_of, name) for name in names}
            return (lambda ctx: {name: get(ctx) for name, get in getters.items()}), 1
        return _peer_field(peer_of, path[1]), 2
    if var == "tls":
        return (lambda ctx: {"sni": ctx.request.sni, "version": ctx.request.tls_version}), 1
    if var == "context":
        return (lambda ctx: dict(ctx.request.context_extensions)), 1
    if var == "metadata":
        return (lambda ctx: dict(ctx.request.metadata)), 1
    if var == "identity":
        return (lambda ctx: ctx.identity), 1
    raise KeyError(var)


def accessor_for(path: tuple[str, ...]) -> Accessor:
    """Build the function that reads ``path`` from a CheckContext (MISSING when absent).

    The common shapes (``request.<field>``, ``request.headers['name']``) get direct closures:
    they run for every rule of every request.
    """
    if path[0] == "request" and len(path) == 2 and path[1] in _DIRECT_FIELDS:
        name = path[1]
        return lambda ctx: getattr(ctx.request, name)
    if path[0] == "request" and len(path) == 3 and path[1] in ("headers", "query"):
        field_name, key = path[1], path[2]
        return lambda ctx: getattr(ctx.request, field_name).get(key, MISSING)
    root, consumed = _root(path)
    keys = path[consumed:]
    if not keys:
        return root

    def get(ctx: CheckContext) -> Any:
        value = root(ctx)
        for key in keys:
            if type(value) is dict or isinstance(value, Mapping):  # the ABC check only for other maps
                value = value.get(key, MISSING)
                if value is MISSING:
                    return MISSING
            else:
                return MISSING
        return value

    return get


#: Request fields whose value CEL can use as it is (strings, numbers, booleans, bytes).
_DIRECT_FIELDS = frozenset(
    {"method", "host", "path", "raw_path", "id", "scheme", "protocol", "size", "partial_body", "fragment"}
)
