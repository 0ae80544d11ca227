"""Revocation: a denylist of token ids (``jti``) or API key ids, checked after the signature.

Two places, either or both:

- ``file``: one id per line (``#`` starts a comment), typically a mounted Secret or ConfigMap;
  re-read in the background when it changes.
- ``redisSet``: a Redis set of ids, asked on every request (the sidecar's ``--redis-url``); when
  Redis cannot answer, the request is denied with 503 (never allowed).

``withoutRedis`` says what a sidecar started without ``--redis-url`` does with the set: ``deny``
(the default) refuses every request with a token or key id (503 ``revocation_unavailable``), as
it cannot know whether the id is revoked; ``skip`` goes on with the file alone, as the policy then
explicitly says. The offline commands (``extauthz test``, ``explain``, ``validate``) never ask
Redis: they skip the set, since they test the policy, not the set's contents.
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

_FIELDS = {"file", "redisSet", "withoutRedis"}
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
    """Answers "is this id revoked?"; raises Rejected (503) when the set cannot be asked."""

    def __init__(self, file: WatchedPath[frozenset[str]] | None, store: Store | None, set_name: str,
                 deny_without_store: bool = False) -> None:  # fmt: skip
        self.file = file
        self.store = store
        self.set_name = set_name
        #: A set is named, there is no Redis to ask, and the policy says deny (withoutRedis).
        self.deny_without_store = deny_without_store and bool(set_name) and store is None
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
                raise unavailable("revocation_unavailable", "revocation status cannot be checked") from None
        if self.deny_without_store:
            raise unavailable("revocation_unavailable", "revocation status cannot be checked (no Redis configured)")
        return False


def revocation_from_spec(spec: Spec, build: BuildContext) -> RevocationList | None:
    if not spec.present or not spec.is_mapping(allowed=_FIELDS):
        return None
    file_name = spec.str("file")
    set_name = spec.str("redisSet")
    without_redis = spec.str("withoutRedis", "deny", choices=("deny", "skip"))
    if file_name is None and set_name is None:
        spec.error("give file, redisSet or both")
        return None
    if set_name is None and spec.child("withoutRedis").present:
        spec.error("applies to redisSet only", "withoutRedis")
    watched: WatchedPath[frozenset[str]] | None = None
    if file_name is not None:
        watched = build.watched(spec.child("file"), file_name, parse_denylist, what="revocation list")
    store: Store | None = None
    settings = build.services.settings
    if set_name is not None:
        if not set_name.strip():
            spec.error("must not be empty", "redisSet")
        elif settings.get("redis_url"):
            store = store_for(build.services)
        elif settings.get("offline"):
            without_redis = "skip"  # extauthz test/explain/validate: the policy is tested, not the set
        elif without_redis == "deny":
            log.warning("policy %s: revocation set %s cannot be asked without --redis-url: requests with a "
                        "token or key id are refused (503 revocation_unavailable; withoutRedis: skip "
                        "consults the file alone)", build.policy_name, set_name)  # fmt: skip
        else:
            log.info("policy %s: revocation set %s is not consulted without --redis-url (withoutRedis: skip)",
                     build.policy_name, set_name)  # fmt: skip
    return RevocationList(watched, store, set_name or "", deny_without_store=without_redis == "deny")
