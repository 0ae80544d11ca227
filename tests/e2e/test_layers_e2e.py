"""Layers and cross-policy header ownership through a real Envoy."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import _procs
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.authz_modes]

request = _procs.http_request


@pytest.fixture(scope="module")
def envoy(envoy_factory, extauthz_factory, echo_upstream):
    sidecar = extauthz_factory(_procs.DEFAULT_POLICIES)
    return envoy_factory(ext_authz=sidecar.target, upstream_port=echo_upstream.port)


def test_a_header_another_policy_sets_never_comes_from_the_client(envoy) -> None:
    """public-health sets no x-user, but the JWT policy does: a client's own x-user is removed."""
    status, _, body = request(envoy.port, "GET", "/healthz",
                              headers={"Host": "anything.example.net", "x-user": "admin", "x-caller": "root",
                                       "x-not-owned": "kept"})
    assert status == 200
    seen = json.loads(body)["headers"]
    assert "x-user" not in seen and "x-caller" not in seen
    assert seen["x-not-owned"] == ["kept"]


def test_mesh_layer_refuses_trace_on_every_host(envoy, echo_upstream) -> None:
    before = echo_upstream.request_count()
    status, _, body = request(envoy.port, "TRACE", "/api/orders/1", headers={"Host": "orders.example.com"})
    assert status == 405
    assert json.loads(body)["reason"] == "denied_by_rule"
    assert echo_upstream.request_count() == before


@pytest.mark.parametrize("path", ["/Actuator/heapdump", "/INTERNAL/env", "/internal"])
def test_internal_endpoints_are_refused_in_any_case(envoy, path: str) -> None:
    status, _, body = request(envoy.port, "GET", path, headers={"Host": "orders.example.com"})
    assert status == 403
    assert json.loads(body)["reason"] == "denied_by_rule"


def test_network_layer_denial_is_final(envoy_factory, extauthz_factory, echo_upstream, tmp_path: Path) -> None:
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "p.yaml").write_text(textwrap.dedent("""\
        apiVersion: extauthz.dev/v1
        kind: LayerPolicy
        metadata: {name: loopback-banned}
        spec:
          match: {hosts: [blocked.test]}
          network: {deny: ["127.0.0.0/8", "::1/128"]}
        ---
        apiVersion: extauthz.dev/v1
        kind: AuthPolicy
        metadata: {name: everyone}
        spec:
          rules:
            - {name: all, decision: allow}
        """))
    sidecar = extauthz_factory(folder)
    proxy = envoy_factory(ext_authz=sidecar.target, upstream_port=echo_upstream.port)
    before = echo_upstream.request_count()
    status, _, body = request(proxy.port, "GET", "/", headers={"Host": "blocked.test"})
    assert status == 403
    assert json.loads(body)["reason"] == "denied_by_network"
    assert echo_upstream.request_count() == before
    status, _, _ = request(proxy.port, "GET", "/", headers={"Host": "open.test"})
    assert status == 200
