"""The "tracing" bench scenario: the sidecar with tracing on, exporting every span over OTLP gRPC.

    python bench/run.py --scenario extauthz --scenario tracing     # (d)/(c) is the cost of tracing

setup() starts an OTLP gRPC sink in its own process (so receiving spans costs the measured processes
nothing) and configures the sidecar through the standard variables: exporter OTLP gRPC, batch span
processor, parent-based always-on sampling; every request carries a sampled W3C traceparent, so
every Check produces and exports its spans (check, select and one per check).

Run alone, it is the sink:  python bench/tracing_scenario.py --listen 127.0.0.1:4317
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@contextlib.contextmanager
def tracing_setup(workdir: Path) -> Iterator[dict]:
    sys.path.insert(0, str(ROOT / "tests" / "e2e"))
    import _procs

    port = _procs.free_port()
    sink = _procs.ManagedProcess(
        "otlp-sink", [sys.executable, str(Path(__file__).resolve()), "--listen", f"127.0.0.1:{port}"],
        Path(workdir) / "otlp-sink.log", env=_procs._python_env(),
    )  # fmt: skip
    try:
        _procs.wait_for_tcp("127.0.0.1", port, 20, proc=sink)
        yield {
            "env": {
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_TRACES_SAMPLER": "parentbased_always_on",
                "OTEL_SERVICE_NAME": "extauthz-bench",
            },
            "headers": {"traceparent": TRACEPARENT},
        }
    finally:
        sink.stop()
        print(f"otlp sink: {sink.log_tail(1)}")


def _sink(listen: str) -> int:
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    received = [0]
    lock = threading.Lock()

    class Sink(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            count = sum(len(s.spans) for rs in request.resource_spans for s in rs.scope_spans)
            with lock:
                received[0] += count
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Sink(), server)
    server.add_insecure_port(listen)
    server.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    server.stop(0)
    print(f"received {received[0]} spans", flush=True)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", required=True)
    sys.exit(_sink(parser.parse_args().listen))
