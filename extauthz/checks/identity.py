"""Identity: who is calling, from an ordered list of sources (``spec.identity``).

The first source whose credentials are present decides: it accepts and sets ``ctx.identity`` (read
by every later rule, response header and quota key), or it rejects and the request is denied, with
no fall-through to the sources after it (a bad token must never end up as "anonymous" or be tried
against a weaker source). When no source finds credentials the request is denied with 401, unless
the list ends with an explicit ``anonymous`` entry.

Denials follow RFC 6750: 401 with ``WWW-Authenticate: Bearer error="invalid_token",
error_description="..."`` (the scheme of the source that rejected), 400 ``invalid_request`` for
ambiguous credentials, 403 ``insufficient_scope`` when ``requiredScopes`` are missing, and 503
without a challenge when a dependency (keys, introspection, revocation store) cannot answer. The
description is specific but never contains the credential.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from extauthz.checks import Phase, register
from extauthz.context import CheckContext, Denial
from extauthz.identity import Rejected, Source, source_kinds
from extauthz.policy.build import BuildContext, Spec

__all__ = ["IdentityCheck"]

log = logging.getLogger("extauthz.identity")

_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_COMMON_FIELDS = {"name", "requiredScopes"}
_UNSAFE = re.compile(r'[^\x20\x21\x23-\x5b\x5d-\x7e]')


def _quoted(text: str) -> str:
    """An RFC 6750 error_description value: printable ASCII without quote or backslash."""
    return _UNSAFE.sub("'", text)[:200]


@dataclass(frozen=True, slots=True)
class Entry:
    """One ``identity:`` list entry: its source and the scopes it must grant."""

    source: Source
    required_scopes: tuple[str, ...]
    rule: str


def challenge(scheme: str, error: str = "", description: str = "", scope: str = "") -> str:
    """A WWW-Authenticate value (RFC 6750 3): ``Bearer error="...", error_description="..."``."""
    params = []
    if error:
        params.append(f'error="{error}"')
    if description:
        params.append(f'error_description="{_quoted(description)}"')
    if scope:
        params.append(f'scope="{_quoted(scope)}"')
    return f"{scheme} {', '.join(params)}" if params else scheme


@register("identity", Phase.IDENTITY)
class IdentityCheck:
    """Asks the sources in order; the first with credentials accepts (sets ctx.identity) or denies."""

    def __init__(self, entries: tuple[Entry, ...], policy: str) -> None:
        self.entries = entries
        self.may_wait = any(e.source.may_wait for e in entries)
        self.credential_locations = tuple(dict.fromkeys(
            (location.kind, location.name) for e in entries for location in getattr(e.source, "locations", ())
        ))  # fmt: skip
        #: Credential headers that a source strips (``forward: false``) when it reads them.
        self.owned_credentials = tuple(dict.fromkeys(
            location for e in entries for location in getattr(e.source, "locations", ())
            if location.kind == "header" and not location.forward
        ))  # fmt: skip
        schemes = dict.fromkeys(e.source.challenge_scheme for e in entries if e.source.challenge_scheme)
        self.missing = Denial(
            401, "credentials_missing", "credentials are required",
            headers=tuple(("www-authenticate", scheme) for scheme in schemes), rule="identity",
        )
        self.policy = policy

    async def check(self, ctx: CheckContext) -> Denial | None:
        for entry in self.entries:
            source = entry.source
            try:
                identity = await source.authenticate(ctx)
            except Rejected as rejected:
                return self._rejection(ctx, entry, rejected)
            if identity is None:
                if ctx.steps is not None:  # explain only: no formatting on the serving path
                    ctx.note(f"identity {source.name} ({source.kind}): no credentials")
                continue
            if entry.required_scopes:
                granted = identity.get("scopes") or ()
                missing = [s for s in entry.required_scopes if s not in granted]
                if missing:
                    shortfall = Rejected("insufficient_scope", "token lacks a required scope", status=403,
                                         error="insufficient_scope", scope=" ".join(entry.required_scopes))
                    ctx.identity = identity
                    return self._rejection(ctx, entry, shortfall)
            ctx.identity = identity
            # The subject is in the decision's identity, where the decision log and traces apply
            # their subject privacy setting (hash/plain/none); attributes are logged as they are.
            ctx.attributes["identity_kind"] = source.kind
            ctx.attributes["identity_source"] = source.name
            if ctx.steps is not None:
                ctx.note(f"identity {source.name} ({source.kind}): accepted subject {identity.get('subject', '')!r}")
            return None
        ctx.note("identity: no source found credentials -> deny")
        return self.missing

    def _rejection(self, ctx: CheckContext, entry: Entry, rejected: Rejected) -> Denial:
        source = entry.source
        ctx.attributes["identity_kind"] = source.kind
        ctx.attributes["identity_source"] = source.name
        ctx.note(f"identity {source.name} ({source.kind}): rejected: {rejected.reason} ({rejected.description})")
        log.debug("policy %s: identity %s rejected the request: %s", self.policy, source.name, rejected.reason)
        headers: tuple[tuple[str, str], ...] = ()
        if rejected.error and source.challenge_scheme:
            if getattr(source, "challenge_errors", True):
                value = challenge(source.challenge_scheme, rejected.error, rejected.description, rejected.scope)
            else:  # a scheme without error parameters (Basic: realm and charset only, RFC 7617)
                value = source.challenge_scheme
            headers = (("www-authenticate", value),)
        return Denial(rejected.status, rejected.reason, rejected.description, headers=headers, rule=entry.rule,
                      malformed=rejected.status == 400)

    @classmethod
    def from_spec(cls, spec: Spec, build: BuildContext) -> IdentityCheck | None:
        kinds = source_kinds()
        entries: list[Entry] = []
        names: set[str] = set()
        items = spec.items(nonempty="identity source")
        for position, item in enumerate(items):
            if not item.is_mapping(allowed=_COMMON_FIELDS | set(kinds)):
                continue
            name = item.str("name", required=True) or ""
            if name and _NAME.fullmatch(name) is None:
                item.error("must be lower-case letters, digits and '-'", "name")
            if name in names:
                item.error("duplicate identity source name", "name")
            names.add(name)
            kind = item.one_of(sorted(kinds), what="source kind")
            if kind is None:
                continue
            if kind == "anonymous" and position != len(items) - 1:
                item.error("anonymous accepts every request, so it must be the last entry", kind)
            source = kinds[kind](name, item.child(kind), build)
            required = tuple(item.str_list("requiredScopes", nonempty="scope"))  # [] would require none
            if required and kind in ("anonymous", "mtls", "basic"):
                item.error(f"{kind} identities have no scopes", "requiredScopes")
            if source is not None:
                entries.append(Entry(source, required, f"identity/{name}"))
        if not entries:
            return None
        return cls(tuple(entries), build.policy_name)
