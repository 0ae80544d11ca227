"""Revocation: a denylist of token ids (``jti``) or API key ids, checked after the signature.

Two places, either or both:

- ``file``: one id per line (``#`` starts a comment), typically a mounted Secret or ConfigMap;
  re-read in the background when it changes.
- ``redisSet``: a Redis set of ids, asked on every request (the sidecar's ``--redis-url``).

``onStoreError`` says what happens when the set cannot be asked: Redis does not answer, or the
sidecar runs without ``--redis-url``. ``deny`` (the default) refuses the request with 503
``revocation_unavailable``; ``allow`` goes on with the file alone, as the policy then explicitly says.
"""

from __future__ import annotations

import logging
from pathlib import Path

from extauthz.identity import unavailable
from extauthz.policy.build import BuildContext, Spec
from extauthz.stores import Store, StoreError, store_for
from extauthz.watched import WatchedPath

__all__ = ["RevocationList", "revocation_from_spec"]

log = logging.getLogger("extauthz.identity.revocation")

_FIELDS = {"file", "redisSet", "onStoreError"}
_MAX_ID = 512


def parse_denylist(path: Path) -> frozenset[str]:
    ids: set[str] = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if len(text) > _MAX_ID or any(c.isspace() for c in text):
            raise ValueError(f"line {number}: an id is one word of at most {_MAX_ID} characters")
        ids.add(text)
    return frozenset(ids)


class RevocationList:
    """Answers "is this id revoked?"; raises Rejected (503) when the set cannot be asked and the
    policy says deny."""

    def __init__(self, file: WatchedPath[frozenset[str]] | None, store: Store | None, set_name: str,
                 on_store_error: str = "deny") -> None:  # fmt: skip
        self.file = file
        self.store = store
        self.set_name = set_name
        self.on_store_error = on_store_error
        #: A set is named but there is no Redis to ask (no --redis-url).
        self.no_store = bool(set_name) and store is None
        #: Only a Redis lookup waits on I/O.
        self.may_wait = store is not None

    async def is_revoked(self, item_id: str) -> bool:
        if not item_id:
            return False
        if self.file is not None and self.file.value is not None and item_id in self.file.value:
            return True
        if self.store is not None:
            try:
                return await self.store.is_member(self.set_name, item_id)
            except StoreError as exc:
                log.warning("revocation store %s unavailable: %s", self.set_name, exc)
                if self.on_store_error == "allow":
                    return False
                raise unavailable("revocation_unavailable", "revocation status cannot be checked") from None
        if self.no_store and self.on_store_error == "deny":
            raise unavailable("revocation_unavailable", "revocation status cannot be checked (no Redis configured)")
        return False


def revocation_from_spec(spec: Spec, build: BuildContext) -> RevocationList | None:
    if not spec.present or not spec.is_mapping(allowed=_FIELDS):
        return None
    file_name = spec.str("file")
    set_name = spec.str("redisSet")
    on_store_error = spec.str("onStoreError", "deny", choices=("deny", "allow"))
    if file_name is None and set_name is None:
        spec.error("give file, redisSet or both")
        return None
    if set_name is None and spec.child("onStoreError").present:
        spec.error("applies to redisSet only", "onStoreError")
    watched: WatchedPath[frozenset[str]] | None = None
    if file_name is not None:
        watched = build.watched(spec.child("file"), file_name, parse_denylist, what="revocation list")
    store: Store | None = None
    if set_name is not None:
        if not set_name.strip():
            spec.error("must not be empty", "redisSet")
        elif build.services.settings.get("redis_url"):
            store = store_for(build.services)
        elif on_store_error == "deny":
            log.warning("policy %s: revocation set %s cannot be asked without --redis-url: requests with a "
                        "token or key id are refused (503 revocation_unavailable; onStoreError: allow "
                        "consults the file alone)", build.policy_name, set_name)  # fmt: skip
        else:
            log.info("policy %s: revocation set %s is not consulted without --redis-url (onStoreError: allow)",
                        build.policy_name, set_name)  # fmt: skip
    return RevocationList(watched, store, set_name or "", on_store_error)
