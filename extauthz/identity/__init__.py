"""Identity sources: who is calling (a workload certificate, a user token, a partner key).

A policy's ``identity:`` section is an ordered list of sources. Each entry names one source kind
(``mtls``, ``jwt``, ``apiKey``, ``oauth2Introspection``, ``basic``, ``anonymous``); the identity check asks
them in order and the first one whose credentials are present decides (see
:mod:`extauthz.checks.identity`).

Adding a source kind means adding a file to this package that decorates a class with
:func:`source_kind`. The contract of a source:

- ``from_spec(name, spec, build)`` runs at policy load, validates its options (errors through
  ``spec``) and prepares everything (keys, tables, caches), or returns ``None`` after an error.
- ``async authenticate(ctx)`` runs per request and returns the identity mapping, ``None`` when
  the request carries no credentials for this source, or raises :class:`Rejected`. It never
  performs file I/O; network I/O only where ``may_wait`` is True.

Identities are plain dicts, lists and strings so that CEL can read them. They may be cached and
shared between requests: treat them as read-only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from extauthz._plugins import import_submodules

if TYPE_CHECKING:
    from extauthz.context import CheckContext
    from extauthz.policy.build import BuildContext, Spec

__all__ = [
    "Identity",
    "Rejected",
    "Source",
    "SourceFactory",
    "make_identity",
    "source_kind",
    "source_kinds",
]

Identity = Mapping[str, Any]


class Rejected(Exception):
    """The credentials are present but not acceptable: the request is denied, no fall-through.

    ``reason`` is a stable documented code; ``description`` is safe to show to the client (it never
    contains the credential or anything taken from it); ``error`` is the RFC 6750 error code used
    in ``WWW-Authenticate`` ("" for none, e.g. on 503).
    """

    def __init__(self, reason: str, description: str, *, status: int = 401, error: str = "invalid_token",
                 scope: str = "") -> None:
        super().__init__(description)
        self.reason = reason
        self.description = description
        self.status = status
        self.error = error
        #: For insufficient_scope: the scopes the resource needs (space-separated).
        self.scope = scope

    def again(self) -> Rejected:
        """A fresh copy to raise: re-raising one cached instance would grow its traceback forever."""
        return Rejected(self.reason, self.description, status=self.status, error=self.error, scope=self.scope)


def unavailable(reason: str, description: str) -> Rejected:
    """A dependency (key set, introspection endpoint, revocation store) cannot answer: 503, never allow."""
    return Rejected(reason, description, status=503, error="")


class Source(Protocol):
    #: The entry's ``name`` in the policy.
    name: str
    #: The source kind (the key of the entry: "jwt", "mtls", ...).
    kind: str
    #: True when authenticate may wait on the network (the pipeline then applies its timeout).
    may_wait: bool
    #: The HTTP authentication scheme for WWW-Authenticate ("Bearer", "ApiKey", "mTLS"), with its
    #: parameters for schemes that need some (``Basic realm="x"``). A source whose scheme has no
    #: error parameters sets ``challenge_errors = False`` (read with getattr, default True).
    challenge_scheme: str

    async def authenticate(self, ctx: CheckContext) -> Identity | None: ...


SourceFactory = Callable[[str, "Spec", "BuildContext"], "Source | None"]

_KINDS: dict[str, SourceFactory] = {}
_loaded = False


def source_kind(kind: str) -> Callable[[type], type]:
    """Class decorator: the class handles identity entries with the key ``kind``."""

    def decorate(cls: type) -> type:
        if kind in _KINDS:
            raise RuntimeError(f"two identity sources registered for {kind!r}")
        _KINDS[kind] = cls.from_spec  # type: ignore[attr-defined]
        return cls

    return decorate


def source_kinds() -> dict[str, SourceFactory]:
    """Every registered source kind, importing this package's modules once."""
    global _loaded
    if not _loaded:
        import_submodules(__name__, __path__)
        _loaded = True
    return _KINDS


def make_identity(kind: str, source: str, subject: str, claims: Mapping[str, Any] | None = None,
                  scopes: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """The identity mapping every rule sees: kind, source, subject, claims, scopes, plus kind-specific keys."""
    identity: dict[str, Any] = {
        "kind": kind,
        "source": source,
        "subject": subject,
        "claims": dict(claims) if claims else {},
        "scopes": list(scopes) if scopes else [],
    }
    identity.update(extra)
    return identity
