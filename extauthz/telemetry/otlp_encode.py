"""OTLP encoding straight from span records and decision-log records to protobuf wire bytes.

The SDK's encoder builds a ReadableSpan, then one protobuf object per span, attribute and value,
some 25 microseconds per span in Python. A Check's spans are small and alike: the same attribute
names and mostly the same values (policy, rule, decision, reason) over and over. Encoding each
``key=value`` pair once, keeping its bytes, and joining pre-encoded pieces makes a span cost a few
microseconds. The output parses into exactly the message the SDK's encoder produces (a test checks
it field by field), so any OTLP receiver sees no difference.

Decision-log records (the JSON line's object) become OTLP LogRecords the same way (:class:`LogEncoder`):
what repeats from decision to decision is kept encoded.

Wire format: https://protobuf.dev/programming-guides/encoding/ ; field numbers from
opentelemetry/proto/{trace,logs,common,resource}/v1/*.proto.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from extauthz._wire import varint
from extauthz.telemetry.check_spans import (
    DECISION_ID,
    EXTRA,
    SERVER,
    CheckRecord,
    Facts,
    attributes_from_facts,
    expand,
    random_span_id,
)

__all__ = ["LogEncoder", "SpanEncoder"]

_FIXED64 = struct.Struct("<Q")
_DOUBLE = struct.Struct("<d")
_FIXED32 = struct.Struct("<I")

# Span (trace.proto)
_TRACE_ID, _SPAN_ID, _TRACE_STATE, _PARENT_SPAN_ID, _NAME = b"\x0a", b"\x12", b"\x1a", b"\x22", b"\x2a"
_KIND, _START, _END, _ATTRIBUTE, _STATUS = b"\x30", b"\x39", b"\x41", b"\x4a", b"\x7a"
_FLAGS = b"\x85\x01"  # field 16, fixed32
# Status: message = 2, code = 3
_STATUS_MESSAGE, _STATUS_CODE = b"\x12", b"\x18"
# KeyValue: key = 1, value = 2; AnyValue: string 1, bool 2, int 3, double 4
_KEY, _VALUE = b"\x0a", b"\x12"
_STRING, _BOOL, _INT, _DOUBLE_TAG = b"\x0a", b"\x10", b"\x18", b"\x21"
# ExportTraceServiceRequest.resource_spans = 1; ResourceSpans.resource = 1, .scope_spans = 2;
# Resource.attributes = 1; ScopeSpans.scope = 1, .spans = 2; InstrumentationScope.name = 1, .version = 2
_RESOURCE_SPANS, _RESOURCE, _SCOPE_SPANS, _RESOURCE_ATTRIBUTE = b"\x0a", b"\x0a", b"\x12", b"\x0a"
_SCOPE, _SPANS, _SCOPE_NAME, _SCOPE_VERSION = b"\x0a", b"\x12", b"\x0a", b"\x12"

#: Span.flags: the parent's is-remote bit is known (0x100), and set when it is remote (0x200).
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200
_LOCAL_FLAGS = _FLAGS + _FIXED32.pack(_HAS_IS_REMOTE)
_REMOTE_FLAGS = _FLAGS + _FIXED32.pack(_HAS_IS_REMOTE | _IS_REMOTE)

#: Pre-encoded attributes kept per name, and names kept; beyond that a cache starts over (values such
#: as decision ids never repeat).
_CACHE_LIMIT = 8192

# Fixed-size runs of a span, packed in one call each: ids (bytes 16 and 8 long) and times (fixed64).
_LOW64 = (1 << 64) - 1
_TRACE_ID_HEAD, _SPAN_ID_HEAD, _PARENT_HEAD = _TRACE_ID + b"\x10", _SPAN_ID + b"\x08", _PARENT_SPAN_ID + b"\x08"
_IDS = struct.Struct(">2sQQ2sQ")
_IDS_WITH_PARENT = struct.Struct(">2sQQ2sQ2sQ")
_TIMES = struct.Struct("<1sQ1sQ")
_EMPTY_STATUS = _STATUS + b"\x00"
_DECISION_ID_KEY = _KEY + bytes([len("extauthz.decision_id")]) + b"extauthz.decision_id"


def _trace_state(state: list[tuple[str, str]] | None) -> bytes:
    # After the ids here, before them in the SDK: field order means nothing to a parser.
    return _field(_TRACE_STATE, ",".join(f"{k}={v}" for k, v in state).encode()) if state else b""


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, payload."""
    return tag + varint(len(payload)) + payload


def _any_value(value: Any) -> bytes:
    if isinstance(value, bool):
        return _BOOL + (b"\x01" if value else b"\x00")
    if isinstance(value, str):
        return _field(_STRING, value.encode("utf-8", "replace"))
    if isinstance(value, int):
        return _INT + varint(value)
    if isinstance(value, float):
        return _DOUBLE_TAG + _DOUBLE.pack(value)
    return _field(_STRING, str(value).encode("utf-8", "replace"))


def _key_value(key: str, value: Any) -> bytes:
    return _field(_KEY, key.encode("utf-8", "replace")) + _field(_VALUE, _any_value(value))


def _resource_and_scope(resource: Mapping[str, Any], scope_name: str,
                        scope_version: str | None) -> tuple[bytes, bytes]:  # fmt: skip
    """The encoded Resource and InstrumentationScope, the same for every export of an encoder."""
    encoded = _field(_RESOURCE, b"".join(_field(_RESOURCE_ATTRIBUTE, _key_value(k, v)) for k, v in resource.items()))
    scope = _field(_SCOPE_NAME, scope_name.encode())
    if scope_version:
        scope += _field(_SCOPE_VERSION, scope_version.encode())
    return encoded, _field(_SCOPE, scope)


class SpanEncoder:
    """Turns span records (see span_export.SpanRecord) into an ExportTraceServiceRequest's bytes."""

    def __init__(self, resource: Mapping[str, Any], scope_name: str, scope_version: str | None = None) -> None:
        self._resource, self._scope = _resource_and_scope(resource, scope_name, scope_version)
        self._attributes: dict[str, dict[Any, bytes]] = {}
        #: (name, kind) -> the span's encoded name and kind.
        self._names: dict[tuple[str, int], bytes] = {}
        #: A stage's (stage, check, denial, error) -> its encoded head, what follows its times, and
        #: its length without a trace state.
        self._stages: dict[tuple[Any, ...], tuple[bytes, bytes, int]] = {}
        #: A Check span's facts but the decision id -> what precedes and follows the decision id.
        self._check_tails: dict[tuple[Any, ...], tuple[bytes, bytes]] = {}

    def _attribute(self, key: str, value: Any) -> bytes:
        # Keyed by name, then by value: no tuple per attribute. Only strings are keyed by themselves:
        # True == 1 == 1.0 in a dict, and they encode differently.
        values = self._attributes.get(key)
        if values is None:
            if len(self._attributes) >= _CACHE_LIMIT:
                self._attributes.clear()
            values = self._attributes[key] = {}
        value_key = value if type(value) is str else (type(value), value)
        encoded = values.get(value_key)
        if encoded is None:
            if len(values) >= _CACHE_LIMIT:
                values.clear()
            encoded = values[value_key] = _field(_ATTRIBUTE, _key_value(key, value))
        return encoded

    def _ids(self, trace_id: int, span_id: int, parent_id: int) -> bytes:
        if parent_id:
            return _IDS_WITH_PARENT.pack(_TRACE_ID_HEAD, trace_id >> 64, trace_id & _LOW64, _SPAN_ID_HEAD, span_id,
                                         _PARENT_HEAD, parent_id)  # fmt: skip
        return _IDS.pack(_TRACE_ID_HEAD, trace_id >> 64, trace_id & _LOW64, _SPAN_ID_HEAD, span_id)

    def span(self, record: tuple[Any, ...]) -> bytes:
        """One span as a ScopeSpans ``spans`` field (tag, length, Span), as :meth:`request` joins them.
        ``kind`` is the SDK's SpanKind value, which is one less than OTLP's (the SDK has no UNSPECIFIED)."""
        (name, trace_id, span_id, parent_id, parent_remote, _flags, state, kind, start, end, attributes,
         code, description) = record  # fmt: skip
        tail = self._tail(attributes, code, description, parent_id and parent_remote)
        return _field(_SPANS, b"".join((
            self._ids(trace_id, span_id, parent_id), _trace_state(state), self._head(name, kind),
            _TIMES.pack(_START, start, _END, end), tail,
        )))  # fmt: skip

    def _head(self, name: str, kind: int) -> bytes:
        head = self._names.get((name, kind))
        if head is None:
            head = _field(_NAME, name.encode("utf-8", "replace")) + _KIND + varint(kind + 1)
            self._names[(name, kind)] = head
        return head

    def _tail(self, attributes: Mapping[str, Any] | None, code: int, description: str, remote: Any) -> bytes:
        """What follows the times: attributes, status and flags."""
        attribute = self._attribute
        parts = [attribute(k, v) for k, v in attributes.items()] if attributes else []
        if description or code:
            status = _field(_STATUS_MESSAGE, description.encode("utf-8", "replace")) if description else b""
            if code:
                status += _STATUS_CODE + varint(code)
            parts.append(_field(_STATUS, status))
        else:
            parts.append(_EMPTY_STATUS)
        parts.append(_REMOTE_FLAGS if remote else _LOCAL_FLAGS)
        return b"".join(parts)

    def check_spans(self, record: CheckRecord, span_id: Callable[[], int] = random_span_id) -> list[bytes]:
        """The spans of one Check record (see check_spans), encoded as :meth:`span` encodes each span of
        ``check_spans.expand(record)``, but what repeats from Check to Check is kept encoded:
        a stage span costs two struct packs and a join."""
        (trace_id, check_id, parent_id, parent_remote, state, start, end, code, description, facts, sampler,
         stages) = record  # fmt: skip
        state_bytes = _trace_state(state)
        state_size = len(state_bytes)
        high, low = trace_id >> 64, trace_id & _LOW64
        known = self._stages
        spans = []
        for stage in stages:
            key = (stage[0], stage[1], stage[4], stage[5])
            rest = known.get(key)
            if rest is None:
                if len(known) >= _CACHE_LIMIT:
                    known.clear()
                rest = known[key] = self._stage_rest(stage)
            spans.append(b"".join((
                _SPANS, varint(rest[2] + state_size),
                _IDS_WITH_PARENT.pack(_TRACE_ID_HEAD, high, low, _SPAN_ID_HEAD, span_id(), _PARENT_HEAD, check_id),
                state_bytes, rest[0], _TIMES.pack(_START, stage[2], _END, stage[3]), rest[1],
            )))  # fmt: skip
        if sampler or (facts is not None and facts[EXTRA]):
            tail = self._tail(attributes_from_facts(facts, sampler), code, description, parent_id and parent_remote)
        else:
            tail = self._check_tail(facts, code, description, bool(parent_id and parent_remote))
        head = self._head("extauthz.check", SERVER)
        ids = self._ids(trace_id, check_id, parent_id)
        spans.append(b"".join((
            _SPANS, varint(len(ids) + state_size + len(head) + _TIMES.size + len(tail)),
            ids, state_bytes, head, _TIMES.pack(_START, start, _END, end), tail,
        )))  # fmt: skip
        return spans

    def _stage_rest(self, stage: tuple[Any, ...]) -> tuple[bytes, bytes, int]:
        """A stage span's encoded head, what follows its times (the same for every Check), and its
        length without a trace state."""
        span = expand((0, 0, 0, False, None, 0, 0, 0, "", None, None, [stage]), int)[0]
        name, kind, attributes, code, description = span[0], span[7], span[10], span[11], span[12]
        head, tail = self._head(name, kind), self._tail(attributes, code, description, False)
        return head, tail, _IDS_WITH_PARENT.size + len(head) + _TIMES.size + len(tail)

    def _check_tail(self, facts: Facts | None, code: int, description: str, remote: bool) -> bytes:
        """The Check span's attributes, status and flags. Only the decision id differs between two
        Checks decided alike: the rest is kept encoded, before and after it."""
        if facts is None:
            return self._tail(attributes_from_facts(None), code, description, remote)
        key = (facts[:DECISION_ID], facts[DECISION_ID + 1 : EXTRA], code, description, remote)
        pieces = self._check_tails.get(key)
        if pieces is None:
            if len(self._check_tails) >= _CACHE_LIMIT:
                self._check_tails.clear()
            encoded = self._tail(attributes_from_facts(facts), code, description, remote)
            marker = _field(_ATTRIBUTE, _key_value("extauthz.decision_id", facts[DECISION_ID]))
            before, found, after = encoded.partition(marker)
            if not found:  # cannot happen: the attributes always hold the decision id
                return encoded
            pieces = self._check_tails[key] = (before, after)
        # Never the same twice: encoded here, not kept.
        value = _field(_STRING, facts[DECISION_ID].encode("utf-8", "replace"))
        decision_id = _field(_ATTRIBUTE, _DECISION_ID_KEY + _field(_VALUE, value))
        return b"".join((pieces[0], decision_id, pieces[1]))

    def request(self, spans: Iterable[bytes]) -> bytes:
        """The ExportTraceServiceRequest holding ``spans`` (from :meth:`span` or :meth:`check_spans`,
        each already a ScopeSpans ``spans`` field): the spans are copied once, not once per level."""
        body = b"".join(spans)
        scope_spans = len(self._scope) + len(body)
        scope_head = _SCOPE_SPANS + varint(scope_spans)
        resource_spans = len(self._resource) + len(scope_head) + scope_spans
        return b"".join((_RESOURCE_SPANS, varint(resource_spans), self._resource, scope_head, self._scope, body))


# --- logs (logs.proto, logs_service.proto) ------------------------------------------------------------
# LogRecord: time_unix_nano 1 (fixed64), severity_number 2, severity_text 3, body 5, flags 8 (fixed32),
# trace_id 9, span_id 10, observed_time_unix_nano 11 (fixed64), event_name 12.
_LOG_TIME, _LOG_SEVERITY, _LOG_SEVERITY_TEXT, _LOG_BODY = b"\x09", b"\x10", b"\x1a", b"\x2a"
_LOG_TRACE_ID, _LOG_SPAN_ID, _LOG_OBSERVED, _LOG_EVENT_NAME = b"\x4a", b"\x52", b"\x59", b"\x62"
# AnyValue: array_value 5 (ArrayValue.values 1), kvlist_value 6 (KeyValueList.values 1)
_ARRAY, _KVLIST, _LIST_VALUES = b"\x2a", b"\x32", b"\x0a"
# ExportLogsServiceRequest.resource_logs 1; ResourceLogs.resource 1, .scope_logs 2; ScopeLogs.scope 1,
# .log_records 2 (the same numbers as the spans' request).
_RESOURCE_LOGS, _SCOPE_LOGS, _LOG_RECORDS = b"\x0a", b"\x12", b"\x12"
#: SeverityNumber INFO and WARN: an allow is information, a denial (or a dry-run would-deny) a warning.
_SEVERITIES = {"allow": (9, b"INFO"), "deny": (13, b"WARN"), "dry_run_deny": (13, b"WARN")}
#: Record fields whose values never repeat: encoded every time, never cached.
_UNIQUE_FIELDS = frozenset({"time", "decision_id", "trace_id", "span_id", "latency_ms", "path", "query", "headers"})


def _deep_value(value: Any) -> bytes:
    """An AnyValue's content for JSON-like values: maps become key-value lists, lists arrays."""
    if value is None:
        return b""
    if isinstance(value, Mapping):
        pairs = b"".join(_field(_LIST_VALUES, _field(_KEY, str(k).encode("utf-8", "replace"))
                                + _field(_VALUE, _deep_value(v))) for k, v in value.items())  # fmt: skip
        return _field(_KVLIST, pairs)
    if isinstance(value, list | tuple):
        return _field(_ARRAY, b"".join(_field(_LIST_VALUES, _deep_value(v)) for v in value))
    return _any_value(value)


class LogEncoder:
    """Turns decision-log records (the JSON line's object) into an ExportLogsServiceRequest's bytes.

    Each record is one LogRecord: its body is the record as a map (the same fields as the JSON
    line, so docs/observability.md describes both), ``event_name`` is ``extauthz.decision``, the
    severity INFO for an allow and WARN for a denial, and the trace and span ids are the decision's,
    so a collector joins each decision to its trace. Fields that repeat from decision to decision
    (decision, reason, policy, rule, identity) are kept encoded.
    """

    def __init__(self, resource: Mapping[str, Any], scope_name: str, scope_version: str | None = None) -> None:
        self._resource, self._scope = _resource_and_scope(resource, scope_name, scope_version)
        self._event = _field(_LOG_EVENT_NAME, b"extauthz.decision")
        self._fields: dict[tuple[Any, ...], bytes] = {}
        #: Field name -> its encoded KeyValue key.
        self._keys: dict[str, bytes] = {}

    def _pair(self, key: str, value: Any) -> bytes:
        """One field of the body: a KeyValueList ``values`` entry. A string, the common case, is
        written out here; a (name, value) that repeats is kept encoded."""
        kind = type(value)
        cache_key: Any = None
        if (kind is str or kind is bool or kind is int) and key not in _UNIQUE_FIELDS:
            cache_key = (key, value) if kind is str else (key, kind, value)
            encoded = self._fields.get(cache_key)
            if encoded is not None:
                return encoded
        key_part = self._keys.get(key)
        if key_part is None:
            if len(self._keys) >= _CACHE_LIMIT:
                self._keys.clear()
            key_part = self._keys[key] = _field(_KEY, key.encode("utf-8", "replace"))
        if kind is str:
            data = value.encode("utf-8", "replace")
            any_value = _STRING + varint(len(data)) + data
        else:
            any_value = _deep_value(value)
        pair = key_part + _VALUE + varint(len(any_value)) + any_value
        encoded = _LIST_VALUES + varint(len(pair)) + pair
        if cache_key is not None:
            if len(self._fields) >= _CACHE_LIMIT:
                self._fields.clear()
            self._fields[cache_key] = encoded
        return encoded

    def record(self, when_ns: int, record: Mapping[str, Any]) -> bytes:
        """One decision as a ScopeLogs ``log_records`` field (tag, length, LogRecord)."""
        number, text = _SEVERITIES.get(str(record.get("decision")), (9, b"INFO"))
        pair = self._pair
        body = _field(_KVLIST, b"".join([pair(k, v) for k, v in record.items()]))
        parts = [_LOG_TIME, _FIXED64.pack(when_ns), _LOG_SEVERITY, varint(number), _field(_LOG_SEVERITY_TEXT, text),
                 _field(_LOG_BODY, body)]  # fmt: skip
        trace_id, span_id = record.get("trace_id"), record.get("span_id")
        if trace_id and span_id and len(trace_id) == 32 and len(span_id) == 16:
            with contextlib.suppress(ValueError):  # not hex: the record keeps them in its body only
                parts += [_field(_LOG_TRACE_ID, bytes.fromhex(trace_id)), _field(_LOG_SPAN_ID, bytes.fromhex(span_id))]
        parts += [_LOG_OBSERVED, _FIXED64.pack(when_ns), self._event]
        return _field(_LOG_RECORDS, b"".join(parts))

    def request(self, records: Iterable[bytes]) -> bytes:
        """The ExportLogsServiceRequest holding ``records`` (from :meth:`record`)."""
        body = b"".join(records)
        scope_logs = len(self._scope) + len(body)
        scope_head = _SCOPE_LOGS + varint(scope_logs)
        resource_logs = len(self._resource) + len(scope_head) + scope_logs
        return b"".join((_RESOURCE_LOGS, varint(resource_logs), self._resource, scope_head, self._scope, body))
