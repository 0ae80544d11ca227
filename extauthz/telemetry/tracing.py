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
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from opentelemetry import trace
from opentelemetry.propagators.textmap import Getter, TextMapPropagator
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import Sampler, TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanKind, StatusCode, TraceState

from extauthz.api.envoy.service.auth.v3 import external_auth_pb2
from extauthz.context import Denial
from extauthz.decision import Decision
from extauthz.telemetry.check_spans import CheckRecord, Facts, attributes_from_facts, expand, random_span_id
from extauthz.telemetry.metrics import count_export_errors
from extauthz.telemetry.span_export import sdk_span

if TYPE_CHECKING:
    from extauthz.telemetry.span_export import SpanShipper

__all__ = ["SubjectHasher", "Tracing", "TracingConfigError", "trace_headers", "tracing_from_env"]

log = logging.getLogger("extauthz.tracing")

#: Headers that carry trace context (read from the CheckRequest; never put in spans or logs).
TRACE_HEADERS = ("traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid",
                 "x-b3-sampled", "x-b3-flags")  # fmt: skip

#: Attribute names (of ctx.attributes) that are never copied into a span, whatever a check puts there.
_SECRET_WORDS = ("token", "secret", "password", "passwd", "signature", "cookie", "authorization", "credential",
                 "private", "api_key", "apikey", "api-key", "jwt", "assertion", "session")  # fmt: skip
_MAX_ATTRIBUTE_CHARS = 256
#: Attribute names (of ctx.attributes) whose value names a person (the user name a failed login
#: tried, which is sometimes a password typed in the wrong field): spans and the decision log show
#: them as they show the identity's subject (a keyed hash, as is, or not at all).
PERSONAL_ATTRIBUTES = frozenset({"attempted_user"})


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


def subject_hash_key(environ: Mapping[str, str]) -> bytes:
    """EXTAUTHZ_SUBJECT_HASH_KEY, shared by spans and decision logs. Without one, hashes correlate
    within this process only (and cannot be reversed by hashing guessed subjects anywhere else)."""
    return environ.get("EXTAUTHZ_SUBJECT_HASH_KEY", "").encode() or os.urandom(32)


@dataclass(frozen=True, slots=True)
class SubjectHasher:
    """How the identity's subject appears in spans: a keyed hash (default), as is, or not at all."""

    mode: str = "hash"
    key: bytes = b""
    #: Hashes already computed (the same callers come back); bounded.
    _known: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> SubjectHasher:
        mode = environ.get("EXTAUTHZ_TRACE_SUBJECT", "hash").strip().lower()
        if mode not in ("hash", "plain", "none"):
            raise TracingConfigError("EXTAUTHZ_TRACE_SUBJECT must be hash, plain or none")
        return cls(mode, subject_hash_key(environ))

    def attributes(self, subject: str) -> dict[str, str]:
        pair = self.attribute(subject)
        return {} if pair is None else {pair[0]: pair[1]}

    def attribute(self, subject: str) -> tuple[str, str] | None:
        """The (name, value) of the subject's span attribute, or None for none."""
        if not subject or self.mode == "none":
            return None
        if self.mode == "plain":
            return ("extauthz.identity.subject", subject[:_MAX_ATTRIBUTE_CHARS])
        digest = self._known.get(subject)
        if digest is None:
            digest = hmac.new(self.key, subject.encode("utf-8", "replace"), hashlib.sha256).hexdigest()[:32]
            if len(self._known) >= 4096:
                self._known.clear()
            self._known[subject] = digest
        return ("extauthz.identity.subject_hash", digest)


class _CountingExporter(SpanExporter):
    """Delegates to the real exporter and counts the spans of failed batches (by default into
    extauthz_trace_export_errors; the exporter process reports them to the sidecar instead)."""

    def __init__(self, inner: SpanExporter, on_failure: Callable[[int], None] = count_export_errors) -> None:
        self.inner = inner
        self.on_failure = on_failure

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception:
            log.warning("trace export failed", exc_info=True)
            result = SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            self.on_failure(len(spans))
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
    standard = not environ.get("OTEL_PROPAGATORS")
    if environ.get("EXTAUTHZ_TRACE_EXPORT", "process").strip().lower() == "inprocess":
        for exporter in exporters:
            provider.add_span_processor(BatchSpanProcessor(_CountingExporter(exporter)))
        return Tracing(provider, _default_propagator(), subjects, standard_propagation=standard)
    # Default: encode and send from a helper process (see span_export); the configuration was
    # checked above by building the exporters once.
    for exporter in exporters:
        exporter.shutdown()
    from extauthz.telemetry.span_export import SpanShipper

    os.environ.setdefault("EXTAUTHZ_VERSION", version or "unknown")
    return Tracing(provider, _default_propagator(), subjects, shipper=SpanShipper(), standard_propagation=standard)


_UNSET, _ERROR = StatusCode.UNSET.value, StatusCode.ERROR.value

#: The Check being decided in this task: (trace id, span id), for log lines (see telemetry.logs).
CURRENT_CHECK: ContextVar[tuple[int, int] | None] = ContextVar("extauthz_current_check", default=None)

_TRACEPARENT = re.compile(r"^[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?[ \t]*$")
_HEX = re.compile(r"[0-9a-fA-F]+")
#: B3 "sampled" values that mean sampled (as the SDK's B3 propagator reads them).
_B3_SAMPLED = frozenset({"1", "True", "true", "d"})


class _Parent(NamedTuple):
    """The caller's span, from the request's trace headers."""

    trace_id: int
    span_id: int
    sampled: bool
    trace_state: TraceState | None = None


def parse_parent(headers: Mapping[str, str]) -> _Parent | None:
    """The parent of the default propagators (W3C trace context, then B3 single, then B3 multi),
    read the way the SDK's propagators read it, in a few string operations instead of two
    propagator calls and a context object per Check."""
    value = headers.get("traceparent")
    if value is not None:
        match = _TRACEPARENT.match(value)
        if match is not None:
            version, trace_hex, span_hex, flags, rest = match.groups()
            valid = version != "ff" and not (version == "00" and rest)
            trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
            if valid and trace_id and span_id:
                state = headers.get("tracestate")
                trace_state = TraceState.from_header([state]) if state else None
                return _Parent(trace_id, span_id, bool(int(flags, 16) & 1), trace_state)
    single = headers.get("b3")
    if single:
        fields = single.split("-", 4)
        if 2 <= len(fields) <= 4:
            # Without a sampling field the decision is "deferred", which the SDK reads as sampled.
            return _b3_parent(fields[0], fields[1], fields[2] if len(fields) > 2 else "1", "")
        return None  # "0", "1" or "d" alone is a sampling decision without ids
    trace_hex, span_hex = headers.get("x-b3-traceid"), headers.get("x-b3-spanid")
    if trace_hex and span_hex:
        return _b3_parent(trace_hex, span_hex, headers.get("x-b3-sampled", ""), headers.get("x-b3-flags", ""))
    return None


def _b3_parent(trace_hex: str, span_hex: str, sampled: str, flags: str) -> _Parent | None:
    if len(trace_hex) not in (16, 32) or len(span_hex) != 16 or not _HEX.fullmatch(trace_hex + span_hex):
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    return _Parent(trace_id, span_id, sampled in _B3_SAMPLED or flags == "1")


def _sampling_rule(sampler: Sampler) -> Callable[[_Parent | None, int], bool] | None:
    """The decision of the standard samplers (OTEL_TRACES_SAMPLER: always_on, always_off,
    traceidratio and their parentbased_ forms, with the SDK's default parent delegates) as a plain
    function; None for any other sampler, which is then asked through its own API."""
    description = sampler.get_description()
    parent_based = False
    if description.startswith("ParentBased{root:"):
        root, sep, rest = description[len("ParentBased{root:") :].partition(",remoteParentSampled:")
        if rest != ("AlwaysOnSampler,remoteParentNotSampled:AlwaysOffSampler,localParentSampled:AlwaysOnSampler,"
                    "localParentNotSampled:AlwaysOffSampler}") or not sep:  # fmt: skip
            return None
        description, parent_based = root, True
    if description == "AlwaysOnSampler":
        def root_rule(trace_id: int) -> bool:
            return True
    elif description == "AlwaysOffSampler":
        def root_rule(trace_id: int) -> bool:
            return False
    elif description.startswith("TraceIdRatioBased{") and description.endswith("}"):
        try:
            bound = TraceIdRatioBased.get_bound_for_rate(float(description[len("TraceIdRatioBased{") : -1]))
        except ValueError:
            return None

        def root_rule(trace_id: int) -> bool:
            return trace_id & TraceIdRatioBased.TRACE_ID_LIMIT < bound
    else:
        return None
    if not parent_based:
        return lambda parent, trace_id: root_rule(trace_id)
    return lambda parent, trace_id: parent.sampled if parent is not None else root_rule(trace_id)


class Tracing:
    """Implements the pipeline's CheckTracer on the OpenTelemetry SDK, leanly.

    The SDK's general-purpose Span costs tens of microseconds (locks, attribute validation, a
    sampler call per span). A Check's spans are simpler: one sampling decision for the Check (the
    configured sampler, honouring the caller's decision), its stage spans share it, attributes are
    plain values built here, and finished spans go out as plain records (to the exporter process)
    or, in process, to the span processor as the SDK's ReadableSpans. Unsampled Checks create no
    span objects at all. With the default propagators and a standard sampler, the parent and the
    sampling decision are computed here too (``parse_parent``, ``_sampling_rule``): same results,
    a fraction of the cost.
    """

    def __init__(self, provider: TracerProvider, propagator: TextMapPropagator, subjects: SubjectHasher,
                 processor: SpanProcessor | None = None, shipper: SpanShipper | None = None, *,
                 standard_propagation: bool = True) -> None:  # fmt: skip
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
        #: Fast paths: None means ask the propagator / sampler through the OpenTelemetry API.
        self._parse = parse_parent if standard_propagation else None
        self._rule = _sampling_rule(self.sampler)
        self._random_ids = isinstance(self.ids, RandomIdGenerator)

    def _span_id(self) -> int:
        return random_span_id() if self._random_ids else self.ids.generate_span_id()

    def begin(self, message: external_auth_pb2.CheckRequest) -> _CheckSpan:
        return self.begin_headers(trace_headers(message))

    def begin_headers(self, headers: Mapping[str, str]) -> _CheckSpan:
        """``begin`` from the request's headers (Envoy's HTTP mode sends no CheckRequest)."""
        if self._parse is not None and self._rule is not None:
            parent = self._parse(headers)
            trace_id = parent.trace_id if parent is not None else self.ids.generate_trace_id()
            sampled = self._rule(parent, trace_id)
            trace_state = parent.trace_state if parent is not None else None
            parent_span_id, parent_remote, extra = (parent.span_id if parent is not None else 0), True, None
        else:
            otel_parent = self.propagator.extract(headers, getter=_GETTER)
            found = trace.get_current_span(otel_parent).get_span_context()
            parent_span_id = found.span_id if found.is_valid else 0
            parent_remote = found.is_remote
            trace_id = found.trace_id if parent_span_id else self.ids.generate_trace_id()
            result = self.sampler.should_sample(otel_parent, trace_id, "extauthz.check", SpanKind.SERVER)
            sampled = result.decision.is_sampled()
            trace_state = result.trace_state if result.trace_state is not None else (
                found.trace_state if parent_span_id else None)  # fmt: skip
            extra = dict(result.attributes) if sampled and result.attributes else None
        span_id = self._span_id()
        token = CURRENT_CHECK.set((trace_id, span_id))
        return _CheckSpan(self, trace_id, span_id, trace_state, parent_span_id, parent_remote, sampled, token, extra)

    def emit(self, record: CheckRecord) -> None:
        """Hand a Check's finished spans on: to the exporter process, or to the span processor."""
        if self.shipper is not None:
            self.shipper.add(record)
            return
        for span in expand(record, self._span_id):
            self.processor.on_end(sdk_span(span, self.resource, self.scope))

    def shutdown(self) -> None:
        """Flush pending spans (bounded by OTEL_BSP_EXPORT_TIMEOUT) and stop the exporter."""
        if self.shipper is not None:
            self.shipper.shutdown()
        self.provider.shutdown()


class _CheckSpan:
    """One Check's span (implements decision.CheckTrace). Its stages are noted as plain tuples and
    handed on, with the decision's facts, as one record when the Check ends (see check_spans)."""

    __slots__ = ("_ended", "_stages", "_state", "extra", "owner", "parent_remote", "parent_span_id", "sampled",
                 "span_hex", "span_id", "start", "token", "trace_hex", "trace_id")  # fmt: skip

    def __init__(self, owner: Tracing, trace_id: int, span_id: int, trace_state: TraceState | None,
                 parent_span_id: int, parent_remote: bool, sampled: bool, token: Token[tuple[int, int] | None],
                 extra: dict[str, Any] | None) -> None:  # fmt: skip
        self.owner = owner
        self.trace_id = trace_id
        self.span_id = span_id
        self.trace_hex = format(trace_id, "032x")
        self.span_hex = format(span_id, "016x")
        self._state = list(trace_state.items()) if trace_state else None
        #: The caller's span (0: none, this Check starts the trace).
        self.parent_span_id = parent_span_id
        self.parent_remote = parent_remote
        self.sampled = sampled
        self.token = token
        self.extra = extra
        self.start = time.time_ns()
        self._stages: list[tuple[Any, ...]] = []
        self._ended = False

    def stage(self, stage: str, check: str) -> tuple[str, str, int] | None:
        if not self.sampled:
            return None
        return (stage, check, time.time_ns())

    def end_stage(self, handle: tuple[str, str, int] | None, denial: Denial | None,
                  error: BaseException | None = None) -> None:  # fmt: skip
        if handle is None:
            return
        # The error's type only: an exception's text may quote request data. A stage that failed
        # without raising (an expression error: a 5xx denial) is an error span too.
        if error is not None:
            failure: str | None = type(error).__name__
        else:
            failure = denial.reason if denial is not None and denial.status >= 500 else None
        self._stages.append((handle[0], handle[1], handle[2], time.time_ns(),
                             None if denial is None else denial.reason, failure))  # fmt: skip

    def finish(self, decision: Decision) -> Decision:
        if self.sampled:
            facts = decision_facts(decision, self.owner.subjects)
            if decision.status >= 500:
                self._end(facts, _ERROR, decision.reason)
            else:
                self._end(facts, _UNSET, "")
        else:
            self._end(None, _UNSET, "")
        if decision.trace_id == self.trace_hex and decision.span_id == self.span_hex:
            return decision
        return decision._replace(trace_id=self.trace_hex, span_id=self.span_hex)

    def abort(self) -> None:
        self._end(None, _ERROR, "cancelled")

    def _end(self, facts: Facts | None, code: int, description: str) -> None:
        if self._ended:
            return
        self._ended = True
        CURRENT_CHECK.reset(self.token)
        if not self.sampled:
            return
        parent = self.parent_span_id
        self.owner.emit((self.trace_id, self.span_id, parent, bool(parent) and self.parent_remote, self._state,
                         self.start, time.time_ns(), code, description, facts, self.extra, self._stages))  # fmt: skip


def outcome(decision: Decision) -> str:
    """allow, deny or dry_run_deny: the ``decision`` label of metrics, spans and logs."""
    if decision.allowed:
        return "dry_run_deny" if decision.would_deny else "allow"
    return "deny"


def decision_facts(decision: Decision, subjects: SubjectHasher) -> Facts:
    """What a Check's span says of its decision, as check_spans.Facts: values only, never a secret.

    It runs for every sampled Check, in the sidecar: one tuple, no names (the exporter process
    puts the names back), and only attribute values that are safe to export.
    """
    method: str | None
    host: str | None
    path: str | None
    address: str | None
    kind: str | None
    request = decision.request
    if request is not None:
        path = request.path
        method, host, address = request.method, request.host, request.source_address
        if len(path) > _MAX_ATTRIBUTE_CHARS:
            path = path[:_MAX_ATTRIBUTE_CHARS]
    else:
        method = host = path = address = None
    identity = decision.identity
    if identity is not None:
        kind, source, subject = str(identity.get("kind", "")), identity.get("source"), identity.get("subject")
        if source:
            source = str(source)
        subject_attribute = subjects.attribute(str(subject)) if subject else None
    else:
        kind = source = subject_attribute = None
    extra = _safe_attributes(decision.attributes, subjects) if decision.attributes else None
    return (outcome(decision), decision.reason, int(decision.status), decision.decision_id, bool(decision.dry_run),
            decision.policy, decision.rule, bool(decision.would_deny), method, host, path, address, kind, source,
            subject_attribute, extra)  # fmt: skip


def _safe_attributes(found: Mapping[str, Any], subjects: SubjectHasher | None = None) -> dict[str, Any]:
    """A check's context attributes as span attributes: plain values, secret-named ones left out,
    personal ones under the subject setting."""
    attributes: dict[str, Any] = {}
    for name, value in found.items():
        if name == "error":
            attributes["error.type"] = str(value).split(":", 1)[0][:64]
        elif is_secret_name(name):
            continue
        elif name in PERSONAL_ATTRIBUTES:
            pair = subjects.attribute(str(value)) if subjects is not None else None
            if pair is not None:
                attributes[f"extauthz.{name}" + ("_hash" if pair[0].endswith("_hash") else "")] = pair[1]
        # Exactly bool, int, float or str (an enum member or other subclass becomes its plain value):
        # the record crosses to the exporter process by marshal, which takes nothing else.
        elif isinstance(value, bool):
            attributes[f"extauthz.{name}"] = bool(value)
        elif isinstance(value, int):
            attributes[f"extauthz.{name}"] = int(value)
        elif isinstance(value, float):
            attributes[f"extauthz.{name}"] = float(value)
        elif isinstance(value, str):
            attributes[f"extauthz.{name}"] = value[:_MAX_ATTRIBUTE_CHARS]  # a slice is a plain str
    return attributes


def decision_attributes(decision: Decision, subjects: SubjectHasher,
                        sampler_attributes: dict[str, Any] | None = None) -> dict[str, Any]:
    """The attributes of a Check's span: the call, what decided and why, never a secret."""
    return attributes_from_facts(decision_facts(decision, subjects), sampler_attributes)


def parse_trace_ids(headers: Mapping[str, str]) -> tuple[str, str]:
    """(trace id, parent span id) in hex from a request's traceparent or B3 headers, without the SDK.

    Used by the decision log when tracing is off, so log lines still join the request's trace; it
    reads the headers exactly as tracing does (``parse_parent``).
    """
    parent = parse_parent(headers)
    if parent is None:
        return "", ""
    return format(parent.trace_id, "032x"), format(parent.span_id, "016x")
