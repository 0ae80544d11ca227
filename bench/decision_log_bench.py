"""What the decision log costs the sidecar: JSON lines, OTLP log records, or both, per logged decision.

    python bench/decision_log_bench.py                     # 20,000 denials, 3 rounds, each way
    python bench/decision_log_bench.py --decisions 50000 --rounds 5

The decisions are made first (a policy that denies, with an identity, a traceparent and attributes,
as a real denial has); then, timed, each is handed to a DecisionLog the way the sidecar does
(``observe``), in bursts of 2,000 that the bounded queues hold, and the log is closed, which waits
until the writer thread has taken every record.
``cpu`` is this process's CPU per decision (``time.process_time``: the writer and shipping threads
included, the exporter process not), which is what the sidecar pays on its two cores:

- ``json``: lines to a file (``--decision-log PATH``; stdout costs the same plus the reader's work);
- ``otlp``: ``--decision-log off`` with ``OTEL_LOGS_EXPORTER=otlp``: the record is built and marshalled
  to the exporter process, which encodes and sends it (to a sink process that accepts every export);
- ``both``: lines and OTLP.

It also times, in this process, the encoding an exporter process does per record: our LogEncoder
against the OpenTelemetry SDK's (an SDK log record per decision, then ``encode_logs``), which is what
the exporter process would spend with the SDK's own batch log processor.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from extauthz.decision import Authorizer, Decision  # noqa: E402
from extauthz.policy import load_folder  # noqa: E402
from extauthz.samples import check_request_from_sample  # noqa: E402
from extauthz.telemetry.decision_log import DecisionLog, DecisionLogConfig, decision_record  # noqa: E402
from extauthz.telemetry.otlp_encode import LogEncoder  # noqa: E402
from extauthz.telemetry.tracing import SubjectHasher  # noqa: E402

POLICY = """\
apiVersion: extauthz.dev/v1
kind: AuthPolicy
metadata: {name: orders}
spec:
  match: {hosts: [orders.example.com]}
  rules:
    - {name: no-deletes, when: "request.method == 'DELETE'", decision: deny, message: "orders cannot be deleted"}
"""

#: A collector that accepts every logs export and keeps nothing (a process of its own: its CPU is not ours).
SINK = """
import sys, time
from concurrent import futures
import grpc
server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
handler = grpc.unary_unary_rpc_method_handler(lambda request, context: b"")
server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
    "opentelemetry.proto.collector.logs.v1.LogsService", {"Export": handler})])
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
time.sleep(3600)
"""


def _decisions(count: int) -> list[Decision]:
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "orders.yaml").write_text(POLICY)
        authorizer = Authorizer(load_folder(Path(folder)))
    decisions: list[Decision] = []
    authorizer.observers.append(decisions.append)

    async def go() -> None:
        for i in range(count):
            sample = {"method": "DELETE", "host": "orders.example.com", "path": f"/api/orders/{i}",
                      "headers": {"x-request-id": f"req-{i}", "traceparent": f"00-{i + 1:032x}-{i + 1:016x}-01"}}
            await authorizer.check(check_request_from_sample(sample))

    asyncio.run(go())
    return decisions


def _round(decisions: list[Decision], way: str, path: str) -> float:
    config = DecisionLogConfig(destination=path if way in ("json", "both") else "off", allow_sample=1.0,
                               otlp=way in ("otlp", "both"), max_pending=len(decisions) + 1)  # fmt: skip
    log = DecisionLog(config, subjects=SubjectHasher("hash", b"bench"))
    started = time.process_time()
    for i, decision in enumerate(decisions, 1):
        log.observe(decision)
        if i % 2000 == 0:  # in bursts the bounded queues hold: a drop would be a figure of nothing
            _drain(log)
    log.close(timeout=60)
    cpu = time.process_time() - started
    if log.dropped or (log._shipper is not None and log._shipper.dropped):
        raise SystemExit(f"{way}: records were dropped; the figures would be wrong")
    return cpu * 1e6 / len(decisions)


def _drain(log: DecisionLog) -> None:
    """Wait (without spending CPU) until the writer and the shipper have taken what was queued."""
    shipper = log._shipper
    while not log._queue.empty() or (shipper is not None and shipper._pending):
        time.sleep(0.005)


def _encoders(decisions: list[Decision]) -> tuple[float, float]:
    from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk.resources import Resource

    config = DecisionLogConfig(allow_sample=1.0)
    records = [decision_record(d, time.time(), config, SubjectHasher("hash", b"bench")) for d in decisions]
    encoder = LogEncoder({"service.name": "extauthz"}, "extauthz.decision_log")
    started = time.perf_counter()
    encoder.request([encoder.record(time.time_ns(), record) for record in records])
    ours = (time.perf_counter() - started) * 1e6 / len(records)
    provider = LoggerProvider(resource=Resource.create({"service.name": "extauthz"}))
    logger = provider.get_logger("extauthz.decision_log")
    captured: list = []

    class Keep:  # a log record processor that keeps the SDK's records to encode them afterwards
        def on_emit(self, record):  # type: ignore[no-untyped-def]
            captured.append(record)

        def shutdown(self) -> None: ...

        def force_flush(self, timeout_millis: int = 0) -> bool:
            return True

    provider.add_log_record_processor(Keep())  # type: ignore[arg-type]
    started = time.perf_counter()
    for record in records:
        logger.emit(body=record, event_name="extauthz.decision", severity_text="WARN")  # type: ignore[call-arg]
    encode_logs(captured).SerializeToString()
    sdk = (time.perf_counter() - started) * 1e6 / len(records)
    return ours, sdk


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decisions", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    if not (100 <= args.decisions <= 200_000 and 1 <= args.rounds <= 10):
        p.error("bounds: decisions 100..200000, rounds 1..10")
    decisions = _decisions(args.decisions)
    sink = subprocess.Popen([sys.executable, "-c", SINK], stdout=subprocess.PIPE, text=True)
    try:
        port = int(sink.stdout.readline())  # type: ignore[union-attr]
        os.environ.update(OTEL_EXPORTER_OTLP_LOGS_ENDPOINT=f"http://127.0.0.1:{port}", OTEL_BLRP_MAX_QUEUE_SIZE="100000",
                          OTEL_BLRP_SCHEDULE_DELAY="100")  # fmt: skip
        with tempfile.TemporaryDirectory() as folder:
            path = str(Path(folder, "decisions.log"))
            results: dict[str, list[float]] = {"json": [], "otlp": [], "both": []}
            for _ in range(args.rounds):  # the ways alternate, so a busy moment of the machine hits all of them
                for way in results:
                    results[way].append(_round(decisions, way, path))
    finally:
        sink.kill()
        sink.wait()
    print(f"decision log, {args.decisions} denials x {args.rounds} rounds: the sidecar's CPU per logged decision")
    for way, values in results.items():
        rounds = "  ".join(f"{v:6.1f}" for v in values)
        print(f"  {way:5s} median {statistics.median(values):6.1f} us   (rounds: {rounds})")
    ratios = [o / j for o, j in zip(results["otlp"], results["json"], strict=True)]
    print(f"  otlp / json, median of per-round ratios: {statistics.median(ratios):.2f}")
    ours, sdk = _encoders(decisions)
    print(f"encoding in the exporter process, per record: ours {ours:.1f} us, the SDK's {sdk:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
