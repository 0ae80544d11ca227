"""Security requirements: an operation's ``security`` judged against the identity the policy established.

The identity sources of the policy (``spec.identity``) have already verified the caller; what is left
is whether that identity is one the operation accepts. A requirement is a set of schemes that must
all be satisfied (AND); an operation's list of requirements is satisfied by any one of them (OR); an
empty requirement (``{}``) or ``security: []`` makes the operation public.

A scheme is satisfied by an identity of a kind that presents such credentials, unless the policy maps
the scheme to named identity sources instead:

| scheme | identity kinds |
| --- | --- |
| ``oauth2``, ``openIdConnect``, ``http`` ``bearer`` | ``jwt``, ``oauth2Introspection`` |
| ``apiKey`` | ``apiKey`` |
| ``mutualTLS`` | ``mtls`` |
| ``http`` ``basic`` | ``basic`` |
| other ``http`` schemes | none: map them to identity sources |

and by the scopes the requirement lists: every one must be among ``identity.scopes`` (exact strings;
for schemes other than OAuth2/OIDC they are roles, as OpenAPI 3.1 says, and checked the same way).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_KINDS", "Requirement", "Scheme", "SecurityOutcome", "judge"]

DEFAULT_KINDS: dict[str, frozenset[str]] = {
    "oauth2": frozenset({"jwt", "oauth2Introspection"}),
    "openIdConnect": frozenset({"jwt", "oauth2Introspection"}),
    "bearer": frozenset({"jwt", "oauth2Introspection"}),
    "apiKey": frozenset({"apiKey"}),
    "mutualTLS": frozenset({"mtls"}),
    "basic": frozenset({"basic"}),
}


@dataclass(frozen=True, slots=True)
class Scheme:
    name: str
    type: str
    #: Identity kinds that satisfy it (``identity.kind``).
    kinds: frozenset[str]
    #: Identity sources that satisfy it (``identity.source``, the policy's entry names).
    sources: frozenset[str]
    #: The WWW-Authenticate scheme a client is challenged with ("" when HTTP has none for it).
    challenge: str

    def accepts(self, identity: Mapping[str, Any]) -> bool:
        return identity.get("kind") in self.kinds or identity.get("source") in self.sources


@dataclass(frozen=True, slots=True)
class Requirement:
    """One alternative of an operation's ``security``: every scheme, with its scopes."""

    schemes: tuple[tuple[Scheme, tuple[str, ...]], ...]

    @property
    def public(self) -> bool:
        return not self.schemes


@dataclass(frozen=True, slots=True)
class SecurityOutcome:
    """Why the identity does not satisfy the operation (None from ``judge`` when it does)."""

    status: int
    reason: str
    message: str
    #: WWW-Authenticate schemes to challenge with (401), or the scope a 403 asks for.
    challenges: tuple[str, ...] = ()
    scope: str = ""


def _authenticated(identity: Mapping[str, Any]) -> bool:
    return identity.get("kind", "anonymous") != "anonymous"


def judge(requirements: tuple[Requirement, ...], identity: Mapping[str, Any]) -> SecurityOutcome | None:
    """None when some requirement is met; else the most helpful refusal."""
    if not requirements or any(r.public for r in requirements):
        return None
    challenges = tuple(dict.fromkeys(s.challenge for r in requirements for s, _ in r.schemes if s.challenge))
    if not _authenticated(identity):
        return SecurityOutcome(401, "credentials_missing", "credentials are required", challenges)
    granted = identity.get("scopes") or ()
    short_of_scope: Requirement | None = None
    for requirement in requirements:
        if all(scheme.accepts(identity) for scheme, _ in requirement.schemes):
            if all(scope in granted for _, scopes in requirement.schemes for scope in scopes):
                return None
            short_of_scope = short_of_scope or requirement
    if short_of_scope is not None:
        needed = " ".join(dict.fromkeys(scope for _, scopes in short_of_scope.schemes for scope in scopes))
        return SecurityOutcome(403, "insufficient_scope", "the credentials lack a scope this operation requires",
                               scope=needed)  # fmt: skip
    kinds = ", ".join(sorted({s.name for r in requirements for s, _ in r.schemes}))
    return SecurityOutcome(401, "openapi_credentials_not_accepted",
                           f"this operation accepts other credentials (security schemes: {kinds})", challenges)
