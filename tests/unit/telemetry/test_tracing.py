"""Check spans: parentage from the request's trace headers, stage spans, attributes, no secrets."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, ClassVar

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from extauthz.context import CheckContext, Denial
from extauthz.decision import Authorizer
from extauthz.policy import load_folder
from extauthz.policy.compiler import CompiledPolicy, PolicySet
from extauthz.policy.routing import Route, Router
from extauthz.samples import check_request_from_sample
from extauthz.telemetry.tracing import (
    SubjectHasher,
    TracingConfigError,
    decision_attributes,
    parse_trace_ids,
    tracing_from_env,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
SECRET_TOKEN = "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LXRva2Vu.c2lnbmF0dXJl"

ORDERS = """
match: {paths: [/api/orders]}
rules:
  - {name: no-deletes, when: "request.method == 'DELETE'", decision: deny}
  - {name: reads, when: "request.method == 'GET'", decision: allow}
response:
  headers:
    x-method: "request.method"
"""


def _authorizer(folder: Path, tracing: Any) -> Authorizer:
    authorizer = Authorizer(load_folder(folder))
    authorizer.tracer = tracing
    return authorizer


def _decide(authorizer: Authorizer, **sample: Any):
    return asyncio.run(authorizer.check(check_request_from_sample(sample)))


def _by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    return {span.name: span for span in spans}


def test_check_span_is_child_of_traceparent_with_stage_spans(policy_dir, policy_yaml, tracing, span_exporter) -> None:
    authorizer = _authorizer(policy_dir(**{"o.yaml": policy_yaml("orders", ORDERS)}), tracing)
    decision = _decide(authorizer, method="GET", path="/api/orders",
                       headers={"traceparent": TRACEPARENT, "tracestate": "vendor=1"})  # fmt: skip
    spans = _by_name(span_exporter.get_finished_spans())
    assert set(spans) == {"extauthz.check", "extauthz.select", "extauthz.rules", "extauthz.response"}
    check = spans["extauthz.check"]
    assert check.kind is SpanKind.SERVER
    assert format(check.context.trace_id, "032x") == TRACE_ID
    assert format(check.parent.span_id, "016x") == PARENT_ID and check.parent.is_remote
    assert check.context.trace_state.get("vendor") == "1"
    for name in ("extauthz.select", "extauthz.rules", "extauthz.response"):
        assert spans[name].parent.span_id == check.context.span_id
        assert spans[name].context.trace_id == check.context.trace_id
    assert spans["extauthz.rules"].attributes["extauthz.check"] == "rules"
    attrs = check.attributes
    assert attrs["extauthz.decision"] == "allow" and attrs["extauthz.reason"] == "allowed"
    assert attrs["extauthz.policy"] == "orders" and attrs["extauthz.rule"] == "reads"
    assert attrs["extauthz.dry_run"] is False
    assert attrs["extauthz.identity.kind"] == "anonymous"
    assert attrs["http.request.method"] == "GET" and attrs["url.path"] == "/api/orders"
    assert check.status.status_code is StatusCode.UNSET
    # the decision carries the ids, for the decision log
    assert decision.trace_id == TRACE_ID and decision.span_id == format(check.context.span_id, "016x")


def test_denying_stage_is_marked_and_later_stages_do_not_run(policy_dir, policy_yaml, tracing, span_exporter) -> None:
    authorizer = _authorizer(policy_dir(**{"o.yaml": policy_yaml("orders", ORDERS)}), tracing)
    _decide(authorizer, method="DELETE", path="/api/orders", headers={"traceparent": TRACEPARENT})
    spans = _by_name(span_exporter.get_finished_spans())
    assert "extauthz.response" not in spans
    assert spans["extauthz.rules"].attributes["extauthz.denied"] is True
    assert spans["extauthz.rules"].attributes["extauthz.reason"] == "denied_by_rule"
    assert spans["extauthz.check"].attributes["extauthz.decision"] == "deny"
    assert spans["extauthz.check"].attributes["extauthz.rule"] == "no-deletes"


@pytest.mark.parametrize(
    "headers",
    [
        {"b3": f"{TRACE_ID}-{PARENT_ID}-1"},
        {"x-b3-traceid": TRACE_ID, "x-b3-spanid": PARENT_ID, "x-b3-sampled": "1"},
        # both present: W3C wins
        {"traceparent": TRACEPARENT, "b3": f"{'1' * 32}-{'2' * 16}-1"},
    ],
    ids=["b3-single", "b3-multi", "traceparent-over-b3"],
)
def test_b3_and_w3c_parents(headers, policy_dir, policy_yaml, tracing, span_exporter) -> None:
    authorizer = _authorizer(policy_dir(**{"o.yaml": policy_yaml("orders", ORDERS)}), tracing)
    _decide(authorizer, method="GET", path="/api/orders", headers=headers)
    check = _by_name(span_exporter.get_finished_spans())["extauthz.check"]
    assert format(check.context.trace_id, "032x") == TRACE_ID
    assert format(check.parent.span_id, "016x") == PARENT_ID


def test_a_configured_propagator_and_sampler_go_through_the_sdk(policy_dir, policy_yaml, span_exporter) -> None:
    """OTEL_PROPAGATORS set, or a sampler that is not one of the built-in six: no native shortcut."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    from extauthz.telemetry.tracing import Tracing

    sampler = ParentBased(TraceIdRatioBased(0.0), remote_parent_not_sampled=TraceIdRatioBased(1.0))
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    tracing = Tracing(provider, TraceContextTextMapPropagator(), SubjectHasher("none"), standard_propagation=False)
    assert tracing._parse is None and tracing._rule is None
    authorizer = _authorizer(policy_dir(**{"o.yaml": policy_yaml("orders", ORDERS)}), tracing)
    # An unsampled parent, which this sampler samples anyway.
    decision = _decide(authorizer, method="GET", path="/api/orders",
                       headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00", "b3": f"{'1' * 32}-{'2' * 16}-1"})
    check = _by_name(span_exporter.get_finished_spans())["extauthz.check"]
    assert format(check.parent.span_id, "016x") == PARENT_ID and check.parent.is_remote
    assert decision.trace_id == TRACE_ID
    provider.shutdown()


def test_without_trace_headers_a_root_span_is_started(policy_dir, policy_yaml, tracing, span_exporter) -> None:
    authorizer = _authorizer(policy_dir(**{"o.yaml": policy_yaml("orders", ORDERS)}), tracing)
    decision = _decide(authorizer, method="GET", path="/api/orders")
    check = _by_name(span_exporter.get_finished_spans())["extauthz.check"]
    assert check.parent is None
    assert decision.trace_id == format(check.context.trace_id, "032x")


def test_unsampled_parent_records_nothing_but_keeps_ids(policy_dir, policy_yaml, tracing, span_exporter) -> None:
    authorizer = _authorizer(policy_dir(**{"o.yaml": policy_yaml("orders", ORDERS)}), tracing)
    decision = _decide(authorizer, method="GET", path="/api/orders",
                       headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00"})  # fmt: skip
    assert span_exporter.get_finished_spans() == ()
    assert decision.trace_id == TRACE_ID and decision.allowed


class _Identify:
    """Sets an identity and quota facts the way identity and quota checks do."""

    may_wait: ClassVar[bool] = False

    async def check(self, ctx: CheckContext) -> Denial | None:
        ctx.identity = {"kind": "jwt", "source": "bearer", "subject": "alice@example.com", "claims": {"tok": "x"}}
        ctx.attributes.update({"quota": "per-user", "quota_remaining": 41, "access_token": SECRET_TOKEN})
        return None


class _Explode:
    may_wait: ClassVar[bool] = False

    async def check(self, ctx: CheckContext) -> Denial | None:
        raise RuntimeError(f"boom {SECRET_TOKEN}")


def _custom(*checks: tuple[str, Any]) -> PolicySet:
    policy = CompiledPolicy("custom", "c.yaml", False, tuple(c for _, c in checks), tuple(n for n, _ in checks), False)
    return PolicySet((policy,), Router([Route("", "", frozenset(), policy)]))


def _all_values(spans: tuple[ReadableSpan, ...]) -> str:
    return repr([(s.name, dict(s.attributes or {}), s.status.description) for s in spans])


def test_identity_quota_attributes_and_no_secrets(tracing, span_exporter) -> None:
    from extauthz.checks.rules import Rule, RulesCheck

    rules = RulesCheck((Rule("all", None, True, None),), "custom")
    authorizer = Authorizer(_custom(("identity", _Identify()), ("rules", rules)))
    authorizer.tracer = tracing
    _decide(authorizer, method="GET", path="/p?access_token=" + SECRET_TOKEN,
            headers={"authorization": f"Bearer {SECRET_TOKEN}", "cookie": f"session={SECRET_TOKEN}",
                     "traceparent": TRACEPARENT})  # fmt: skip
    spans = span_exporter.get_finished_spans()
    check = _by_name(spans)["extauthz.check"]
    attrs = check.attributes
    assert attrs["extauthz.identity.kind"] == "jwt" and attrs["extauthz.identity.source"] == "bearer"
    assert "extauthz.identity.subject" not in attrs  # hashed by default
    assert len(attrs["extauthz.identity.subject_hash"]) == 32
    assert attrs["extauthz.quota"] == "per-user" and attrs["extauthz.quota_remaining"] == 41
    assert attrs["url.path"] == "/p"  # no query
    assert _by_name(spans)["extauthz.identity"].parent.span_id == check.context.span_id
    dumped = _all_values(spans)
    assert SECRET_TOKEN not in dumped and "alice" not in dumped and "c2VjcmV0" not in dumped


def test_errors_set_span_status_without_the_message(tracing, span_exporter) -> None:
    authorizer = Authorizer(_custom(("identity", _Explode())))
    authorizer.tracer = tracing
    decision = _decide(authorizer, method="GET", path="/p")
    assert decision.status == 503
    spans = _by_name(span_exporter.get_finished_spans())
    assert spans["extauthz.check"].status.status_code is StatusCode.ERROR
    assert spans["extauthz.check"].status.description == "internal_error"
    assert spans["extauthz.check"].attributes["error.type"] == "RuntimeError"
    assert spans["extauthz.identity"].status.status_code is StatusCode.ERROR
    assert SECRET_TOKEN not in _all_values(tuple(spans.values()))


def test_a_stage_that_fails_without_raising_is_an_error_span(policy_dir, policy_yaml, tracing,
                                                              span_exporter) -> None:  # fmt: skip
    broken = "rules:\n  - {name: r, when: \"request.headers['x-missing'] == 'x'\", decision: allow}\n"
    authorizer = _authorizer(policy_dir(**{"b.yaml": policy_yaml("broken", broken)}), tracing)
    assert _decide(authorizer, method="GET", path="/").status == 503
    rules = _by_name(span_exporter.get_finished_spans())["extauthz.rules"]
    assert rules.status.status_code is StatusCode.ERROR
    assert rules.attributes["error.type"] == "internal_error"


def test_not_ready_is_an_error_span(tracing, span_exporter) -> None:
    authorizer = Authorizer()
    authorizer.tracer = tracing
    _decide(authorizer, method="GET", path="/")
    check = _by_name(span_exporter.get_finished_spans())["extauthz.check"]
    assert check.status.status_code is StatusCode.ERROR and check.attributes["extauthz.reason"] == "not_ready"


def test_subject_modes() -> None:
    hashed = SubjectHasher("hash", b"k").attributes("alice")
    assert hashed == SubjectHasher("hash", b"k").attributes("alice")
    assert hashed != SubjectHasher("hash", b"other").attributes("alice")
    assert SubjectHasher("plain", b"").attributes("alice") == {"extauthz.identity.subject": "alice"}
    assert SubjectHasher("none", b"").attributes("alice") == {}
    assert SubjectHasher.from_env({"EXTAUTHZ_TRACE_SUBJECT": "plain"}).mode == "plain"
    with pytest.raises(TracingConfigError):
        SubjectHasher.from_env({"EXTAUTHZ_TRACE_SUBJECT": "reversible"})


def test_decision_attributes_skip_secret_named_attributes() -> None:
    from extauthz.decision import Decision

    decision = Decision(True, 200, "allowed", "", "id-1", attributes={"api_key_id": "k1", "client_secret": "s",
                                                                        "quota": "q"})  # fmt: skip
    attrs = decision_attributes(decision, SubjectHasher("none"))
    assert "extauthz.client_secret" not in attrs and "extauthz.api_key_id" not in attrs
    assert attrs["extauthz.quota"] == "q"


def test_tracing_is_off_unless_an_exporter_is_configured() -> None:
    assert tracing_from_env({}) is None
    assert tracing_from_env({"OTEL_TRACES_EXPORTER": "none"}) is None
    assert tracing_from_env({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"}) is None


@pytest.mark.parametrize(
    ("env", "exporter_module"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}, "grpc"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}, "http"),
        ({"OTEL_TRACES_EXPORTER": "console"}, "export"),
    ],
)
def test_exporters_from_env(env: dict[str, str], exporter_module: str, monkeypatch) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("EXTAUTHZ_TRACE_EXPORT", "inprocess")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "authz-test")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
    tracing = tracing_from_env(version="1.2.3")
    assert tracing is not None
    try:
        resource = tracing.provider.resource.attributes
        assert resource["service.name"] == "authz-test" and resource["service.version"] == "1.2.3"
        assert resource["deployment.environment"] == "test"
        processor = tracing.provider._active_span_processor._span_processors[0]
        inner = processor._batch_processor._exporter.inner
        assert exporter_module in type(inner).__module__
    finally:
        tracing.shutdown()


def test_default_service_name_and_bad_configuration() -> None:
    tracing = tracing_from_env({"OTEL_TRACES_EXPORTER": "console"})
    assert tracing is not None
    assert tracing.provider.resource.attributes["service.name"] == "extauthz"
    tracing.shutdown()
    with pytest.raises(TracingConfigError):
        tracing_from_env({"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(TracingConfigError):
        tracing_from_env({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


def test_parse_trace_ids_without_the_sdk() -> None:
    assert parse_trace_ids({"traceparent": TRACEPARENT}) == (TRACE_ID, PARENT_ID)
    assert parse_trace_ids({"b3": f"{TRACE_ID}-{PARENT_ID}-1"}) == (TRACE_ID, PARENT_ID)
    assert parse_trace_ids({"b3": f"{TRACE_ID[16:]}-{PARENT_ID}"}) == ("0" * 16 + TRACE_ID[16:], PARENT_ID)
    assert parse_trace_ids({"x-b3-traceid": TRACE_ID, "x-b3-spanid": PARENT_ID}) == (TRACE_ID, PARENT_ID)
    assert parse_trace_ids({"traceparent": "00-" + "0" * 32 + f"-{PARENT_ID}-01"}) == ("", "")
    assert parse_trace_ids({"traceparent": "garbage", "b3": "zz-yy"}) == ("", "")


def test_default_export_goes_through_the_exporter_process(monkeypatch) -> None:
    monkeypatch.delenv("EXTAUTHZ_TRACE_EXPORT", raising=False)
    tracing = tracing_from_env({"OTEL_TRACES_EXPORTER": "console"})
    assert tracing is not None and tracing.shipper is not None
    tracing.shutdown()


PARENT_HEADERS = [
    {},
    {"traceparent": TRACEPARENT},
    {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00", "tracestate": "a=1,b=2"},
    {"traceparent": f" 01-{TRACE_ID}-{PARENT_ID}-03-future\t"},
    {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01-extra"},
    {"traceparent": f"ff-{TRACE_ID}-{PARENT_ID}-01"},
    {"traceparent": f"00-{'0' * 32}-{PARENT_ID}-01"},
    {"traceparent": f"00-{TRACE_ID.upper()}-{PARENT_ID}-01"},
    {"traceparent": "garbage", "b3": f"{TRACE_ID}-{PARENT_ID}-1"},
    {"b3": f"{TRACE_ID}-{PARENT_ID}"},
    {"b3": f"{TRACE_ID[16:]}-{PARENT_ID}-d"},
    {"b3": f"{TRACE_ID.upper()}-{PARENT_ID}-true-{'3' * 16}"},
    {"b3": f"{TRACE_ID}-{PARENT_ID}-0"},
    {"b3": "1"},
    {"b3": f"{TRACE_ID}-{PARENT_ID}-1-{'3' * 16}-x"},
    {"b3": f"{TRACE_ID}-{'0' * 16}-1"},
    {"b3": f"{TRACE_ID}-zz{PARENT_ID[2:]}-1"},
    {"x-b3-traceid": TRACE_ID, "x-b3-spanid": PARENT_ID, "x-b3-sampled": "1"},
    {"x-b3-traceid": TRACE_ID, "x-b3-spanid": PARENT_ID, "x-b3-flags": "1"},
    {"x-b3-traceid": TRACE_ID, "x-b3-spanid": PARENT_ID},
    {"x-b3-traceid": TRACE_ID[:15], "x-b3-spanid": PARENT_ID, "x-b3-sampled": "1"},
]


@pytest.mark.parametrize("headers", PARENT_HEADERS)
def test_native_parent_parsing_agrees_with_the_sdk_propagators(headers: dict[str, str]) -> None:
    from opentelemetry import trace

    from extauthz.telemetry.tracing import _default_propagator, parse_parent

    context = trace.get_current_span(_default_propagator().extract(headers)).get_span_context()
    ours = parse_parent(headers)
    if not context.is_valid:
        assert ours is None
        return
    assert ours is not None
    assert (ours.trace_id, ours.span_id, ours.sampled) == (context.trace_id, context.span_id, context.trace_flags.sampled)
    assert dict(ours.trace_state or {}) == dict(context.trace_state or {})


@pytest.mark.parametrize(
    "name", ["always_on", "always_off", "traceidratio", "parentbased_always_on", "parentbased_always_off",
             "parentbased_traceidratio"],
)  # fmt: skip
def test_native_sampling_agrees_with_the_sdk_sampler(name: str, monkeypatch) -> None:
    import random

    from opentelemetry.sdk.trace import sampling
    from opentelemetry.trace import TraceFlags

    from extauthz.telemetry.tracing import _Parent, _sampling_rule

    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.3")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", name)
    sampler = sampling._get_from_env_or_default()
    rule = _sampling_rule(sampler)
    assert rule is not None
    rng = random.Random(7)
    for _ in range(300):
        trace_id = rng.getrandbits(128)
        parent = None if rng.random() < 0.5 else _Parent(trace_id, rng.getrandbits(64) or 1, rng.random() < 0.5)
        if parent is None:
            context = None
        else:
            span = trace.NonRecordingSpan(trace.SpanContext(parent.trace_id, parent.span_id, True,
                                                            TraceFlags(1 if parent.sampled else 0)))  # fmt: skip
            context = trace.set_span_in_context(span)
        expected = sampler.should_sample(context, trace_id, "extauthz.check").decision.is_sampled()
        assert rule(parent, trace_id) == expected


def test_a_custom_sampler_is_asked_through_its_own_api() -> None:
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    from extauthz.telemetry.tracing import _sampling_rule

    assert _sampling_rule(ParentBased(TraceIdRatioBased(0.5), remote_parent_not_sampled=TraceIdRatioBased(1.0))) is None


def test_the_attempted_user_follows_the_subject_setting() -> None:
    from extauthz.decision import Decision

    decision = Decision(False, 401, "invalid_credentials", "", "id-2", attributes={"attempted_user": "alice"})
    hashed = decision_attributes(decision, SubjectHasher("hash", b"k"))
    assert hashed["extauthz.attempted_user_hash"] == SubjectHasher("hash", b"k").attributes("alice")[
        "extauthz.identity.subject_hash"]
    assert "extauthz.attempted_user" not in hashed
    assert decision_attributes(decision, SubjectHasher("plain"))["extauthz.attempted_user"] == "alice"
    none = decision_attributes(decision, SubjectHasher("none"))
    assert not any("attempted_user" in name for name in none)
