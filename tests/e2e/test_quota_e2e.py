"""Quotas end to end: client -> real Envoy -> sidecar (memory or a real Redis) -> echo upstream, and
two sidecar replicas sharing one Redis under concurrent load."""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from extauthz.api.envoy.service.auth.v3 import external_auth_pb2
from extauthz.samples import check_request_from_sample

pytestmark = [pytest.mark.e2e, pytest.mark.authz_modes]

HOST = "quota.example.com"

POLICY = f"""
apiVersion: extauthz.dev/v1
kind: AuthPolicy
metadata: {{name: quota-api}}
spec:
  match: {{hosts: ["{HOST}"]}}
  rules: [{{name: all, decision: allow}}]
  quotas:
    - name: per-tenant
      key: "request.headers[?'x-tenant'].orValue('none')"
      when: "request.path == '/things'"
      limit: 2
      window: 1h
      headers: true
    - name: exact
      when: "request.path == '/exact'"
      limit: 500
      window: 1h
    - name: paced
      when: "request.path == '/paced'"
      limit: 50
      window: 1s
      burst: 10
  response:
    headers: {{x-client-ip: source.client_ip}}
"""


def _policies(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "quota.yaml").write_text(POLICY)
    return folder


def _get(port: int, path: str, tenant: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers={"Host": HOST, "x-tenant": tenant})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_429_with_retry_after_and_ratelimit_headers_reaches_the_client(
    store: str, tmp_path: Path, envoy_factory: Any, extauthz_factory: Any, echo_upstream: Any, redis_factory: Any
) -> None:
    extra: list[str] = []
    if store == "redis":
        extra = ["--redis-url", redis_factory().url]
    sidecar = extauthz_factory(_policies(tmp_path / "policies"), extra_args=extra)
    envoy = envoy_factory(ext_authz=sidecar.target, upstream_port=echo_upstream.port)
    before = echo_upstream.request_count()

    first = _get(envoy.port, "/things", "acme")
    second = _get(envoy.port, "/things", "acme")
    refused = _get(envoy.port, "/things", "acme")
    other = _get(envoy.port, "/things", "globex")

    assert first[0] == 200 and second[0] == 200 and other[0] == 200
    assert first[1]["ratelimit-policy"] == '"per-tenant";q=2;w=3600'
    assert first[1]["ratelimit"] == '"per-tenant";r=1;t=1800'
    assert second[1]["ratelimit"] == '"per-tenant";r=0;t=3600'
    status, headers, body = refused
    assert status == 429
    assert headers["retry-after"] == "1800"
    assert headers["ratelimit"] == '"per-tenant";r=0;t=1800'
    assert headers["ratelimit-policy"] == '"per-tenant";q=2;w=3600'
    assert json.loads(body)["reason"] == "quota_exceeded"
    # The refused request never reached the upstream.
    assert echo_upstream.request_count() == before + 3


@pytest.mark.parametrize(("hops", "expected"), [(0, "127.0.0.1"), (1, "198.51.100.9"), (2, "1.1.1.1")])
def test_client_ip_counts_hops_as_envoy_does(hops: int, expected: str, tmp_path: Path, envoy_factory: Any,
                                             extauthz_factory: Any, echo_upstream: Any) -> None:  # fmt: skip
    """The deployed Envoy (use_remote_address: true) appends its peer to X-Forwarded-For before ext_authz."""
    sidecar = extauthz_factory(_policies(tmp_path / "policies"), extra_args=["--xff-trusted-hops", str(hops)])
    envoy = envoy_factory(ext_authz=sidecar.target, upstream_port=echo_upstream.port)
    conn = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=5)
    try:
        conn.request("GET", "/things", headers={"Host": HOST, "x-tenant": f"ip-{hops}",
                                                "X-Forwarded-For": "1.1.1.1, 198.51.100.9"})  # fmt: skip
        resp = conn.getresponse()
        echo = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 200
    assert echo["headers"]["x-client-ip"] == [expected]


# --- two replicas, one Redis ---------------------------------------------------------------------------
async def _load(targets: list[str], path: str, total: int, concurrency: int, seconds: float | None) -> list[float]:
    """Send Check calls to every target (round robin over tasks); return the times of the allowed ones."""
    message = check_request_from_sample({"host": HOST, "path": path, "headers": {"x-tenant": "load"}})
    payload = message.SerializeToString()
    channels = [grpc.aio.insecure_channel(t) for t in targets]
    calls = [ch.unary_unary("/envoy.service.auth.v3.Authorization/Check") for ch in channels]
    allowed: list[float] = []
    sent = 0
    deadline = None if seconds is None else time.monotonic() + seconds

    async def worker(call: Any) -> None:
        nonlocal sent
        while (deadline is None and sent < total) or (deadline is not None and time.monotonic() < deadline):
            sent += 1
            reply = external_auth_pb2.CheckResponse.FromString(await call(payload, timeout=5))
            if reply.status.code == 0:
                allowed.append(time.monotonic())
            elif reply.denied_response.status.code != 429:
                raise AssertionError(f"unexpected answer: {reply.status.message}")

    try:
        await asyncio.gather(*(worker(calls[i % len(calls)]) for i in range(concurrency * len(calls))))
    finally:
        for ch in channels:
            await ch.close()
    return allowed


@pytest.mark.grpc_only("calls the replicas' gRPC Check API directly, without Envoy")
def test_two_replicas_sharing_redis_admit_exactly_the_limit(tmp_path: Path, extauthz_factory: Any,
                                                            redis_factory: Any) -> None:  # fmt: skip
    redis = redis_factory()
    policies = _policies(tmp_path / "policies")
    # Generous timeouts (the store's below the Check's, as serve requires): this measures exactness on
    # a shared 2-core machine, not failure handling.
    url = redis.url + "?timeout=2s"
    replicas = [extauthz_factory(policies, extra_args=["--redis-url", url, "--check-timeout", "3"]) for _ in range(2)]
    targets = [r.grpc_target for r in replicas]

    allowed = asyncio.run(_load(targets, "/exact", total=1500, concurrency=16, seconds=None))
    assert len(allowed) == 500  # limit 500 an hour: not one more, not one less, from 1500 concurrent calls

    admitted = asyncio.run(_load(targets, "/paced", total=0, concurrency=8, seconds=3.0))
    # GCRA under saturating load: the burst of 10 at once, then exactly one every 20 ms.
    span = admitted[-1] - admitted[0]
    expected = 10 + span / 0.020
    assert abs(len(admitted) - expected) <= max(3, 0.01 * expected)
    # ...and never more than limit + burst in any one-second interval.
    for i, t in enumerate(admitted):
        in_window = sum(1 for u in admitted[i:] if u < t + 1.0)
        assert in_window <= 50 + 10 + 1  # +1: client-side timestamps lag the server's by a little
