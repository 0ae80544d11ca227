"""The Redis store on a real three-node Redis Cluster: counters spread over slots, all or nothing."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis
from redis.crc import key_slot
from redisd import free_port

from extauthz.stores import Charge, StoreError
from extauthz.stores.redis import RedisStore

HOUR_US = 3_600_000_000


@pytest.fixture
def cluster(redis_factory: Any) -> list[Any]:
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is not installed")
    nodes = [
        redis_factory(extra=("--cluster-enabled", "yes", "--cluster-port", str(free_port()),
                             "--cluster-config-file", f"nodes-{i}.conf", "--cluster-node-timeout", "2000"))
        for i in range(3)
    ]  # fmt: skip
    subprocess.run(
        ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes), "--cluster-replicas", "0",
         "--cluster-yes"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if all(b"cluster_state:ok" in n.client().execute_command("CLUSTER", "INFO") for n in nodes):
            return nodes
        time.sleep(0.1)
    pytest.fail("the cluster did not become ready")


def counter(key: str, limit: int, cost: int = 1) -> Charge:
    return Charge(f"q:p:{key}:{{{key}}}", HOUR_US // limit, limit, cost)


def test_counters_in_different_slots_are_charged_all_or_nothing(cluster: list[Any]) -> None:
    assert key_slot(b"{user}") != key_slot(b"{global}")
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in cluster[:2]) + "?timeout=2s"

    async def test() -> list[list[tuple[bool, int]]]:
        store = RedisStore(url)
        await store.start()
        try:
            outcomes = []
            for _ in range(4):
                results = await store.charge([counter("user", 2), counter("global", 100)])
                outcomes.append([(r.allowed, r.remaining) for r in results])
            # Many at once: exactly the limit gets through.
            burst = await asyncio.gather(*(store.charge([counter("burst", 25), counter("global2", 1000)])
                                           for _ in range(60)))  # fmt: skip
            outcomes.append([(sum(r[0].allowed for r in burst), 0)])
            return outcomes
        finally:
            await store.aclose()

    outcomes = asyncio.run(test())
    assert outcomes[:4] == [
        [(True, 1), (True, 99)],
        [(True, 0), (True, 98)],
        [(False, 0), (True, 98)],  # refused by "user": the global counter was refunded
        [(False, 0), (True, 98)],
    ]
    assert outcomes[4] == [(25, 0)]
    client = redis.RedisCluster(host="127.0.0.1", port=cluster[0].port)
    try:
        now_s, now_us = client.time()
        tat = int(client.get("extauthz:q:p:global:{global}"))
        assert round((tat - (now_s * 1_000_000 + now_us)) / (HOUR_US // 100)) == 2
        tat2 = int(client.get("extauthz:q:p:global2:{global2}"))
        assert round((tat2 - (now_s * 1_000_000 + now_us)) / (HOUR_US // 1000)) == 25
    finally:
        client.close()


def _tat_units(client: Any, key: str, limit: int) -> int:
    """Units charged on a counter (HOUR_US // limit apart), from its stored TAT and Redis's clock."""
    now_s, now_us = client.time()
    tat = int(client.get(key) or 0)
    return max(0, round((tat - (now_s * 1_000_000 + now_us)) / (HOUR_US // limit)))


def _with_store(cluster: list[Any], body: Callable[[RedisStore, Any], Awaitable[None]]) -> Any:
    """Run ``body(store, client)`` with a started store on ``cluster`` and a plain client of it;
    the client (still open) is returned for checks afterwards."""
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in cluster) + "?timeout=2s&probe_interval=10s"
    client = redis.RedisCluster(host="127.0.0.1", port=cluster[0].port)

    async def run() -> None:
        store = RedisStore(url)
        await store.start()
        try:
            await body(store, client)
        finally:
            await store.aclose()

    try:
        asyncio.run(run())
    except BaseException:
        client.close()
        raise
    return client


def test_a_slot_that_fails_refunds_the_slots_that_charged(cluster: list[Any]) -> None:
    """One slot's script fails (a key of the wrong type there: WRONGTYPE) while another slot's charged:
    the charge fails as a failure would, and the slot that charged gives it back."""
    assert key_slot(b"{good}") != key_slot(b"{bad}")

    async def body(store: RedisStore, client: Any) -> None:
        assert (await store.charge([counter("good", 10)]))[0].remaining == 9
        client.lpush("extauthz:q:p:bad:{bad}", "not a counter")
        with pytest.raises(StoreError, match="WRONGTYPE"):
            await store.charge([counter("good", 10), counter("bad", 10)])
        assert store.circuit_open

    client = _with_store(cluster, body)
    try:
        assert _tat_units(client, "extauthz:q:p:good:{good}", 10) == 1  # the first charge only
    finally:
        client.close()


def test_a_refusal_stands_when_another_slot_fails(cluster: list[Any]) -> None:
    """One slot refuses (its counter is spent) while another fails (WRONGTYPE): Redis has refused the
    request, and that is the answer -- a store error would let onStoreError: allow admit it."""
    assert key_slot(b"{tight}") != key_slot(b"{bad}")

    async def body(store: RedisStore, client: Any) -> None:
        assert (await store.charge([counter("tight", 1)]))[0].allowed
        client.lpush("extauthz:q:p:bad:{bad}", "not a counter")
        tight, bad = await store.charge([counter("tight", 1), counter("bad", 10)])
        assert tight is not None and not tight.allowed and tight.retry_after > 0
        assert bad is None  # nothing could be charged there

    _with_store(cluster, body).close()


def test_a_command_queued_behind_stuck_lanes_waits_no_longer_than_its_timeout(cluster: list[Any]) -> None:
    """One node stops answering (CLIENT PAUSE): both lanes wait on it, and a command queued behind them
    still fails at its own deadline, counted from when it was submitted (not when a lane sends it)."""
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in cluster) + "?timeout=300ms&probe_interval=100ms"
    client = redis.RedisCluster(host="127.0.0.1", port=cluster[0].port)
    port = client.get_node_from_key("extauthz:q:p:stuck:{stuck}").port
    client.close()
    node = next(n for n in cluster if n.port == port)

    async def timed(charge: Awaitable[Any]) -> tuple[str, float]:
        t0 = time.perf_counter()
        try:
            await charge
            return "answered", time.perf_counter() - t0
        except StoreError as exc:
            return str(exc), time.perf_counter() - t0

    async def test() -> None:
        store = RedisStore(url)
        await store.start()
        try:
            assert (await store.charge([counter("stuck", 10)]))[0].allowed
            node.client().execute_command("CLIENT", "PAUSE", "900", "ALL")
            waits = []
            for _ in range(3):  # one lane each for the first two, the third queues behind them
                waits.append(asyncio.ensure_future(timed(store.charge([counter("stuck", 10)]))))
                await asyncio.sleep(0.03)
            assert all(not w.done() for w in waits)
            outcomes = await asyncio.gather(*waits)
            for message, seconds in outcomes:
                assert "TimeoutError" in message
                assert 0.2 < seconds < 0.42  # the timeout (300 ms), never twice as long
            assert store.circuit_open
            # The pause ends: the probe closes the circuit and the lanes serve again.
            deadline = time.monotonic() + 5
            while store.circuit_open and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert not store.circuit_open
            assert (await store.charge([counter("stuck", 10)]))[0].allowed
        finally:
            await store.aclose()

    asyncio.run(test())
