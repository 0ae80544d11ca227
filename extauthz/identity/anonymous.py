"""An explicit fallback: requests without credentials continue as the anonymous identity.

Fail-closed is the default (a policy whose sources find no credentials denies 401); a policy
that also serves the public says so by ending its list with an ``anonymous`` entry. Rules then
tell callers apart with ``identity.kind == 'anonymous'``. Presented but invalid credentials are
still rejected by the source that recognised them: anonymous never rescues a bad token.
"""

from __future__ import annotations

from extauthz.context import CheckContext
from extauthz.identity import Identity, make_identity, source_kind
from extauthz.policy.build import BuildContext, Spec

__all__ = ["AnonymousSource"]


@source_kind("anonymous")
class AnonymousSource:
    kind = "anonymous"
    challenge_scheme = ""
    may_wait = False

    def __init__(self, name: str) -> None:
        self.name = name
        self.identity = make_identity("anonymous", name, "")

    async def authenticate(self, ctx: CheckContext) -> Identity | None:
        return self.identity

    @classmethod
    def from_spec(cls, name: str, spec: Spec, build: BuildContext) -> AnonymousSource | None:
        if isinstance(spec.value, dict):
            spec.is_mapping(allowed=())
        elif spec.present:
            spec.error("takes no options (write anonymous: {})")
        return cls(name)
