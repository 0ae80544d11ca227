"""Abuse detection: counters that notice what quotas do not, and the blocks they decide.

A quota caps volume; an attacker who guesses passwords from one address, or walks ``/orders/1..N``
with one token, can stay under any cap. A detector (``spec.detect`` of a policy, see
:mod:`extauthz.checks.detect`) watches one pattern per key (a client address, a user name, a
subject):

- ``failures``: failed authentications (our identity denials, the upstream's 401/403 learnt from
  Envoy's access logs) within a window: brute force;
- ``distinct``: distinct values (object ids, paths, user names) within a window: enumeration,
  credential stuffing, scraping, probing. Counted exactly in a bounded set in process, with a
  HyperLogLog in Redis (a few hundred bytes whatever the count);
- ``spike``: the key's rate in the current interval against a moving average of its own past
  intervals (after a warm-up, above a minimum, by a factor): a normally busy account is not flagged,
  a normally quiet one that suddenly is, is.

When a detector trips, its action runs: ``log`` (the decision log, a metric), ``throttle`` (a
temporary quota on the key) or ``block`` (every request of the key refused for a duration that grows
for repeat offenders). Every action can be a dry run. State lives in the sidecar's store: in process
(:class:`MemoryDetections`) or in Redis (:class:`~extauthz.detection.redis.RedisDetections`), where
every replica shares blocks and counters; every key there expires (a block at its end, a counter
with its window), so nothing outlives what the policy said.

The store-facing vocabulary is :class:`Op` (what one request asks of one detector's key) and
:class:`Answer` (what the store said). Both stores implement the same arithmetic, and tests hold
them to the same answers.
"""

from __future__ import annotations

from extauthz.detection.memory import MemoryDetections
from extauthz.detection.model import (
    ACTION_BLOCK,
    ACTION_LOG,
    ACTION_THROTTLE,
    OP_CHECK,
    OP_DISTINCT,
    OP_FAIL,
    OP_RATE,
    Answer,
    BlockRecord,
    Detector,
    Op,
    block_id,
    parse_block_id,
)

__all__ = [
    "ACTION_BLOCK",
    "ACTION_LOG",
    "ACTION_THROTTLE",
    "OP_CHECK",
    "OP_DISTINCT",
    "OP_FAIL",
    "OP_RATE",
    "Answer",
    "BlockRecord",
    "Detector",
    "MemoryDetections",
    "Op",
    "block_id",
    "parse_block_id",
]
