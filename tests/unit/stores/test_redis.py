"""The Redis store against real redis-server processes (own ports, killed and restarted by pid)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from redisd import free_port, make_tls_files

from extauthz.stores import Charge, StoreConfigError, StoreError
from extauthz.stores import redis as redis_store
from extauthz.stores.memory import MemoryStore
from extauthz.stores.redis import RedisStore, parse_redis_url

HOUR_US = 3_600_000_000


def run(test: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(test())


async def started(url: str, **kwargs: Any) -> RedisStore:
    store = RedisStore(url, **kwargs)
    await store.start()
    return store


def hourly(limit: int, key: str = "k", cost: int = 1, enforce: bool = True, burst: int | None = None) -> Charge:
    """A long window: nothing refills while a test runs, so results are exact."""
    return Charge(f"q:test:{key}:{{{key}}}", HOUR_US // limit, burst or limit, cost, enforce)


def test_same_answers_as_the_memory_store(redis_server: Any) -> None:
    sequence = [
        [hourly(3, "a")], [hourly(3, "a"), hourly(10, "b")], [hourly(3, "a", cost=2)],
        [hourly(3, "a"), hourly(2, "s", enforce=False)], [hourly(10, "b", cost=0)], [hourly(3, "a")],
        [hourly(10, "b", cost=5), hourly(1, "c")], [hourly(10, "b", cost=5), hourly(1, "c")],
    ]  # fmt: skip

    async def test() -> None:
        store = await started(redis_server.url)
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

    run(test)
    keys = sorted(k.decode() for k in redis_server.client().keys("*"))
    assert keys == ["extauthz:q:test:a:{a}", "extauthz:q:test:b:{b}", "extauthz:q:test:c:{c}",
                    "extauthz:q:test:s:{s}"]  # fmt: skip
    assert 0 < redis_server.client().pttl("extauthz:q:test:c:{c}") <= 3_600_001


def test_concurrent_requests_are_charged_exactly(redis_server: Any) -> None:
    """500 requests from 50 concurrent tasks against a limit of 300: the script is atomic."""

    async def test() -> int:
        store = await started(redis_server.url + "?timeout=2s")
        try:

            async def worker() -> int:
                admitted = 0
                for _ in range(10):
                    result = await store.charge([hourly(300, "shared"), hourly(10_000, "other")])
                    admitted += result[0].allowed
                return admitted

            return sum(await asyncio.gather(*(worker() for _ in range(50))))
        finally:
            await store.aclose()

    assert run(test) == 300
    # Refused requests charged nothing, the other quota included.
    tat = int(redis_server.client().get("extauthz:q:test:other:{other}"))
    now = redis_server.client().time()
    now_us = now[0] * 1_000_000 + now[1]
    assert round((tat - now_us) / (HOUR_US // 10_000)) == 300


def test_noscript_after_a_script_flush_falls_back_to_eval(redis_server: Any) -> None:
    async def test() -> list[bool]:
        store = await started(redis_server.url)
        try:
            first = (await store.charge([hourly(2)]))[0].allowed
            redis_server.client().script_flush()
            second = (await store.charge([hourly(2)]))[0].allowed
            third = (await store.charge([hourly(2)]))[0].allowed
            assert not store.circuit_open
            return [first, second, third]
        finally:
            await store.aclose()

    assert run(test) == [True, True, False]


async def _refused_at_once(store: RedisStore, count: int, pause: float = 0.0) -> list[float]:
    """Seconds each of ``count`` charges took to fail with the circuit open (``pause`` between them)."""
    timings = []
    for _ in range(count):
        t0 = time.perf_counter()
        with pytest.raises(StoreError, match="circuit is open"):
            await store.charge([hourly(5)])
        timings.append(time.perf_counter() - t0)
        if pause:
            await asyncio.sleep(pause)
    return timings


def test_a_dead_redis_costs_one_timeout_then_fails_fast_and_recovery_is_automatic(redis_server: Any) -> None:
    async def test() -> None:
        store = await started(redis_server.url + "?timeout=200ms&probe_interval=100ms")
        try:
            assert (await store.charge([hourly(5)]))[0].remaining == 4
            redis_server.kill()
            t0 = time.perf_counter()
            with pytest.raises(StoreError):
                await store.charge([hourly(5)])
            first = time.perf_counter() - t0
            assert first < 0.5
            assert store.circuit_open
            timings = await _refused_at_once(store, 50)
            # Under a millisecond each (generous bounds: the test machine is shared and noisy).
            assert sorted(timings)[len(timings) // 2] < 0.002 and max(timings) < 0.05
            redis_server.start()  # same port, empty (no persistence)
            deadline = time.monotonic() + 5
            while store.circuit_open and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not store.circuit_open
            # The script is gone from the new server and the old connection is dead: both handled.
            assert (await store.charge([hourly(5)]))[0].remaining == 4
            assert store.trips == 1
        finally:
            await store.aclose()

    run(test)


@pytest.mark.parametrize("credentials", ["", "app:secret@"])
def test_a_redis_that_stops_answering_costs_one_timeout_then_fails_fast(credentials: str) -> None:
    """A black hole (accepts, never answers): the first timeout opens the circuit, every later request
    fails at once, and the probe sent right after the timeout, unanswered too, leaves it open.

    With credentials, the connection's AUTH is what goes unanswered: connecting is inside the deadline.
    """

    async def test() -> None:
        async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while await reader.read(65536):
                pass

        hole = await asyncio.start_server(swallow, "127.0.0.1", 0)
        port = hole.sockets[0].getsockname()[1]
        store = RedisStore(f"redis://{credentials}127.0.0.1:{port}/0?timeout=150ms&probe_interval=10s")
        try:
            t0 = time.perf_counter()
            with pytest.raises(StoreError, match="TimeoutError"):
                await store.charge([hourly(5)])
            assert 0.1 < time.perf_counter() - t0 < 0.4
            assert store.circuit_open
            # Fast while the probe's PING is in flight and after it timed out too (0.3 s in all).
            timings = await _refused_at_once(store, 15, pause=0.02)
            assert max(timings) < 0.05
            assert store.circuit_open and store.trips == 1
        finally:
            await store.aclose()
            hole.close()

    run(test)


async def _put_to_sleep(server: Any, seconds: float) -> asyncio.Task[Any]:
    """DEBUG SLEEP on its own connection; returns (the sleeping command's task) once redis-server is
    asleep, i.e. a PING on another connection goes unanswered for 20 ms, so a loaded machine cannot
    make the test send its command before the sleep began."""
    pause = asyncio.create_task(asyncio.to_thread(server.client().execute_command, "DEBUG", "SLEEP", str(seconds)))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with socket.create_connection(("127.0.0.1", server.port), timeout=1) as probe:
            probe.sendall(b"PING\r\n")
            probe.settimeout(0.02)
            try:
                probe.recv(64)
            except TimeoutError:
                return pause
        await asyncio.sleep(0.01)
    raise AssertionError("redis-server never went to sleep")


def test_a_command_in_flight_when_redis_dies_fails_at_once_not_at_the_deadline(redis_factory: Any) -> None:
    redis_server = redis_factory(extra=("--enable-debug-command", "local"))

    async def test() -> None:
        store = await started(redis_server.url + "?timeout=5s&probe_interval=10s")
        try:
            assert (await store.charge([hourly(5)]))[0].allowed
            pause = await _put_to_sleep(redis_server, 3)
            in_flight = asyncio.ensure_future(store.charge([hourly(5)]))
            await asyncio.sleep(0.1)
            t0 = time.perf_counter()
            redis_server.kill()
            with pytest.raises(StoreError, match="ConnectionError"):
                await in_flight
            assert time.perf_counter() - t0 < 1.0  # the connection closed: no waiting for the 5 s deadline
            assert store.circuit_open and store.trips == 1
            with contextlib.suppress(Exception):
                await pause  # its client saw the server die too
        finally:
            await store.aclose()

    run(test)


def test_commands_issued_together_share_one_write(redis_server: Any) -> None:
    async def test() -> None:
        store = await started(redis_server.url)
        try:
            pipeline = store._pipeline
            batches, commands = pipeline.batches, pipeline.commands
            results = await asyncio.gather(*(store.charge([hourly(10, f"k{i % 5}")]) for i in range(50)))
            assert sorted(r[0].allowed for r in results) == [True] * 50
            assert (pipeline.batches - batches, pipeline.commands - commands) == (1, 50)
        finally:
            await store.aclose()

    run(test)


def test_noscript_fallbacks_in_a_shared_write_answer_their_own_callers(redis_server: Any) -> None:
    """After a SCRIPT FLUSH every EVALSHA of a write fails; each is sent again as EVAL, in order, among other commands."""
    redis_server.client().sadd("revoked", "member")

    async def test() -> list[Any]:
        store = await started(redis_server.url)
        try:
            redis_server.client().script_flush()
            return list(await asyncio.gather(
                store.charge([hourly(2, "a")]), store.is_member("revoked", "member"),
                store.charge([hourly(3, "b", cost=2)]), store.remember_once("nonce", 60),
                store.is_member("revoked", "other"), store.charge([hourly(2, "a")]), store.charge([hourly(2, "a")]),
            ))  # fmt: skip
        finally:
            await store.aclose()

    a1, member, b, fresh, other, a2, a3 = run(test)
    assert (member, fresh, other) == (True, True, False)
    assert [(r[0].allowed, r[0].remaining) for r in (a1, b, a2, a3)] == [(True, 1), (True, 1), (True, 0), (False, 0)]


def test_unix_socket_and_a_database_number(redis_factory: Any, tmp_path: Path) -> None:
    socket_path = tmp_path / "redis.sock"
    server = redis_factory(extra=("--unixsocket", str(socket_path), "--unixsocketperm", "700"))

    async def test() -> list[bool]:
        store = await started(f"unix://{socket_path}?db=3")
        try:
            return [(await store.charge([hourly(1)]))[0].allowed for _ in range(2)]
        finally:
            await store.aclose()

    assert run(test) == [True, False]
    assert list(server.client().info("keyspace")) == ["db3"]


def test_an_acl_user_from_the_url_with_the_password_from_the_url_or_a_file(redis_server: Any, tmp_path: Path) -> None:
    redis_server.client().acl_setuser("app", enabled=True, passwords=["+app-secret"], keys=["*"], commands=["+@all"])
    secret = tmp_path / "password"
    secret.write_text("app-secret\n")
    port = redis_server.port

    async def test() -> None:
        from_url = await started(f"redis://app:app-secret@127.0.0.1:{port}/0")
        from_file = await started(f"redis://app@127.0.0.1:{port}/0", password_file=str(secret))
        wrong = await started(f"redis://app:nope@127.0.0.1:{port}/0?probe_interval=10s")
        try:
            assert (await from_url.charge([hourly(2)]))[0].remaining == 1
            assert (await from_file.charge([hourly(2)]))[0].remaining == 0
            assert wrong.circuit_open  # WRONGPASS at start: failing fast, never allowing
        finally:
            for store in (from_url, from_file, wrong):
                await store.aclose()

    run(test)


def test_one_slow_round_trip_opens_the_circuit_only_until_redis_answers(
    redis_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pause (here of redis-server, SIGSTOP for slightly longer than the timeout; it could as well be
    this process's) opens the circuit, and the probe sent at once closes it as soon as Redis answers,
    not after probe_interval. A timeout again right after it closed waits probe_interval."""
    states: list[str] = []
    errors: list[str] = []
    monkeypatch.setattr(redis_store, "_circuit_metric", states.append)
    monkeypatch.setattr(redis_store, "_store_error_metric", errors.append)
    pid = redis_server.proc.pid

    async def test() -> None:
        store = await started(redis_server.url + "?timeout=200ms&probe_interval=1s")
        try:
            assert (await store.charge([hourly(5)]))[0].allowed
            os.kill(pid, signal.SIGSTOP)
            t0 = time.perf_counter()
            with pytest.raises(StoreError, match="TimeoutError"):
                await store.charge([hourly(5)])
            assert 0.15 < time.perf_counter() - t0 < 0.5
            assert store.circuit_open and store.trips == 1
            t0 = time.perf_counter()
            with pytest.raises(StoreError, match="circuit is open"):
                await store.charge([hourly(5)])
            assert time.perf_counter() - t0 < 0.05
            await asyncio.sleep(0.05)
            os.kill(pid, signal.SIGCONT)
            resumed = time.monotonic()
            while store.circuit_open and time.monotonic() - resumed < 3:
                await asyncio.sleep(0.005)
            # Closed by the PING sent right after the timeout, once Redis answered it: one round trip.
            assert not store.circuit_open and time.monotonic() - resumed < 0.25
            assert (await store.charge([hourly(5)]))[0].allowed
            assert states == ["closed", "open", "half_open", "closed"]
            assert errors == ["charge", "charge"]  # the timeout, then the fast failure

            # Timing out again right after the circuit closed: Redis answers PINGs but not requests
            # in time, so the probe waits probe_interval (requests fail fast meanwhile).
            os.kill(pid, signal.SIGSTOP)
            with pytest.raises(StoreError, match="TimeoutError"):
                await store.charge([hourly(5)])
            tripped = time.monotonic()
            os.kill(pid, signal.SIGCONT)
            await asyncio.sleep(0.5)
            assert store.circuit_open and store.trips == 2
            while store.circuit_open and time.monotonic() - tripped < 3:
                await asyncio.sleep(0.01)
            assert not store.circuit_open and 0.9 < time.monotonic() - tripped < 1.6
            assert states[4:] == ["open", "half_open", "closed"]
        finally:
            os.kill(pid, signal.SIGCONT)
            await store.aclose()

    run(test)


def test_an_unreachable_redis_at_start_is_not_fatal(redis_server: Any) -> None:
    port = redis_server.port
    redis_server.stop()

    async def test() -> None:
        store = await started(f"redis://127.0.0.1:{port}/0?timeout=100ms&probe_interval=50ms")
        try:
            assert store.circuit_open
            with pytest.raises(StoreError):
                await store.charge([hourly(5)])
            redis_server.start()
            deadline = time.monotonic() + 5
            while store.circuit_open and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert (await store.charge([hourly(5)]))[0].allowed
        finally:
            await store.aclose()

    run(test)


def test_nonces_and_set_membership(redis_server: Any) -> None:
    redis_server.client().sadd("revoked-jtis", "jti-1")

    async def test() -> None:
        store = await started(redis_server.url)
        try:
            assert await store.remember_once("nonce-a", 60) is True
            assert await store.remember_once("nonce-a", 60) is False
            assert await store.remember_once("nonce-b", 0.05) is True
            await asyncio.sleep(0.1)
            assert await store.remember_once("nonce-b", 60) is True
            assert await store.is_member("revoked-jtis", "jti-1") is True
            assert await store.is_member("revoked-jtis", "jti-2") is False
        finally:
            await store.aclose()

    run(test)
    # Nonces are stored hashed: bounded keys, no client bytes in key names.
    once = [k.decode() for k in redis_server.client().keys("extauthz:once:*")]
    assert len(once) == 2 and all("nonce" not in k for k in once)


def test_auth_from_a_password_file(redis_factory: Any, tmp_path: Path) -> None:
    server = redis_factory(password="s3cret-pass")
    secret = tmp_path / "password"
    secret.write_text("s3cret-pass\n")  # a trailing newline, as `echo` writes it

    async def test() -> None:
        good = await started(server.url, password_file=str(secret))
        bad_file = tmp_path / "wrong"
        bad_file.write_text("nope")
        bad = await started(server.url + "?probe_interval=10s", password_file=str(bad_file))
        try:
            assert (await good.charge([hourly(1)]))[0].allowed
            assert bad.circuit_open  # AUTH failed at start: failing fast, never allowing
            with pytest.raises(StoreError):
                await bad.charge([hourly(1)])
        finally:
            await good.aclose()
            await bad.aclose()

    run(test)
    with pytest.raises(StoreConfigError, match="cannot read"):
        RedisStore(server.url, password_file=str(tmp_path / "missing"))


def test_the_password_file_is_reread_when_it_changes(redis_factory: Any, tmp_path: Path) -> None:
    server = redis_factory(password="first")
    secret = tmp_path / "password"
    secret.write_text("first")

    async def test() -> None:
        store = await started(server.url, password_file=str(secret))
        try:
            assert (await store.charge([hourly(5)]))[0].allowed
            admin = server.client()
            admin.config_set("requirepass", "second")
            secret.write_text("second")
            assert store._credentials is not None and store._credentials.reload() is True
            # As after a Redis restart: the server drops the store's connection (the store sees it
            # close), and the next command opens a new one, authenticated with the new password.
            assert admin.client_kill_filter(_type="normal", skipme=True) == 1
            await asyncio.sleep(0.05)
            assert (await store.charge([hourly(5)]))[0].allowed
            assert not store.circuit_open
        finally:
            await store.aclose()

    run(test)


def test_tls_with_a_private_ca(redis_factory: Any, tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path / "tls")
    server = redis_factory(tls=tls)

    async def test() -> None:
        verified = await started(f"{server.url}?ssl_ca_certs={tls.ca}")
        unverified = await started(f"{server.url}?probe_interval=10s")  # system CAs: the cert is not trusted
        try:
            assert (await verified.charge([hourly(1)]))[0].allowed
            assert not (await verified.charge([hourly(1)]))[0].allowed
            assert unverified.circuit_open
        finally:
            await verified.aclose()
            await unverified.aclose()

    run(test)


def test_sentinel_url(redis_factory: Any) -> None:
    master = redis_factory()
    sentinel = redis_factory(sentinel_of=(master, "mymaster"))

    dead = free_port()  # a sentinel that is down: the next one is asked

    async def test() -> None:
        store = await started(f"redis+sentinel://127.0.0.1:{dead},127.0.0.1:{sentinel.port}/mymaster?timeout=500ms")
        try:
            assert (await store.charge([hourly(1)]))[0].allowed
            assert not (await store.charge([hourly(1)]))[0].allowed
        finally:
            await store.aclose()

    run(test)
    assert master.client().exists("extauthz:q:test:k:{k}")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://localhost", "scheme"),
        ("redis://", "no host"),
        ("redis://a:1,b:2", "several hosts"),
        ("redis://localhost?timeot=1s", "unknown redis URL parameter 'timeot'"),
        ("redis://localhost?timeout=forever", "timeout"),
        ("redis://localhost?max_connections=0", "max_connections"),
        ("redis://localhost/x", "database number"),
        ("redis+sentinel://localhost:26379", "master name"),
        ("redis+cluster://localhost/3", "only database 0"),
        ("redis://localhost?ssl_ca_certs=/etc/passwd", "needs a TLS URL"),
        ("rediss://localhost?ssl_ca_certs=/nonexistent.pem", "not a readable file"),
        ("redis://localhost?prefix={x}", "prefix"),
        ("redis://user:hunter2@localhost:99999", "port"),
    ],
)
def test_bad_urls_are_refused_without_echoing_credentials(url: str, message: str) -> None:
    with pytest.raises(StoreConfigError, match=message) as info:
        parse_redis_url(url)
    assert "hunter2" not in str(info.value)


def test_url_forms() -> None:
    s = parse_redis_url("rediss://app:p%40ss@redis.example:6380/2?timeout=50ms&max_connections=8&prefix=tenant-a")
    assert (s.mode, s.tls, s.hosts, s.db, s.username, s.password) == (
        "single", True, (("redis.example", 6380),), 2, "app", "p@ss")  # fmt: skip
    assert (s.timeout, s.max_connections, s.prefix) == (0.05, 8, "tenant-a")
    assert "p@ss" not in s.describe() and "p@ss" not in repr(s)
    s = parse_redis_url("redis+sentinel://s1,s2:26380,[::1]:26381/primary/1")
    assert (s.mode, s.hosts, s.service, s.db) == (
        "sentinel", (("s1", 26379), ("s2", 26380), ("::1", 26381)), "primary", 1)  # fmt: skip
    s = parse_redis_url("rediss+cluster://n1:7000,n2:7001")
    assert (s.mode, s.tls, s.hosts) == ("cluster", True, (("n1", 7000), ("n2", 7001)))
    s = parse_redis_url("unix:///run/redis/redis.sock?db=3")
    assert (s.mode, s.path, s.db) == ("unix", "/run/redis/redis.sock", 3)
