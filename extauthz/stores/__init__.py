"""Stores: where state shared between requests lives (quota counters, seen nonces, revocations).

Every store implements :class:`Store`. The in-memory store is exact for one process; the Redis
store is shared by every replica. Checks get the configured store with :func:`store_for`, so a
policy never names a backend: the operator chooses one for the whole sidecar (``--redis-url``).

Quota counters use GCRA by default (the generic cell rate algorithm, a token bucket kept as one
number per key: the "theoretical arrival time", TAT). A charge of ``cost`` units against a bucket
that refills one unit every ``interval_us`` and holds at most ``burst`` units succeeds when
``max(TAT, now) + cost * interval_us - burst * interval_us <= now``, and then moves the TAT to
``max(TAT, now) + cost * interval_us``.

A quota may instead use a sliding log (``algorithm: sliding-log``): every admitted charge is kept
with its time, and a charge of ``cost`` succeeds when the units admitted in the last window (the
entries with ``now - time <= window``) plus ``cost`` are at most ``limit``. No interval of one
window's length ever holds more than ``limit`` units, at the price of one entry per admitted request
instead of one number per key.

Both stores implement exactly this arithmetic, in integer microseconds, so a policy behaves the same
on either.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NamedTuple, Protocol, runtime_checkable

from extauthz.policy.build import Services

__all__ = [
    "GCRA",
    "SLIDING_LOG",
    "Charge",
    "ChargeResult",
    "Store",
    "StoreConfigError",
    "StoreError",
    "local_store",
    "store_for",
]

#: ``Charge.kind``: the counter is a GCRA bucket (one number).
GCRA = 0
#: ``Charge.kind``: the counter is a sliding log (one entry per admitted charge).
SLIDING_LOG = 1


#: Charge.spec: interval_us, burst, cost, enforce, kind.
_SPEC = struct.Struct(">5d")


class StoreError(Exception):
    """The store could not answer (unreachable, timed out, circuit open). Never an allow."""


class StoreConfigError(ValueError):
    """The store settings are unusable (bad URL, unreadable password file); reported at start."""


class Charge(NamedTuple):
    """One quota counter to charge for one request.

    This and ChargeResult are NamedTuples, immutable like frozen dataclasses: several of each are
    built for every Check with quotas, and a frozen dataclass takes about three times as long.
    """

    #: The store key: namespaced, bounded and free of client-chosen bytes (the quota check hashes).
    key: str
    #: GCRA: microseconds for one unit to come back (window / limit); at least 1.
    #: Sliding log: the window, in microseconds.
    interval_us: int
    #: GCRA: units the bucket holds, what an idle client may spend at once. Sliding log: the limit.
    burst: int
    #: Units this request costs; 0 only reads the state.
    cost: int
    #: False for shadow quotas: reported, charged when there is room, but never refusing the others.
    enforce: bool = True
    #: GCRA or SLIDING_LOG.
    kind: int = GCRA

    @property
    def spec(self) -> bytes:
        """The numbers as the Redis script reads them: five big-endian doubles (``struct.unpack`` in
        the script, far cheaper there than parsing text; every number is an integer below 2**53)."""
        return _SPEC.pack(self.interval_us, self.burst, self.cost, 1 if self.enforce else 0, self.kind)


class ChargeResult(NamedTuple):
    """What one counter said. When the request as a whole is refused, nothing was charged."""

    #: This counter had room for the cost.
    allowed: bool
    #: Units left after this request (before it, when it was refused).
    remaining: int
    #: Seconds until the cost fits (0 when allowed).
    retry_after: float
    #: Seconds until the bucket is full again.
    reset_after: float


@runtime_checkable
class Store(Protocol):
    async def remember_once(self, key: str, ttl: float) -> bool:
        """Record ``key`` for ``ttl`` seconds; True if it was not already recorded (a fresh nonce)."""
        ...

    async def is_member(self, set_name: str, member: str) -> bool:
        """True if ``member`` is in the set ``set_name`` (revocation denylists). Raises StoreError."""
        ...

    async def charge(self, charges: Sequence[Charge]) -> Sequence[ChargeResult | None]:
        """Charge every counter of one request, all or nothing; one result per charge, in order.

        The request is admitted when every enforced charge has room; then each charge with room
        (shadow ones included) is applied. Otherwise nothing is applied. Raises StoreError. None
        stands for a counter that could not be read while another refused the request (a Redis
        Cluster slot that failed): the refusal is the answer.
        """
        ...


def store_for(services: Services) -> Store:
    """The sidecar's store: Redis when ``redis_url`` is configured, else in-memory. One per process.

    Raises StoreConfigError when the Redis settings are unusable.
    """
    url = services.settings.get("redis_url")
    if url:
        from extauthz.stores.redis import RedisStore

        password_file = services.settings.get("redis_password_file")
        return services.shared(
            ("store", "redis", url, password_file), lambda: RedisStore(url, password_file=password_file)
        )
    return local_store(services)


def local_store(services: Services) -> Store:
    """This process's in-memory store (the default store, and the quota fallback when Redis fails)."""
    from extauthz.stores.memory import MemoryStore

    return services.shared(("store", "memory"), MemoryStore)
