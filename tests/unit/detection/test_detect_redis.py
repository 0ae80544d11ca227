"""Detectors with the Redis store (a real redis-server): shared by replicas, one round trip beside a quota."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from detect_helpers import ACME, GLOBEX, build, decide_async, request

from extauthz.decision import Authorizer
from extauthz.detection import OP_DISTINCT, OP_FAIL, OP_RATE, Detector, MemoryDetections, Op
from extauthz.detection.backend import detections_for
from extauthz.detection.redis import RedisDetections
from extauthz.policy import Services
from extauthz.stores import store_for
from extauthz.stores.redis import RedisStore

BRUTE = """
- name: guessing
  failures: {identity: true}
  by: client_ip
  threshold: 10
  window: 10m
  action: {block: {duration: 5m, status: 429}}
"""
ENUMERATION = """
- name: order-walking
  distinct: {pathSegment: 2}
  by: subject
  threshold: 20
  window: 5m
  action: {block: {duration: 10m, status: 403}}
"""
QUOTA = """
- {name: per-key, key: "request.headers['x-api-key']", limit: 1000, window: 1m}
"""


class Replica:
    """One sidecar's policies and store client (its own connection), as a second process would have."""

    def __init__(self, folder: Path, url: str, detect: str, **kwargs: Any) -> None:
        self.services = Services(settings={"redis_url": url})
        self.authorizer: Authorizer = build(folder, detect, services=self.services, **kwargs)
        store = store_for(self.services)
        assert isinstance(store, RedisStore)
        self.store = store

    async def start(self) -> None:
        await self.store.start()

    async def close(self) -> None:
        await self.store.aclose()


def test_a_block_decided_at_one_replica_holds_at_the_other(tmp_path: Path, redis_server: Any) -> None:
    async def test() -> None:
        one = Replica(tmp_path / "one", redis_server.url, BRUTE)
        two = Replica(tmp_path / "two", redis_server.url, BRUTE)
        await one.start()
        await two.start()
        try:
            for _ in range(10):  # ten failures at replica one
                assert (await decide_async(one.authorizer, request("ak_wrong"))).status == 401
            # The very next request, at replica two (one round trip: its detect script), is blocked.
            other = await decide_async(two.authorizer, request(ACME))
            assert (other.allowed, other.status, other.reason) == (False, 429, "abuse_blocked")
            assert 299 <= int(dict(other.client_headers)["retry-after"]) <= 300
            # Replica two has seen the block: its next request from there is refused before the
            # identity check, without a store call.
            writes = two.store._pipeline.batches
            again = await decide_async(two.authorizer, request("ak_wrong"))
            assert again.reason == "abuse_blocked" and two.store._pipeline.batches == writes
            assert any("before the identity check" in step for step in again.steps or ())
            # Another address is not.
            assert (await decide_async(two.authorizer, request(ACME, ip="198.51.100.9"))).allowed
            # Every key the detector wrote expires.
            client = redis_server.client()
            keys = client.keys("extauthz:d:*")
            assert keys and all(client.pttl(k) > 0 for k in keys)
        finally:
            await one.close()
            await two.close()

    asyncio.run(test())


def test_enumeration_through_redis_blocks_the_walker_only(tmp_path: Path, redis_server: Any) -> None:
    async def test() -> None:
        one = Replica(tmp_path / "one", redis_server.url, ENUMERATION)
        await one.start()
        try:
            for order in range(1, 21):
                assert (await decide_async(one.authorizer, request(ACME, path=f"/orders/{order}"))).allowed
            walker = await decide_async(one.authorizer, request(ACME, path="/orders/21"))
            assert (walker.status, walker.reason) == (403, "abuse_blocked")
            for _ in range(10):
                for order in (7, 8, 9):
                    assert (await decide_async(one.authorizer, request(GLOBEX, path=f"/orders/{order}"))).allowed
        finally:
            await one.close()

    asyncio.run(test())


def test_beside_a_quota_detection_adds_no_round_trip(tmp_path: Path, redis_server: Any) -> None:
    async def test() -> None:
        with_detect = Replica(tmp_path / "one", redis_server.url, ENUMERATION, quotas=QUOTA)
        await with_detect.start()
        pipeline = with_detect.store._pipeline
        try:
            for order in range(1, 4):  # connect, load the script (NOSCRIPT -> EVAL once)
                assert (await decide_async(with_detect.authorizer, request(ACME, path=f"/orders/{order}"))).allowed
            before = pipeline.batches, pipeline.commands
            for order in range(4, 14):
                d = await decide_async(with_detect.authorizer, request(ACME, path=f"/orders/{order}"))
                assert d.allowed and d.attributes["quota"] == "per-key"
            writes, commands = pipeline.batches - before[0], pipeline.commands - before[1]
            # One write (one round trip) and one command per request: the detectors ride in the quota's script.
            assert (writes, commands) == (10, 10)
            # And the block still answers through the quota check's round trip.
            for order in range(14, 22):
                last = await decide_async(with_detect.authorizer, request(ACME, path=f"/orders/{order}"))
            assert (last.status, last.reason) == (403, "abuse_blocked")
        finally:
            await with_detect.close()

    asyncio.run(test())


def test_a_store_failure_follows_on_store_error(tmp_path: Path, redis_server: Any) -> None:
    async def test() -> None:
        allow = ENUMERATION.replace("  by: subject", "  by: subject\n  onStoreError: allow")
        local = ENUMERATION.replace("  by: subject", "  by: subject\n  onStoreError: local")
        one = Replica(tmp_path / "one", redis_server.url, ENUMERATION)  # the default: deny
        two = Replica(tmp_path / "two", redis_server.url, allow)
        three = Replica(tmp_path / "three", redis_server.url, local)
        for replica in (one, two, three):
            await replica.start()
        try:
            redis_server.kill()
            refused = await decide_async(one.authorizer, request(ACME, path="/orders/1"))
            assert (refused.status, refused.reason) == (503, "detect_store_unavailable")
            allowed = await decide_async(two.authorizer, request(ACME, path="/orders/1"))
            assert allowed.allowed and allowed.attributes["detect_store"] == "unavailable"
            # local: the replica's own state decides meanwhile, the walker is still caught.
            for order in range(1, 21):
                d = await decide_async(three.authorizer, request(ACME, path=f"/orders/{order}"))
                assert d.allowed and d.attributes["detect_store"] == "local"
            walker = await decide_async(three.authorizer, request(ACME, path="/orders/21"))
            assert (walker.status, walker.reason) == (403, "abuse_blocked")
        finally:
            for replica in (one, two, three):
                await replica.close()

    asyncio.run(test())


def _detector(op: int, **kwargs: Any) -> Detector:
    base: dict[str, Any] = dict(policy="p", name="d", op=op, threshold=3, window_ms=60_000, store_action=2, action=2,
                                dry_run=False, duration_ms=30_000, escalation=2.0, max_duration_ms=100_000,
                                memory_ms=3_600_000, status=403)  # fmt: skip
    base.update(kwargs)
    return Detector(**base)


def _said(answer: Any) -> Any:
    if not answer.refused_ms and not answer.tripped:
        return "nothing"
    return answer._replace(refused_ms=True, total=answer.total if answer.tripped else 0)


def test_same_answers_as_the_memory_store(redis_server: Any) -> None:
    """The script and MemoryDetections, op for op (times aside: Redis's clock is its own)."""
    fail = _detector(OP_FAIL)
    distinct = _detector(OP_DISTINCT, name="e", store_action=1, action=1, throttle_interval_us=1_000_000,
                         throttle_burst=2)
    rate = _detector(OP_RATE, name="r", threshold=0, window_ms=0, interval_ms=3_600_000, alpha=0.2, warmup=0,
                     min_count=4, factor=3.0, state_ttl_ms=7_200_000)
    script = (
        [Op(OP_FAIL, fail, "a" * 32, "ip") for _ in range(5)]
        + [Op(OP_DISTINCT, distinct, "b" * 32, "sub", str(v)) for v in (1, 2, 2, 3, 4, 5, 6, 7, 8)]
        + [Op(OP_RATE, rate, "c" * 32, "sub") for _ in range(6)]
    )

    async def test() -> None:
        services = Services(settings={"redis_url": redis_server.url})
        backend = detections_for(services)
        assert isinstance(backend, RedisDetections)
        await backend.store.start()
        memory = MemoryDetections()
        try:
            for op in script:
                remote = await backend.submit([op])
                local = memory.run([op])
                # The script says nothing of an op with nothing to say (the common case); refused_ms
                # counts down on either clock: the same within the time between the two calls.
                assert [_said(a) for a in remote] == [_said(a) for a in local], op
                assert abs(remote[0].refused_ms - local[0].refused_ms) < 2000
            # Every key any op wrote expires (blocks, offences, counters, HyperLogLogs, spike states, TATs).
            client = redis_server.client()
            keys = client.keys("extauthz:d:*")
            assert {k.decode().rsplit(":", 1)[1] for k in keys} >= {"b", "o", "t", "s", "n"}
            assert all(client.pttl(k) > 0 for k in keys)
            listed = await backend.blocks()
            assert {(r.detector, r.kind, r.offences) for r in listed} == {("d", 2, 1), ("e", 1, 1), ("r", 2, 1)}
            assert await backend.lift("p", "d", "a" * 32)
            assert (await backend.submit([Op(OP_FAIL, fail, "a" * 32, "ip")]))[0].refused_ms == 0
        finally:
            await backend.store.aclose()

    asyncio.run(test())


UPSTREAM = """
- name: login-failures
  failures: {identity: false, upstream: [401]}
  by: client_ip
  threshold: 3
  window: 10m
  action: {block: {duration: 1m}}
"""


def test_upstream_failures_through_redis_block_at_every_replica(tmp_path: Path, redis_server: Any) -> None:
    from extauthz.outcomes import Outcome, outcomes_for

    async def test() -> None:
        one = Replica(tmp_path / "one", redis_server.url, UPSTREAM)
        two = Replica(tmp_path / "two", redis_server.url, UPSTREAM)
        await one.start()
        await two.start()
        join = outcomes_for(one.services)
        try:
            for n in range(3):
                sample = request(ACME, path="/login")
                sample["headers"]["x-request-id"] = f"r{n}"
                assert (await decide_async(one.authorizer, sample)).allowed
                assert join.deliver(Outcome(f"r{n}", 401))
            # Each outcome is counted by a task of the detect check: wait for them, then ask replica two.
            from extauthz.checks.detect import DetectCheck

            policy = one.authorizer.policy_set.policies[0]  # type: ignore[union-attr]
            check = next(c for c in policy.checks if isinstance(c, DetectCheck))
            await asyncio.gather(*check._tasks)
            blocked = await decide_async(two.authorizer, request(ACME))
            assert (blocked.status, blocked.reason) == (429, "abuse_blocked")
        finally:
            await one.close()
            await two.close()

    asyncio.run(test())


def test_a_spike_after_idle_intervals_same_in_both_stores(redis_server: Any) -> None:
    """The baseline's decay over idle intervals, the same arithmetic in the script and in process:
    both start from the same state, written three intervals back (days: the current one is the same
    on both clocks)."""
    import time as _time

    from extauthz.detection.memory import _Spike

    day = 86_400_000
    rate = _detector(OP_RATE, name="r", threshold=0, window_ms=0, interval_ms=day, alpha=0.2, warmup=2,
                     min_count=3, factor=2.0, state_ttl_ms=10 * day)
    digest = "d" * 32
    bucket = int(_time.time() * 1000) // day

    async def test() -> None:
        services = Services(settings={"redis_url": redis_server.url})
        backend = detections_for(services)
        assert isinstance(backend, RedisDetections)
        await backend.store.start()
        memory = MemoryDetections()
        # Three days ago: 5 requests so far that day, an average of 4.0 over 5 days seen.
        memory._spikes[rate.prefix + digest] = _Spike(bucket - 3, 5, 4.0, 5, -1, (bucket + 5) * day)
        # In Redis: the state "bucket trip-count average seen" and the bucket's count.
        redis_server.client().set(f"extauthz:d:p:r:{{{digest}}}:s", f"{bucket - 3} 0 4 5", px=10 * day)
        redis_server.client().set(f"extauthz:d:p:r:{{{digest}}}:n", "5", px=10 * day)
        try:
            remote = [(await backend.submit([Op(OP_RATE, rate, digest, "k")]))[0] for _ in range(7)]
            local = [memory.run([Op(OP_RATE, rate, digest, "k")])[0] for _ in range(7)]
            # average 4 + 0.2 (5 - 4) = 4.2, then x 0.8^2 over two idle days = 2.688: more than 5.376
            # trips, at the sixth request of today.
            assert [_said(a) for a in remote] == [_said(a) for a in local]
            assert [a.tripped for a in local] == [False] * 5 + [True, False]
        finally:
            await backend.store.aclose()

    asyncio.run(test())
