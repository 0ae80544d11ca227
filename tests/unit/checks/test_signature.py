"""The ``signature:`` policy section end to end in process: policy YAML -> Authorizer -> decision."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from extauthz.checks.signature import SignatureCheck
from extauthz.decision import Authorizer, Decision
from extauthz.policy import PolicySetError, Services, load_folder
from extauthz.samples import check_request_from_sample
from extauthz.signatures.base import Message
from extauthz.signatures.digest import content_digest
from extauthz.signatures.signer import sign_message
from extauthz.signatures.webhook import sign_webhook

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "signatures"))
import rfc9421_vectors as rfc

CLIENT = ed25519.Ed25519PrivateKey.generate()
OTHER = ed25519.Ed25519PrivateKey.generate()
SECRET = b"whsec-0123456789abcdef0123456789"
HOST, PATH, BODY = "partners.example.com", "/api/transfers?dry=1", b'{"amount": 100}'


def _write_keys(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    (folder / "client-1.pem").write_bytes(CLIENT.public_key().public_bytes(*pem))
    (folder / "client-2.pem").write_bytes(OTHER.public_key().public_bytes(*pem))
    (folder / "hooks.secret").write_bytes(SECRET)
    (folder / "test-key-ed25519.pem").write_text(rfc.TEST_KEY_ED25519_PUBLIC_PEM)
    (folder / "keys.yaml").write_text("client-1: {owner: alice}\nclient-2: {owner: bob}\n")
    return folder


POLICY = """
apiVersion: extauthz.dev/v1
kind: AuthPolicy
metadata: {name: partners}
spec:
  match: {hosts: ["partners.example.com"]}
  signature:
    keys: {folder: ../keys}
    components: ["@method", "@authority", "@path", "@query", "x-tenant"]
    tag: partner-api
    maxAge: 5m
  rules:
    - name: signed-by-client-1
      when: "identity.key_id == 'client-1' && identity.subject == 'alice'"
      decision: allow
    - name: others
      decision: deny
---
apiVersion: extauthz.dev/v1
kind: AuthPolicy
metadata: {name: hooks}
spec:
  match: {hosts: ["hooks.example.com"]}
  signature:
    keys: {folder: ../keys, ids: [hooks]}
    webhook: {preset: timestamp-v1, tolerance: 2m}
  rules: [{name: any, decision: allow}]
---
apiVersion: extauthz.dev/v1
kind: AuthPolicy
metadata: {name: bound}
spec:
  match: {hosts: ["bound.example.com"]}
  signature:
    when: "request.method == 'POST'"
    keys: {folder: ../keys}
    requireNonce: false
    keyOwner: "request.headers[?'x-user'].orValue('')"
  rules: [{name: any, decision: allow}]
---
apiVersion: extauthz.dev/v1
kind: AuthPolicy
metadata: {name: rfc-example}
spec:
  match: {hosts: ["example.com"]}
  signature:
    keys: {folder: ../keys}
    requireNonce: false
    components: ["@method", "@path", "@authority", "content-type", "date"]
    bodyComponents: none
  rules: [{name: any, decision: allow}]
"""


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("signature")
    _write_keys(root / "keys")  # a mounted Secret, beside (never inside) the policy folder
    (root / "policies").mkdir()
    (root / "policies" / "policies.yaml").write_text(POLICY)
    return root / "policies"


@pytest.fixture
def authorizer(policy_dir: Path) -> Authorizer:
    return Authorizer(load_folder(policy_dir, Services()))


def _decide(authorizer: Authorizer, sample: dict[str, Any]) -> Decision:
    return asyncio.run(authorizer.check(check_request_from_sample(sample)))


def _signed_sample(*, host: str = HOST, key: Any = CLIENT, key_id: str = "client-1", nonce: str | None = "n",
                   body: bytes = BODY, components: tuple[str, ...] = ("@method", "@authority", "@path", "@query",
                                                                       "x-tenant", "content-digest"),
                   tag: str | None = "partner-api", created: int | None = None,
                   headers: dict[str, str] | None = None) -> dict[str, Any]:
    fields = {"x-tenant": "acme", "content-digest": content_digest(body), "content-type": "application/json",
              "content-length": str(len(body)), **(headers or {})}
    message = Message(method="POST", scheme="http", authority=host, target=PATH, fields=fields)
    signed = sign_message(message, components, key_id=key_id, algorithm="ed25519", private_key=key,
                          created=created or int(time.time()), nonce=nonce, tag=tag)
    return {"method": "POST", "host": host, "path": PATH, "body": body.decode(),
            "headers": {**fields, "signature-input": signed.signature_input, "signature": signed.signature}}


def test_signed_request_is_allowed_and_identity_has_the_key(authorizer: Authorizer) -> None:
    decision = _decide(authorizer, _signed_sample(nonce="allow-1"))
    assert (decision.allowed, decision.rule) == (True, "signed-by-client-1"), decision
    assert decision.identity["key_id"] == "client-1"
    assert decision.identity["kind"] == "signature" and decision.identity["subject"] == "alice"
    assert decision.attributes["signature_key_id"] == "client-1"


def test_another_valid_key_reaches_the_rules_with_its_own_identity(authorizer: Authorizer) -> None:
    decision = _decide(authorizer, _signed_sample(key=OTHER, key_id="client-2", nonce="other-1"))
    assert (decision.allowed, decision.rule, decision.identity["subject"]) == (False, "others", "bob")


def test_missing_signature_gets_401_with_accept_signature(authorizer: Authorizer) -> None:
    decision = _decide(authorizer, {"method": "POST", "host": HOST, "path": PATH, "body": "{}"})
    assert (decision.status, decision.reason) == (401, "signature_missing")
    headers = dict(decision.client_headers)
    assert headers["accept-signature"] == (
        'sig1=("@method" "@authority" "@path" "@query" "x-tenant" "content-digest");created;tag="partner-api"')
    assert headers["want-content-digest"] == "sha-512=10, sha-256=5"
    get = _decide(authorizer, {"method": "GET", "host": HOST, "path": PATH})
    assert dict(get.client_headers)["accept-signature"] == (
        'sig1=("@method" "@authority" "@path" "@query" "x-tenant");created;tag="partner-api"')


@pytest.mark.parametrize(("change", "reason", "status"), [
    ({"body": '{"amount": 900}'}, "content_digest_mismatch", 401),
    ({"partial_body": True}, "body_truncated", 413),
    ({"headers": {"x-tenant": "evil"}}, "signature_invalid", 401),
    ({"host": "partners.example.com:8443"}, "signature_invalid", 401),
])
def test_tampering_is_denied_with_the_documented_reason(authorizer, change, reason, status) -> None:
    sample = _signed_sample(nonce=f"tamper-{reason}-{status}")
    for key, value in change.items():
        sample[key] = {**sample[key], **value} if isinstance(value, dict) else value
    decision = _decide(authorizer, sample)
    assert (decision.status, decision.reason) == (status, reason), decision.message


def test_replayed_nonce_is_denied(authorizer: Authorizer) -> None:
    sample = _signed_sample(nonce="replay-me")
    assert _decide(authorizer, sample).allowed
    decision = _decide(authorizer, sample)
    assert (decision.status, decision.reason) == (401, "signature_replayed")


def test_expired_and_wrong_tag_and_missing_nonce(authorizer: Authorizer) -> None:
    assert _decide(authorizer, _signed_sample(created=int(time.time()) - 3600)).reason == "signature_expired"
    assert _decide(authorizer, _signed_sample(tag="other")).reason == "signature_tag_mismatch"
    assert _decide(authorizer, _signed_sample(nonce=None)).reason == "signature_nonce_missing"


def test_key_owner_binding_and_conditional_requirement(authorizer: Authorizer) -> None:
    sample = _signed_sample(host="bound.example.com", components=("@method", "@authority", "@path", "content-digest"),
                            tag=None,
                            nonce=None, headers={"x-user": "alice"})
    assert _decide(authorizer, sample).allowed
    sample["headers"]["x-user"] = "bob"
    decision = _decide(authorizer, sample)
    assert (decision.status, decision.reason) == (401, "signature_key_binding_mismatch")
    # when: signatures are only required for POST; an unsigned GET passes, a bad signature never does.
    assert _decide(authorizer, {"method": "GET", "host": "bound.example.com", "path": "/"}).allowed
    garbage = {"method": "GET", "host": "bound.example.com", "path": "/", "headers": {"signature": "x", "signature-input": "y"}}
    assert _decide(authorizer, garbage).reason == "signature_malformed"


def test_webhook_preset_and_replay(authorizer: Authorizer) -> None:
    now = int(time.time())
    body = '{"event": "paid"}'
    header = sign_webhook("timestamp-v1", SECRET, body.encode(), timestamp=now)
    sample = {"method": "POST", "host": "hooks.example.com", "path": "/", "body": body,
              "headers": {"x-signature": header}}
    decision = _decide(authorizer, sample)
    assert decision.allowed and decision.identity["key_id"] == "hooks"
    assert _decide(authorizer, sample).reason == "signature_replayed"
    old = sign_webhook("timestamp-v1", SECRET, body.encode(), timestamp=now - 600)
    assert _decide(authorizer, {**sample, "headers": {"x-signature": old}}).reason == "signature_expired"
    assert _decide(authorizer, {**sample, "body": body + " "}).reason == "signature_invalid"


def test_rfc_b26_vector_through_the_policy(policy_dir: Path) -> None:
    authorizer = Authorizer(load_folder(policy_dir, Services()))
    policy = next(p for p in authorizer.policy_set.policies if p.name == "rfc-example")
    check = next(c for c in policy.checks if isinstance(c, SignatureCheck))
    check.clock = lambda: 1618884473 + 60
    _, signature_input, signature, _, _ = rfc.VECTORS["B26"]
    headers = {k.lower(): v for k, v in rfc.TEST_REQUEST_HEADERS if k != "Host"}
    sample = {"method": "POST", "host": "example.com", "path": "/foo?param=Value&Pet=dog", "scheme": "https",
              "body": rfc.TEST_REQUEST_BODY.decode(),
              "headers": {**headers, "signature-input": signature_input, "signature": signature}}
    decision = _decide(authorizer, sample)
    assert decision.allowed, decision.message
    assert decision.identity["key_id"] == "test-key-ed25519"
    sample["headers"]["date"] = "Tue, 20 Apr 2021 02:07:56 GMT"
    assert _decide(authorizer, sample).reason == "signature_invalid"


def test_unreachable_redis_nonce_store_fails_closed(policy_dir: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    services = Services(settings={"redis_url": f"redis://127.0.0.1:{port}/0?timeout=100ms"})
    authorizer = Authorizer(load_folder(policy_dir, services))
    decision = _decide(authorizer, _signed_sample(nonce="store-down"))
    assert (decision.allowed, decision.status, decision.reason) == (False, 503, "nonce_store_unavailable")


@pytest.mark.parametrize(("section", "message"), [
    ("{components: ['@method']}", "keys"),
    ("{keys: {folder: nowhere}}", "no usable key"),
    ("{keys: {folder: ../keys}, components: ['@status']}", "cannot be required"),
    ("{keys: {folder: ../keys}, components: ['@nope']}", "unknown derived component"),
    ("{keys: {folder: ../keys}, components: ['X-Upper']}", "lower-case"),
    ("{keys: {folder: ../keys}, algorithms: [rsa-sha1]}", "unknown algorithm"),
    ("{keys: {folder: ../keys}, digestAlgorithms: [md5]}", "unknown digest"),
    ("{keys: {folder: ../keys}, label: 'Sig 1'}", "structured-field key"),
    ("{keys: {folder: ../keys}, required: true, when: 'true'}", "either required or when"),
    ("{keys: {folder: ../keys}, webhook: {preset: sha256-hex}, tag: x}", "not to webhook presets"),
    ("{keys: {folder: ../keys}, webhook: {preset: nope}}", "must be one of"),
    ("{keys: {folder: ../keys, ids: [ghost]}}", "ghost"),
    ("{keys: {folder: ../keys}, maxAge: soon}", "duration"),
    ("{keys: {folder: ../keys}, keyOwner: 1}", "CEL"),
    ("{keys: {folder: ../keys}, keyOwner: 'request.size'}", "has type int, expected string"),
    ("{keys: {folder: ../keys}, keyOwner: \"request.headers[?'x-user']\"}", "add .orValue("),
    ("{keys: {folder: ../keys}, when: 'request.method'}", "has type string, expected bool"),
    ("{keys: {folder: ../keys}, surprise: 1}", "unknown field"),
])
def test_policy_errors_are_reported(tmp_path: Path, section: str, message: str) -> None:
    _write_keys(tmp_path / "keys")
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.yaml").write_text(
        "apiVersion: extauthz.dev/v1\nkind: AuthPolicy\nmetadata: {name: p}\n"
        f"spec:\n  signature: {section}\n  rules: [{{name: a, decision: allow}}]\n")
    with pytest.raises(PolicySetError) as info:
        load_folder(tmp_path / "policies", Services())
    assert message in str(info.value)


def test_webhook_needs_an_hmac_secret(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "k.json").write_text(json.dumps(rfc.TEST_KEY_ED25519_JWK))
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.yaml").write_text(
        "apiVersion: extauthz.dev/v1\nkind: AuthPolicy\nmetadata: {name: p}\n"
        "spec:\n  signature: {keys: {folder: ../keys}, webhook: {preset: sha256-hex}}\n")
    with pytest.raises(PolicySetError, match="no usable HMAC secret"):
        load_folder(tmp_path / "policies", Services())


def test_without_components_the_method_authority_and_path_must_be_covered(authorizer: Authorizer) -> None:
    """The `bound` policy names no components: a signature over only its parameters (or over the body
    alone) would verify on any request to any path, so the default covers the request's target."""
    body = b"{}"
    for components in ((), ("content-digest",), ("@method", "@authority", "content-digest")):
        sample = _signed_sample(host="bound.example.com", components=components, body=body, nonce=None, tag=None,
                                headers={"x-user": "alice"})
        d = _decide(authorizer, sample)
        assert (d.allowed, d.status) == (False, 401), components
    sample = _signed_sample(host="bound.example.com", components=("@method", "@authority", "@path", "content-digest"),
                            body=body, nonce=None, tag=None, headers={"x-user": "alice"})
    assert _decide(authorizer, sample).allowed
