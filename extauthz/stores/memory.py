"""In-process store: exact for one process, lost on restart."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import NamedTuple

from extauthz.stores import Charge, ChargeResult

__all__ = ["GcraStep", "MemoryStore", "gcra_step"]

log = logging.getLogger("extauthz.stores.memory")

#: Every this many charges, up to this many expired counters are dropped: the table stays near the
#: live keys at O(1) per request, and most requests skip the sweep altogether.
_SWEEP_EVERY, _SWEEP_AT_MOST = 16, 64


class GcraStep(NamedTuple):
    """One GCRA decision (see :mod:`extauthz.stores`); times in microseconds."""

    allowed: bool
    #: The TAT to store when the request is admitted (the old one when refused).
    tat: int
    remaining: int
    retry_us: int
    reset_us: int


def gcra_step(tat: int, now: int, interval: int, burst: int, cost: int) -> GcraStep:
    """The GCRA arithmetic of every store, as the reference: the Redis script and
    MemoryStore.charge_now are transcriptions of it (tests hold charge_now to its answers, and the
    Redis script to charge_now's)."""
    base = tat if tat > now else now
    new_tat = base + cost * interval
    allow_at = new_tat - burst * interval
    if allow_at <= now:
        return GcraStep(True, new_tat, (now - allow_at) // interval, 0, new_tat - now)
    available = (now - (base - burst * interval)) // interval
    return GcraStep(False, base, max(0, available), allow_at - now, base - now)


def _monotonic_us() -> int:
    return time.monotonic_ns() // 1000


class MemoryStore:
    """State kept in this process's memory, bounded and expiring.

    Quota counters live in an LRU-ordered table: a counter whose TAT has passed is the same as no
    counter (a full bucket), so expired ones are swept a few at a time as requests come, and when
    the table is full of live counters the least recently charged is dropped (logged).
    """

    def __init__(self, max_keys: int = 1_000_000, clock: Callable[[], int] = _monotonic_us) -> None:
        self._seen: dict[str, float] = {}
        self._max_keys = max_keys
        self._sets: dict[str, set[str]] = {}
        self._tats: OrderedDict[str, int] = OrderedDict()
        self._clock = clock
        #: Charges until the next sweep of expired counters.
        self._countdown = _SWEEP_EVERY
        #: Live counters dropped because the table was full (each gave its key a full bucket).
        self.evicted = 0
        #: Live remembered keys (nonces) dropped because their table was full.
        self.forgotten = 0

    async def is_member(self, set_name: str, member: str) -> bool:
        return member in self._sets.get(set_name, ())

    def add_member(self, set_name: str, member: str) -> None:
        """Put ``member`` into a set (what an operator does with SADD on Redis)."""
        self._sets.setdefault(set_name, set()).add(member)

    async def remember_once(self, key: str, ttl: float) -> bool:
        now = time.monotonic()
        expires = self._seen.get(key)
        if expires is not None and expires > now:
            return False
        if len(self._seen) >= self._max_keys:
            self._evict_seen(now)
        self._seen[key] = now + ttl
        return True

    def _evict_seen(self, now: float) -> None:
        """The remembered-keys table is full: expired keys go, then, if need be, the older half."""
        for key in [k for k, exp in self._seen.items() if exp <= now]:
            del self._seen[key]
        if len(self._seen) >= self._max_keys:
            # Still full of live entries: refusing new ones would deny everyone, dropping the
            # oldest half keeps replay protection for the most recent requests. The dropped ones
            # could be replayed within their validity: said loudly, since that weakens a policy.
            dropped = list(self._seen)[: len(self._seen) // 2]
            for key in dropped:
                del self._seen[key]
            self.forgotten += len(dropped)
            log.warning("replay table full (%d keys): %d live nonces forgotten so far, which could be replayed "
                        "until they expire; use Redis or raise the limit", self._max_keys, self.forgotten)

    async def charge(self, charges: Sequence[Charge]) -> list[ChargeResult]:
        return self.charge_now(charges)

    def charge_now(self, charges: Sequence[Charge]) -> list[ChargeResult]:
        """:meth:`charge` without the coroutine: atomic because it never yields.

        The arithmetic of :func:`gcra_step`, written out here with plain tuples: this runs for
        every Check with quotas (a test holds the two to the same answers).
        """
        now = self._clock()
        tats = self._tats
        known = tats.get
        # First every counter's step, then, only if every enforcing counter had room, the charge.
        steps = []
        admitted = True
        for c in charges:
            tat = known(c.key, 0)
            base = tat if tat > now else now
            new_tat = base + c.cost * c.interval_us
            allow_at = new_tat - c.burst * c.interval_us
            allowed = allow_at <= now
            if not allowed and c.enforce:
                admitted = False
            steps.append((allowed, base, new_tat, allow_at))
        results: list[ChargeResult] = []
        for (allowed, base, new_tat, allow_at), c in zip(steps, charges, strict=True):
            interval = c.interval_us
            if not allowed:
                available = (now - (base - c.burst * interval)) // interval
                results.append(ChargeResult(False, max(0, available), (allow_at - now) / 1e6, (base - now) / 1e6))
            elif admitted:
                if c.cost:
                    tats[c.key] = new_tat
                    tats.move_to_end(c.key)
                results.append(ChargeResult(True, (now - allow_at) // interval, 0.0, (new_tat - now) / 1e6))
            else:
                # Had room, but another counter refused the request: nothing charged here.
                results.append(ChargeResult(True, (now - allow_at) // interval + c.cost, 0.0, (base - now) / 1e6))
        self._countdown -= 1
        if self._countdown <= 0:
            self._countdown = _SWEEP_EVERY
            self._sweep(now)
        if len(tats) > self._max_keys:
            self._evict_counters(now)
        return results

    def _sweep(self, now: int) -> None:
        """Drop expired counters from the least recently charged end."""
        tats = self._tats
        for _ in range(_SWEEP_AT_MOST):
            if not tats:
                return
            key, tat = next(iter(tats.items()))
            if tat > now:
                return
            del tats[key]

    def _evict_counters(self, now: int) -> None:
        """The table is over its bound: expired counters go first, then the least recently charged."""
        self._sweep(now)
        tats = self._tats
        while len(tats) > self._max_keys:
            tats.popitem(last=False)
            self.evicted += 1
            if self.evicted in (1, 10, 100, 1000) or self.evicted % 100_000 == 0:
                log.warning(
                    "quota table full (%d counters): %d live counters dropped so far; use Redis or raise the limit",
                    self._max_keys,
                    self.evicted,
                )

    def clear(self) -> None:
        """Forget every quota counter and remembered key (``extauthz test`` empties the store before
        each PolicyTest document, so documents never share counters or nonces)."""
        self._tats.clear()
        self._seen.clear()

    def counters(self) -> int:
        """How many quota counters are held (for tests and diagnostics)."""
        return len(self._tats)
