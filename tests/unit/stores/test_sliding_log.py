"""The sliding-log limiter (``algorithm: sliding-log``): never more than ``limit`` in any window.

In memory on a controlled clock (against the reference step function, for any arrival pattern),
and in a real Redis: the same answers, two clients sharing one counter exactly, the log as stored,
all-or-nothing with GCRA counters, and refunds across the slots of a real Redis Cluster.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extauthz.stores import GCRA, SLIDING_LOG, Charge
from extauthz.stores.memory import MemoryStore, sliding_log_step
from extauthz.stores.redis import RedisStore

SECOND = 1_000_000
MINUTE = 60 * SECOND


class Clock:
    def __init__(self, now: int = 10 * SECOND) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def log(limit: int, window_us: int, key: str = "k", cost: int = 1, enforce: bool = True) -> Charge:
    return Charge(key, window_us, limit, cost, enforce, SLIDING_LOG)


def gcra(limit: int, window_us: int, key: str = "g", cost: int = 1) -> Charge:
    return Charge(key, -(-window_us // limit), limit, cost, True, GCRA)


def test_three_a_minute_means_three_in_any_minute() -> None:
    """Issue 18: with limit 3, window 1m, GCRA let a client have 5 requests in 41 s; the log never does."""
    clock = Clock()
    gcra_store, log_store = MemoryStore(clock=clock), MemoryStore(clock=clock)
    got = {"gcra": 0, "log": 0}
    for _ in range(42):  # one request a second for 41 s
        got["gcra"] += gcra_store.charge_now([gcra(3, MINUTE)])[0].allowed
        got["log"] += log_store.charge_now([log(3, MINUTE)])[0].allowed
        clock.now += SECOND
    assert got == {"gcra": 5, "log": 3}


def test_remaining_retry_after_and_reset_are_exact() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    first = store.charge_now([log(3, MINUTE)])[0]
    assert tuple(first) == (True, 2, 0.0, 60.0)
    clock.now += 10 * SECOND
    store.charge_now([log(3, MINUTE, cost=2)])
    clock.now += 5 * SECOND
    refused = store.charge_now([log(3, MINUTE)])[0]
    # 3 units in the window; the first one (15 s old) leaves it in 45 s, the last one in 55 s.
    assert tuple(refused) == (False, 0, 45.0, 55.0)
    clock.now += 45 * SECOND - 1
    assert not store.charge_now([log(3, MINUTE)])[0].allowed
    clock.now += 1
    assert tuple(store.charge_now([log(3, MINUTE)])[0]) == (True, 0, 0.0, 60.0)
    # A cost of 2 needs both units of the second charge to leave: 10 s after the first did.
    assert store.charge_now([log(3, MINUTE, cost=2)])[0].retry_after == 10.0
    assert store.charge_now([log(3, MINUTE, cost=0)])[0].allowed  # a cost of 0 only reads


def test_a_refusal_charges_nothing_and_shadow_logs_never_refuse() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    assert [r.allowed for r in store.charge_now([log(1, MINUTE, "tight"), gcra(100, SECOND)])] == [True, True]
    refused = store.charge_now([log(1, MINUTE, "tight"), gcra(100, SECOND), log(5, MINUTE, "other")])
    assert [r.allowed for r in refused] == [False, True, True]
    assert [r.remaining for r in refused] == [0, 99, 5]  # nothing charged on the others
    shadow = [store.charge_now([log(1, MINUTE, "s", enforce=False), gcra(100, SECOND)]) for _ in range(3)]
    assert [[r.allowed for r in rs] for rs in shadow] == [[True, True], [False, True], [False, True]]


def test_expired_logs_are_swept_and_entries_are_bounded() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock, max_log_entries=100)
    for i in range(40):
        store.charge_now([log(10, SECOND, f"k{i}")])
    assert store.counters() == 40
    clock.now += 2 * SECOND
    for i in range(20):
        store.charge_now([log(10, SECOND, f"new{i}")])
    assert store.counters() < 40
    for i in range(300):
        store.charge_now([log(1000, MINUTE, f"live{i % 3}")])
    assert store._log_entries <= 100
    assert store.evicted > 0
    store.clear()
    assert store.counters() == 0 and store._log_entries == 0


@settings(max_examples=200, deadline=None)
@given(
    limit=st.integers(1, 8),
    gaps=st.lists(st.integers(0, 400_000), min_size=1, max_size=200),
    costs=st.lists(st.integers(0, 3), min_size=1, max_size=200),
)
def test_never_more_than_limit_in_any_window(limit: int, gaps: list[int], costs: list[int]) -> None:
    """Whatever the arrival pattern, the units admitted in any window-long span [t, t + window)
    are at most the limit, and every refusal came when the window really held too much."""
    window = SECOND
    clock = Clock(0)
    store = MemoryStore(clock=clock)
    admitted: list[tuple[int, int]] = []
    for i, gap in enumerate(gaps):
        clock.now += gap
        cost = min(costs[i % len(costs)], limit)
        in_window = sum(c for t, c in admitted if clock.now - t < window)
        result = store.charge_now([log(limit, window, cost=cost)])[0]
        assert result.allowed == (in_window + cost <= limit)
        if result.allowed and cost:
            admitted.append((clock.now, cost))
    for start, _ in admitted:
        assert sum(c for t, c in admitted if start <= t < start + window) <= limit


WINDOWS = {"a": SECOND, "b": 300_000, "c": 2 * SECOND}


@given(st.lists(st.tuples(
    st.integers(0, 3 * SECOND),  # time since the previous request
    st.lists(st.tuples(st.sampled_from("abc"), st.integers(1, 2 * SECOND), st.integers(1, 6), st.integers(0, 3),
                       st.booleans(), st.sampled_from((GCRA, SLIDING_LOG))), min_size=1, max_size=3),
), max_size=40))  # fmt: skip
@settings(max_examples=150, deadline=None)
def test_charge_now_answers_as_the_step_function_says(requests: list) -> None:
    """Mixed with GCRA counters in one request (all or nothing); the logs' answers are sliding_log_step's."""
    clock = Clock()
    store = MemoryStore(clock=clock)
    entries: dict[str, list[tuple[int, int]]] = {}
    for gap, specs in requests:
        clock.now += gap
        # One charge per counter and request (two quotas never share a counter: their names differ).
        specs = list({(kind, key): (key, a, b, cost, enforce, kind) for key, a, b, cost, enforce, kind in specs}.values())
        # A log's window stays the same (a shorter one drops entries that a longer one would count again).
        charges = [Charge(f"{kind}{key}", WINDOWS[key] if kind == SLIDING_LOG else a, b, min(cost, b), enforce, kind)
                   for key, a, b, cost, enforce, kind in specs]  # fmt: skip
        results = store.charge_now(charges)
        steps = [sliding_log_step(entries.get(c.key, []), clock.now, c.interval_us, c.burst, c.cost)
                 if c.kind == SLIDING_LOG else None for c in charges]  # fmt: skip
        admitted = all(r.allowed for r, c in zip(results, charges, strict=True) if c.enforce)
        for result, c, step in zip(results, charges, steps, strict=True):
            if step is None:
                continue
            assert result.allowed == step.allowed
            if not step.allowed:
                assert tuple(result) == (False, step.remaining, step.retry_us / 1e6, step.reset_us / 1e6)
            elif admitted:
                assert tuple(result) == (True, step.remaining, 0.0, step.reset_us / 1e6)
                if c.cost:
                    entries.setdefault(c.key, []).append((clock.now, c.cost))
            else:  # had room, another counter refused the request: nothing charged, the cost still free
                assert result.remaining == step.remaining + c.cost


# --- Redis ---------------------------------------------------------------------------------------------

def redis_log(limit: int, key: str, window_us: int = 3600 * SECOND, cost: int = 1) -> Charge:
    return Charge(f"q:test:{key}:log:{{{key}}}", window_us, limit, cost, True, SLIDING_LOG)


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


async def _started(url: str) -> RedisStore:
    store = RedisStore(url)
    await store.start()
    return store


def test_redis_gives_the_memory_store_s_answers(redis_server: Any) -> None:
    sequence = [
        [redis_log(3, "a")], [redis_log(3, "a"), redis_log(10, "b")], [redis_log(3, "a", cost=2)],
        [redis_log(3, "a"), redis_log(10, "b")], [redis_log(10, "b", cost=0)], [redis_log(3, "a")],
        [redis_log(10, "b", cost=5), gcra(1, 3600 * SECOND, key="q:test:g:{g}")],
        [redis_log(10, "b", cost=5), gcra(1, 3600 * SECOND, key="q:test:g:{g}")],
    ]  # fmt: skip

    async def test() -> None:
        store = await _started(redis_server.url)
        memory = MemoryStore()
        try:
            for charges in sequence:
                remote = await store.charge(charges)
                local = await memory.charge(charges)
                assert [(r.allowed, r.remaining) for r in remote] == [(r.allowed, r.remaining) for r in local]
                for r, m in zip(remote, local, strict=True):
                    assert r.retry_after == pytest.approx(m.retry_after, abs=0.05)
                    assert r.reset_after == pytest.approx(m.reset_after, abs=0.05)
        finally:
            await store.aclose()

    run(test())
    client = redis_server.client()
    stored = [v.decode().split() for v in client.lrange("extauthz:q:test:a:log:{a}", 0, -1)]
    # One "time before cost" entry per admitted charge (the cost-2 charge was refused), oldest first.
    assert [(before, cost) for _, before, cost in stored] == [("0", "1"), ("1", "1"), ("2", "1")]
    assert [int(at) for at, _, _ in stored] == sorted(int(at) for at, _, _ in stored)
    assert 0 < client.pttl("extauthz:q:test:a:log:{a}") <= 3_600_001


def test_two_clients_share_one_log_exactly(redis_server: Any) -> None:
    """Two stores (two replicas) hammer one counter concurrently: exactly the limit is admitted, and the
    log Redis holds never has more than the limit in any window."""
    window = 2 * SECOND

    async def client(store: RedisStore) -> int:
        admitted = 0
        for _ in range(40):
            results = await asyncio.gather(*(store.charge([redis_log(25, "shared", window)]) for _ in range(5)))
            admitted += sum(r[0].allowed for r in results)
        return admitted

    async def test() -> tuple[int, int]:
        one = await _started(redis_server.url + "?timeout=2s")
        two = await _started(redis_server.url + "?timeout=2s")
        try:
            first, second = await asyncio.gather(client(one), client(two))
            return first, second
        finally:
            await one.aclose()
            await two.aclose()

    first, second = run(test())
    entries = [v.decode().split() for v in redis_server.client().lrange("extauthz:q:test:shared:log:{shared}", 0, -1)]
    times = sorted(int(at) for at, _, _ in entries)
    for start in times:
        assert sum(1 for at in times if start <= at < start + window) <= 25
    assert first > 0 and second > 0
    # Both clients were refused once the window was full; 400 attempts over more than a window may
    # admit a second window's worth, never more than the log allows.
    span = times[-1] - times[0]
    assert first + second == len(times) <= 25 * (span // window + 1)


def test_a_refused_request_charges_no_log_nor_bucket_in_redis(redis_server: Any) -> None:
    async def test() -> list[list[bool]]:
        store = await _started(redis_server.url)
        try:
            outcomes = []
            for _ in range(3):
                results = await store.charge([redis_log(2, "tight"), redis_log(100, "wide"),
                                              gcra(100, 3600 * SECOND, key="q:test:g:{g}")])
                outcomes.append([r.allowed for r in results])
            return outcomes
        finally:
            await store.aclose()

    assert run(test()) == [[True] * 3, [True] * 3, [False, True, True]]
    client = redis_server.client()
    assert client.llen("extauthz:q:test:wide:log:{wide}") == 2  # the refused request added nothing


def test_refunds_across_cluster_slots(redis_factory: Any) -> None:
    """A Redis Cluster charges each slot with its own script; when one slot refuses, the log entry
    another slot added is taken back."""
    import shutil
    import subprocess
    import time

    import redis
    from redis.crc import key_slot
    from redisd import free_port

    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is not installed")
    nodes = [redis_factory(extra=("--cluster-enabled", "yes", "--cluster-port", str(free_port()),
                                  "--cluster-config-file", f"nodes-{i}.conf")) for i in range(3)]  # fmt: skip
    subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
                    "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)  # fmt: skip
    deadline = time.monotonic() + 20
    while not all(b"cluster_state:ok" in n.client().execute_command("CLUSTER", "INFO") for n in nodes):
        assert time.monotonic() < deadline, "the cluster did not become ready"
        time.sleep(0.1)
    assert key_slot(b"{user}") != key_slot(b"{global}")
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in nodes) + "?timeout=2s"

    async def test() -> list[list[tuple[bool, int]]]:
        store = await _started(url)
        try:
            return [[(r.allowed, r.remaining) for r in await store.charge([redis_log(2, "user"),
                                                                            redis_log(100, "global")])]
                    for _ in range(4)]  # fmt: skip
        finally:
            await store.aclose()

    outcomes = run(test())
    assert outcomes == [[(True, 1), (True, 99)], [(True, 0), (True, 98)], [(False, 0), (True, 98)],
                        [(False, 0), (True, 98)]]  # fmt: skip
    client = redis.RedisCluster(host="127.0.0.1", port=nodes[0].port)
    try:
        key = "extauthz:q:test:global:log:{global}"

        def costs() -> list[str]:
            return [entry.decode().split()[2] for entry in client.lrange(key, 0, -1)]

        deadline = time.monotonic() + 5  # refunds run in the background, right after the answer
        while costs() != ["1", "1", "0", "0"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert costs() == ["1", "1", "0", "0"]  # the refused requests' entries gave their unit back
    finally:
        client.close()


def test_a_request_after_a_burst_left_the_window_does_not_walk_the_log(redis_server: Any) -> None:
    """20,000 entries leave the window at once: the next charge drops them with a binary search and one
    LTRIM (Redis's own command counts say so), and the in-process log with one slice."""
    window = 300_000  # 0.3 s

    async def test() -> None:
        store = await _started(redis_server.url + "?timeout=2s")
        try:
            for _ in range(20):
                await asyncio.gather(*(store.charge([redis_log(100_000, "burst", window)]) for _ in range(1000)))
            await asyncio.sleep(window / 1e6 + 0.05)
            client = redis_server.client()
            before = client.info("commandstats").get("cmdstat_lindex", {}).get("calls", 0)
            result = (await store.charge([redis_log(100_000, "burst", window)]))[0]
            after = client.info("commandstats")["cmdstat_lindex"]["calls"]
            assert (result.allowed, result.remaining) == (True, 99_999)
            assert after - before < 40, after - before  # log2(20,000) is about 15
            assert client.llen("extauthz:q:test:burst:log:{burst}") == 1
        finally:
            await store.aclose()

    run(test())
    clock = Clock()
    memory = MemoryStore(clock=clock)
    for _ in range(20_000):
        memory.charge_now([log(100_000, window, "burst")])
    clock.now += window
    assert memory.charge_now([log(100_000, window, "burst")])[0].remaining == 99_999
    counter = memory._logs["burst"]
    assert (counter.live(), counter.head, len(counter.times), memory._log_entries) == (1, 0, 1, 1)
