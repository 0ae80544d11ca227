"""The identity check: ordered sources, first present decides, no fall-through, RFC 6750 denials."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "identity"))

from material import (
    AUDIENCE,
    ISSUER,
    bearer,
    claims,
    decide_now,
    mint,
    public_jwk,
    rsa_key,
    write_policy,
    www_authenticate,
)
from material import authorizer as make_authorizer

from extauthz.policy.model import PolicySetError

PRINCIPAL = "spiffe://cluster.local/ns/orders/sa/api"


@pytest.fixture(scope="module")
def key():
    return rsa_key()


def _folder(tmp_path: Path, key) -> Path:
    import json

    folder = tmp_path / "policies"
    folder.mkdir(exist_ok=True)
    (folder / "jwks.json").write_text(json.dumps({"keys": [public_jwk(key, "k1")]}))
    return folder


def _auth(tmp_path: Path, key, identity: str, rules: str | None = None, extra: str = ""):
    folder = _folder(tmp_path, key)
    return make_authorizer(write_policy(folder, f"identity:\n{identity}{extra}", rules=rules))


JWT = f"""  - name: users
    jwt: {{issuer: "{ISSUER}", audiences: [{AUDIENCE}], jwksFile: jwks.json}}
"""
MTLS = "  - name: mesh\n    mtls: {}\n"
ANONYMOUS = "  - name: public\n    anonymous: {}\n"


def test_first_source_with_credentials_decides(tmp_path, key):
    auth = _auth(tmp_path, key, JWT + MTLS)
    both = {**bearer(mint(key)), "source": {"principal": PRINCIPAL}}
    assert decide_now(auth, both).identity["kind"] == "jwt"
    assert decide_now(auth, {"source": {"principal": PRINCIPAL}}).identity["kind"] == "mtls"


def test_a_rejected_credential_never_falls_through(tmp_path, key):
    auth = _auth(tmp_path, key, JWT + MTLS + ANONYMOUS)
    expired = mint(key, claims(exp=1))
    d = decide_now(auth, {**bearer(expired), "source": {"principal": PRINCIPAL}})
    assert (d.allowed, d.status, d.reason, d.rule) == (False, 401, "token_expired", "identity/users")
    assert d.identity["kind"] == "anonymous" and d.identity["source"] == ""


def test_no_credentials_denies_401_with_every_challenge(tmp_path, key):
    d = decide_now(_auth(tmp_path, key, JWT + MTLS), {})
    assert (d.status, d.reason) == (401, "credentials_missing")
    assert www_authenticate(d) == ["Bearer", "mTLS"]
    assert d.message == "credentials are required"


def test_anonymous_fallback_is_explicit(tmp_path, key):
    rules = """rules:
  - name: members
    when: "identity.kind == 'jwt'"
    decision: allow
  - name: public-reads
    when: "identity.kind == 'anonymous' && request.method == 'GET'"
    decision: allow"""
    auth = _auth(tmp_path, key, JWT + ANONYMOUS, rules)
    d = decide_now(auth, {})
    assert d.allowed and d.rule == "public-reads" and d.identity["source"] == "public"
    assert decide_now(auth, {"method": "POST"}).reason == "no_rule_matched"
    assert decide_now(auth, {"method": "POST", **bearer(mint(key))}).allowed


def test_required_scopes_give_403_insufficient_scope(tmp_path, key):
    auth = _auth(tmp_path, key, JWT + "    requiredScopes: [orders:admin]\n")
    d = decide_now(auth, bearer(mint(key)))
    assert (d.status, d.reason) == (403, "insufficient_scope")
    assert www_authenticate(d) == [
        'Bearer error="insufficient_scope", error_description="token lacks a required scope", scope="orders:admin"']
    assert d.identity["subject"] == "alice"  # who was refused is known
    assert decide_now(auth, bearer(mint(key, claims(scope="orders:admin")))).allowed


def test_identity_in_rules_and_response_headers(tmp_path, key):
    rules = """rules:
  - name: acme-only
    when: "identity.claims.tenant == 'acme' && 'orders:read' in identity.scopes"
    decision: allow
  - name: mesh-orders
    when: "identity.kind == 'mtls' && identity.spiffe.namespace == 'orders'"
    decision: allow
response:
  headers:
    x-subject: "identity.subject"
    x-identity-source: "identity.source"
"""
    auth = _auth(tmp_path, key, JWT + MTLS, rules)
    d = decide_now(auth, bearer(mint(key, claims(tenant="acme"))))
    assert d.allowed and d.rule == "acme-only"
    assert dict(d.upstream_headers) == {"x-subject": "alice", "x-identity-source": "users"}
    assert decide_now(auth, bearer(mint(key, claims(tenant="other")))).status == 403
    d = decide_now(auth, {"source": {"principal": PRINCIPAL}})
    assert d.allowed and d.rule == "mesh-orders" and dict(d.upstream_headers)["x-subject"] == PRINCIPAL


def test_identity_denial_in_dry_run_is_reported_not_enforced(tmp_path, key):
    folder = _folder(tmp_path, key)
    write_policy(folder, f"mode: dry-run\nidentity:\n{JWT}")
    d = decide_now(make_authorizer(folder), {})
    assert d.allowed and d.would_deny and d.reason == "credentials_missing"


def test_client_gets_json_body_and_challenge(tmp_path, key):
    from extauthz.responses import to_check_response

    d = decide_now(_auth(tmp_path, key, JWT), bearer(mint(key, claims(aud="elsewhere"))))
    response = to_check_response(d)
    assert response.denied_response.status.code == 401
    assert b'"reason":"wrong_audience"' in response.denied_response.body.encode()
    headers = {h.header.key: h.header.value for h in response.denied_response.headers}
    assert headers["www-authenticate"] == 'Bearer error="invalid_token", error_description="token audience is not accepted"'


@pytest.mark.parametrize(("identity", "message"), [
    ("  - name: a\n    mtls: {}\n  - name: a\n    mtls: {}\n", "duplicate identity source name"),
    ("  - name: a\n    mtls: {}\n    anonymous: {}\n", "exactly one source kind"),
    ("  - name: a\n    saml: {}\n", "unknown field"),
    ("  - name: a\n", "exactly one source kind"),
    ("  - mtls: {}\n", "name: is required"),
    ("  - name: Bad_Name\n    mtls: {}\n", "lower-case"),
    ("  - name: a\n    anonymous: {}\n  - name: b\n    mtls: {}\n", "must be the last entry"),
    ("  - name: a\n    anonymous: {x: 1}\n", "takes no options"),
    ("  - name: a\n    mtls: {}\n    requiredScopes: [x]\n", "have no scopes"),
    ("  {}\n", "must be a list"),
    ("  []\n", "at least one identity source"),
])
def test_configuration_errors(tmp_path, key, identity, message):
    with pytest.raises(PolicySetError, match=message):
        _auth(tmp_path, key, identity)


def test_policy_without_identity_keeps_anonymous(tmp_path, key):
    folder = _folder(tmp_path, key)
    write_policy(folder, "match: {hosts: [x.example.com]}")
    d = decide_now(make_authorizer(folder), {"host": "x.example.com"})
    assert d.allowed and d.identity["kind"] == "anonymous"


def test_check_timeout_applies_only_when_a_source_may_wait(tmp_path, key):
    auth = _auth(tmp_path, key, JWT + MTLS)
    assert not auth.policy_set.policies[0].may_wait


@pytest.mark.parametrize("where", ["header", "query", "cookie", "custom-header"])
def test_credentials_never_reach_logs_or_traces(tmp_path, key, where):
    import json
    import time

    from extauthz.telemetry.decision_log import DecisionLogConfig, decision_record
    from extauthz.telemetry.tracing import SubjectHasher, decision_attributes

    locations = "[{header: authorization, scheme: Bearer}, {query: access_token}, {cookie: session}, {header: x-token}]"
    jwt_entry = JWT.replace("jwksFile: jwks.json}", f"jwksFile: jwks.json, token: {locations}}}")
    auth = _auth(tmp_path, key, jwt_entry)
    config = DecisionLogConfig(headers=("authorization", "cookie", "x-token"), query="full")
    for token in (mint(key), mint(key, claims(exp=1))):  # accepted and rejected
        sample = {
            "header": bearer(token),
            "query": {"path": f"/?access_token={token}"},
            "cookie": {"headers": {"cookie": f"session={token}"}},
            "custom-header": {"headers": {"x-token": token}},
        }[where]
        d = decide_now(auth, sample)
        record = json.dumps(decision_record(d, time.time(), config))
        spans = repr(decision_attributes(d, SubjectHasher(mode="plain")))
        assert token not in record and token not in spans
        assert token.split(".")[2] not in record + spans  # not even the signature part


def test_rules_on_scope_lists_are_exact_for_every_identity(tmp_path, key):
    """Scope lists are part of the CEL memo key: a cached result never leaks to other scopes."""
    rules = """rules:
  - name: admins
    when: "'orders:admin' in identity.scopes"
    decision: allow"""
    auth = _auth(tmp_path, key, JWT, rules)
    for scope, allowed in [("orders:admin", True), ("orders:read", False), ("orders:read orders:admin", True),
                           ("", False), ("orders:admin", True), ("orders:administrator", False)]:
        d = decide_now(auth, bearer(mint(key, claims(scope=scope))))
        assert d.allowed is allowed, (scope, d.reason)
