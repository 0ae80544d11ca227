"""HTTP Basic through a real Envoy and the real sidecar: an htpasswd file of bcrypt and argon2id
hashes made here, the realm challenge, the password kept from the upstream and from the logs, and a
changed file (a Secret update) applied without a restart, cached verifications included."""

from __future__ import annotations

import base64
import json
import os
import textwrap
import time
from collections.abc import Iterator

import _procs
import bcrypt
import pytest
from argon2 import PasswordHasher

pytestmark = [pytest.mark.e2e, pytest.mark.authz_modes]

PASSWORDS = {"alice": "alice-e2e-Zt4q", "carol": "carol-e2e-Wm8k"}
#: The real minimum cost for bcrypt (10) and a small argon2id the policy allows explicitly.
ARGON2 = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


def _htpasswd(alice: str) -> str:
    return (f"alice:{bcrypt.hashpw(alice.encode(), bcrypt.gensalt(rounds=10)).decode()}:admins\n"
            f"carol:{ARGON2.hash(PASSWORDS['carol'])}\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, authz_mode: str) -> Iterator[dict]:
    """Per ext_authz mode: a test rotates the password file."""
    root = tmp_path_factory.mktemp(f"basic-e2e-{authz_mode}")
    secrets = root / "secrets"
    secrets.mkdir()
    (secrets / "htpasswd").write_text(_htpasswd(PASSWORDS["alice"]))
    policies = root / "policies"
    policies.mkdir()
    (policies / "basic.yaml").write_text(textwrap.dedent("""\
        apiVersion: extauthz.dev/v1
        kind: AuthPolicy
        metadata: {name: console}
        spec:
          match: {hosts: [console.test]}
          identity:
            - name: staff
              basic:
                htpasswd: ../secrets/htpasswd
                realm: console "test"
                minArgon2: {memoryKiB: 1024, iterations: 1, parallelism: 1}
          rules:
            - name: staff
              decision: allow
          response:
            headers:
              x-user: identity.user
              x-groups: identity.groups
        """))
    yield {"root": root, "policies": policies, "htpasswd": secrets / "htpasswd",
           "decision_log": root / "decisions.jsonl"}


@pytest.fixture(scope="module")
def envoy(world, envoy_factory, extauthz_factory, echo_upstream):
    sidecar = extauthz_factory(world["policies"], extra_args=[
        "--decision-log", str(world["decision_log"]), "--decision-log-allow-sample", "1",
        "--decision-log-headers", "authorization,x-note",
        "--check-timeout", "2",  # a bcrypt on a busy test machine is not cut short
    ])
    proxy = envoy_factory(ext_authz=sidecar.target, upstream_port=echo_upstream.port, ext_authz_timeout=3.0)
    proxy.sidecar = sidecar
    return proxy


def _basic(user: str, password: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def _get(envoy, headers: dict[str, str] | None = None):
    return _procs.http_request(envoy.port, "GET", "/things", headers={"Host": "console.test", **(headers or {})})


def test_bcrypt_and_argon2id_users_get_through_without_their_password(envoy):
    for user, groups in (("alice", "admins"), ("carol", "")):
        status, _, body = _get(envoy, _basic(user, PASSWORDS[user]))
        assert status == 200, body
        seen = json.loads(body)["headers"]
        assert seen["x-user"] == [user]
        assert seen.get("x-groups", [""]) == [groups]
        assert "authorization" not in seen  # the password stays here


def test_failures_are_challenged_with_the_realm(envoy, echo_upstream):
    before = echo_upstream.request_count()
    for headers, reason in [(_basic("alice", "wrong"), "invalid_credentials"),
                            (_basic("mallory", "whatever"), "invalid_credentials"),
                            ({"authorization": "Basic %%%"}, "malformed_basic_credentials"),
                            ({}, "credentials_missing")]:
        status, response_headers, body = _get(envoy, headers)
        assert (status, json.loads(body)["reason"]) == (401, reason)
        assert response_headers["www-authenticate"] == 'Basic realm="console \\"test\\"", charset="UTF-8"'
        assert b"wrong" not in body and b"whatever" not in body
    assert echo_upstream.request_count() == before


def test_a_changed_file_applies_without_restart_even_to_cached_users(envoy, world):
    old, new = PASSWORDS["alice"], "alice-rotated-Pp2v"
    assert _get(envoy, _basic("alice", old))[0] == 200  # verified (and cached) before the change
    fresh = world["htpasswd"].with_name("htpasswd.new")
    fresh.write_text(_htpasswd(new))
    os.replace(fresh, world["htpasswd"])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if _get(envoy, _basic("alice", new))[0] == 200:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the new password was never accepted")
    status, _, body = _get(envoy, _basic("alice", old))
    assert (status, json.loads(body)["reason"]) == (401, "invalid_credentials")


def test_the_decision_log_has_the_attempted_user_never_the_password(envoy, world):
    _get(envoy, {**_basic("alice", "guess-Hq9"), "x-note": "visible"})
    deadline = time.monotonic() + 10
    records: list[dict] = []
    while time.monotonic() < deadline:
        text = world["decision_log"].read_text() if world["decision_log"].exists() else ""
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        if any(r.get("headers", {}).get("x-note") == "visible" for r in records):
            break
        time.sleep(0.2)
    mine = [r for r in records if r.get("headers", {}).get("x-note") == "visible"]
    assert mine, "the decision was not logged"
    assert mine[0]["reason"] == "invalid_credentials"
    assert mine[0]["attributes"]["attempted_user"] == "alice"
    assert mine[0]["headers"]["authorization"] == "[REDACTED]"
    text = world["decision_log"].read_text()
    for secret in ("guess-Hq9", PASSWORDS["alice"], PASSWORDS["carol"], "YWxpY2U6"):
        assert secret not in text
    log = envoy.sidecar.proc.log_path.read_text()
    assert "guess-Hq9" not in log and "YWxpY2U6" not in log
