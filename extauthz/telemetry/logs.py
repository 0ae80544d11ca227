"""Process logs as JSON lines on stderr (or classic text), with the current trace and span id.

stdout is the decision log's; stderr carries what the process itself says (start, reloads, errors),
one JSON object per line so that log pipelines parse both without configuration.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import IO, Any

__all__ = ["JsonFormatter", "configure_logging"]

#: LogRecord attributes that are not "extra" fields.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, trace/span id, exception, extras."""

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        out: dict[str, Any] = {
            "time": moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        trace_id, span_id = _current_ids()
        if trace_id:
            out["trace_id"] = trace_id
            out["span_id"] = span_id
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        return json.dumps(out, ensure_ascii=False, default=str)


def _current_ids() -> tuple[str, str]:
    from extauthz.telemetry.tracing import CURRENT_CHECK

    check = CURRENT_CHECK.get()
    if check is not None:  # inside a traced Check
        return format(check[0], "032x"), format(check[1], "016x")
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return "", ""
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def configure_logging(level: str = "info", fmt: str = "json", stream: IO[str] | None = None) -> None:
    """Set up the root logger once for the process (``extauthz serve``)."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # The OTLP exporter logs every failed batch at warning with a traceback; one line is enough.
    logging.getLogger("opentelemetry").setLevel(max(root.level, logging.WARNING))
