"""The vocabulary shared by the detect check and the detection stores."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = [
    "ACTION_BLOCK", "ACTION_LOG", "ACTION_THROTTLE", "OP_CHECK", "OP_DISTINCT", "OP_FAIL", "OP_RATE", "Answer",
    "BlockRecord", "Detector", "Op", "block_id", "parse_block_id",
]  # fmt: skip

#: Op kinds: only look the key's block up; count a failure; add a distinct value; count a request
#: against the key's own baseline. Every counting op looks the block up first and counts nothing while
#: the key is blocked or throttled.
OP_CHECK, OP_FAIL, OP_DISTINCT, OP_RATE = 0, 1, 2, 3
#: Actions, as the stores know them (a dry-run detector is ``log`` to the store: it writes no block).
#: A block record's ``kind`` is its action: ACTION_THROTTLE or ACTION_BLOCK.
ACTION_LOG, ACTION_THROTTLE, ACTION_BLOCK = 0, 1, 2
ACTION_NAMES = {ACTION_LOG: "log", ACTION_THROTTLE: "throttle", ACTION_BLOCK: "block"}

#: A spec's numbers after its kind: six counting, eight action (see Detector.spec).
_SPEC = struct.Struct(">14d")

_ID = re.compile(r"([a-z0-9][-a-z0-9.]*)/([a-z0-9][a-z0-9._-]*)/([0-9a-f]{32})")


@dataclass(frozen=True, slots=True)
class Detector:
    """One compiled detector: what the stores need (numbers) and what the check needs (names)."""

    policy: str
    name: str
    #: OP_FAIL, OP_DISTINCT or OP_RATE: what a counted event is.
    op: int
    #: failures: trips at this many within the window; distinct: at more than this many values.
    threshold: int
    window_ms: int
    #: What the store does on a trip (ACTION_LOG for a dry run, which writes nothing).
    store_action: int
    #: The configured action (reported, and what a dry run would have done).
    action: int
    dry_run: bool
    #: Block or throttle: the first duration, the factor for each repeat offence, the longest, and
    #: how long offences are remembered.
    duration_ms: int = 0
    escalation: float = 1.0
    max_duration_ms: int = 0
    memory_ms: int = 0
    #: Status of a refusal (429 or 403).
    status: int = 429
    #: Throttle: GCRA interval (microseconds) and burst of the temporary quota.
    throttle_interval_us: int = 0
    throttle_burst: int = 0
    #: Spike: interval length, EWMA weight of one interval (0..1), warm-up intervals, the least
    #: count that can trip, the factor over the baseline, and how long an idle key's state is kept.
    #: (alpha, factor and escalation are rounded at compile time to what the Redis script reads:
    #: millionths, thousandths, thousandths, so both stores compute with the same numbers.)
    interval_ms: int = 0
    alpha: float = 0.0
    warmup: int = 0
    min_count: int = 0
    factor: float = 0.0
    state_ttl_ms: int = 0
    #: "<policy>:<detector>:": the in-process store's keys are this and a key digest.
    prefix: str = ""
    #: spec(kind) for each op kind, worked out once.
    specs: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", f"{self.policy}:{self.name}:")
        object.__setattr__(self, "specs", tuple(self.spec(kind) for kind in (OP_CHECK, OP_FAIL, OP_DISTINCT, OP_RATE)))

    def spec(self, kind: int) -> bytes:
        """The numbers of an op of ``kind`` as the Redis script reads them (extauthz.detection.redis):
        the kind as an ASCII digit, then six counting numbers and eight action numbers as big-endian
        doubles (``struct.unpack`` in the script: a tenth of what parsing text cost); a lookup is its
        kind alone. Every number is an integer far below 2**53, so the doubles are exact."""
        if kind == OP_CHECK:
            return b"0"
        if kind == OP_RATE:
            head = (self.interval_ms, round(self.alpha * 1e6), self.warmup, self.min_count, round(self.factor * 1000),
                    self.state_ttl_ms)  # fmt: skip
        else:
            head = (self.threshold, self.window_ms, 0, 0, 0, 0)
        action = (self.store_action, self.duration_ms, round(self.escalation * 1000), self.max_duration_ms,
                  self.memory_ms, self.status, self.throttle_interval_us, self.throttle_burst)  # fmt: skip
        return bytes((48 + kind,)) + _SPEC.pack(*head, *action)

    def duration_for(self, offences: int) -> int:
        """Milliseconds of the block (or throttle) for the ``offences``-th offence (1 is the first)."""
        scaled = self.duration_ms * self.escalation ** (offences - 1)
        return int(min(scaled, self.max_duration_ms))


class Op(NamedTuple):
    """What one request asks of one detector for one key."""

    kind: int
    detector: Detector
    #: The key's digest (blake2b-128 hex of its value): store keys never hold client bytes.
    digest: str
    #: The key's value as operators see it in a block (truncated; a user name, an address).
    label: str = ""
    #: OP_DISTINCT: the value counted (hashed by the caller when long).
    value: str = ""


class Answer(NamedTuple):
    """What the store said for one op."""

    #: Milliseconds until the key may try again: > 0 refuses this request (a block, or a throttle
    #: whose temporary quota is exhausted); 0 lets it on.
    refused_ms: int
    #: The key's live record: 0 none, ACTION_THROTTLE or ACTION_BLOCK.
    kind: int
    #: This op tripped the detector (its action ran, or for a dry run would have).
    tripped: bool
    #: The counter after this op (failures, distinct values, requests in the interval).
    total: int
    #: Offences remembered for the key, this one included (0 unless a block or throttle was written).
    offences: int = 0
    #: Milliseconds of the block or throttle written now (0 when none).
    duration_ms: int = 0
    #: Status of the refusal (the record's, for a key blocked by another replica).
    status: int = 429


@dataclass(frozen=True, slots=True)
class BlockRecord:
    """A live block or throttle, as operators list it (times in Unix milliseconds)."""

    id: str
    policy: str
    detector: str
    label: str
    kind: int
    status: int
    since_ms: int
    until_ms: int
    offences: int

    def as_dict(self, now_ms: int) -> dict[str, Any]:
        return {
            "id": self.id, "policy": self.policy, "detector": self.detector, "key": self.label,
            "action": ACTION_NAMES.get(self.kind, "block"), "status": self.status, "since_ms": self.since_ms,
            "until_ms": self.until_ms, "remaining_s": max(0.0, (self.until_ms - now_ms) / 1000),
            "offences": self.offences,
        }  # fmt: skip


def block_id(policy: str, detector: str, digest: str) -> str:
    """The operator-facing id of a key's block: ``<policy>/<detector>/<digest>``."""
    return f"{policy}/{detector}/{digest}"


def parse_block_id(text: str) -> tuple[str, str, str]:
    """(policy, detector, digest) of a block id; ValueError when it is not one."""
    match = _ID.fullmatch(text)
    if match is None:
        raise ValueError("a block id is <policy>/<detector>/<32 hex digits>")
    return match.group(1), match.group(2), match.group(3)
