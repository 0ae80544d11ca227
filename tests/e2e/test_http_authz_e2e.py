"""Envoy's HTTP ext_authz mode through a real Envoy: the mapping is the contract.

Envoy (downstream TLS, client certificate optional) calls the sidecar's HTTP ext_authz port
(``--http-authz-listen``, ``path_prefix: /authz``) with the http_service configured here, inline,
as docs/http-mode.md says: the headers_to_add carry the connection's facts as ``v1:<formatter>``,
allowed_headers deliberately also lets x-extauthz-peer-uri-san through from the client (to show that
a client still cannot pose as a workload), and the answer's headers map to upstream headers,
headers to remove, client headers and dynamic metadata.
"""

from __future__ import annotations

import json
import ssl
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _procs
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "identity"))

import material

from extauthz.request import ENVOY_HEADERS, ENVOY_OPTIONAL_HEADERS, ENVOY_VALUE_PREFIX

pytestmark = pytest.mark.e2e

CHECKOUT = "spiffe://cluster.local/ns/payments/sa/checkout"
PARTNER_DNS = "api.partners.example.com"
PREFIX = "/authz"
MAX_BODY = 16


def http_mode(authz_port: int, *, extra_allowed: tuple[str, ...] = ()) -> Callable[[dict], None]:
    """Turn the deployed gRPC ext_authz filter into Envoy's HTTP mode against 127.0.0.1:authz_port."""

    def mutate(cfg: dict) -> None:
        static = cfg["static_resources"]
        hcm = static["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        authz = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_authz")["typed_config"]
        authz.pop("grpc_service")
        allowed = ["x-tenant", "x-request-id", "x-envoy-auth-partial-body", "authorization", *extra_allowed]
        authz["http_service"] = {
            "server_uri": {"uri": f"http://127.0.0.1:{authz_port}", "cluster": "ext_authz", "timeout": "0.5s"},
            "path_prefix": PREFIX,
            "authorization_request": {
                "allowed_headers": {"patterns": [{"exact": name} for name in allowed]},
                "headers_to_add": [{"key": name, "value": ENVOY_VALUE_PREFIX + formatter}
                                   for name, formatter in {**ENVOY_HEADERS, **ENVOY_OPTIONAL_HEADERS}.items()],
            },
            "authorization_response": {
                "allowed_upstream_headers": {"patterns": [{"exact": "x-seen"}, {"exact": "x-caller"}]},
                "allowed_client_headers": {"patterns": [{"exact": "content-type"}, {"exact": "retry-after"},
                                                        {"prefix": "ratelimit"}]},
                "allowed_client_headers_on_success": {"patterns": [{"prefix": "ratelimit"}]},
                "dynamic_metadata_from_headers": {"patterns": [{"prefix": "x-extauthz-"}]},
            },
        }
        authz["with_request_body"] = {"max_request_bytes": MAX_BODY, "allow_partial_message": True}
        for cluster in static["clusters"]:
            if cluster["name"] == "ext_authz":  # HTTP/1.1 to the sidecar
                cluster.pop("typed_extension_protocol_options", None)
                cluster["common_http_protocol_options"] = {"idle_timeout": "60s"}
        log_format = hcm["access_log"][0]["typed_config"]["log_format"]["json_format"]
        for key in ("decision-id", "policy", "rule", "reason"):
            log_format[f"authz_{key}"] = f"%DYNAMIC_METADATA(envoy.filters.http.ext_authz:x-extauthz-{key})%"

    return mutate


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("http-authz-e2e")
    pki = material.Pki("http-mode-ca")
    certs = {"server": pki.server(), "checkout": pki.client("checkout", uris=(CHECKOUT,)),
             "partner": pki.client("partner", dns=(PARTNER_DNS,))}
    tls = root / "tls"
    files = {name: issued.write(tls, name) for name, issued in certs.items()}
    (tls / "ca.crt").write_text(pki.ca.pem)
    signing_key = material.rsa_key()
    policies = root / "policies"
    policies.mkdir()
    (policies / "jwks.json").write_text(json.dumps({"keys": [material.public_jwk(signing_key, "k1")]}))
    (policies / "policies.yaml").write_text(textwrap.dedent(f"""\
        apiVersion: extauthz.dev/v1
        kind: AuthPolicy
        metadata: {{name: api}}
        spec:
          match: {{hosts: [api.test]}}
          rules:
            - {{name: tenant-a, when: "request.headers[?'x-tenant'].orValue('') == 'a'", decision: allow}}
          response:
            headers:
              x-seen: >-
                [request.method, request.host, request.path, request.raw_path, request.scheme, request.protocol,
                 tls.sni, source.principal, source.address, request.headers[?':authority'].orValue('-'), tls.version]
        ---
        apiVersion: extauthz.dev/v1
        kind: AuthPolicy
        metadata: {{name: mesh}}
        spec:
          match: {{hosts: [mesh.test]}}
          rules:
            - {{name: workloads, when: "source.principal.startsWith('spiffe://')", decision: allow}}
            - {{name: partners, when: "source.principal.endsWith('.partners.example.com')", decision: allow}}
          response:
            headers:
              x-caller: "source.principal"
        ---
        apiVersion: extauthz.dev/v1
        kind: AuthPolicy
        metadata: {{name: open}}
        spec:
          match: {{hosts: [open.test]}}
          rules: [{{name: everyone, decision: allow}}]
        ---
        apiVersion: extauthz.dev/v1
        kind: AuthPolicy
        metadata: {{name: body}}
        spec:
          match: {{hosts: [body.test]}}
          rules:
            - {{name: hello, when: "request.body == 'hello' && !request.partial_body", decision: allow}}
            - {{name: partial, when: "request.path == '/partial' && request.partial_body", decision: allow}}
            - {{name: length, when: "request.path == '/length' && request.headers[?'content-length'].orValue('') == '7'",
                decision: allow}}
        ---
        apiVersion: extauthz.dev/v1
        kind: AuthPolicy
        metadata: {{name: tokens}}
        spec:
          match: {{hosts: [jwt.test]}}
          identity:
            - name: users
              jwt:
                issuer: {material.ISSUER}
                audiences: [{material.AUDIENCE}]
                jwksFile: jwks.json
          rules: [{{name: users, decision: allow}}]
        """))
    yield {"root": root, "files": files, "tls": tls, "policies": policies, "signing_key": signing_key}


@pytest.fixture(scope="module")
def envoy(world, envoy_factory, extauthz_factory, echo_upstream):
    authz_port = _procs.free_port()
    extauthz_factory(world["policies"], extra_args=["--http-authz-listen", f"127.0.0.1:{authz_port}",
                                                    "--http-authz-path-prefix", PREFIX])
    server_cert, server_key = world["files"]["server"]
    tls = _procs.DownstreamTls(server_cert, server_key, world["tls"] / "ca.crt", require_client_certificate=False)
    # ext_authz names the gRPC cluster's endpoint; the http_service uses the same cluster.
    return envoy_factory(ext_authz=f"127.0.0.1:{authz_port}", upstream_port=echo_upstream.port, tls=tls,
                         mutate=http_mode(authz_port, extra_allowed=("x-extauthz-peer-uri-san", "x-seen")))


def _client(world: dict[str, Any], name: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(world["tls"] / "ca.crt"))
    context.check_hostname = False
    if name is not None:
        cert, key = world["files"][name]
        context.load_cert_chain(str(cert), str(key))
    return context


def _request(envoy, world, host: str, path: str = "/things", *, method: str = "GET", client: str | None = None,
             headers: dict[str, str] | None = None, body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    return _procs.http_request(envoy.port, method, path, body=body, headers={"Host": host, **(headers or {})},
                               tls=_client(world, client))


def test_allow_sees_the_request_as_the_grpc_mode_would(envoy, world) -> None:
    status, _, body = _request(envoy, world, "api.test", "/things/../stuff?q=1", client="checkout",
                               headers={"x-tenant": "a"})
    assert status == 200, body
    seen = json.loads(body)["headers"]["x-seen"][0].split(",")
    method, host, path, raw_path, scheme, protocol, sni, principal, address, authority, tls_version = seen
    assert (method, host, path, scheme, protocol) == ("GET", "api.test", "/stuff", "https", "HTTP/1.1")
    assert raw_path == "/stuff?q=1"  # Envoy normalized the path before asking (normalize_path: true)
    assert authority == "api.test"
    assert sni == ""  # the client connected to 127.0.0.1: no SNI
    assert principal == CHECKOUT
    assert address == "127.0.0.1"
    assert tls_version.startswith("TLSv1.")  # tls.version: only the HTTP mode has it


def test_deny_status_body_client_headers_and_metadata(envoy, world, echo_upstream) -> None:
    before = echo_upstream.request_count()
    status, headers, body = _request(envoy, world, "api.test", headers={"x-tenant": "b"})
    assert status == 403
    assert headers["content-type"] == "application/json"
    answer = json.loads(body)
    assert answer["reason"] == "no_rule_matched"
    decision_id = answer["decision_id"]  # Envoy's x-request-id (the edge replaces a client's own)
    assert not any(name.startswith("x-extauthz-") for name in headers)  # allowed_client_headers keeps them in
    assert echo_upstream.request_count() == before
    # The dynamic metadata reached Envoy's access log (dynamic_metadata_from_headers).
    deadline = time.monotonic() + 5
    line = None
    while line is None and time.monotonic() < deadline:
        for text in envoy.proc.log_path.read_text(errors="replace").splitlines():
            if decision_id in text and text.startswith("{"):
                line = json.loads(text)
        time.sleep(0.05)
    assert line is not None
    assert line["request_id"] == decision_id
    assert (line["authz_decision-id"], line["authz_policy"], line["authz_reason"]) == (
        decision_id, "api", "no_rule_matched")


def test_a_client_cannot_pose_as_a_workload(envoy, world) -> None:
    """No certificate, but the client sends the header Envoy's formatter would fill (and allowed_headers
    lets it through): Envoy's 'v1:' value, empty after the prefix, replaces it."""
    status, _, body = _request(envoy, world, "mesh.test", headers={"x-extauthz-peer-uri-san": f"v1:{CHECKOUT}"})
    assert status == 403, body
    status, _, body = _request(envoy, world, "mesh.test", headers={"x-extauthz-peer-uri-san": CHECKOUT})
    assert status == 403, body
    status, _, body = _request(envoy, world, "mesh.test", client="checkout")
    assert status == 200
    assert json.loads(body)["headers"]["x-caller"] == [CHECKOUT]
    # A certificate with only a DNS SAN: that is the principal, as in gRPC mode.
    status, _, body = _request(envoy, world, "mesh.test", client="partner")
    assert status == 200
    assert json.loads(body)["headers"]["x-caller"] == [PARTNER_DNS]


def test_headers_other_policies_own_are_removed_upstream(envoy, world) -> None:
    """open.test sets no x-seen, api.test does: a client's own x-seen is stripped
    (x-envoy-auth-headers-to-remove)."""
    status, _, body = _request(envoy, world, "open.test", headers={"x-seen": "forged"})
    assert status == 200
    assert "x-seen" not in json.loads(body)["headers"]


def test_body_and_partial_body(envoy, world) -> None:
    assert _request(envoy, world, "body.test", method="POST", body=b"hello")[0] == 200
    assert _request(envoy, world, "body.test", method="POST", body=b"hullo")[0] == 403
    big = b"hello" + b"x" * (MAX_BODY * 2)
    assert _request(envoy, world, "body.test", method="POST", body=big)[0] == 403
    assert _request(envoy, world, "body.test", "/partial", method="POST", body=big)[0] == 200
    # The client's own content-length, as the gRPC mode shows it (x-extauthz-content-length).
    assert _request(envoy, world, "body.test", "/length", method="POST", body=b"1234567")[0] == 200


def test_unauthenticated_gets_the_challenge(envoy, world) -> None:
    status, headers, body = _request(envoy, world, "jwt.test")
    assert (status, json.loads(body)["reason"]) == (401, "credentials_missing")
    assert headers["www-authenticate"] == "Bearer"
    token = material.mint(world["signing_key"])
    assert _request(envoy, world, "jwt.test", headers={"authorization": f"Bearer {token}"})[0] == 200


def test_keep_alive_connections_serve_many_checks(envoy, world) -> None:
    """Many requests over Envoy's pooled connections to the sidecar, alternating allow and deny."""
    statuses = [_request(envoy, world, "api.test", headers={"x-tenant": "a" if i % 2 else "b"})[0] for i in range(30)]
    assert statuses == [403, 200] * 15
    stats = envoy.stats("cluster.ext_authz.upstream_cx_total")
    assert stats["cluster.ext_authz.upstream_cx_total"] <= 3


def test_sidecar_unreachable_fails_closed(envoy_factory, echo_upstream) -> None:
    dead = _procs.free_port()
    closed = envoy_factory(ext_authz=f"127.0.0.1:{dead}", upstream_port=echo_upstream.port, mutate=http_mode(dead))
    before = echo_upstream.request_count()
    status, _, _ = _procs.http_request(closed.port, "GET", "/things", headers={"Host": "open.test"})
    assert status == 503  # the deployed status_on_error
    assert echo_upstream.request_count() == before
