"""The Redis store on a real three-node Redis Cluster: counters spread over slots, all or nothing."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from typing import Any

import pytest
import redis
from redis.crc import key_slot
from redisd import free_port

from extauthz.stores import Charge
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
