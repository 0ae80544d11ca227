"""Traces through a real Envoy: the client's traceparent -> Envoy -> sidecar span -> OTLP gRPC receiver.

The receiver is the OTLP TraceService from opentelemetry-proto (tests/otlpd.py), so what is checked
is exactly what a collector would receive.
"""

from __future__ import annotations

import http.client
import time
from collections.abc import Iterator

import pytest
from otlpd import OtlpReceiver, attribute_value

pytestmark = [pytest.mark.e2e, pytest.mark.authz_modes]

SECRET = "e2e-bearer-token-never-in-spans"


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[OtlpReceiver, int]]:
    servicer = OtlpReceiver().start()
    yield servicer, servicer.port
    servicer.stop()


@pytest.fixture(scope="module")
def traced_envoy(receiver, extauthz_factory, envoy_factory, echo_upstream):
    _, port = receiver
    sidecar = extauthz_factory(env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_SERVICE_NAME": "extauthz-e2e",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=e2e",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
    })  # fmt: skip
    return envoy_factory(ext_authz=sidecar.target, upstream_port=echo_upstream.port)


def _get(port: int, method: str, path: str, headers: dict[str, str]) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def _wait_for(receiver: OtlpReceiver, trace_id: str, names: set[str], timeout: float = 15.0) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        spans = receiver.of_trace(trace_id)
        if names <= {s.name for _, s in spans}:
            return spans
        time.sleep(0.05)
    raise AssertionError(f"spans {names} of trace {trace_id} not received; got {[s.name for _, s in spans]}")


def _attrs(span) -> dict:
    return {kv.key: attribute_value(kv.value) for kv in span.attributes}


@pytest.mark.parametrize(
    ("method", "status", "decision", "reason", "rule"),
    [("GET", 200, "allow", "allowed", "reads-and-writes"), ("DELETE", 403, "deny", "denied_by_rule", "no-deletes")],
)
def test_check_span_joins_the_clients_trace(receiver, traced_envoy, method, status, decision, reason, rule) -> None:
    servicer, _ = receiver
    trace_id = ("4bf92f3577b34da6a3ce929d0e0e47" + ("36" if method == "GET" else "37"))
    parent = "00f067aa0ba902b7"
    headers = {"Host": "orders.example.com", "traceparent": f"00-{trace_id}-{parent}-01",
               "tracestate": "congo=t61rcWkgMzE", "Authorization": f"Bearer {SECRET}", "Cookie": f"s={SECRET}"}
    assert _get(traced_envoy.port, method, "/api/orders?token=" + SECRET, headers) == status

    spans = _wait_for(servicer, trace_id, {"extauthz.check", "extauthz.select", "extauthz.rules"})
    by_name = {s.name: (r, s) for r, s in spans}
    resource, check = by_name["extauthz.check"]
    assert check.parent_span_id.hex() == parent, "the Check span is a child of the client's span"
    assert check.trace_state == "congo=t61rcWkgMzE"
    assert check.kind == check.SPAN_KIND_SERVER
    for name in ("extauthz.select", "extauthz.rules"):
        assert by_name[name][1].parent_span_id == check.span_id
    attrs = _attrs(check)
    assert attrs["extauthz.decision"] == decision and attrs["extauthz.reason"] == reason
    assert attrs["extauthz.policy"] == "orders-api" and attrs["extauthz.rule"] == rule
    assert attrs["extauthz.dry_run"] is False and attrs["extauthz.identity.kind"] == "anonymous"
    assert attrs["http.request.method"] == method and attrs["url.path"] == "/api/orders"
    assert attrs["server.address"] == "orders.example.com"
    assert resource["service.name"] == "extauthz-e2e" and resource["deployment.environment"] == "e2e"
    with servicer.lock:
        exported = b"".join(servicer.raw)
    assert SECRET.encode() not in exported, "no token, cookie or query value in any exported span"


def test_b3_multi_headers_are_followed_too(receiver, traced_envoy) -> None:
    servicer, _ = receiver
    trace_id, parent = "a" * 16 + "0123456789abcdef", "1122334455667788"
    headers = {"Host": "orders.example.com", "X-B3-TraceId": trace_id, "X-B3-SpanId": parent, "X-B3-Sampled": "1"}
    assert _get(traced_envoy.port, "GET", "/api/orders", headers) == 200
    spans = _wait_for(servicer, trace_id, {"extauthz.check"})
    check = next(s for _, s in spans if s.name == "extauthz.check")
    assert check.parent_span_id.hex() == parent
