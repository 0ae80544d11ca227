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
def tracing_setup(workdir: Path, *, ratio: float | None = None) -> Iterator[dict]:
    """Every request sampled (the caller's traceparent says so), or with ``ratio``: the sampling
    deploy/k8s ships (parentbased_traceidratio), requests without trace headers, so the sidecar
    starts each trace and samples that fraction of them -- the steady cost in a typical mesh."""
    sys.path.insert(0, str(ROOT / "tests" / "e2e"))
    import _procs

    port = _procs.free_port()
    sink = _procs.ManagedProcess(
        "otlp-sink", [sys.executable, str(Path(__file__).resolve()), "--listen", f"127.0.0.1:{port}"],
        Path(workdir) / "otlp-sink.log", env=_procs._python_env(),
    )  # fmt: skip
    try:
        _procs.wait_for_tcp("127.0.0.1", port, 20, proc=sink)
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_TRACES_SAMPLER": "parentbased_always_on",
            "OTEL_SERVICE_NAME": "extauthz-bench",
        }
        if ratio is None:
            yield {"env": env, "headers": {"traceparent": TRACEPARENT}}
        else:
            yield {"env": {**env, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                           "OTEL_TRACES_SAMPLER_ARG": str(ratio)}}  # fmt: skip
    finally:
        sink.stop()
        print(f"otlp sink: {sink.log_tail(1)}")


def _sink(listen: str) -> int:
    """Accepts OTLP trace exports and answers OK without decoding them: a collector runs on another
    machine in production, so its work is not the sidecar's and should take as little of this
    machine's CPU as possible. It counts requests and bytes (and the sidecar's exporter would log a
    failure if the answer were not a valid ExportTraceServiceResponse: an empty message is one)."""
    import grpc

    received = [0, 0]
    lock = threading.Lock()

    def export(request: bytes, context: grpc.ServicerContext) -> bytes:
        with lock:
            received[0] += 1
            received[1] += len(request)
        return b""  # an empty ExportTraceServiceResponse

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_unary_rpc_method_handler(export)  # raw bytes in and out
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.trace.v1.TraceService", {"Export": handler})])  # fmt: skip
    server.add_insecure_port(listen)
    server.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    server.stop(0)
    print(f"received {received[0]} export requests, {received[1]} bytes", flush=True)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", required=True)
    sys.exit(_sink(parser.parse_args().listen))
