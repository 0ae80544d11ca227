"""OpenTelemetry traces: one ``extauthz.check`` span per Check, inside the request's own trace.

Envoy forwards the request's headers in the CheckRequest, so the trace context the client (or
Envoy's tracer) put there -- W3C ``traceparent``/``tracestate``, B3 single ``b3`` or multi
``x-b3-*`` -- is extracted and the Check's span becomes its child. Each stage (policy selection,
then every check: identity, signature, rules, quota, response) gets a child span.

Configuration is the standard one, read from ``OTEL_*`` environment variables once at start:
``OTEL_TRACES_EXPORTER`` (otlp, console, none), ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`` (grpc,
http/protobuf), ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``, ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER[_ARG]``, ``OTEL_BSP_*``, ``OTEL_PROPAGATORS``.
Tracing is on only when an exporter is configured (an exporter name or an OTLP endpoint); otherwise
:func:`tracing_from_env` returns None and the pipeline does no span work at all.

What a span never holds: tokens, keys, signatures, cookies, header values, query strings. The
subject is hashed with a keyed HMAC by default (``EXTAUTHZ_TRACE_SUBJECT=hash|plain|none``; key from
``EXTAUTHZ_SUBJECT_HASH_KEY``) so it correlates across requests without being readable.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagators.textmap import Getter, TextMapPropagator
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from extauthz.api.envoy.service.auth.v3 import external_auth_pb2
from extauthz.context import Denial
from extauthz.decision import Decision

if TYPE_CHECKING:
    from extauthz.telemetry.span_export import SpanShipper

__all__ = ["SubjectHasher", "Tracing", "TracingConfigError", "trace_headers", "tracing_from_env"]

log = logging.getLogger("extauthz.tracing")

#: Headers that carry trace context (read from the CheckRequest; never put in spans or logs).
TRACE_HEADERS = ("traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid",
                 "x-b3-sampled", "x-b3-flags")  # fmt: skip

#: Attribute names (of ctx.attributes) that are never copied into a span, whatever a check puts there.
_SECRET_WORDS = ("token", "secret", "password", "passwd", "signature", "cookie", "authorization", "credential",
                 "private", "api_key", "apikey")  # fmt: skip
_MAX_ATTRIBUTE_CHARS = 256


class TracingConfigError(ValueError):
    """The OTEL_* configuration asks for something extauthz cannot do: the sidecar refuses to start."""


def is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_WORDS)


class _HeaderGetter(Getter[Mapping[str, str]]):
    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier.keys())


_GETTER = _HeaderGetter()


def trace_headers(message: external_auth_pb2.CheckRequest) -> Mapping[str, str]:
    """The request's headers as Envoy sent them, lower-case names (only the trace ones matter)."""
    http = message.attributes.request.http
    if http.headers or not http.header_map.headers:
        return http.headers
    found: dict[str, str] = {}
    for entry in http.header_map.headers:
        name = entry.key.lower()
        if name in TRACE_HEADERS:
            found[name] = entry.raw_value.decode("latin-1") if entry.raw_value else entry.value
    return found


def _default_propagator() -> TextMapPropagator:
    """B3 (single and multi) then W3C trace context: with both present, ``traceparent`` wins."""
    if os.environ.get("OTEL_PROPAGATORS"):
        from opentelemetry.propagate import get_global_textmap

        return get_global_textmap()
    from opentelemetry.propagators.b3 import B3MultiFormat
    from opentelemetry.propagators.composite import CompositePropagator
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return CompositePropagator([B3MultiFormat(), TraceContextTextMapPropagator()])


@dataclass(frozen=True, slots=True)
class SubjectHasher:
    """How the identity's subject appears in spans: a keyed hash (default), as is, or not at all."""

    mode: str = "hash"
    key: bytes = b""

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> SubjectHasher:
        mode = environ.get("EXTAUTHZ_TRACE_SUBJECT", "hash").strip().lower()
        if mode not in ("hash", "plain", "none"):
            raise TracingConfigError("EXTAUTHZ_TRACE_SUBJECT must be hash, plain or none")
        key = environ.get("EXTAUTHZ_SUBJECT_HASH_KEY", "").encode()
        # Without a configured key, hashes correlate within this process only (and cannot be
        # reversed by hashing guessed subjects anywhere else).
        return cls(mode, key or os.urandom(32))

    def attributes(self, subject: str) -> dict[str, str]:
        if not subject or self.mode == "none":
            return {}
        if self.mode == "plain":
            return {"extauthz.identity.subject": subject[:_MAX_ATTRIBUTE_CHARS]}
        digest = hmac.new(self.key, subject.encode("utf-8", "replace"), hashlib.sha256).hexdigest()[:32]
        return {"extauthz.identity.subject_hash": digest}


class _CountingExporter(SpanExporter):
    """Delegates to the real exporter and counts failed batches (extauthz_trace_export_errors)."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception:
            log.warning("trace export failed", exc_info=True)
            result = SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            from extauthz.telemetry import metrics

            m = metrics.current()
            if m is not None:
                m.trace_export_errors.inc()
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def _exporters(environ: Mapping[str, str]) -> list[SpanExporter]:
    names = environ.get("OTEL_TRACES_EXPORTER")
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if names is None:
        names = "otlp" if endpoint else "none"
    protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc").strip().lower()  # fmt: skip
    try:
        return _build_exporters(names, protocol)
    except ImportError as exc:
        # Seen when another package overwrote opentelemetry-proto's modules with older ones.
        raise TracingConfigError(f"the OTLP exporter cannot be loaded ({exc}); reinstall opentelemetry-proto") from exc


def _build_exporters(names: str, protocol: str) -> list[SpanExporter]:
    exporters: list[SpanExporter] = []
    for name in (n.strip().lower() for n in names.split(",")):
        if name in ("", "none"):
            continue
        if name == "otlp":
            if protocol == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

                exporters.append(GrpcExporter())
            elif protocol == "http/protobuf":
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

                exporters.append(HttpExporter())
            else:
                raise TracingConfigError(f"OTLP protocol {protocol!r} is not supported (grpc or http/protobuf)")
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            # stdout carries the decision log: spans printed for debugging go to stderr.
            exporters.append(ConsoleSpanExporter(out=sys.stderr))
        else:
            raise TracingConfigError(f"OTEL_TRACES_EXPORTER {name!r} is not supported (otlp, console or none)")
    return exporters


def _resource(environ: Mapping[str, str], version: str) -> Resource:
    attributes: dict[str, str] = {SERVICE_VERSION: version}
    named = environ.get("OTEL_SERVICE_NAME") or "service.name=" in environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    if not named:
        attributes[SERVICE_NAME] = "extauthz"
    return Resource.create(attributes)


def tracing_from_env(environ: Mapping[str, str] | None = None, *, version: str = "") -> Tracing | None:
    """Tracing as the OTEL_* variables configure it, or None when no exporter is configured."""
    environ = os.environ if environ is None else environ
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    exporters = _exporters(environ)
    if not exporters:
        return None
    # The SDK reads OTEL_TRACES_SAMPLER(_ARG) and OTEL_BSP_* itself.
    provider = TracerProvider(resource=_resource(environ, version or "unknown"))
    subjects = SubjectHasher.from_env(environ)
    if environ.get("EXTAUTHZ_TRACE_EXPORT", "process").strip().lower() == "inprocess":
        for exporter in exporters:
            provider.add_span_processor(BatchSpanProcessor(_CountingExporter(exporter)))
        return Tracing(provider, _default_propagator(), subjects)
    # Default: encode and send from a helper process (see span_export); the configuration was
    # checked above by building the exporters once.
    for exporter in exporters:
        exporter.shutdown()
    from extauthz.telemetry.span_export import SpanShipper

    os.environ.setdefault("EXTAUTHZ_VERSION", version or "unknown")
    return Tracing(provider, _default_propagator(), subjects, shipper=SpanShipper())


_STATIC_ATTRIBUTES = {
    "rpc.system": "grpc",
    "rpc.service": "envoy.service.auth.v3.Authorization",
    "rpc.method": "Check",
}
_OK = Status(StatusCode.UNSET)
_INTERNAL = SpanKind.INTERNAL.value


class Tracing:
    """Implements the pipeline's CheckTracer on the OpenTelemetry SDK, leanly.

    The SDK's general-purpose Span costs tens of microseconds (locks, attribute validation, a
    sampler call per span). A Check's spans are simpler: one sampling decision for the Check (the
    configured sampler, honouring the caller's decision), its stage spans share it, attributes are
    plain values built here, and finished spans go to the span processor as ReadableSpans -- the
    same objects the SDK exports. Unsampled Checks create no span objects at all.
    """

    def __init__(self, provider: TracerProvider, propagator: TextMapPropagator, subjects: SubjectHasher,
                 processor: SpanProcessor | None = None, shipper: SpanShipper | None = None) -> None:  # fmt: skip
        self.provider = provider
        self.propagator = propagator
        self.subjects = subjects
        self.sampler = provider.sampler
        self.ids = provider.id_generator
        self.resource = provider.resource
        # The processor finished spans go to: the one given, else the provider's.
        self.processor: SpanProcessor = processor if processor is not None else provider._active_span_processor
        self.scope = InstrumentationScope("extauthz")
        #: When set, finished spans go to the exporter process instead of the processor.
        self.shipper = shipper
        self._stage_names: dict[str, str] = {}

    def begin(self, message: external_auth_pb2.CheckRequest) -> _CheckSpan:
        parent_context = self.propagator.extract(trace_headers(message), getter=_GETTER)
        parent = trace.get_current_span(parent_context).get_span_context()
        if not parent.is_valid:
            parent = None
        trace_id = parent.trace_id if parent is not None else self.ids.generate_trace_id()
        result = self.sampler.should_sample(parent_context, trace_id, "extauthz.check", SpanKind.SERVER)
        sampled = result.decision.is_sampled()
        trace_state = result.trace_state if result.trace_state is not None else (
            parent.trace_state if parent is not None else None)  # fmt: skip
        context = SpanContext(trace_id, self.ids.generate_span_id(), is_remote=False,
                              trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT),
                              trace_state=trace_state)  # fmt: skip
        # Code running inside the Check (logs, client libraries) sees the Check's span as current.
        token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(context), parent_context))
        extra = dict(result.attributes) if sampled and result.attributes else None
        return _CheckSpan(self, context, parent, sampled, token, extra)

    def stage_name(self, stage: str) -> str:
        name = self._stage_names.get(stage)
        if name is None:
            name = self._stage_names[stage] = f"extauthz.{stage}"
        return name

    def emit(self, name: str, context: SpanContext, parent: SpanContext | None, kind: SpanKind,
             attributes: dict[str, Any], status: Status, start: int, end: int) -> None:  # fmt: skip
        if self.shipper is not None:
            state = context.trace_state
            self.shipper.add((
                name, context.trace_id, context.span_id, parent.span_id if parent is not None else 0,
                parent.is_remote if parent is not None else False, int(context.trace_flags),
                list(state.items()) if state else None, kind.value, start, end, attributes,
                status.status_code.value, status.description or "",
            ))  # fmt: skip
            return
        self.processor.on_end(ReadableSpan(
            name, context, parent, self.resource, attributes, kind=kind, status=status, start_time=start,
            end_time=end, instrumentation_scope=self.scope,
        ))  # fmt: skip

    def shutdown(self) -> None:
        """Flush pending spans (bounded by OTEL_BSP_EXPORT_TIMEOUT) and stop the exporter."""
        if self.shipper is not None:
            self.shipper.shutdown()
        self.provider.shutdown()


@dataclass(slots=True)
class _Stage:
    name: str
    check: str
    start: int


class _CheckSpan:
    """One Check's span (implements decision.CheckTrace)."""

    __slots__ = ("_ended", "context", "extra", "owner", "parent", "sampled", "start", "token")

    def __init__(self, owner: Tracing, context: SpanContext, parent: SpanContext | None, sampled: bool,
                 token: object, extra: dict[str, Any] | None) -> None:  # fmt: skip
        self.owner = owner
        self.context = context
        self.parent = parent
        self.sampled = sampled
        self.token = token
        self.extra = extra
        self.start = time.time_ns()
        self._ended = False

    def stage(self, stage: str, check: str) -> _Stage | None:
        if not self.sampled:
            return None
        return _Stage(self.owner.stage_name(stage), check, time.time_ns())

    def end_stage(self, handle: _Stage | None, denial: Denial | None, error: BaseException | None = None) -> None:
        if handle is None:
            return
        end = time.time_ns()
        owner = self.owner
        attributes: dict[str, Any] = {"extauthz.check": handle.check} if handle.check else {}
        status = _OK
        if denial is not None:
            attributes["extauthz.denied"] = True
            attributes["extauthz.reason"] = denial.reason
        if error is not None:
            # The type only: an exception's text may quote request data.
            attributes["error.type"] = type(error).__name__
            status = Status(StatusCode.ERROR, type(error).__name__)
        mine = self.context
        shipper = owner.shipper
        if shipper is not None:  # the common case, without building a SpanContext
            state = mine.trace_state
            shipper.add((handle.name, mine.trace_id, owner.ids.generate_span_id(), mine.span_id, False,
                         int(mine.trace_flags), list(state.items()) if state else None, _INTERNAL, handle.start, end,
                         attributes, status.status_code.value, status.description or ""))  # fmt: skip
            return
        context = SpanContext(mine.trace_id, owner.ids.generate_span_id(), is_remote=False,
                              trace_flags=mine.trace_flags, trace_state=mine.trace_state)  # fmt: skip
        owner.emit(handle.name, context, mine, SpanKind.INTERNAL, attributes, status, handle.start, end)

    def finish(self, decision: Decision) -> Decision:
        if self.sampled:
            attributes = dict(_STATIC_ATTRIBUTES)
            if self.extra:
                attributes.update(self.extra)
            attributes.update(decision_attributes(decision, self.owner.subjects))
            status = Status(StatusCode.ERROR, decision.reason) if decision.status >= 500 else _OK
            self._end(attributes, status)
        else:
            self._end(None, _OK)
        context = self.context
        return replace(decision, trace_id=format(context.trace_id, "032x"), span_id=format(context.span_id, "016x"))

    def abort(self) -> None:
        self._end(dict(_STATIC_ATTRIBUTES) if self.sampled else None, Status(StatusCode.ERROR, "cancelled"))

    def _end(self, attributes: dict[str, Any] | None, status: Status) -> None:
        if self._ended:
            return
        self._ended = True
        otel_context.detach(self.token)  # type: ignore[arg-type]
        if attributes is not None:
            self.owner.emit("extauthz.check", self.context, self.parent, SpanKind.SERVER, attributes, status,
                            self.start, time.time_ns())  # fmt: skip


def outcome(decision: Decision) -> str:
    """allow, deny or dry_run_deny: the ``decision`` label of metrics, spans and logs."""
    if decision.allowed:
        return "dry_run_deny" if decision.would_deny else "allow"
    return "deny"


def decision_attributes(decision: Decision, subjects: SubjectHasher) -> dict[str, Any]:
    """Span attributes of a decision: what decided and why, never a secret."""
    attributes: dict[str, Any] = {
        "extauthz.decision": outcome(decision),
        "extauthz.reason": decision.reason,
        "extauthz.status": decision.status,
        "extauthz.decision_id": decision.decision_id,
        "extauthz.dry_run": decision.dry_run,
    }
    if decision.policy:
        attributes["extauthz.policy"] = decision.policy
    if decision.rule:
        attributes["extauthz.rule"] = decision.rule
    if decision.would_deny:
        attributes["extauthz.would_deny"] = True
    request = decision.request
    if request is not None:
        attributes["http.request.method"] = request.method
        if request.host:
            attributes["server.address"] = request.host
        attributes["url.path"] = request.path[:_MAX_ATTRIBUTE_CHARS]
        if request.source.address:
            attributes["client.address"] = request.source.address
    identity = decision.identity
    if identity is not None:
        attributes["extauthz.identity.kind"] = str(identity.get("kind", ""))
        source = identity.get("source")
        if source:
            attributes["extauthz.identity.source"] = str(source)
        attributes.update(subjects.attributes(str(identity.get("subject") or "")))
    for name, value in (decision.attributes or {}).items():
        if name == "error":
            attributes["error.type"] = str(value).split(":", 1)[0][:64]
        elif isinstance(value, bool | int | float) and not is_secret_name(name):
            attributes[f"extauthz.{name}"] = value
        elif isinstance(value, str) and not is_secret_name(name):
            attributes[f"extauthz.{name}"] = value[:_MAX_ATTRIBUTE_CHARS]
    return attributes


def parse_trace_ids(headers: Mapping[str, str]) -> tuple[str, str]:
    """(trace id, parent span id) from a request's traceparent or B3 headers, without the SDK.

    Used by the decision log when tracing is off, so log lines still join the request's trace.
    """
    value = headers.get("traceparent", "")
    parts = value.split("-")
    if (len(parts) >= 4 and len(parts[1]) == 32 and len(parts[2]) == 16 and _is_hex(parts[1] + parts[2])
            and parts[1] != "0" * 32):
        return parts[1].lower(), parts[2].lower()
    b3 = headers.get("b3", "")
    if b3:
        fields = b3.split("-")
        if len(fields) >= 2 and len(fields[0]) in (16, 32) and len(fields[1]) == 16 and _is_hex(fields[0] + fields[1]):
            return fields[0].lower().rjust(32, "0"), fields[1].lower()
    trace_id, span_id = headers.get("x-b3-traceid", ""), headers.get("x-b3-spanid", "")
    if len(trace_id) in (16, 32) and len(span_id) == 16 and _is_hex(trace_id + span_id):
        return trace_id.lower().rjust(32, "0"), span_id.lower()
    return "", ""


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True
