"""The span shipper and its exporter process: Check records through the pipe, OTLP bytes to a real
receiver, restarts, and what is counted when spans are lost."""

from __future__ import annotations

import enum
import marshal
import os
import signal
import socket
import sys
import time

import pytest
from otlpd import OtlpReceiver

from extauthz.decision import Decision
from extauthz.telemetry import metrics
from extauthz.telemetry import shipper as shipper_module
from extauthz.telemetry.metrics import Metrics
from extauthz.telemetry.span_export import SpanShipper
from extauthz.telemetry.tracing import SubjectHasher, decision_attributes, decision_facts

FACTS = ("allow", "allowed", 200, "d-0", False, "orders-api", "read", False, "GET", "orders.example.com", "/api",
         "10.0.0.7", "jwt", "issuer", ("extauthz.identity.subject_hash", "ab12"), None)  # fmt: skip


def _record(n: int) -> tuple:
    facts = (*FACTS[:3], f"d-{n}", *FACTS[4:])
    return (0x4BF92F3577B34DA6A3CE929D0E0E4736, n, 0x00F067AA0BA902B7, True, None, 10, 20, 0, "", facts, None,
            [("select", "", 10, 11, None, None), ("rules", "rules", 11, 12, "denied_by_rule", None)])  # fmt: skip


def _wait(condition, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_records_reach_a_collector_and_again_after_it_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    receiver = OtlpReceiver().start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "2")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    shipper = SpanShipper()
    try:
        shipper.add(_record(1))
        assert _wait(lambda: receiver.decision_ids() == {"d-1"}, 15)
        spans = [span for _, span in receiver.spans]
        assert [s.name for s in spans] == ["extauthz.select", "extauthz.rules", "extauthz.check"]
        assert spans[0].parent_span_id == spans[2].span_id == (1).to_bytes(8, "big")
        receiver.stop()  # the collector restarts: the exporter's channel is rebuilt, still sending bytes
        receiver.start()
        for n in (2, 3):
            shipper.add(_record(n))
        assert _wait(lambda: {"d-2", "d-3"} <= receiver.decision_ids(), 20)
    finally:
        shipper.shutdown()
        receiver.stop()
    assert shipper.dropped == 0


class _Level(enum.IntEnum):
    HIGH = 3


class _Name(enum.StrEnum):
    GOLD = "gold"


def test_facts_are_plain_values_whatever_a_check_put_in_its_attributes() -> None:
    decision = Decision(True, 200, "allowed", "", "d-1", "p", "r", dry_run=1, would_deny=0,  # type: ignore[arg-type]
                        attributes={"level": _Level.HIGH, "tier": _Name.GOLD, "api_key": "s3cret", "ok": True})
    facts = decision_facts(decision, SubjectHasher("none"))
    marshal.dumps(facts)  # the pipe to the exporter process takes nothing else
    assert facts[4] is True and facts[7] is False  # plain bools, not 1 and 0
    extra = facts[-1]
    assert extra == {"extauthz.level": 3, "extauthz.tier": "gold", "extauthz.ok": True}
    assert type(extra["extauthz.level"]) is int and type(extra["extauthz.tier"]) is str
    assert "extauthz.api_key" not in decision_attributes(decision, SubjectHasher("none"))


def test_tracing_resumes_after_the_exporter_process_is_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    receiver = OtlpReceiver().start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    shipper = SpanShipper()
    try:
        shipper.add(_record(1))
        assert _wait(lambda: "d-1" in receiver.decision_ids(), 15)
        os.kill(shipper._proc.pid, signal.SIGKILL)
        n = 2
        deadline = time.monotonic() + 20
        while shipper.restarts == 0 and time.monotonic() < deadline:  # Checks go on meanwhile
            shipper.add(_record(n))
            n += 1
            time.sleep(0.05)
        assert shipper.restarts == 1
        shipper.add(_record(1000))
        assert _wait(lambda: "d-1000" in receiver.decision_ids(), 15)
    finally:
        shipper.shutdown()
        receiver.stop()


def test_spans_the_collector_never_gets_are_counted_in_the_sidecar(monkeypatch: pytest.MonkeyPatch) -> None:
    installed = Metrics()
    metrics.install(installed)
    with socket.socket() as probe:  # a port nothing listens on: every export fails
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    shipper = SpanShipper()
    try:
        for n in range(1, 4):
            shipper.add(_record(n))  # 3 spans each
        assert _wait(lambda: shipper.failed >= 9, 20)  # the shipping thread reads the reports
    finally:
        shipper.shutdown()
        metrics.install(None)
    assert shipper.dropped == 0 and shipper.failed == 9
    assert installed.trace_export_errors._value.get() == 9


def test_a_dead_exporter_process_drops_and_counts_spans() -> None:
    installed = Metrics()
    metrics.install(installed)
    shipper = SpanShipper([sys.executable, "-c", "raise SystemExit(3)"])  # exits at once, every time
    # A Check with one stage: two spans each.
    record = (1, 2, 0, False, None, 0, 1, 0, "", None, None, [("select", "", 0, 1, None, None)])
    deadline = time.monotonic() + 10
    while not (shipper.restarts and shipper._proc.poll() is not None) and time.monotonic() < deadline:
        shipper.add(record)  # gets the first exit noticed and the process started again
        time.sleep(0.05)
    assert shipper.restarts == 1  # the next start waits (doubling from 1 s): no spinning
    before = shipper.dropped
    for _ in range(5):
        shipper.add(record)
    while shipper.dropped < before + 10 and time.monotonic() < deadline:
        time.sleep(0.02)
    shipper.shutdown()
    assert shipper.dropped >= before + 10
    assert installed.trace_export_errors._value.get() == shipper.dropped


def test_an_exporter_process_that_exited_is_started_again(tmp_path) -> None:


    marker, received = tmp_path / "started-once", tmp_path / "received"
    # The first process exits at once; the second reads everything until EOF and says how much.
    script = (f"import pathlib, sys\nm = pathlib.Path({str(marker)!r})\nif not m.exists():\n"
              f"    m.touch(); raise SystemExit(9)\n"
              f"pathlib.Path({str(received)!r}).write_text(str(len(sys.stdin.buffer.read())))\n")  # fmt: skip
    shipper = SpanShipper([sys.executable, "-c", script])
    record = (1, 2, 0, False, None, 0, 1, 0, "", None, None, [("select", "", 0, 1, None, None)])
    deadline = time.monotonic() + 10
    while not shipper.restarts and time.monotonic() < deadline:
        shipper.add(record)
        time.sleep(0.05)
    assert shipper.restarts == 1 and marker.exists()
    for _ in range(3):
        shipper.add(record)
    while shipper.shipped < 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    shipper.shutdown()
    assert shipper.shipped >= 6 and int(received.read_text()) > 0


def test_an_exporter_process_that_reads_nothing_is_killed_and_started_again(monkeypatch: pytest.MonkeyPatch) -> None:

    monkeypatch.setattr(shipper_module, "WRITE_TIMEOUT", 0.5)
    shipper = SpanShipper([sys.executable, "-c", "import time; time.sleep(60)"])  # never reads its stdin
    for i in range(3000):  # distinct records (marshal writes a repeated object once): more than a pipe holds
        shipper.add((i + 1, 2, 0, False, None, 0, 1, 0, f"d-{i}", None, None, [("select", "", 0, i, None, None)]))
    deadline = time.monotonic() + 15
    while not shipper.restarts and time.monotonic() < deadline:
        time.sleep(0.05)
    shipper.shutdown(timeout=2)
    assert shipper.restarts == 1
    assert shipper.dropped >= 2 * 3000 - shipper.shipped  # the stuck batch is counted, not lost
