"""Our OTLP span encoding parses into exactly what the SDK's own encoder builds from the same spans."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from extauthz.telemetry.otlp_encode import SpanEncoder

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
RESOURCE = {"service.name": "extauthz", "service.version": "1.2.3", "telemetry.sdk.language": "python"}

RECORDS = [
    # name, trace, span, parent, parent remote, flags, trace state, kind, start, end, attributes, code, text
    ("extauthz.check", TRACE_ID, 0x1111, 0x00F067AA0BA902B7, True, 1, [("vendor", "v1"), ("other", "x")],
     SpanKind.SERVER.value, 1_700_000_000_000_000_000, 1_700_000_000_000_050_000,
     {"rpc.system": "grpc", "extauthz.status": 200, "extauthz.dry_run": False, "ratio": 0.25,
      "negative": -3, "big": 2**62, "unicode": "grüße ✓"}, StatusCode.UNSET.value, ""),
    ("extauthz.rules", TRACE_ID, 0x2222, 0x1111, False, 1, None, SpanKind.INTERNAL.value, 5, 9,
     {"extauthz.check": "rules", "extauthz.denied": True}, StatusCode.ERROR.value, "KeyError"),
    ("extauthz.check", TRACE_ID + 1, 0x3333, 0, False, 1, None, SpanKind.SERVER.value, 1, 2, {},
     StatusCode.ERROR.value, "internal_error"),
]  # fmt: skip


def _sdk_span(record: tuple) -> ReadableSpan:
    name, trace_id, span_id, parent_id, remote, flags, state, kind, start, end, attributes, code, text = record
    trace_state = TraceState(state) if state else None
    context = SpanContext(trace_id, span_id, False, TraceFlags(flags), trace_state)
    parent = SpanContext(trace_id, parent_id, remote, TraceFlags(flags), trace_state) if parent_id else None
    return ReadableSpan(name, context, parent, Resource(RESOURCE), attributes, kind=SpanKind(kind),
                        status=Status(StatusCode(code), text or None), start_time=start, end_time=end,
                        instrumentation_scope=InstrumentationScope("extauthz"))  # fmt: skip


def test_encoding_matches_the_sdk_encoder() -> None:
    encoder = SpanEncoder(RESOURCE, "extauthz")
    ours = ExportTraceServiceRequest.FromString(encoder.request(encoder.span(r) for r in RECORDS))
    sdk = encode_spans([_sdk_span(r) for r in RECORDS])
    assert ours == sdk
    # The pre-encoded attribute cache gives the same bytes the second time.
    again = ExportTraceServiceRequest.FromString(encoder.request(encoder.span(r) for r in RECORDS))
    assert again == sdk


@pytest.mark.parametrize("value", [0, 1, 127, 128, 2**63 - 1, -1, -(2**63)])
def test_integers_survive_the_round_trip(value: int) -> None:
    encoder = SpanEncoder({}, "extauthz")
    record = ("s", TRACE_ID, 1, 0, False, 1, None, 0, 1, 2, {"n": value}, 0, "")
    span = ExportTraceServiceRequest.FromString(encoder.request([encoder.span(record)])).resource_spans[0]
    assert span.scope_spans[0].spans[0].attributes[0].value.int_value == value


def _facts(**changes: object) -> tuple:
    facts = {"outcome": "allow", "reason": "allowed", "status": 200, "decision_id": "d-1", "dry_run": False,
             "policy": "orders-api", "rule": "read", "would_deny": False, "method": "GET",
             "host": "orders.example.com", "path": "/api/orders", "address": "10.0.0.7", "kind": "jwt",
             "source": "issuer", "subject": ("extauthz.identity.subject_hash", "ab12"), "extra": None}  # fmt: skip
    facts.update(changes)
    return tuple(facts.values())


STAGES = [("select", "", 10, 11, None, None), ("identity", "identity", 11, 14, None, None),
          ("rules", "rules", 14, 15, "denied_by_rule", None), ("quota", "quota", 15, 16, None, "TimeoutError")]  # fmt: skip
CHECK_RECORDS = [
    # trace, span, parent, remote, state, start, end, code, text, facts, sampler attributes, stages
    (TRACE_ID, 0x1111, 0x00F067AA0BA902B7, True, [("vendor", "v1")], 10, 20, 0, "", _facts(), None, STAGES),
    (TRACE_ID, 0x1112, 0, False, None, 10, 20, 0, "", _facts(decision_id="d-2"), None, STAGES[:1]),
    (TRACE_ID, 0x1113, 0x22, False, None, 10, 20, 2, "internal_error",
     _facts(outcome="deny", reason="internal_error", status=503, method=None, kind=None,
            extra={"error.type": "KeyError", "extauthz.quota": "per-user"}), None, STAGES),
    (TRACE_ID, 0x1114, 0x22, True, None, 10, 20, 0, "", _facts(subject=None, rule=""), {"sampler.note": "x"}, []),
    (TRACE_ID, 0x1115, 0x22, True, None, 10, 20, 2, "cancelled", None, None, STAGES[:2]),
]  # fmt: skip


@pytest.mark.parametrize("record", CHECK_RECORDS)
def test_check_records_encode_as_their_expanded_spans(record: tuple) -> None:
    from extauthz.telemetry.check_spans import expand

    encoder = SpanEncoder(RESOURCE, "extauthz")
    for _ in range(2):  # the second time from what the encoder kept
        ours = ExportTraceServiceRequest.FromString(
            encoder.request(encoder.check_spans(record, iter(range(0x9000, 0x9100)).__next__)))
        sdk = encode_spans([_sdk_span(span) for span in expand(record, iter(range(0x9000, 0x9100)).__next__)])
        assert ours == sdk
    spans = sdk.resource_spans[0].scope_spans[0].spans
    assert [s.name for s in spans] == [f"extauthz.{stage[0]}" for stage in record[-1]] + ["extauthz.check"]
    assert all(s.parent_span_id == spans[-1].span_id for s in spans[:-1])


_TEXT = st.sampled_from(["", "a", "orders-api", "/api/orders", "grüße", "x" * 40])
_MAYBE = st.one_of(st.none(), _TEXT)
_VALUE = st.one_of(st.booleans(), st.integers(-3, 2**40), st.floats(allow_nan=False, allow_infinity=False), _TEXT)
# Facts as decision_facts makes them: the documented types, in the documented places.
_FACTS = st.tuples(
    st.sampled_from(["allow", "deny", "dry_run_deny"]), _TEXT, st.sampled_from([200, 400, 403, 429, 503]), _TEXT,
    st.booleans(), _TEXT, _TEXT, st.booleans(), _MAYBE, _MAYBE, _MAYBE, _MAYBE, _MAYBE, _MAYBE,
    st.one_of(st.none(), st.tuples(st.sampled_from(["extauthz.identity.subject", "extauthz.identity.subject_hash"]),
                                   _TEXT)),
    st.one_of(st.none(), st.dictionaries(st.sampled_from(["extauthz.quota", "error.type", "extauthz.n"]), _VALUE,
                                         min_size=1, max_size=2)),
)
_STAGE = st.tuples(st.sampled_from(["select", "identity", "rules", "quota"]), st.sampled_from(["", "jwt", "rules"]),
                   st.integers(0, 2**62), st.integers(0, 2**62), _MAYBE, st.sampled_from([None, "KeyError"]))
_RECORD = st.tuples(
    st.integers(1, 2**128 - 1), st.integers(1, 2**64 - 1), st.sampled_from([0, 0x22]), st.booleans(),
    st.sampled_from([None, [("vendor", "v1")]]), st.integers(0, 2**62), st.integers(0, 2**62), st.sampled_from([0, 2]),
    st.sampled_from(["", "cancelled", "internal_error"]), st.one_of(st.none(), _FACTS),
    st.one_of(st.none(), st.dictionaries(st.sampled_from(["sampler.x", "extauthz.decision"]), _VALUE, max_size=2)),
    st.lists(_STAGE, max_size=4),
)  # fmt: skip


@given(st.lists(_RECORD, min_size=1, max_size=6))
@settings(max_examples=300, deadline=None)
def test_check_records_encode_as_their_spans_whatever_the_encoder_kept(records: list) -> None:
    from extauthz.telemetry.check_spans import expand

    encoder = SpanEncoder(RESOURCE, "extauthz")  # one encoder for the sequence: its caches carry over
    for record in records:
        ours = encoder.check_spans(record, iter(range(1, 99)).__next__)
        fresh = SpanEncoder(RESOURCE, "extauthz")
        assert ours == [fresh.span(span) for span in expand(record, iter(range(1, 99)).__next__)]
