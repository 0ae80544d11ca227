"""Identity through a real Envoy with real mTLS: Envoy's listener requires client certificates
signed by a CA made here and forwards them (include_peer_certificate); the sidecar decides who the
caller is from the SPIFFE or DNS SAN, and accepts certificate-bound tokens (RFC 8705) only with the
client certificate they were issued to.
"""

from __future__ import annotations

import json
import ssl
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import _procs
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "identity"))

import material

from extauthz.request import ENVOY_VALUE_PREFIX

pytestmark = [pytest.mark.e2e, pytest.mark.authz_modes]

CHECKOUT = "spiffe://cluster.local/ns/payments/sa/checkout"
REFUNDS = "spiffe://cluster.local/ns/payments/sa/refunds"
INTRUDER = "spiffe://cluster.local/ns/sandbox/sa/intruder"
PARTNER_DNS = "api.partners.example.com"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, authz_mode: str) -> Iterator[dict]:
    """Per mode: the last test stops the JWKS server."""
    root = tmp_path_factory.mktemp(f"identity-e2e-{authz_mode}")
    pki = material.Pki("e2e-mesh-ca")
    certs = {
        "server": pki.server(),
        "checkout": pki.client("checkout", uris=(CHECKOUT,)),
        "refunds": pki.client("refunds", uris=(REFUNDS,)),
        "intruder": pki.client("intruder", uris=(INTRUDER,)),
        "partner": pki.client("partner", dns=(PARTNER_DNS,)),
    }
    # A second CA that the (misconfigured) proxy also trusts, but the sidecar's caFile does not.
    rogue_pki = material.Pki("rogue-ca")
    certs["rogue"] = rogue_pki.client("impostor", uris=(CHECKOUT,))
    tls = root / "tls"
    files = {name: issued.write(tls, name) for name, issued in certs.items()}
    (tls / "ca.crt").write_text(pki.ca.pem + rogue_pki.ca.pem)
    signing_key = material.rsa_key()
    secrets = root / "secrets"
    secrets.mkdir()
    (secrets / "ca.crt").write_text(pki.ca.pem)
    (secrets / "jwks.json").write_text(json.dumps({"keys": [material.public_jwk(signing_key, "k1")]}))
    # A JWKS endpoint on loopback, served from this test process (rotation and outage below).
    jwks_server = material.JsonServer()
    jwks_server.routes["/jwks"] = (200, {"keys": [material.public_jwk(signing_key, "k1")]})
    policies = root / "policies"
    policies.mkdir()
    (policies / "remote.yaml").write_text(textwrap.dedent(f"""\
        apiVersion: extauthz.dev/v1
        kind: AuthPolicy
        metadata: {{name: remote-keys}}
        spec:
          match: {{hosts: [remote.test]}}
          identity:
            - name: users
              jwt:
                issuer: {material.ISSUER}
                audiences: [{material.AUDIENCE}]
                jwksUrl: {jwks_server.url("/jwks")}
                jwksRefresh: {{interval: 1h, minInterval: 0s, wait: 400ms}}
          rules: [{{name: users, decision: allow}}]
          response: {{headers: {{x-subject: identity.subject}}}}
        """))
    (policies / "mesh.yaml").write_text(textwrap.dedent(f"""\
        apiVersion: extauthz.dev/v1
        kind: AuthPolicy
        metadata: {{name: mesh}}
        spec:
          match: {{hosts: [mesh.test]}}
          identity:
            - name: workloads
              mtls:
                principals: ["spiffe://cluster.local/ns/payments/sa/*", "*.partners.example.com"]
                certificate: {{caFile: ../secrets/ca.crt}}
          rules:
            - name: known-callers
              decision: allow
          response:
            headers:
              x-caller: "identity.principal"
              x-caller-namespace: "identity.spiffe.namespace"
        ---
        apiVersion: extauthz.dev/v1
        kind: AuthPolicy
        metadata: {{name: bound}}
        spec:
          match: {{hosts: [bound.test]}}
          identity:
            - name: services
              jwt:
                issuer: {material.ISSUER}
                audiences: [{material.AUDIENCE}]
                jwksFile: ../secrets/jwks.json
                certificateBound: required
          rules:
            - name: bound-tokens
              decision: allow
          response:
            headers:
              x-subject: "identity.subject"
        """))
    yield {"root": root, "pki": pki, "certs": certs, "files": files, "tls": tls, "policies": policies,
           "signing_key": signing_key, "jwks_server": jwks_server}
    jwks_server.stop()


@pytest.fixture(scope="module")
def sidecar(world, extauthz_factory):
    return extauthz_factory(world["policies"])


@pytest.fixture(scope="module")
def envoy(world, envoy_factory, sidecar, echo_upstream):
    server_cert, server_key = world["files"]["server"]
    tls = _procs.DownstreamTls(server_cert, server_key, world["tls"] / "ca.crt", require_client_certificate=True)
    return envoy_factory(ext_authz=sidecar.target, upstream_port=echo_upstream.port, tls=tls,
                         include_peer_certificate=True)


def _client(world, name: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(world["tls"] / "ca.crt"))
    if name is not None:
        cert, key = world["files"][name]
        context.load_cert_chain(str(cert), str(key))
    return context


def _get(envoy, world, client: str, host: str, headers: dict[str, str] | None = None):
    return _procs.http_request(envoy.port, "GET", "/things", headers={"Host": host, **(headers or {})},
                               tls=_client(world, client))


def test_spiffe_workload_is_identified_and_spoofed_headers_are_replaced(envoy, world):
    status, _, body = _get(envoy, world, "checkout", "mesh.test", {"x-caller": "spiffe://evil/ns/x/sa/y"})
    assert status == 200, body
    seen = json.loads(body)["headers"]
    assert seen["x-caller"] == [CHECKOUT]
    assert seen["x-caller-namespace"] == ["payments"]


def test_dns_san_partner_is_identified(envoy, world):
    status, _, body = _get(envoy, world, "partner", "mesh.test")
    assert status == 200, body
    assert json.loads(body)["headers"]["x-caller"] == [PARTNER_DNS]


def test_principal_outside_the_allow_list_is_refused(envoy, world, echo_upstream):
    before = echo_upstream.request_count()
    status, _, body = _get(envoy, world, "intruder", "mesh.test")
    assert status == 403
    assert json.loads(body)["reason"] == "principal_not_allowed"
    assert echo_upstream.request_count() == before


def test_envoy_refuses_clients_without_a_certificate(envoy, world):
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _get(envoy, world, None, "mesh.test")


def _forged_peer_headers(world, workload: str) -> dict[str, str]:
    """Every header HTTP-mode Envoy sets for the sidecar about the connection (deploy/envoy/envoy-http.yaml),
    filled with what the workload ``workload``'s connection would give: its SPIFFE id, its certificate."""
    cert_pem = Path(world["files"][workload][0]).read_text()
    config = _procs.render_envoy_bootstrap(mode="http", ext_authz="127.0.0.1:1")
    forged = {}
    for chain in config["static_resources"]["listeners"][0]["filter_chains"]:
        for http_filter in chain["filters"][0]["typed_config"]["http_filters"]:
            if http_filter["name"] == "envoy.filters.http.ext_authz":
                for entry in http_filter["typed_config"]["http_service"]["authorization_request"]["headers_to_add"]:
                    formatter = entry["value"].removeprefix(ENVOY_VALUE_PREFIX)
                    forged[entry["key"]] = ENVOY_VALUE_PREFIX + {
                        "%DOWNSTREAM_PEER_URI_SAN%": CHECKOUT,
                        "%DOWNSTREAM_PEER_CERT%": quote(cert_pem, safe="-"),
                        "%DOWNSTREAM_PEER_SUBJECT%": "CN=checkout",
                        "%REQUESTED_SERVER_NAME%": "mesh.test",
                        "%DOWNSTREAM_TLS_VERSION%": "TLSv1.3",
                        "%REQ(:SCHEME)%": "https",
                        "%REQ(:AUTHORITY)%": "mesh.test",
                    }.get(formatter, "10.0.0.1:443")
    assert forged, "no headers_to_add in envoy-http.yaml"
    return forged


def test_a_client_cannot_become_a_workload_by_sending_the_peer_headers_itself(envoy, world, echo_upstream,
                                                                              authz_mode):
    """Over mTLS as the intruder, with every peer header of HTTP mode forged to say "checkout": the
    sidecar must see the intruder (Envoy drops the client's copies and sets its own)."""
    before = echo_upstream.request_count()
    status, _, body = _get(envoy, world, "intruder", "mesh.test", _forged_peer_headers(world, "checkout"))
    assert (status, json.loads(body)["reason"]) == (403, "principal_not_allowed"), body
    assert echo_upstream.request_count() == before
    # A workload that is allowed still gets its own identity, not the forged one's.
    status, _, body = _get(envoy, world, "refunds", "mesh.test", _forged_peer_headers(world, "checkout"))
    assert status == 200, body
    seen = json.loads(body)["headers"]
    assert seen["x-caller"] == [REFUNDS]
    if authz_mode == "http":  # envoy-http.yaml also keeps them from the application
        assert not any(name.startswith("x-extauthz-") for name in seen), "the app got the client's forged headers"


def test_without_tls_forged_peer_headers_are_no_certificate(envoy_factory, sidecar, world, echo_upstream):
    """A plain-text listener: Envoy has no peer certificate, so it sets no peer header at all; the
    client's forged ones must not fill the gap."""
    plain = envoy_factory(ext_authz=sidecar.target, upstream_port=echo_upstream.port)
    before = echo_upstream.request_count()
    status, _, body = _procs.http_request(plain.port, "GET", "/things",
                                          headers={"Host": "mesh.test", **_forged_peer_headers(world, "checkout")})
    assert (status, json.loads(body)["reason"]) == (401, "credentials_missing"), body
    assert echo_upstream.request_count() == before


def test_certificate_bound_token_needs_its_own_certificate(envoy, world, echo_upstream):
    key = world["signing_key"]
    token = material.mint(key, material.claims(sub="checkout-svc", cnf={"x5t#S256": world["certs"]["checkout"].thumbprint}))
    auth = {"authorization": f"Bearer {token}"}

    status, _, body = _get(envoy, world, "checkout", "bound.test", auth)
    assert status == 200, body
    assert json.loads(body)["headers"]["x-subject"] == ["checkout-svc"]

    before = echo_upstream.request_count()
    status, headers, body = _get(envoy, world, "refunds", "bound.test", auth)  # stolen token, other client
    assert status == 401
    assert json.loads(body)["reason"] == "bound_certificate_mismatch"
    assert headers["www-authenticate"] == (
        'Bearer error="invalid_token", error_description="token is bound to another client certificate"')
    assert token not in body.decode()
    assert echo_upstream.request_count() == before

    unbound = material.mint(key, material.claims(sub="checkout-svc"))
    status, _, body = _get(envoy, world, "checkout", "bound.test", {"authorization": f"Bearer {unbound}"})
    assert (status, json.loads(body)["reason"]) == (401, "token_not_bound")


def test_missing_and_expired_tokens_get_rfc6750_challenges(envoy, world):
    status, headers, body = _get(envoy, world, "checkout", "bound.test")
    assert (status, json.loads(body)["reason"]) == (401, "credentials_missing")
    assert headers["www-authenticate"] == "Bearer"
    expired = material.mint(world["signing_key"], material.claims(exp=int(time.time()) - 600))
    status, headers, body = _get(envoy, world, "checkout", "bound.test", {"authorization": f"Bearer {expired}"})
    assert (status, json.loads(body)["reason"]) == (401, "token_expired")
    assert 'error_description="token has expired"' in headers["www-authenticate"]


def test_certificate_from_a_ca_the_policy_does_not_trust_is_refused(envoy, world, echo_upstream):
    """Defence in depth: the proxy accepted the handshake (it trusts a second CA), the policy's caFile does not."""
    before = echo_upstream.request_count()
    status, headers, body = _get(envoy, world, "rogue", "mesh.test")
    assert (status, json.loads(body)["reason"]) == (401, "certificate_untrusted")
    assert headers["www-authenticate"].startswith('mTLS error="invalid_token"')
    assert echo_upstream.request_count() == before


def test_remote_key_set_rotation_and_outage_in_the_real_sidecar(envoy, world):
    """The sidecar process fetched the JWKS at start; a new kid triggers a refetch; then the server dies."""
    server, key = world["jwks_server"], world["signing_key"]
    status, _, body = _get(envoy, world, "checkout", "remote.test",
                           {"authorization": f"Bearer {material.mint(key, material.claims(sub='u1'))}"})
    assert status == 200, body
    assert json.loads(body)["headers"]["x-subject"] == ["u1"]
    fetched = server.calls["/jwks"]

    rotated = material.ec_key()
    server.routes["/jwks"] = (200, {"keys": [material.public_jwk(key, "k1"), material.public_jwk(rotated, "k2")]})
    token = material.mint(rotated, material.claims(sub="u2"), kid="k2", alg="ES256")
    status, _, body = _get(envoy, world, "checkout", "remote.test", {"authorization": f"Bearer {token}"})
    assert status == 200, body  # the first request with the new kid waited for the refetch
    assert server.calls["/jwks"] == fetched + 1

    server.stop()
    for kid, signer, alg in (("k1", key, "RS256"), ("k2", rotated, "ES256")):
        token = material.mint(signer, material.claims(sub="u3"), kid=kid, alg=alg)
        status, _, body = _get(envoy, world, "checkout", "remote.test", {"authorization": f"Bearer {token}"})
        assert status == 200, body  # last good keys keep serving
    token = material.mint(key, material.claims(sub="u4"), kid="k-new")
    status, _, body = _get(envoy, world, "checkout", "remote.test", {"authorization": f"Bearer {token}"})
    assert (status, json.loads(body)["reason"]) == (401, "unknown_key")
