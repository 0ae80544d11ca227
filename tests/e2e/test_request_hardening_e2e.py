"""Ambiguous requests through a real Envoy: percent-encoded hosts and several credentials in one
header are refused with 400 before any policy could read them as something else."""

from __future__ import annotations

import http.client
import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import _procs
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "identity"))

import material

pytestmark = [pytest.mark.e2e, pytest.mark.authz_modes]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("hardening-e2e")
    signing_key = material.rsa_key()
    policies = root / "policies"
    policies.mkdir()
    (policies / "jwks.json").write_text(json.dumps({"keys": [material.public_jwk(signing_key, "k1")]}))
    jwt = f"jwt: {{issuer: {material.ISSUER}, audiences: [{material.AUDIENCE}], jwksFile: jwks.json"
    (policies / "hosts.yaml").write_text(textwrap.dedent("""\
        apiVersion: extauthz.dev/v1
        kind: AuthPolicy
        metadata: {name: admin}
        spec:
          match: {hosts: [admin.example.com]}
          rules: [{name: nobody, decision: deny}]
        ---
        apiVersion: extauthz.dev/v1
        kind: AuthPolicy
        metadata: {name: public}
        spec:
          rules: [{name: everyone, decision: allow}]
        """))
    (policies / "tokens.yaml").write_text(textwrap.dedent(f"""\
        apiVersion: extauthz.dev/v1
        kind: AuthPolicy
        metadata: {{name: pages}}
        spec:
          match: {{hosts: [pages.test]}}
          identity:
            - {{name: users, {jwt}}}}}
            - {{name: visitors, anonymous: {{}}}}
          rules: [{{name: everyone, decision: allow}}]
          response: {{headers: {{x-who: identity.kind}}}}
        ---
        apiVersion: extauthz.dev/v1
        kind: AuthPolicy
        metadata: {{name: trial}}
        spec:
          match: {{hosts: [trial.test]}}
          mode: dry-run
          identity:
            - {{name: users, {jwt}, token: {{header: authorization, scheme: Bearer, forward: false}}}}}}
            - {{name: visitors, anonymous: {{}}}}
          rules: [{{name: everyone, decision: allow}}]
        ---
        apiVersion: extauthz.dev/v1
        kind: AuthPolicy
        metadata: {{name: keys}}
        spec:
          match: {{hosts: [keys.test]}}
          identity:
            - {{name: partners, apiKey: {{keys: ../secrets/apikeys.yaml}}}}
            - {{name: visitors, anonymous: {{}}}}
          rules: [{{name: everyone, decision: allow}}]
        """))
    (root / "secrets").mkdir()
    (root / "secrets" / "apikeys.yaml").write_text("[]\n")
    yield {"policies": policies, "signing_key": signing_key, "root": root}


@pytest.fixture(scope="module")
def decision_log(world) -> Path:
    return world["root"] / "decisions.jsonl"


@pytest.fixture(scope="module")
def envoy(world, decision_log, envoy_factory, extauthz_factory, echo_upstream):
    sidecar = extauthz_factory(world["policies"], extra_args=["--decision-log", str(decision_log)])
    return envoy_factory(ext_authz=sidecar.target, upstream_port=echo_upstream.port)


def _send(port: int, headers: list[tuple[str, str]]) -> tuple[int, dict]:
    """GET / with exactly these header lines (repeats kept, Host given here): (status, JSON body)."""
    conn = http.client.HTTPConnection(_procs.LOOPBACK, port, timeout=5)
    try:
        conn.putrequest("GET", "/things", skip_host=True, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


@pytest.mark.parametrize("host", ["admin%2eexample.com", "%61dmin.example.com", "admin.example.com%2e",
                                  "ADMIN%2Eexample.com:80"])
def test_envoy_passes_a_percent_encoded_host_and_the_sidecar_refuses_it(envoy, echo_upstream, host: str) -> None:
    """Envoy 1.40 forwards such a Host unchanged (a WHATWG URL parser upstream would decode it to the
    admin host); without the refusal the catch-all policy allowed it."""
    assert _send(envoy.port, [("Host", "admin.example.com")])[0] == 403
    assert _send(envoy.port, [("Host", "public.example.com")])[0] == 200
    before = echo_upstream.request_count()
    status, body = _send(envoy.port, [("Host", host)])
    assert (status, body["reason"]) == (400, "invalid_host")
    assert echo_upstream.request_count() == before


def _forged() -> str:
    return material.unsigned_token({"alg": "none", "kid": "k1"}, material.claims(sub="admin"))


@pytest.mark.parametrize("lines", [
    [("Authorization", "Basic eDp5"), ("Authorization", "Bearer {forged}")],
    [("Authorization", "Basic eDp5, Bearer {forged}")],
    [("Authorization", "Bearer {forged}"), ("Authorization", "Basic eDp5")],
])
def test_a_forged_token_behind_basic_credentials_is_refused_not_anonymous(envoy, echo_upstream,
                                                                          lines: list[tuple[str, str]]) -> None:
    status, body = _send(envoy.port, [("Host", "pages.test"), ("Authorization", "Basic eDp5")])
    assert status == 200 and body["headers"]["x-who"] == ["anonymous"]
    before = echo_upstream.request_count()
    forged = _forged()
    status, body = _send(envoy.port, [("Host", "pages.test"), *((n, v.format(forged=forged)) for n, v in lines)])
    assert (status, body["reason"]) == (400, "ambiguous_credentials")
    assert echo_upstream.request_count() == before


def test_an_api_key_header_sent_twice_is_refused(envoy, echo_upstream) -> None:
    before = echo_upstream.request_count()
    status, body = _send(envoy.port, [("Host", "keys.test"), ("X-Api-Key", "ak_unknown"), ("X-Api-Key", "ak_other")])
    assert (status, body["reason"]) == (400, "ambiguous_credentials")
    assert echo_upstream.request_count() == before


def test_a_dry_run_policy_refuses_ambiguous_credentials_too(envoy, echo_upstream) -> None:
    """A dry-run trials a policy on live traffic; it never forwards a forged token behind a decoy."""
    forged = _forged()
    before = echo_upstream.request_count()
    status, body = _send(envoy.port, [("Host", "trial.test"), ("Authorization", "Basic eDp5"),
                                      ("Authorization", f"Bearer {forged}")])
    assert (status, body["reason"]) == (400, "ambiguous_credentials")
    assert echo_upstream.request_count() == before
