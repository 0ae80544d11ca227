"""Stores: where state shared between requests lives (quota counters, seen nonces, revocations).

Every store implements :class:`Store`. The in-memory store is exact for one process; the Redis
store is shared by every replica. Checks get the configured store with :func:`store_for`, so a
policy never names a backend: the operator chooses one for the whole sidecar (``--redis-url``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from extauthz.policy.build import Services

__all__ = ["Store", "StoreError", "store_for"]


class StoreError(Exception):
    """The store could not answer (unreachable, timed out, circuit open). Never an allow."""


@runtime_checkable
class Store(Protocol):
    async def remember_once(self, key: str, ttl: float) -> bool:
        """Record ``key`` for ``ttl`` seconds; True if it was not already recorded (a fresh nonce)."""
        ...

    async def is_member(self, set_name: str, member: str) -> bool:
        """True if ``member`` is in the set ``set_name`` (revocation denylists). Raises StoreError."""
        ...


def store_for(services: Services) -> Store:
    """The sidecar's store: Redis when ``redis_url`` is configured, else in-memory. One per process."""
    url = services.settings.get("redis_url")
    if url:
        from extauthz.stores.redis import RedisStore

        return services.shared(("store", "redis", url), lambda: RedisStore(url))
    from extauthz.stores.memory import MemoryStore

    return services.shared(("store", "memory"), MemoryStore)
