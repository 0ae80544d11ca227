"""Detection state in Redis: shared by every replica, one script per request, every key expiring.

Every op of a request goes into one script call (:data:`DETECT_SCRIPT`), with Redis's clock, so a
block decided at one replica holds at the next request any replica sees. Beside a quota the ops ride
in the quota charge's own call (:class:`Rider`, :data:`COMBINED_SCRIPT`): one command, one round
trip; otherwise :meth:`RedisDetections.send` queues their own call at once.

Keys, per (policy, detector, key digest), all with the digest as hash tag (one slot per key value)::

    <prefix>:d:<policy>:<detector>:{<digest>}:b   the block or throttle (hash), expires at its end
    <prefix>:d:<policy>:<detector>:{<digest>}:o   offences (integer), expires ``remember`` after the last
    <prefix>:d:<policy>:<detector>:{<digest>}:c   the counter: failures (integer) or distinct values
                                                  (HyperLogLog), expiring with their window
    <prefix>:d:<policy>:<detector>:{<digest>}:s   a spike's state (a string, rewritten once per
                                                  interval) and, in ``:n``, the interval's count; both
                                                  expire when idle (the state's TTL after the end of
                                                  the key's last interval with a request)
    <prefix>:d:<policy>:<detector>:{<digest>}:t   a throttle's temporary quota (GCRA TAT), expires when full

The script is given the ``:b`` key of each op and derives the others (same hash slot). The
arithmetic is :class:`~extauthz.detection.memory.MemoryDetections`' (tests hold the two to the same
answers); distinct values are counted by a HyperLogLog, exact for small sets and within about 1%
beyond. On a Redis Cluster the ops of one key value share a slot; a request's ops on different key
values go as one script per slot, sent together (never riding in a quota's call).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Sequence
from typing import Any

from redis.crc import key_slot

from extauthz.detection.model import Answer, BlockRecord, Op, block_id
from extauthz.stores import StoreError
from extauthz.stores.redis import CHARGE_SCRIPT, RedisStore, _failed

__all__ = ["DETECT_SCRIPT", "RedisDetections"]

#: What an op with nothing to say is answered (the script leaves it out of its reply).
_NOTHING = Answer(0, 0, False, 0)

#: KEYS: per op, its block key ("<base>b"; the op's other keys are the same base with another last
#: letter, in the same hash slot). ARGV: per op, its Detector.spec(kind) (binary), the distinct value, the key's
#: label (what operators see in a block). Returns "" when no op has anything to say (the common
#: case, parsed at once), else, per op with something to say (refused or tripped), eight integers:
#: its index (1-based), refused_ms, kind, tripped, total, offences, duration_ms, status (see
#: detection.Answer). A spike's state is a string "bucket trip-count average seen" (":s", written
#: once per interval) and the interval's count (":n", an INCR).
DETECT_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 1, #KEYS do
  local kb, spec = KEYS[i], ARGV[3 * i - 2]
  local base = string.sub(kb, 1, -2)
  local op = string.byte(spec) - 48
  -- The op's kind (an ASCII digit), then six counting numbers and eight action numbers as doubles:
  -- the action's are read only on a trip.
  local s = nil
  if op > 0 then s = {struct.unpack('>dddddd', spec, 2)} else s = {} end
  local threshold, window = s[1], s[2]
  local refused, kind, tripped, total, offences, dur, status = 0, 0, 0, 0, 0, 0, 429
  local rec = redis.call('HMGET', kb, 'kind', 'ti', 'tb', 'status', 'until', 'off')
  local kc, kt = base .. 'c', base .. 't'
  if rec[1] then
    kind, status, offences = tonumber(rec[1]), tonumber(rec[4]), tonumber(rec[6])
    if kind == 2 then
      refused = math.max(1, tonumber(rec[5]) - now)
    else
      local rti, rtb, nowu = tonumber(rec[2]), tonumber(rec[3]), now * 1000
      local tat = tonumber(redis.call('GET', kt)) or 0
      if tat < nowu then tat = nowu end
      local newtat = tat + rti
      local allow = newtat - rtb * rti
      if allow <= nowu then
        redis.call('SET', kt, string.format('%d', newtat), 'PX', math.floor((newtat - nowu) / 1000) + 1)
      else
        refused = math.floor((allow - nowu) / 1000) + 1
      end
    end
  elseif op > 0 then
    if op == 1 then
      total = redis.call('INCR', kc)
      if total == 1 then redis.call('PEXPIRE', kc, window) end
      if total >= threshold then tripped = 1 end
    elseif op == 2 then
      -- An unchanged HyperLogLog has the count it had, at most the threshold: nothing to check.
      if redis.call('PFADD', kc, ARGV[3 * i - 1]) == 1 then
        if redis.call('PTTL', kc) == -1 then redis.call('PEXPIRE', kc, window) end
        total = redis.call('PFCOUNT', kc)
        if total > threshold then tripped = 1 end
      end
    else
      -- A spike: ":s" holds "<bucket> <trip count> <average> <seen>", rewritten once per interval;
      -- ":n" the bucket's count (INCR). The request that makes the count the bucket's trip count
      -- trips (it is the first past warm-up, minCount and factor x average: once per interval).
      local interval, ks, kn = s[1], base .. 's', base .. 'n'
      local b = math.floor(now / interval)
      local state = redis.call('GET', ks)
      local sb, thr = nil, 0
      if state then
        local x1, x2 = string.match(state, '^(%d+) (%d+) ')
        sb, thr = tonumber(x1), tonumber(x2)
      end
      if sb and b <= sb then
        total = redis.call('INCR', kn)
        if total == 1 then redis.call('PEXPIRE', kn, s[6]) end
      else
        local alpha, warmup, mincount, factor = s[2] / 1000000, s[3], s[4], s[5] / 1000
        local avg, seen = 0, 0
        if state then
          local x3, x4 = string.match(state, '^%d+ %d+ (%S+) (%d+)$')
          avg, seen = tonumber(x3), tonumber(x4)
          avg = avg + alpha * ((tonumber(redis.call('GET', kn)) or 0) - avg)
          seen = seen + 1
          local gap = math.min(b - sb - 1, 100000)
          if gap > 0 then
            avg = avg * (1 - alpha) ^ gap
            seen = seen + gap
          end
        end
        thr = 0
        if seen >= warmup then thr = math.max(mincount, math.floor(factor * avg) + 1) end
        total = 1
        local ttl = (b + 1) * interval + s[6] - now
        redis.call('SET', ks, string.format('%d %d %.17g %d', b, thr, avg, seen), 'PX', ttl)
        redis.call('SET', kn, 1, 'PX', ttl)
      end
      if total == thr then tripped = 1 end
    end
    if tripped == 1 then
      if op ~= 3 then redis.call('DEL', kc) end
      local a = {struct.unpack('>dddddddd', spec, 50)}
      local action = a[1]
      status = a[6]
      if action > 0 then
        local ko = base .. 'o'
        offences = redis.call('INCR', ko)
        redis.call('PEXPIRE', ko, a[5])
        dur = math.floor(math.min(a[2] * (a[3] / 1000) ^ (offences - 1), a[4]))
        redis.call('DEL', kb, kt)
        redis.call('HSET', kb, 'kind', action, 'ti', a[7], 'tb', a[8], 'status', status,
          'since', string.format('%d', now), 'until', string.format('%d', now + dur), 'off', offences,
          'label', ARGV[3 * i])
        redis.call('PEXPIRE', kb, dur)
        kind = action
        if action == 2 then refused = dur end
      end
    end
  end
  if refused > 0 or tripped == 1 then
    out[#out + 1] = string.format('%d %d %d %d %d %d %d %d', i, refused, kind, tripped, total, offences, dur, status)
  end
end
return table.concat(out, ' ')
"""

#: The quota charge and the detectors in one call (the quota check carries the detect check's ops):
#: KEYS are the quota counters then the detect keys; ARGV[1] the number of quota counters, ARGV[2]
#: the charge spec, then the detect arguments. Each script runs as it does alone (its own KEYS and
#: ARGV); the reply is the detectors' reply, "|", the charge's.
_TIME = "local t = redis.call('TIME')\n"
assert CHARGE_SCRIPT.count(_TIME) == 1 and DETECT_SCRIPT.count(_TIME) == 1
COMBINED_SCRIPT = (
    # One TIME for both parts (each read it first thing; the same instant for the charge and the
    # detectors).
    _TIME + "local function charge(KEYS, ARGV)\n" + CHARGE_SCRIPT.replace(_TIME, "") + "\nend\n"
    "local function detect(KEYS, ARGV)\n" + DETECT_SCRIPT.replace(_TIME, "") + "\nend\n"
    """local nq = tonumber(ARGV[1])
local qk, dk, da = {}, {}, {}
for i = 1, nq do qk[i] = KEYS[i] end
for i = nq + 1, #KEYS do dk[i - nq] = KEYS[i] end
for i = 3, #ARGV do da[i - 2] = ARGV[i] end
return detect(dk, da) .. '|' .. charge(qk, {ARGV[2]})
"""
)
_COMBINED = (COMBINED_SCRIPT, hashlib.sha1(COMBINED_SCRIPT.encode()).hexdigest())


class Rider:
    """The detectors' ops of one request, riding in the quota charge's script call."""

    __slots__ = ("argv", "error", "indexes", "keys", "reply", "script")

    def __init__(self, keys: list[str], argv: list[str | bytes]) -> None:
        self.keys = keys
        self.argv = argv
        self.script = _COMBINED
        #: The detectors' part of the reply, once the call answered; or the failure.
        self.reply: str | None = None
        self.error: Exception | None = None


#: At most this many block keys are listed (SCAN is bounded: operators page through a store that
#: holds more with the metrics and the decision log).
MAX_LISTED = 10_000


class RedisDetections:
    """Detection ops in Redis through the sidecar's Redis store (its connection, deadline, circuit)."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self._sha = hashlib.sha1(DETECT_SCRIPT.encode()).hexdigest()
        self._base = store.key_prefix + "d:"
        #: "<policy>:<detector>:" -> the detector's Redis key prefix, up to the hash tag's brace.
        self._prefixes: dict[str, str] = {}
        #: End times (monotonic) of the blocks and throttles this replica wrote (extauthz_blocks_active).
        self._written: list[float] = []

    def submit(self, ops: Sequence[Op]) -> Any:
        """Queue the ops now; an awaitable of their answers (StoreError on failure; await it)."""
        try:
            sends = self.send(ops)
        except StoreError as exc:
            return _failed(exc)
        return self.answers(ops, sends)

    def send(self, ops: Sequence[Op]) -> list[Any]:
        """Queue the ops now (one script; on a Cluster one per slot): the futures of their replies,
        for :meth:`answers`. Raises StoreError at once when the circuit is open."""
        if not self.store.cluster or len(ops) == 1:
            return [self._send(ops, range(len(ops)))]
        groups: dict[int, list[int]] = {}
        for i, op in enumerate(ops):
            groups.setdefault(key_slot(op.digest.encode()), []).append(i)
        return [self._send([ops[i] for i in idx], idx) for idx in groups.values()]

    def rider(self, ops: Sequence[Op]) -> Rider | None:
        """The ops as a rider of the quota charge (None on a Cluster: they go in their own call)."""
        if self.store.cluster:
            return None
        return Rider(*self._arguments(ops))

    def answers_from(self, ops: Sequence[Op], reply: str) -> list[Answer]:
        """The answers in a rider's reply."""
        answers = [_NOTHING] * len(ops)
        if reply:
            self._parse(reply, range(len(ops)), answers)
        return answers

    def _arguments(self, ops: Sequence[Op]) -> tuple[list[str], list[str | bytes]]:
        keys: list[str] = []
        argv: list[str | bytes] = []
        prefixes = self._prefixes
        for op in ops:
            det = op.detector
            prefix = prefixes.get(det.prefix)
            if prefix is None:
                if len(prefixes) >= 4096:
                    prefixes.clear()
                prefix = prefixes[det.prefix] = self._base + det.prefix + "{"
            keys.append(prefix + op.digest + "}:b")
            argv.append(det.specs[op.kind])
            argv.append(op.value)
            argv.append(op.label)
        return keys, argv

    def _send(self, ops: Sequence[Op], indexes: Sequence[int]) -> Any:
        keys, argv = self._arguments(ops)
        tail = (len(keys), *keys, *argv)
        future = self.store.send_now("detect", ("EVALSHA", self._sha, *tail), ("EVAL", DETECT_SCRIPT, *tail))
        return future, indexes

    async def answers(self, ops: Sequence[Op], sends: list[Any]) -> list[Answer]:
        """The answers to ``ops`` from the replies of :meth:`send` (StoreError when one failed)."""
        answers = [_NOTHING] * len(ops)
        failure: StoreError | None = None
        for future, indexes in sends:
            try:
                reply = await future
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failure = failure or self.store.failed("detect", exc)
                continue
            if reply:
                self._parse(reply, indexes, answers)
        if failure is not None:
            raise failure
        return answers

    def _parse(self, reply: Any, indexes: Sequence[int], answers: list[Answer]) -> None:
        try:
            values = [int(v) for v in (reply.decode() if isinstance(reply, bytes) else str(reply)).split()]
            if len(values) % 8:
                raise ValueError
            for k in range(0, len(values), 8):
                answer = Answer(values[k + 1], values[k + 2], values[k + 3] == 1, values[k + 4], values[k + 5],
                                values[k + 6], values[k + 7])  # fmt: skip
                answers[indexes[values[k] - 1]] = answer
                if answer.duration_ms:
                    self._written.append(time.monotonic() + answer.duration_ms / 1000)
        except (ValueError, IndexError):
            raise StoreError("redis detect script gave an unexpected reply") from None

    # --- operators -------------------------------------------------------------------------------
    def active_blocks(self) -> int:
        """Blocks and throttles this replica wrote that have not ended (lifted ones count until then)."""
        now = time.monotonic()
        self._written = [end for end in self._written if end > now]
        return len(self._written)

    async def blocks(self) -> list[BlockRecord]:
        """Live blocks and throttles of every replica (SCAN, bounded by MAX_LISTED), the newest first."""
        if self.store.cluster:
            raise StoreError("listing blocks is not supported on a Redis Cluster (show and lift are)")
        cursor, keys = b"0", []
        while True:
            cursor, batch = await self.store.send("scan", ("SCAN", cursor, "MATCH", self._base + "*:b", "COUNT", 1000))
            keys.extend(batch)
            if cursor in (b"0", 0, "0") or len(keys) >= MAX_LISTED:
                break
        records = []
        for key in keys[:MAX_LISTED]:
            record = await self._record(key.decode() if isinstance(key, bytes) else key)
            if record is not None:
                records.append(record)
        records.sort(key=lambda r: r.since_ms, reverse=True)
        return records

    async def block(self, policy: str, detector: str, digest: str) -> BlockRecord | None:
        return await self._record(f"{self._base}{policy}:{detector}:{{{digest}}}:b")

    async def _record(self, key: str) -> BlockRecord | None:
        rest = key[len(self._base):]
        policy, detector, tagged = rest.rsplit(":", 3)[:3]
        digest = tagged.strip("{}")
        fields = await self.store.send("hmget", ("HMGET", key, "kind", "status", "since", "until", "off", "label"))
        if fields[0] is None:
            return None
        kind, status, since, until, offences = (int(v) for v in fields[:5])
        label = fields[5].decode("utf-8", "replace") if isinstance(fields[5], bytes) else str(fields[5] or "")
        return BlockRecord(block_id(policy, detector, digest), policy, detector, label, kind, status, since, until,
                           offences)  # fmt: skip

    async def lift(self, policy: str, detector: str, digest: str) -> bool:
        """End a block or throttle now (its offences are kept); True when there was one."""
        base = f"{self._base}{policy}:{detector}:{{{digest}}}:"
        return bool(await self.store.send("lift", ("DEL", base + "b", base + "t")))

