"""In-process store: exact for one process, lost on restart."""

from __future__ import annotations

import bisect
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from extauthz.stores import Charge, ChargeResult

__all__ = ["GcraStep", "LogStep", "MemoryStore", "gcra_step", "sliding_log_step"]

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


class LogStep(NamedTuple):
    """One sliding-log decision (see :mod:`extauthz.stores`); times in microseconds."""

    allowed: bool
    #: Units admitted within the window before this charge.
    total: int
    remaining: int
    retry_us: int
    #: Until the log is empty again (the newest entry leaves the window).
    reset_us: int


def sliding_log_step(entries: Sequence[tuple[int, int]], now: int, window: int, limit: int, cost: int) -> LogStep:
    """The sliding-log arithmetic of every store, as the reference (MemoryStore.charge_now and the
    Redis script are held to it by tests). ``entries``: (time, cost) of admitted charges, oldest
    first; one counts while ``now - time < window``."""
    live = [(at, units) for at, units in entries if now - at < window]
    total = sum(units for _, units in live)
    if total + cost <= limit:
        newest = now if cost else (live[-1][0] if live else now - window)
        return LogStep(True, total, limit - total - cost, 0, newest + window - now)
    need, freed, retry = total + cost - limit, 0, window
    for at, units in live:
        freed += units
        if freed >= need:
            retry = at + window - now
            break
    return LogStep(False, total, max(0, limit - total), retry, live[-1][0] + window - now)


class _Log:
    """One sliding-log counter: the admitted charges still in its window, oldest first, as parallel
    lists of their times and of the units admitted before each (a running sum), from ``head`` on.

    Every operation is a binary search or an append, never a walk over the entries, so a request that
    comes after a burst of 100,000 has left the window costs what any other does: expired entries are
    skipped by moving ``head`` and dropped in one slice once they are half the lists.
    """

    __slots__ = ("after", "befores", "head", "times", "window")

    def __init__(self, window: int) -> None:
        self.times: list[int] = []
        #: Units admitted by this counter before each entry (so an entry's cost is the next one's
        #: minus its own, the last one's ``after`` minus its own).
        self.befores: list[int] = []
        #: Units admitted in all, the last entry included.
        self.after = 0
        self.head = 0
        self.window = window

    def live(self) -> int:
        """Entries still held (in the window as of the last prune)."""
        return len(self.times) - self.head

    def prune(self, now: int, window: int) -> tuple[int, int]:
        """Skip the entries that left the window: (units still in it, entries dropped)."""
        self.window = window
        times, head = self.times, self.head
        if head < len(times) and times[head] <= now - window:
            new_head = bisect.bisect_right(times, now - window, head)
            dropped = new_head - head
            if new_head * 2 >= len(times):  # compact once what is skipped is half the lists (amortized O(1))
                del times[:new_head]
                del self.befores[:new_head]
                new_head = 0
            self.head = new_head
            return self.units(), dropped
        return self.units(), 0

    def units(self) -> int:
        return self.after - self.befores[self.head] if self.head < len(self.times) else 0

    def add(self, now: int, cost: int) -> None:
        """Record a charge; times never go backwards (a clock set back would break the order)."""
        times = self.times
        times.append(max(now, times[-1]) if times else now)
        self.befores.append(self.after)
        self.after += cost

    def retry_us(self, now: int, need: int) -> int:
        """Microseconds until ``need`` units have left the window: when the entry that brings the
        units admitted since the oldest one up to ``need`` leaves it."""
        befores, head = self.befores, self.head
        if head >= len(befores):
            return self.window
        target = befores[head] + need
        # The first entry whose running sum after it reaches the target: entry j - 1, where j is the
        # first entry after head whose "before" reaches it (the last entry when none does).
        j = bisect.bisect_left(befores, target, head + 1)
        return self.times[j - 1] + self.window - now

    def reset_us(self, now: int) -> int:
        return self.times[-1] + self.window - now if self.head < len(self.times) else 0


def _monotonic_us() -> int:
    return time.monotonic_ns() // 1000


class MemoryStore:
    """State kept in this process's memory, bounded and expiring.

    Quota counters live in an LRU-ordered table: a counter whose TAT has passed is the same as no
    counter (a full bucket), so expired ones are swept a few at a time as requests come, and when
    the table is full of live counters the least recently charged is dropped (logged).
    """

    def __init__(self, max_keys: int = 1_000_000, clock: Callable[[], int] = _monotonic_us,
                 max_log_entries: int = 10_000_000) -> None:  # fmt: skip
        self._seen: dict[str, float] = {}
        self._max_keys = max_keys
        self._sets: dict[str, set[str]] = {}
        self._tats: OrderedDict[str, int] = OrderedDict()
        #: Sliding-log counters, least recently charged first, and their entries in all.
        self._logs: OrderedDict[str, _Log] = OrderedDict()
        self._log_entries = 0
        self._max_log_entries = max_log_entries
        self._clock = clock
        #: Charges until the next sweep of expired counters.
        self._countdown = _SWEEP_EVERY
        #: Live counters dropped because the table was full (each gave its key a full bucket).
        self.evicted = 0
        #: Live remembered keys (nonces) dropped because their table was full.
        self.forgotten = 0
        #: Called by clear(): other in-process state kept beside this store (abuse detection's).
        self.on_clear: list[Callable[[], None]] = []

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
        steps: list[Any] = []
        admitted = True
        for c in charges:
            if c.kind:  # a sliding log: (had room, units in the window, the log)
                counter = self._logs.get(c.key)
                total = 0
                if counter is not None:
                    total, dropped = counter.prune(now, c.interval_us)
                    self._log_entries -= dropped
                allowed = total + c.cost <= c.burst
                steps.append((allowed, total, counter, 0))
            else:
                tat = known(c.key, 0)
                base = tat if tat > now else now
                new_tat = base + c.cost * c.interval_us
                allow_at = new_tat - c.burst * c.interval_us
                allowed = allow_at <= now
                steps.append((allowed, base, new_tat, allow_at))
            if not allowed and c.enforce:
                admitted = False
        results: list[ChargeResult] = []
        for (allowed, base, new_tat, allow_at), c in zip(steps, charges, strict=True):
            interval = c.interval_us
            if c.kind:
                results.append(self._log_result(c, allowed and admitted, allowed, base, new_tat, now))
            elif not allowed:
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
            if self._logs:
                self._sweep_logs(now)
        if len(tats) > self._max_keys:
            self._evict_counters(now)
        return results

    def _log_result(self, c: Charge, charge: bool, allowed: bool, total: int, counter: _Log | None,
                    now: int) -> ChargeResult:  # fmt: skip
        """A sliding-log counter's answer (see sliding_log_step), charging it when ``charge``."""
        window, limit = c.interval_us, c.burst
        if not allowed:
            if counter is None:  # cannot happen: an empty log has room for any cost up to the limit
                return ChargeResult(False, limit, window / 1e6, 0.0)
            retry = counter.retry_us(now, total + c.cost - limit)
            return ChargeResult(False, max(0, limit - total), retry / 1e6, counter.reset_us(now) / 1e6)
        if not charge:  # had room, but another counter refused the request: nothing charged here
            return ChargeResult(True, limit - total, 0.0, (counter.reset_us(now) if counter is not None else 0) / 1e6)
        if c.cost:
            logs = self._logs
            if counter is None:
                counter = logs[c.key] = _Log(window)
            counter.add(now, c.cost)
            logs.move_to_end(c.key)
            self._log_entries += 1
            if len(logs) > self._max_keys or self._log_entries > self._max_log_entries:
                self._evict_logs(now)
        reset = counter.reset_us(now) if counter is not None else 0
        return ChargeResult(True, limit - total - c.cost, 0.0, reset / 1e6)

    def _sweep_logs(self, now: int) -> None:
        """Drop sliding logs whose every entry left the window, from the least recently charged end."""
        logs = self._logs
        for _ in range(_SWEEP_AT_MOST):
            if not logs:
                return
            key, log = next(iter(logs.items()))
            if log.reset_us(now) > 0:
                return
            del logs[key]
            self._log_entries -= log.live()

    def _evict_logs(self, now: int) -> None:
        """Over a bound (counters or entries): expired logs first, then the least recently charged."""
        self._sweep_logs(now)
        logs = self._logs
        while logs and (len(logs) > self._max_keys or self._log_entries > self._max_log_entries):
            _, dropped = logs.popitem(last=False)
            self._log_entries -= dropped.live()
            self.evicted += 1
            if self.evicted in (1, 10, 100, 1000) or self.evicted % 100_000 == 0:
                log.warning("quota table full (%d sliding-log counters, %d entries): %d live counters dropped so "
                            "far; use Redis or raise the limit", len(logs), self._log_entries, self.evicted)

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
        self._logs.clear()
        self._log_entries = 0
        self._seen.clear()
        for clear in self.on_clear:
            clear()

    def counters(self) -> int:
        """How many quota counters are held (for tests and diagnostics)."""
        return len(self._tats) + len(self._logs)
