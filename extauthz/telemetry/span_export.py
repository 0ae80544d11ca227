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

import logging
import os
import signal
import sys
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from extauthz.telemetry.check_spans import CheckRecord, expand
from extauthz.telemetry.metrics import count_export_errors
from extauthz.telemetry.shipper import Batcher, EncodedSender, RecordShipper, read_batches, report_not_exported

__all__ = ["SpanRecord", "SpanShipper", "main"]

log = logging.getLogger("extauthz.tracing")

#: (name, trace_id, span_id, parent_span_id or 0, parent_is_remote, trace_flags, trace_state pairs,
#:  kind, start_ns, end_ns, attributes, status_code, status_description)
SpanRecord = tuple[Any, ...]


class SpanShipper(RecordShipper):
    """Collects Check records on the request path; a thread ships them to the span exporter process.

    The exporter process is started again when it exits (killed, out of memory, a bug): spans
    meanwhile are dropped and counted (extauthz_trace_export_errors_total), and tracing resumes
    without restarting the sidecar.
    """

    def __init__(self, argv: list[str] | None = None) -> None:
        super().__init__(argv or [sys.executable, "-m", "extauthz.telemetry.export_process"], what="span",
                         count=_span_count, on_lost=count_export_errors)  # fmt: skip


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
    if exporters and all(EncodedSender.supports(e) for e in exporters):
        from extauthz.telemetry.otlp_encode import SpanEncoder

        encoder = SpanEncoder(dict(resource.attributes), "extauthz")
        batcher = Batcher(encoder, [EncodedSender(e) for e in exporters], os.environ)
        for records in read_batches(sys.stdin.buffer):
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
        provider.add_span_processor(BatchSpanProcessor(_CountingExporter(exporter, report_not_exported)))
    processor = provider._active_span_processor
    scope = InstrumentationScope("extauthz")
    for records in read_batches(sys.stdin.buffer):
        for record in records:
            for span in expand(record):
                processor.on_end(sdk_span(span, resource, scope))
    provider.shutdown()
    return 0
