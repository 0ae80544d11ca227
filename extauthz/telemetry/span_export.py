"""Exporting spans from a helper process, so the sidecar's event loop never encodes protobuf.

Encoding a span for OTLP costs the Python SDK some 25 microseconds, and a Check has several spans:
done in the sidecar (even on the batch processor's thread, which shares the GIL) that would cost a
large share of its throughput. Instead the sidecar hands each Check's spans, as one compact record
(see check_spans), to a :class:`SpanShipper`; a thread marshals batches of them down a pipe to a
child process (``python -m extauthz.telemetry.export_process``). The child expands the records into
spans and encodes them to OTLP itself (see otlp_encode: pre-encoded attributes make a span cost a
few microseconds instead of 25) and sends them, batched as the ``OTEL_BSP_*`` variables say, with the
SDK's OTLP exporter configured by the same ``OTEL_*`` variables. Other exporters (console) get SDK
spans and its batch span processor.

Failure is contained: if the child falls behind or dies, spans are dropped and counted
(``extauthz_trace_export_errors_total``); requests are never slowed or failed by tracing. A child
that exited, or that read nothing for WRITE_TIMEOUT seconds (then it is killed), is started again
(after 1 s, then 2, 4, ... up to 60 s while it keeps exiting).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import marshal
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from extauthz.telemetry.check_spans import CheckRecord, expand
from extauthz.telemetry.metrics import count_export_errors

__all__ = ["SpanRecord", "SpanShipper", "main"]

log = logging.getLogger("extauthz.tracing")

#: (name, trace_id, span_id, parent_span_id or 0, parent_is_remote, trace_flags, trace_state pairs,
#:  kind, start_ns, end_ns, attributes, status_code, status_description)
SpanRecord = tuple[Any, ...]

_FRAME = struct.Struct("!I")
#: Checks held while the child catches up; beyond that new ones are dropped.
MAX_PENDING = 10_000
#: Seconds between batches when spans trickle in.
FLUSH_INTERVAL = 0.05


#: Seconds before an exporter process that exited is started again; doubled while it keeps exiting.
RESTART_DELAY, MAX_RESTART_DELAY = 1.0, 60.0
#: Seconds a batch may wait for room in the pipe: an exporter process that reads nothing for this
#: long is stuck, and is killed (then started again like one that exited).
WRITE_TIMEOUT = 10.0


class SpanShipper:
    """Collects Check records on the request path; a thread ships them to the exporter process.

    The exporter process is started again when it exits (killed, out of memory, a bug): spans
    meanwhile are dropped and counted, and tracing resumes without restarting the sidecar.
    """

    def __init__(self, argv: list[str] | None = None) -> None:
        self._argv = argv or [sys.executable, "-m", "extauthz.telemetry.export_process"]
        self._proc = self._spawn()
        self._fd = self._proc.stdin.fileno()  # type: ignore[union-attr]
        self._restart_delay = RESTART_DELAY
        self._restart_at = 0.0
        self.restarts = 0
        #: Appended on the request path, emptied by the shipping thread: each side's deque operation
        #: is atomic, so neither takes a lock.
        self._pending: collections.deque[CheckRecord] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        #: Spans dropped here (the exporter process down or behind), shipped to it, and reported
        #: by it as not exported (the collector refused them or did not answer).
        self.dropped = 0
        self.shipped = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name="span-shipper", daemon=True)
        self._thread.start()

    # --- the request path ------------------------------------------------------------------------
    def add(self, record: CheckRecord) -> None:
        """Queue the spans of one Check."""
        if len(self._pending) >= MAX_PENDING or self._stopped:
            with self._lock:
                self._drop(_span_count([record]))
            return
        self._pending.append(record)

    # --- the shipping thread ---------------------------------------------------------------------
    def _spawn(self) -> subprocess.Popen[bytes]:
        self._started_at = time.monotonic()
        # stdin: the records; stdout: the child's reports of spans it could not export (see main).
        proc = subprocess.Popen(self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        os.set_blocking(proc.stdin.fileno(), False)  # type: ignore[union-attr]  # see _ship
        os.set_blocking(proc.stdout.fileno(), False)  # type: ignore[union-attr]  # see _collect_reports
        self._reports = b""
        return proc

    def _collect_reports(self) -> None:
        """Count what the exporter process says it could not export (one number per line)."""
        stdout = self._proc.stdout
        if stdout is None:
            return
        try:
            data = os.read(stdout.fileno(), 65536)
        except (BlockingIOError, OSError, ValueError):  # nothing yet, or closed
            return
        if not data:
            return
        lines = (self._reports + data).split(b"\n")
        self._reports = lines.pop()
        failed = sum(int(line) for line in lines if line.strip().isdigit())
        if failed:
            self.failed += failed
            count_export_errors(failed)

    def _run(self) -> None:
        while True:
            self._wake.wait(FLUSH_INTERVAL)
            self._wake.clear()
            stopped = self._stopped
            pending = self._pending
            batch = [pending.popleft() for _ in range(len(pending))]
            self._collect_reports()
            if not stopped and self._proc.poll() is not None and not self._restart():
                if batch:
                    with self._lock:
                        self._drop(_span_count(batch))
                continue
            if batch:
                self._ship(batch)
            if stopped:
                return

    def _restart(self) -> bool:
        """Start the exporter process again if it is time; whether one is running now."""
        now = time.monotonic()
        if now < self._restart_at:
            return False
        if now - self._started_at > MAX_RESTART_DELAY:  # it had run well: not "keeps exiting"
            self._restart_delay = RESTART_DELAY
        code = self._proc.returncode
        self._collect_reports()  # what it said before it went
        # Through the file objects, never os.close: they would close the descriptors again when
        # collected, and by then the numbers may be the new pipes'.
        with contextlib.suppress(OSError):
            self._proc.stdin.close()  # type: ignore[union-attr]
            self._proc.stdout.close()  # type: ignore[union-attr]
        try:
            self._proc = self._spawn()
        except OSError as exc:
            log.error("span exporter process could not be started again (%s)", exc.strerror)
            self._restart_at = now + self._restart_delay
            self._restart_delay = min(self._restart_delay * 2, MAX_RESTART_DELAY)
            return False
        self._fd = self._proc.stdin.fileno()  # type: ignore[union-attr]
        self.restarts += 1
        log.warning("span exporter process exited (code %s); started again", code)
        # The next exit, if it comes soon, waits longer: a process that cannot start is not spun.
        self._restart_at = now + self._restart_delay
        self._restart_delay = min(self._restart_delay * 2, MAX_RESTART_DELAY)
        return True

    def _ship(self, batch: list[CheckRecord]) -> None:
        try:
            payload = marshal.dumps(batch)
        except ValueError:  # cannot happen: decision_facts makes records of plain values only
            log.error("span records could not be marshalled; dropping %d spans", _span_count(batch))
            with self._lock:
                self._drop(_span_count(batch))
            return
        data = memoryview(_FRAME.pack(len(payload)) + payload)
        deadline = time.monotonic() + WRITE_TIMEOUT
        try:
            while data:
                try:
                    written = os.write(self._fd, data)
                except BlockingIOError:  # the pipe is full: wait for room, without the GIL
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        log.warning("span exporter process read nothing for %gs; killing it", WRITE_TIMEOUT)
                        self._proc.kill()
                        raise
                    self._collect_reports()  # so the child never waits on its report pipe meanwhile
                    select.select([], [self._fd], [], min(remaining, 1.0))
                    continue
                data = data[written:]
            self.shipped += _span_count(batch)
        except OSError as exc:
            log.warning("span exporter process unavailable (%s); dropping spans", exc.strerror or type(exc).__name__)
            with self._lock:
                self._drop(_span_count(batch))

    def _drop(self, count: int) -> None:
        self.dropped += count
        count_export_errors(count)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ship what is pending, close the pipe, and let the child flush and exit."""
        with self._lock:
            self._stopped = True
        self._wake.set()
        self._thread.join(timeout)
        # A Check that ended while the thread took its last batch: counted, not lost silently.
        left = [self._pending.popleft() for _ in range(len(self._pending))]
        if left:
            with self._lock:
                self._drop(_span_count(left))
        with contextlib.suppress(OSError):
            self._proc.stdin.close()  # type: ignore[union-attr]  # closes self._fd: EOF for the child
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
        self._collect_reports()  # what the child said as it flushed
        with contextlib.suppress(OSError):
            self._proc.stdout.close()  # type: ignore[union-attr]


class _RawTraceStub:
    """TraceService's Export method on a channel, taking and returning wire bytes: the request is
    already encoded, so parsing it into a message only to serialize it again would be waste."""

    def __init__(self, channel: Any) -> None:
        self.Export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")


class _EncodedSender:
    """Sends pre-encoded ExportTraceServiceRequests through the SDK's own OTLP exporter, so its
    configuration (OTEL_EXPORTER_OTLP_* endpoint, headers, TLS, compression, timeout) and its retry
    rules apply unchanged; only the per-span encoding is ours.

    The gRPC exporter calls ``self._client.Export`` with what ``_translate_data`` makes of its input
    (and counts spans with ``_count_data``), and builds ``_client`` from ``_stub`` and ``_channel``
    (again after a reconnection): for this instance the stub sends bytes as they are, and both hooks
    read our (request bytes, count) pair. The HTTP exporter sends bytes with its client's
    ``export``. :meth:`supports` checks those hooks exist, so an SDK that changed them gets the SDK
    path instead of a broken one.
    """

    _GRPC_HOOKS = ("_export", "_translate_data", "_count_data", "_stub", "_channel", "_client")

    def __init__(self, exporter: Any) -> None:
        self.exporter = exporter
        self.grpc = ".proto.grpc." in type(exporter).__module__
        if self.grpc:
            exporter._translate_data = lambda pair: pair[0]
            exporter._count_data = lambda pair: pair[1]
            exporter._stub = _RawTraceStub
            exporter._client = _RawTraceStub(exporter._channel)

    @classmethod
    def supports(cls, exporter: Any) -> bool:
        module = type(exporter).__module__
        if ".proto.grpc." in module:
            return all(hasattr(exporter, name) for name in cls._GRPC_HOOKS) and exporter._channel is not None
        if ".proto.http." in module:
            return hasattr(getattr(exporter, "_client", None), "export")
        return False

    def send(self, request: bytes, count: int) -> bool:
        if self.grpc:
            result = self.exporter._export((request, count))
            return getattr(result, "name", "") == "SUCCESS"
        return bool(getattr(self.exporter._client.export(request), "success", False))


_REPORT_LOCK = threading.Lock()


def _report_not_exported(spans: int) -> None:
    """In the exporter process: tell the sidecar that ``spans`` spans were not exported (it counts
    them in extauthz_trace_export_errors_total), one number per line on stdout."""
    if spans <= 0:
        return
    with _REPORT_LOCK, contextlib.suppress(OSError, ValueError):
        sys.stdout.buffer.write(b"%d\n" % spans)
        sys.stdout.buffer.flush()


class _Batcher:
    """The batch span processor's job for encoded spans: up to ``batch_size`` spans per request,
    sent when a batch is full or ``delay`` seconds after the first span; at most ``queue_size``
    spans waiting (beyond, dropped and logged). Configured by the standard OTEL_BSP_* variables."""

    def __init__(self, encoder: Any, senders: list[_EncodedSender], environ: Any) -> None:
        def number(name: str, default: float) -> float:
            try:
                return float(environ.get(name, default))
            except ValueError:
                return default

        self.delay = max(0.001, number("OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000)
        self.batch_size = max(1, int(number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)))
        self.queue_size = max(self.batch_size, int(number("OTEL_BSP_MAX_QUEUE_SIZE", 2048)))
        self.encoder = encoder
        self.senders = senders
        self._spans: list[bytes] = []
        self._cond = threading.Condition()
        self._closed = False
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="span-export", daemon=True)
        self._thread.start()

    def add(self, spans: list[bytes]) -> None:
        with self._cond:
            room = self.queue_size - len(self._spans)
            if room < len(spans):
                self.dropped += len(spans) - max(room, 0)
                _report_not_exported(len(spans) - max(room, 0))
                spans = spans[: max(room, 0)]
            self._spans += spans
            if len(self._spans) >= self.batch_size:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._closed and len(self._spans) < self.batch_size:
                    self._cond.wait(self.delay)
                batch, self._spans = self._spans[: self.batch_size], self._spans[self.batch_size :]
                closed = self._closed and not self._spans
            if batch:
                self._send(batch)
            if closed:
                return

    def _send(self, batch: list[bytes]) -> None:
        request = self.encoder.request(batch)
        for sender in self.senders:
            try:
                sent = sender.send(request, len(batch))
            except Exception:
                log.warning("trace export failed", exc_info=True)
                sent = False
            if not sent:
                log.warning("trace export of %d spans failed", len(batch))
                _report_not_exported(len(batch))

    def close(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)
        if self.dropped:
            log.warning("%d spans dropped: the exporter could not keep up", self.dropped)


def main() -> int:
    """The exporter process: read span batches from stdin until EOF, export them, flush, exit."""
    from extauthz.telemetry.logs import configure_logging
    from extauthz.telemetry.tracing import _exporters, _resource

    # The sidecar decides when this process ends (EOF on stdin), so that nothing pending is lost
    # to a Ctrl-C or a SIGTERM sent to the whole process group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(os.environ.get("EXTAUTHZ_LOG_LEVEL", "info"), os.environ.get("EXTAUTHZ_LOG_FORMAT", "json"))
    resource = _resource(os.environ, os.environ.get("EXTAUTHZ_VERSION", "unknown"))
    exporters = _exporters(os.environ)
    if exporters and all(_EncodedSender.supports(e) for e in exporters):
        from extauthz.telemetry.otlp_encode import SpanEncoder

        encoder = SpanEncoder(dict(resource.attributes), "extauthz")
        batcher = _Batcher(encoder, [_EncodedSender(e) for e in exporters], os.environ)
        for records in _batches(sys.stdin.buffer):
            batcher.add(_encoded(encoder, records))
        batcher.close()
        for exporter in exporters:
            exporter.shutdown()
        return 0
    return _export_with_sdk(resource, exporters)


def _encoded(encoder: Any, records: list[CheckRecord]) -> list[bytes]:
    """The encoded spans of ``records``; a record that cannot be encoded is logged and skipped, so
    one bad record never stops the exporter."""
    encode = encoder.check_spans
    try:
        return [span for record in records for span in encode(record)]
    except Exception:
        spans: list[bytes] = []
        for record in records:
            try:
                spans += encode(record)
            except Exception as exc:
                log.error("a span record could not be encoded (%s); its spans are dropped", type(exc).__name__)
        return spans


def _batches(stream: Any) -> Any:
    """The lists of Check records the sidecar writes, until EOF."""
    while True:
        head = stream.read(_FRAME.size)
        if len(head) < _FRAME.size:
            return
        yield marshal.loads(stream.read(_FRAME.unpack(head)[0]))


def _span_count(records: list[CheckRecord]) -> int:
    return sum(len(record[-1]) + 1 for record in records)


def sdk_span(record: SpanRecord, resource: Any, scope: Any) -> ReadableSpan:
    """The SDK's ReadableSpan for a span record (for the SDK's span processors and exporters)."""
    (name, trace_id, span_id, parent_id, parent_remote, flags, state, kind, start, end, attributes, code,
     description) = record  # fmt: skip
    trace_state = TraceState(state) if state else None
    context = SpanContext(trace_id, span_id, False, TraceFlags(flags), trace_state)
    parent = SpanContext(trace_id, parent_id, parent_remote, TraceFlags(flags), trace_state) if parent_id else None
    return ReadableSpan(name, context, parent, resource, attributes, kind=SpanKind(kind),
                        status=Status(StatusCode(code), description or None), start_time=start, end_time=end,
                        instrumentation_scope=scope)  # fmt: skip


def _export_with_sdk(resource: Any, exporters: list[Any]) -> int:
    """Exporters other than OTLP (console): SDK spans through the batch span processor."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from extauthz.telemetry.tracing import _CountingExporter

    provider = TracerProvider(resource=resource)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(_CountingExporter(exporter, _report_not_exported)))
    processor = provider._active_span_processor
    scope = InstrumentationScope("extauthz")
    for records in _batches(sys.stdin.buffer):
        for record in records:
            for span in expand(record):
                processor.on_end(sdk_span(span, resource, scope))
    provider.shutdown()
    return 0
