"""Process logs are JSON lines on stderr; `serve` wires the decision log and its flags."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from opentelemetry.sdk.trace import TracerProvider

from extauthz.api.envoy.service.auth.v3 import external_auth_pb2_grpc
from extauthz.samples import check_request_from_sample
from extauthz.telemetry.logs import JsonFormatter, configure_logging

REPO = Path(__file__).resolve().parents[3]


def test_json_lines_with_trace_ids_extras_and_exceptions() -> None:
    stream = io.StringIO()
    configure_logging("debug", "json", stream)
    try:
        logger = logging.getLogger("extauthz.test")
        tracer = TracerProvider().get_tracer("t")
        with tracer.start_as_current_span("s") as span:
            logger.info("policy set %d live", 3, extra={"policies": 2})
        try:
            raise ValueError("bad")
        except ValueError:
            logger.exception("failed")
    finally:
        logging.getLogger().handlers.clear()
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "policy set 3 live" and first["level"] == "info" and first["logger"] == "extauthz.test"
    assert first["policies"] == 2
    assert first["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert second["level"] == "error" and "ValueError: bad" in second["exception"] and "trace_id" not in second
    assert isinstance(JsonFormatter(), logging.Formatter)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_writes_decision_log_and_json_process_logs(policy_dir, policy_yaml, tmp_path: Path) -> None:
    folder = policy_dir(**{"o.yaml": policy_yaml("orders", "match: {paths: [/o]}\nrules: [{name: r, when: "
                                                            "\"request.method == 'GET'\", decision: allow}]")})
    decisions = tmp_path / "decisions.jsonl"
    grpc_port, http_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "EXTAUTHZ_"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "extauthz", "serve", "--policies", str(folder), "--listen", f"127.0.0.1:{grpc_port}",
         "--http-port", str(http_port), "--decision-log", str(decisions), "--decision-log-allow-sample", "0",
         "--decision-log-headers", "x-tenant,authorization"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**env, "PYTHONPATH": str(REPO)}, cwd=REPO,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)

        async def send() -> None:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                stub = external_auth_pb2_grpc.AuthorizationStub(channel)
                for method in ("GET", "POST", "GET"):
                    await stub.Check(check_request_from_sample({
                        "method": method, "path": "/o", "headers": {"x-tenant": "acme", "authorization": "Bearer t0k"}
                    }), timeout=5)  # fmt: skip

        asyncio.run(send())
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert out == b""  # the decision log went to the file
    [line] = [json.loads(x) for x in decisions.read_text().splitlines()]  # allows sampled out
    assert line["decision"] == "deny" and line["headers"] == {"x-tenant": "acme", "authorization": "[REDACTED]"}
    records = [json.loads(x) for x in err.decode().splitlines()]
    assert any("live" in r["message"] for r in records) and all({"time", "level", "logger"} <= set(r) for r in records)
    assert b"t0k" not in err


def test_bad_tracing_configuration_refuses_to_start(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OTEL_TRACES_EXPORTER": "zipkin"}
    res = subprocess.run([sys.executable, "-m", "extauthz", "serve", "--policies", str(tmp_path)],
                         capture_output=True, env=env, cwd=REPO, timeout=60)  # fmt: skip
    assert res.returncode == 2 and b"zipkin" in res.stderr
