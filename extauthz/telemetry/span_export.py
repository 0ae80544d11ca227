"""Exporting spans from a helper process, so the sidecar's event loop never encodes protobuf.

Encoding a span for OTLP costs the Python SDK some 25 microseconds, and a Check has several spans:
done in the sidecar (even on the batch processor's thread, which shares the GIL) that would cost a
large share of its throughput. Instead the sidecar hands each finished span, as a plain tuple, to a
:class:`SpanShipper`; a thread marshals batches of them down a pipe to a child process
(``python -m extauthz.telemetry.span_export``) that rebuilds the spans and runs the standard batch
span processor and OTLP exporter, configured by the same ``OTEL_*`` variables.

Failure is contained: if the child falls behind or dies, spans are dropped and counted
(``extauthz_trace_export_errors_total``); requests are never slowed or failed by tracing.
"""

from __future__ import annotations

import logging
import marshal
import os
import signal
import struct
import subprocess
import sys
import threading
from typing import Any

__all__ = ["SpanRecord", "SpanShipper", "main"]

log = logging.getLogger("extauthz.tracing")

#: (name, trace_id, span_id, parent_span_id or 0, parent_is_remote, trace_flags, trace_state pairs,
#:  kind, start_ns, end_ns, attributes, status_code, status_description)
SpanRecord = tuple[Any, ...]

_FRAME = struct.Struct("!I")
#: Spans held while the child catches up; beyond that new spans are dropped.
MAX_PENDING = 50_000
#: Seconds between batches when spans trickle in.
FLUSH_INTERVAL = 0.05


class SpanShipper:
    """Collects span records on the request path; a thread ships them to the exporter process."""

    def __init__(self, argv: list[str] | None = None) -> None:
        self._proc = subprocess.Popen(
            argv or [sys.executable, "-m", "extauthz.telemetry.span_export"], stdin=subprocess.PIPE,
        )  # fmt: skip
        assert self._proc.stdin is not None
        self._fd = self._proc.stdin.fileno()
        self._pending: list[SpanRecord] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        self.dropped = 0
        self.shipped = 0
        self._thread = threading.Thread(target=self._run, name="span-shipper", daemon=True)
        self._thread.start()

    # --- the request path ------------------------------------------------------------------------
    def add(self, record: SpanRecord) -> None:
        with self._lock:
            if len(self._pending) >= MAX_PENDING or self._stopped:
                self._drop(1)
                return
            self._pending.append(record)

    # --- the shipping thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._wake.wait(FLUSH_INTERVAL)
            self._wake.clear()
            with self._lock:
                batch, self._pending = self._pending, []
                stopped = self._stopped
            if batch:
                self._ship(batch)
            if stopped:
                return

    def _ship(self, batch: list[SpanRecord]) -> None:
        payload = marshal.dumps(batch)
        data = memoryview(_FRAME.pack(len(payload)) + payload)
        try:
            while data:
                written = os.write(self._fd, data)  # releases the GIL while the pipe is full
                data = data[written:]
            self.shipped += len(batch)
        except OSError as exc:
            log.warning("span exporter process unavailable (%s); dropping spans", exc.strerror)
            with self._lock:
                self._drop(len(batch))

    def _drop(self, count: int) -> None:
        self.dropped += count
        from extauthz.telemetry import metrics

        current = metrics.current()
        if current is not None:
            current.trace_export_errors.inc(count)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ship what is pending, close the pipe, and let the child flush and exit."""
        with self._lock:
            self._stopped = True
        self._wake.set()
        self._thread.join(timeout)
        try:
            os.close(self._fd)
            self._proc.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)


def main() -> int:
    """The exporter process: read span batches from stdin until EOF, export them, flush, exit."""
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

    from extauthz.telemetry.logs import configure_logging
    from extauthz.telemetry.tracing import _CountingExporter, _exporters, _resource

    # The sidecar decides when this process ends (EOF on stdin), so that nothing pending is lost
    # to a Ctrl-C or a SIGTERM sent to the whole process group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(os.environ.get("EXTAUTHZ_LOG_LEVEL", "info"), os.environ.get("EXTAUTHZ_LOG_FORMAT", "json"))
    provider = TracerProvider(resource=_resource(os.environ, os.environ.get("EXTAUTHZ_VERSION", "unknown")))
    for exporter in _exporters(os.environ):
        provider.add_span_processor(BatchSpanProcessor(_CountingExporter(exporter)))
    processor = provider._active_span_processor
    scope = InstrumentationScope("extauthz")
    resource = provider.resource
    kinds = {kind.value: kind for kind in SpanKind}
    codes = {code.value: code for code in StatusCode}
    stream = sys.stdin.buffer
    while True:
        head = stream.read(_FRAME.size)
        if len(head) < _FRAME.size:
            break
        payload = stream.read(_FRAME.unpack(head)[0])
        for (name, trace_id, span_id, parent_id, parent_remote, flags, state, kind, start, end, attributes,
             code, description) in marshal.loads(payload):  # fmt: skip
            trace_state = TraceState(state) if state else None
            context = SpanContext(trace_id, span_id, False, TraceFlags(flags), trace_state)
            parent = None
            if parent_id:
                parent = SpanContext(trace_id, parent_id, parent_remote, TraceFlags(flags), trace_state)
            processor.on_end(ReadableSpan(
                name, context, parent, resource, attributes, kind=kinds[kind],
                status=Status(codes[code], description or None), start_time=start, end_time=end,
                instrumentation_scope=scope,
            ))  # fmt: skip
    provider.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
