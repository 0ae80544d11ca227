"""Detection state in this process: exact, bounded, expiring; lost on restart, not shared.

Tables are ordered by last write; a few expired entries are swept from the old end on every op,
and a table over its bound drops its oldest entries (counted and logged: a dropped counter starts
again, a dropped block ends early). Times come from :func:`extauthz.clock.wall`, so a policy test
that fixes the clock controls windows, intervals and block ends.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from extauthz import clock
from extauthz.detection.model import (
    ACTION_BLOCK,
    ACTION_LOG,
    OP_CHECK,
    OP_DISTINCT,
    OP_FAIL,
    OP_RATE,
    Answer,
    BlockRecord,
    Op,
    block_id,
)
from extauthz.stores.memory import gcra_step

__all__ = ["MemoryDetections"]

log = logging.getLogger("extauthz.detection")

#: Every this many calls, up to _SWEEP expired entries of each table go (O(1) per request).
_SWEEP, _SWEEP_EVERY = 16, 8
#: The answer of an op with nothing to say (most of them).
_NOTHING = Answer(0, 0, False, 0)


def _wall_ms() -> int:
    return int(clock.wall() * 1000)


@dataclass(slots=True)
class _Block:
    policy: str
    detector: str
    label: str
    kind: int
    status: int
    since_ms: int
    until_ms: int
    offences: int
    throttle_interval_us: int
    throttle_burst: int


@dataclass(slots=True)
class _Spike:
    bucket: int
    count: int
    average: float
    seen: int
    flagged: int
    expires_ms: int


class MemoryDetections:
    """Counters, distinct sets, spike baselines, offences and blocks of every detector, in process."""

    def __init__(self, max_keys: int = 200_000, clock_ms: Callable[[], int] = _wall_ms,
                 max_values: int = 2_000_000) -> None:  # fmt: skip
        self.max_keys = max_keys
        #: Distinct values held in all the sets (each set holds threshold + 1 at most).
        self.max_values = max_values
        self._values = 0
        self._clock = clock_ms
        # key -> (expires, count) / (expires, set) / spike state / (expires, offences) / block / tat_us
        self._counts: OrderedDict[str, list[int]] = OrderedDict()
        self._sets: OrderedDict[str, tuple[int, set[str]]] = OrderedDict()
        self._spikes: OrderedDict[str, _Spike] = OrderedDict()
        self._offences: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._blocks: OrderedDict[str, _Block] = OrderedDict()
        self._tats: dict[str, int] = {}
        #: Live entries dropped because a table was full.
        self.evicted = 0
        self._countdown = _SWEEP_EVERY
        #: Each table with how its entries' expiry is read (for the sweep).
        self._tables: tuple[tuple[OrderedDict[str, Any], Callable[[Any], int]], ...] = (
            (self._counts, lambda e: e[0]), (self._sets, lambda e: e[0]), (self._spikes, lambda e: e.expires_ms),
            (self._offences, lambda e: e[0]), (self._blocks, lambda e: e.until_ms),
        )  # fmt: skip

    # --- the request path ------------------------------------------------------------------------
    def run(self, ops: Sequence[Op]) -> list[Answer]:
        """Every op of one request, in order (atomic: it never yields)."""
        now = self._clock()
        answers = [self._one(op, now) for op in ops]
        self._countdown -= 1
        if self._countdown <= 0:
            self._countdown = _SWEEP_EVERY
            self._sweep(now)
        return answers

    def _one(self, op: Op, now: int) -> Answer:
        det = op.detector
        key = det.prefix + op.digest
        block = self._blocks.get(key)
        if block is not None and block.until_ms <= now:
            del self._blocks[key]
            self._tats.pop(key, None)
            block = None
        if block is not None:
            if block.kind == ACTION_BLOCK:
                return Answer(block.until_ms - now, block.kind, False, 0, block.offences, 0, block.status)
            return Answer(self._throttle(key, block, now), block.kind, False, 0, block.offences, 0, block.status)
        if op.kind == OP_CHECK:
            return _NOTHING
        tripped = False
        if op.kind == OP_FAIL:
            entry = self._counts.get(key)
            if entry is None or entry[0] <= now:
                entry = [now + det.window_ms, 0]
                self._counts[key] = entry
            entry[1] += 1
            count = entry[1]
            tripped = count >= det.threshold
            if tripped:
                del self._counts[key]
        elif op.kind == OP_DISTINCT:
            held = self._sets.get(key)
            if held is None or held[0] <= now:
                if held is not None:
                    self._values -= len(held[1])
                held = (now + det.window_ms, set())
                self._sets[key] = held
            values = held[1]
            if len(values) <= det.threshold and op.value not in values:  # at most threshold + 1 values
                values.add(op.value)
                self._values += 1
                if self._values > self.max_values:
                    self._shed_values(key)
            count = len(values)
            tripped = count > det.threshold
            if tripped:
                del self._sets[key]
                self._values -= count
        elif op.kind == OP_RATE:
            count, tripped = self._rate(key, det, now)
        else:
            raise ValueError(f"unknown detection op {op.kind}")
        if not tripped or det.store_action == ACTION_LOG:
            return Answer(0, 0, True, count, 0, 0, det.status) if tripped else _NOTHING
        return self._apply(key, op, now, count)

    def blocked(self, det: Any, digest: str) -> Answer | None:
        """The key's live block (not a throttle: that would charge it), without counting anything."""
        block = self._blocks.get(det.prefix + digest)
        if block is None or block.kind != ACTION_BLOCK:
            return None
        now = self._clock()
        if block.until_ms <= now:
            return None
        return Answer(block.until_ms - now, block.kind, False, 0, block.offences, 0, block.status)

    def _throttle(self, key: str, block: _Block, now: int) -> int:
        """Charge the throttle's temporary quota (GCRA, as the quota stores do): 0 or ms to wait."""
        step = gcra_step(self._tats.get(key, 0), now * 1000, block.throttle_interval_us, block.throttle_burst, 1)
        if step.allowed:
            self._tats[key] = step.tat
            return 0
        return step.retry_us // 1000 + 1

    def _rate(self, key: str, det: Any, now: int) -> tuple[int, bool]:
        """Count a request in the key's current interval; trip once per interval when the count is
        past the warm-up, the minimum and ``factor`` times the key's moving average."""
        bucket = now // det.interval_ms
        state = self._spikes.get(key)
        if state is None or state.expires_ms <= now:
            state = _Spike(bucket, 0, 0.0, 0, -1, 0)
            self._spikes[key] = state
        else:
            self._spikes.move_to_end(key)
        if bucket > state.bucket:
            alpha = det.alpha
            state.average += alpha * (state.count - state.average)
            state.seen += 1
            gap = min(bucket - state.bucket - 1, 100_000)
            if gap > 0:
                state.average *= (1 - alpha) ** gap
                state.seen += gap
            state.bucket, state.count = bucket, 0
        state.count += 1
        # Kept for state_ttl after the end of the key's last interval with a request (as in Redis,
        # where the state is written once per interval).
        state.expires_ms = (state.bucket + 1) * det.interval_ms + det.state_ttl_ms
        tripped = (state.seen >= det.warmup and state.count >= det.min_count
                   and state.count > det.factor * state.average and state.flagged != bucket)  # fmt: skip
        if tripped:
            state.flagged = bucket
        return state.count, tripped

    def _apply(self, key: str, op: Op, now: int, count: int) -> Answer:
        det = op.detector
        offences = 1
        known = self._offences.get(key)
        if known is not None and known[0] > now:
            offences = known[1] + 1
        self._offences[key] = (now + det.memory_ms, offences)
        self._offences.move_to_end(key)
        duration = det.duration_for(offences)
        self._blocks[key] = _Block(det.policy, det.name, op.label, det.store_action, det.status, now, now + duration,
                                   offences, det.throttle_interval_us, det.throttle_burst)  # fmt: skip
        self._blocks.move_to_end(key)
        self._tats.pop(key, None)
        refused = duration if det.store_action == ACTION_BLOCK else 0
        return Answer(refused, det.store_action, True, count, offences, duration, det.status)

    def _shed_values(self, keep: str) -> None:
        """Over the bound on distinct values held in all: drop the oldest sets (not ``keep``)."""
        sets = self._sets
        while self._values > self.max_values and len(sets) > 1:
            key, (_, values) = next(iter(sets.items()))
            if key == keep:
                sets.move_to_end(key)
                continue
            del sets[key]
            self._values -= len(values)
            self.evicted += 1

    def _sweep(self, now: int) -> None:
        """Drop a few expired entries of each table from its old end, and the oldest of a full one."""
        for table, expiry in self._tables:
            for _ in range(_SWEEP):
                if not table:
                    break
                key, entry = next(iter(table.items()))
                if expiry(entry) > now:
                    break
                del table[key]
                if table is self._blocks:
                    self._tats.pop(key, None)
                elif table is self._sets:
                    self._values -= len(entry[1])
            while len(table) > self.max_keys:
                key, entry = table.popitem(last=False)
                if table is self._sets:
                    self._values -= len(entry[1])
                self._tats.pop(key, None)
                self.evicted += 1
                if self.evicted in (1, 10, 100, 1000) or self.evicted % 100_000 == 0:
                    log.warning("detection table full (%d keys): %d live entries dropped so far; use Redis or "
                                "raise the limit", self.max_keys, self.evicted)  # fmt: skip

    # --- operators -------------------------------------------------------------------------------
    def blocks(self) -> list[BlockRecord]:
        """Live blocks and throttles, the newest first."""
        now = self._clock()
        records = []
        for key, block in self._blocks.items():
            if block.until_ms <= now:
                continue
            digest = key.rsplit(":", 1)[1]
            records.append(BlockRecord(block_id(block.policy, block.detector, digest), block.policy, block.detector,
                                       block.label, block.kind, block.status, block.since_ms, block.until_ms,
                                       block.offences))  # fmt: skip
        records.sort(key=lambda r: r.since_ms, reverse=True)
        return records

    def active_blocks(self) -> int:
        now = self._clock()
        return sum(1 for block in self._blocks.values() if block.until_ms > now)

    def block(self, policy: str, detector: str, digest: str) -> BlockRecord | None:
        return next((r for r in self.blocks() if r.id == block_id(policy, detector, digest)), None)

    def lift(self, policy: str, detector: str, digest: str) -> bool:
        """End a block or throttle now; True when there was one. Offences are kept (a lifted key that
        trips again is a repeat offender)."""
        key = f"{policy}:{detector}:{digest}"
        block = self._blocks.pop(key, None)
        self._tats.pop(key, None)
        return block is not None and block.until_ms > self._clock()

    @property
    def values_held(self) -> int:
        return self._values

    def clear(self) -> None:
        """Forget everything (``extauthz test`` starts every PolicyTest document afresh)."""
        for table in (self._counts, self._sets, self._spikes, self._offences, self._blocks, self._tats):
            table.clear()
        self._values = 0

    def entries(self) -> int:
        """Keys held in every table (tests: nothing grows without bound); values: ``values_held``."""
        return sum(len(t) for t in (self._counts, self._sets, self._spikes, self._offences, self._blocks))

