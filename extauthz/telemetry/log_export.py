"""Decision logs as OpenTelemetry logs over OTLP, shipped like spans: encoded and sent by a child process.

Turned on by the standard variables: ``OTEL_LOGS_EXPORTER=otlp``, or, when that is unset, an
``OTEL_EXPORTER_OTLP_LOGS_ENDPOINT``. The endpoint is ``OTEL_EXPORTER_OTLP_LOGS_ENDPOINT`` or the
generic ``OTEL_EXPORTER_OTLP_ENDPOINT`` (so one collector takes traces and decisions), the protocol
``OTEL_EXPORTER_OTLP_[LOGS_]PROTOCOL`` (grpc or http/protobuf), headers, TLS, compression and
timeout the usual ``OTEL_EXPORTER_OTLP_[LOGS_]*`` ones, and batching ``OTEL_BLRP_*`` (the batch log
record processor's: a batch of up to 512 records every second by default, 2,048 waiting at most).
The generic endpoint alone does not turn decision logs on: a deployment that sends its traces to a
collector keeps its decision log where ``--decision-log`` says.

The decision log's writer thread builds each record (the JSON line's object) as it does for stdout
or a file, and hands it to a :class:`LogShipper`: a thread marshals batches of them down a pipe to
``python -m extauthz.telemetry.export_process logs``, which encodes them (otlp_encode.LogEncoder)
and sends them with the SDK's OTLP log exporter. The request path pays nothing more than it does for
the decision log already (a sample and a queue put); a collector that is down or slow costs dropped
records, counted in ``extauthz_decision_log_export_errors_total``, never a slower request.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Mapping
from typing import Any

from extauthz.telemetry.metrics import count_log_export_errors
from extauthz.telemetry.shipper import Batcher, EncodedSender, RecordShipper, read_batches, report_not_exported

__all__ = ["LogConfigError", "LogShipper", "main", "otlp_logs_from_env"]

log = logging.getLogger("extauthz.decision_log")

_PROTOCOLS = ("grpc", "http/protobuf")


class LogConfigError(ValueError):
    """The OTEL_* logs configuration asks for something extauthz cannot do: the sidecar refuses to start."""


def otlp_logs_from_env(environ: Mapping[str, str]) -> bool:
    """Whether decision logs go to an OTLP collector, as the standard variables say; raises
    LogConfigError for an exporter or protocol extauthz does not support."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    names = environ.get("OTEL_LOGS_EXPORTER")
    if names is None:
        enabled = bool(environ.get("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "").strip())
    else:
        chosen = [name.strip().lower() for name in names.split(",") if name.strip()]
        for name in chosen:
            if name not in ("otlp", "none"):
                raise LogConfigError(f"OTEL_LOGS_EXPORTER {name!r} is not supported (otlp or none): decision logs "
                                     "go to --decision-log, and to a collector with otlp")  # fmt: skip
        enabled = "otlp" in chosen
    if enabled:
        protocol = _protocol(environ)
        if protocol not in _PROTOCOLS:
            raise LogConfigError(f"OTLP protocol {protocol!r} is not supported for logs (grpc or http/protobuf)")
    return enabled


def _protocol(environ: Mapping[str, str]) -> str:
    return (environ.get("OTEL_EXPORTER_OTLP_LOGS_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "grpc").strip().lower()  # fmt: skip


class LogShipper(RecordShipper):
    """Takes (time in ns, decision record) pairs from the decision log's writer thread to the log
    exporter process; records it cannot deliver are counted in extauthz_decision_log_export_errors_total."""

    def __init__(self, argv: list[str] | None = None) -> None:
        os.environ.setdefault("EXTAUTHZ_VERSION", _version())  # the resource's service.version, in the child
        super().__init__(argv or [sys.executable, "-m", "extauthz.telemetry.export_process", "logs"],
                         what="decision log", on_lost=count_log_export_errors)  # fmt: skip


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("extauthz")
    except Exception:
        return "unknown"


def _exporter(environ: Mapping[str, str]) -> Any:
    if _protocol(environ) == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as HttpExporter

        return HttpExporter()
    from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter as GrpcExporter

    return GrpcExporter()


def _encoded(encoder: Any, records: list[Any]) -> list[bytes]:
    """The encoded log records of ``records``; one that cannot be encoded is reported and skipped."""
    out: list[bytes] = []
    for item in records:
        try:
            when_ns, record = item
            out.append(encoder.record(int(when_ns), record))
        except Exception as exc:
            log.error("a decision log record could not be encoded (%s); it is dropped", type(exc).__name__)
            report_not_exported(1)
    return out


def main() -> int:
    """The log exporter process: read batches of records from stdin until EOF, export, flush, exit."""
    from extauthz.telemetry.logs import configure_logging
    from extauthz.telemetry.otlp_encode import LogEncoder
    from extauthz.telemetry.tracing import _resource

    # The sidecar decides when this process ends (EOF on stdin), so that nothing pending is lost to
    # a Ctrl-C or a SIGTERM sent to the whole process group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(os.environ.get("EXTAUTHZ_LOG_LEVEL", "info"), os.environ.get("EXTAUTHZ_LOG_FORMAT", "json"))
    version = os.environ.get("EXTAUTHZ_VERSION", "unknown")
    exporter = _exporter(os.environ)
    encoder = LogEncoder(dict(_resource(os.environ, version).attributes), "extauthz.decision_log", version)
    if not EncodedSender.supports(exporter):  # an SDK whose exporter changed its hooks: say so, count the loss
        log.error("this OpenTelemetry SDK's OTLP log exporter cannot send pre-encoded requests; decision logs "
                  "are not exported")  # fmt: skip
        for records in read_batches(sys.stdin.buffer):
            report_not_exported(len(records))
        return 1
    batcher = Batcher(encoder, [EncodedSender(exporter, "logs")], os.environ, prefix="OTEL_BLRP_", delay_ms=1000,
                      what="decision log")  # fmt: skip
    for records in read_batches(sys.stdin.buffer):
        batcher.add(_encoded(encoder, records))
    batcher.close()
    exporter.shutdown()
    return 0
