"""Metrics scraped over HTTP from a real sidecar after a known sequence of allows and denies."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from extauthz.api.envoy.service.auth.v3 import external_auth_pb2_grpc
from extauthz.samples import check_request_from_sample
from extauthz.server import Settings, Sidecar
from extauthz.telemetry import metrics
from extauthz.telemetry.metrics import Metrics

ORDERS = """
match: {paths: [/api/orders]}
rules:
  - {name: no-deletes, when: "request.method == 'DELETE'", decision: deny}
  - {name: reads, when: "request.method == 'GET'", decision: allow}
"""
REPO = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def _send(target: str, samples: list[dict]) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        for sample in samples:
            await stub.Check(check_request_from_sample(sample), timeout=5)
        raw = channel.unary_unary("/envoy.service.auth.v3.Authorization/Check")
        await raw(b"\xff\xff\xff", timeout=5)  # not a CheckRequest


def test_scrape_after_known_sequence(policy_dir, policy_yaml) -> None:
    folder = policy_dir(**{"o.yaml": policy_yaml("orders", ORDERS)})

    async def scenario() -> None:
        sidecar = Sidecar(Settings(policies=folder, listen=f"127.0.0.1:{_free_port()}", http_port=_free_port(),
                                   grace=1.0, reload_interval=3600))  # fmt: skip
        await sidecar.start()
        sidecar.authorizer.stage_sample_every = 1  # production samples stages in 1 Check of 8
        try:
            assert metrics.current() is sidecar.metrics
            get = {"method": "GET", "path": "/api/orders"}
            delete = {"method": "DELETE", "path": "/api/orders"}
            post = {"method": "POST", "path": "/api/orders"}
            elsewhere = {"method": "GET", "path": "/nowhere"}
            await _send(sidecar.settings.listen, [get] * 3 + [delete] * 2 + [post] + [elsewhere] * 4)
            metrics.store_error("redis", "incr")
            metrics.circuit_state("redis", "open")
            metrics.jwks_fetch("ok", 0.02)
            metrics.introspection_request("error", 0.5)
            port = sidecar.settings.http_port
            s = await asyncio.to_thread(_scrape, port)
            checks = "extauthz_checks_total"
            assert _value(s, checks, decision="allow", reason="allowed", policy="orders") == 3
            assert _value(s, checks, decision="deny", reason="denied_by_rule", policy="orders") == 2
            assert _value(s, checks, decision="deny", reason="no_rule_matched", policy="orders") == 1
            assert _value(s, checks, decision="deny", reason="no_policy", policy="-") == 4
            # _send's last call is not a CheckRequest: a denial like the others, decided in no time.
            assert _value(s, checks, decision="deny", reason="malformed_request", policy="-") == 1
            assert _value(s, "extauthz_check_duration_seconds_count") == 11
            assert _value(s, "extauthz_check_duration_seconds_bucket", le="0.1") == 11
            assert _value(s, "extauthz_check_duration_seconds_bucket", le="2.5e-05") <= 11  # buckets from 25 us
            assert _value(s, "extauthz_stage_duration_seconds_count", stage="parse") == 10
            assert _value(s, "extauthz_stage_duration_seconds_count", stage="select") == 10
            assert _value(s, "extauthz_stage_duration_seconds_count", stage="rules") == 6
            assert _value(s, "extauthz_malformed_requests_total") == 1
            assert _value(s, "extauthz_grpc_in_flight") == 0
            assert _value(s, "extauthz_policies") == 1 and _value(s, "extauthz_policy_generation") == 1
            assert _value(s, "extauthz_policy_reloads_total", result="success") == 1
            assert _value(s, "extauthz_policy_last_reload_timestamp_seconds") > time.time() - 60
            assert _value(s, "extauthz_store_errors_total", store="redis", operation="incr") == 1
            assert _value(s, "extauthz_store_circuit_state", store="redis") == 2
            assert _value(s, "extauthz_jwks_fetches_total", result="ok") == 1
            assert _value(s, "extauthz_introspection_requests_total", result="error") == 1
            assert _value(s, "extauthz_fetch_duration_seconds_count", kind="jwks") == 1
            assert any(name == "extauthz_build_info" for name, _ in s)
            # no label carries a path, host or subject
            assert all("/api" not in v and "/nowhere" not in v for _, labels in s for _, v in labels)

            # a good reload, then a bad one
            (folder / "p.yaml").write_text(policy_yaml("public", "match: {paths: [/p]}\nrules: [{name: a, decision: allow}]"))
            assert await sidecar.watcher.poll_once() is True
            (folder / "bad.yaml").write_text("apiVersion: extauthz.dev/v1\nkind: AuthPolicy\nmetadata: {name: b}\n")
            assert await sidecar.watcher.poll_once() is False
            s = await asyncio.to_thread(_scrape, port)
            assert _value(s, "extauthz_policy_reloads_total", result="success") == 2
            assert _value(s, "extauthz_policy_reloads_total", result="error") == 1
            assert _value(s, "extauthz_policies") == 2 and _value(s, "extauthz_policy_generation") == 2
            assert _value(s, "extauthz_policy_errors") >= 1
        finally:
            await sidecar.stop()
        assert metrics.current() is None

    asyncio.run(scenario())


def test_in_flight_counts_checks_being_decided(policy_dir, policy_yaml) -> None:
    folder = policy_dir(**{"o.yaml": policy_yaml("orders", ORDERS)})

    async def scenario() -> None:
        sidecar = Sidecar(Settings(policies=folder, listen=f"127.0.0.1:{_free_port()}", http_port=_free_port()))
        seen: list[float] = []

        def scrape_now(decision: object) -> None:  # a scrape while the Check is being decided
            sidecar.metrics.flush()
            seen.append(sidecar.metrics.grpc_in_flight._value.get())

        sidecar.authorizer.observers.append(scrape_now)
        await sidecar.start()
        try:
            await _send(sidecar.settings.listen, [{"method": "GET", "path": "/api/orders"}])
        finally:
            await sidecar.stop()
        assert seen == [1.0, 0.0]  # the Check, then _send's malformed call (answered outside the pipeline)
        assert sidecar.metrics.grpc_in_flight._value.get() == 0

    asyncio.run(scenario())


def test_module_functions_are_no_ops_without_installed_metrics() -> None:
    metrics.install(None)
    metrics.store_error("redis", "get")
    metrics.circuit_state("redis", "half_open")
    metrics.jwks_fetch("error")
    metrics.introspection_request("active")
    installed = Metrics()
    metrics.install(installed)
    metrics.circuit_state("redis", "half_open")
    assert installed.circuit.labels("redis")._value.get() == 1


def test_several_workers_report_one_correct_total(policy_dir, policy_yaml, tmp_path: Path) -> None:
    """--workers 2: checks land on both processes; any /metrics answer counts all of them."""
    folder = policy_dir(**{"o.yaml": policy_yaml("orders", ORDERS)})
    grpc_port, http_port = _free_port(), _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "extauthz", "serve", "--policies", str(folder), "--listen", f"127.0.0.1:{grpc_port}",
         "--http-port", str(http_port), "--workers", "2", "--decision-log", "off", "--log-format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        pids: set[float] = set()
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=1) as r:
                    if json.loads(r.read())["ready"]:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
            time.sleep(0.1)

        async def load() -> None:
            for _ in range(30):  # a new connection each time: the kernel spreads them over both workers
                await _send(f"127.0.0.1:{grpc_port}", [{"method": "GET", "path": "/api/orders"}] * 2
                            + [{"method": "DELETE", "path": "/api/orders"}])  # fmt: skip

        time.sleep(1.0)  # let the second worker bind too
        asyncio.run(load())
        time.sleep(1.5)  # each worker publishes its per-Check counts every second (and on its own scrapes)
        for _ in range(6):  # every answer, whichever worker gives it, has the full totals
            s = _scrape(http_port)
            assert _value(s, "extauthz_checks_total", decision="allow", reason="allowed", policy="orders") == 60
            assert _value(s, "extauthz_checks_total", decision="deny", reason="denied_by_rule", policy="orders") == 30
            assert _value(s, "extauthz_check_duration_seconds_count") == 120  # 30 of them malformed
            assert _value(s, "extauthz_malformed_requests_total") == 30
            assert _value(s, "extauthz_policies") == 1
        pids = {float(p.name.split("_")[-1].split(".")[0]) for p in (tmp_path / "prom").glob("counter_*.db")}
        assert len(pids) == 2, "both workers served checks"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]


def test_workers_refuse_a_broken_policy_folder(policy_dir, tmp_path: Path) -> None:
    folder = policy_dir(**{"bad.yaml": "apiVersion: extauthz.dev/v1\nkind: AuthPolicy\nmetadata: {name: b}\n"})
    res = subprocess.run(
        [sys.executable, "-m", "extauthz", "serve", "--policies", str(folder), "--listen", f"127.0.0.1:{_free_port()}",
         "--http-port", str(_free_port()), "--workers", "2"],
        capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2 and b"not starting" in res.stderr


@pytest.mark.parametrize("workers", ["0", "65"])
def test_workers_bounds(workers: str, tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "extauthz", "serve", "--policies", str(tmp_path), "--workers", workers],
                         capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, timeout=60)  # fmt: skip
    assert res.returncode == 2


def test_batched_durations_give_the_same_histogram_as_one_by_one() -> None:
    from prometheus_client import CollectorRegistry, Histogram

    from extauthz.telemetry.metrics import DURATION_BUCKETS, _observe_many

    values = [0.0, 0.000025, 0.00003, 0.0001, 0.0007, 0.0025, 0.3, 1.0, 7.5] * 3
    one, batched = CollectorRegistry(), CollectorRegistry()
    by_one = Histogram("d", "d", buckets=DURATION_BUCKETS, registry=one)
    for value in values:
        by_one.observe(value)
    _observe_many(Histogram("d", "d", buckets=DURATION_BUCKETS, registry=batched), values)

    def samples(registry: CollectorRegistry) -> dict:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for m in registry.collect() for s in m.samples
                if not s.name.endswith("_created")}  # fmt: skip

    assert samples(batched) == pytest.approx(samples(one))
