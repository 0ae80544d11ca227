"""Decision logs over OTLP: the standard variables turn them on, the encoding is the protobuf message,
records reach a real OTLP receiver (gRPC and HTTP) with the decision's trace, and what a collector
does not take is counted."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.logs.v1 import logs_pb2
from otlpd import OtlpHttpReceiver, OtlpReceiver, body_value

from extauthz.api.envoy.service.auth.v3 import external_auth_pb2
from extauthz.decision import Authorizer
from extauthz.policy import load_folder
from extauthz.samples import check_request_from_sample
from extauthz.telemetry import metrics
from extauthz.telemetry.decision_log import DecisionLog, DecisionLogConfig
from extauthz.telemetry.log_export import LogConfigError, otlp_logs_from_env
from extauthz.telemetry.metrics import Metrics
from extauthz.telemetry.otlp_encode import LogEncoder
from extauthz.telemetry.tracing import SubjectHasher

ORDERS = """
match: {paths: [/api/orders]}
rules:
  - {name: no-deletes, when: "request.method == 'DELETE'", decision: deny, message: "orders cannot be deleted"}
  - {name: reads, when: "request.method == 'GET'", decision: allow}
"""
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, False),  # traces' endpoint alone: logs stay local
    ({"OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": "http://collector:4317"}, True),
    ({"OTEL_LOGS_EXPORTER": "otlp"}, True),
    ({"OTEL_LOGS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, True),
    ({"OTEL_LOGS_EXPORTER": "none", "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": "http://collector:4317"}, False),
    ({"OTEL_LOGS_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, False),
    ({"OTEL_LOGS_EXPORTER": " OTLP ", "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL": "http/protobuf"}, True),
])
def test_the_standard_variables_turn_otlp_logs_on(environ: dict[str, str], expected: bool) -> None:
    assert otlp_logs_from_env(environ) is expected


@pytest.mark.parametrize(("environ", "message"), [
    ({"OTEL_LOGS_EXPORTER": "console"}, "OTEL_LOGS_EXPORTER 'console' is not supported (otlp or none)"),
    ({"OTEL_LOGS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "'http/json' is not supported"),
])
def test_what_cannot_be_done_is_refused_at_start(environ: dict[str, str], message: str) -> None:
    with pytest.raises(LogConfigError, match=re.escape(message)):
        otlp_logs_from_env(environ)


def test_a_bad_logs_exporter_stops_serve_with_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from extauthz.cli import main

    monkeypatch.setenv("OTEL_LOGS_EXPORTER", "console")
    assert main(["serve", "--policies", "policies"]) == 2
    assert "extauthz: not starting: OTEL_LOGS_EXPORTER 'console' is not supported" in capsys.readouterr().err


def _any(value: Any) -> common_pb2.AnyValue:
    if isinstance(value, dict):
        return common_pb2.AnyValue(kvlist_value=common_pb2.KeyValueList(
            values=[common_pb2.KeyValue(key=k, value=_any(v)) for k, v in value.items()]))
    if isinstance(value, list):
        return common_pb2.AnyValue(array_value=common_pb2.ArrayValue(values=[_any(v) for v in value]))
    if value is None:
        return common_pb2.AnyValue()
    if isinstance(value, bool):
        return common_pb2.AnyValue(bool_value=value)
    if isinstance(value, int):
        return common_pb2.AnyValue(int_value=value)
    if isinstance(value, float):
        return common_pb2.AnyValue(double_value=value)
    return common_pb2.AnyValue(string_value=value)


def test_the_encoding_is_the_protobuf_message() -> None:
    record = {"time": "2025-06-01T12:00:00.000Z", "decision_id": "d-1", "trace_id": TRACEPARENT[3:35],
              "span_id": TRACEPARENT[36:52], "decision": "deny", "status": 403, "reason": "denied_by_rule",
              "policy": "orders", "rule": "no-deletes", "dry_run": False, "message": "no",
              "identity": {"kind": "jwt", "source": "users", "subject": "alice"}, "query_params": ["a", "b"],
              "latency_ms": 0.25, "attributes": {"quota": "per-key", "quota_remaining": 0}, "empty": None}  # fmt: skip
    encoder = LogEncoder({"service.name": "extauthz", "service.version": "1.2"}, "extauthz.decision_log", "1.2")
    allow = dict(record, decision="allow", decision_id="d-2", trace_id="", span_id="")
    for _ in range(2):  # the second time from the cache of repeated fields
        data = encoder.request([encoder.record(1_748_779_200_000_000_000, record), encoder.record(5, allow)])
        parsed = logs_service_pb2.ExportLogsServiceRequest.FromString(data)
        expected = logs_service_pb2.ExportLogsServiceRequest(resource_logs=[logs_pb2.ResourceLogs(
            resource={"attributes": [common_pb2.KeyValue(key="service.name", value=_any("extauthz")),
                                     common_pb2.KeyValue(key="service.version", value=_any("1.2"))]},
            scope_logs=[logs_pb2.ScopeLogs(scope={"name": "extauthz.decision_log", "version": "1.2"}, log_records=[
                logs_pb2.LogRecord(time_unix_nano=1_748_779_200_000_000_000, observed_time_unix_nano=1_748_779_200_000_000_000,
                                   severity_number=13, severity_text="WARN", body=_any(record),
                                   trace_id=bytes.fromhex(record["trace_id"]), span_id=bytes.fromhex(record["span_id"]),
                                   event_name="extauthz.decision"),
                logs_pb2.LogRecord(time_unix_nano=5, observed_time_unix_nano=5, severity_number=9, severity_text="INFO",
                                   body=_any(allow), event_name="extauthz.decision"),
            ])])])  # fmt: skip
        assert parsed == expected


def _wait(condition: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def _decide(folder: Path, decision_log: DecisionLog, samples: list[dict[str, Any]]) -> None:
    authorizer = Authorizer(load_folder(folder))
    authorizer.observers.append(decision_log.observe)

    async def go() -> None:
        for sample in samples:
            await authorizer.check(check_request_from_sample(sample))

    asyncio.run(go())


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_decisions_reach_a_collector_with_their_trace(protocol: str, policy_dir, policy_yaml,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    receiver = (OtlpReceiver() if protocol == "grpc" else OtlpHttpReceiver()).start()
    endpoint = receiver.endpoint if protocol == "grpc" else receiver.endpoint + "/v1/logs"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_LOGS_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_BLRP_SCHEDULE_DELAY", "50")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "orders-authz")
    folder = policy_dir(**{"o.yaml": policy_yaml("orders", ORDERS)})
    stream = io.BytesIO()
    decision_log = DecisionLog(DecisionLogConfig(allow_sample=1.0, otlp=True), stream=stream,
                               subjects=SubjectHasher("hash", b"k"))  # fmt: skip
    try:
        _decide(folder, decision_log, [
            {"method": "DELETE", "path": "/api/orders", "headers": {"traceparent": TRACEPARENT, "authorization": "Bearer x"}},
            {"method": "GET", "path": "/api/orders"},
        ])  # fmt: skip
        assert _wait(lambda: len(receiver.log_records) == 2, 20), receiver.log_records
    finally:
        decision_log.close()
        receiver.stop()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    bodies = receiver.decisions()
    assert bodies == lines  # the same records as the JSON lines, field for field
    (resource, denied), (_, allowed) = receiver.log_records
    assert resource["service.name"] == "orders-authz"
    assert (denied.severity_text, denied.event_name, allowed.severity_text) == ("WARN", "extauthz.decision", "INFO")
    assert denied.trace_id.hex() == TRACEPARENT[3:35] and not allowed.trace_id
    assert b"Bearer x" not in b"".join(receiver.raw)


def test_off_ships_only_and_an_absent_collector_is_counted(policy_dir, policy_yaml,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_LOGS_TIMEOUT", "1")
    monkeypatch.setenv("OTEL_BLRP_SCHEDULE_DELAY", "20")
    installed = Metrics()
    metrics.install(installed)
    folder = policy_dir(**{"o.yaml": policy_yaml("orders", ORDERS)})
    decision_log = DecisionLog(DecisionLogConfig(destination="off", otlp=True), subjects=SubjectHasher("hash", b"k"))
    try:
        _decide(folder, decision_log, [{"method": "DELETE", "path": "/api/orders"}] * 3)
        assert _wait(lambda: installed.decision_log_export_errors._value.get() == 3, 30)
    finally:
        decision_log.close()
        metrics.install(None)
    assert decision_log._fd is None  # nothing was written to stdout


def test_one_collector_takes_the_sidecars_traces_and_decisions(tmp_path: Path, processes) -> None:
    """`extauthz serve` with the generic endpoint for both: a decision and its spans share a trace id."""
    receiver = OtlpReceiver().start()
    from extauthz.dev.procs import ManagedProcess, free_port, wait_for_http

    grpc_port, http_port = free_port(), free_port()
    env = dict(os.environ, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_LOGS_EXPORTER="otlp",
               OTEL_BSP_SCHEDULE_DELAY="50", OTEL_BLRP_SCHEDULE_DELAY="50", PYTHONPATH=os.pathsep.join(
                   filter(None, [str(Path(__file__).resolve().parents[3]), os.environ.get("PYTHONPATH")])))  # fmt: skip
    root = Path(__file__).resolve().parents[3]
    sidecar = ManagedProcess("extauthz", [sys.executable, "-m", "extauthz", "serve", "--policies", str(root / "policies"),
                                          "--listen", f"127.0.0.1:{grpc_port}", "--http-port", str(http_port),
                                          "--decision-log", "off"], tmp_path / "extauthz.log", env=env, cwd=root)  # fmt: skip
    try:
        wait_for_http(f"http://127.0.0.1:{http_port}/readyz", 30, proc=sidecar)
        message = check_request_from_sample({"method": "DELETE", "host": "orders.example.com", "path": "/api/orders/1",
                                             "headers": {"traceparent": TRACEPARENT}})  # fmt: skip
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            check = channel.unary_unary("/envoy.service.auth.v3.Authorization/Check",
                                        request_serializer=external_auth_pb2.CheckRequest.SerializeToString,
                                        response_deserializer=external_auth_pb2.CheckResponse.FromString)  # fmt: skip
            assert check(message, timeout=5).status.code == 7  # PERMISSION_DENIED
        exporters = processes.children(sidecar.pid)
        assert len(exporters) == 2  # the span and the decision-log exporter processes
        assert _wait(lambda: receiver.log_records and receiver.of_trace(TRACEPARENT[3:35]), 20)
        _, record = receiver.log_records[0]
        body = body_value(record.body)
        assert (body["policy"], body["rule"], body["decision"]) == ("orders-api", "no-deletes", "deny")  # type: ignore[index]
        assert record.trace_id.hex() == TRACEPARENT[3:35]
        check_span = next(s for _, s in receiver.of_trace(TRACEPARENT[3:35]) if s.name == "extauthz.check")
        assert record.span_id == check_span.span_id  # the decision names the Check's own span
    finally:
        assert sidecar.stop() == 0
        receiver.stop()
    # The exporter processes ended with the sidecar (they exit at EOF on their pipe).
    assert not [pid for pid in exporters if processes.running(pid)]
