"""Request signatures end to end: client -> real Envoy (body forwarded to ext_authz) -> sidecar -> echo.

What a client signs must be what Envoy hands the sidecar. These tests sign exactly as an HTTP client
would (method, authority, target, headers as sent on the wire) and check the decision Envoy enforces,
including the documented consequences of Envoy's own processing (path normalization, header joining).
"""

from __future__ import annotations

import http.client
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import _procs
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from extauthz.signatures.base import Message
from extauthz.signatures.digest import content_digest
from extauthz.signatures.signer import sign_message
from extauthz.signatures.webhook import sign_webhook

pytestmark = [pytest.mark.e2e, pytest.mark.authz_modes]

HOST = "signed.example.com"
KEY = ed25519.Ed25519PrivateKey.generate()
HMAC_SECRET = b"e2e-webhook-secret-0123456789abcdef"
BUFFER_LIMIT = 1024
COMPONENTS = ("@method", "@authority", "@path", "@query", "x-tenant", "content-digest")

POLICIES = f"""
apiVersion: extauthz.dev/v1
kind: AuthPolicy
metadata: {{name: signed-api}}
spec:
  match: {{hosts: ["{HOST}"], paths: ["/api/*"]}}
  signature:
    keys: {{folder: ../keys, ids: [client-1]}}
    components: ["@method", "@authority", "@path", "@query", "x-tenant"]
    maxAge: 1m
  rules: [{{name: signed, decision: allow}}]
  response:
    headers: {{x-signed-by: "identity.key_id"}}
---
apiVersion: extauthz.dev/v1
kind: AuthPolicy
metadata: {{name: derivations}}
spec:
  match: {{hosts: ["{HOST}"], paths: ["/derived/*"]}}
  signature:
    keys: {{folder: ../keys, ids: [client-1]}}
    requireNonce: false
    components: ["@method"]   # the tests below choose what else they cover
    bodyComponents: none
  rules: [{{name: signed, decision: allow}}]
---
apiVersion: extauthz.dev/v1
kind: AuthPolicy
metadata: {{name: hooks}}
spec:
  match: {{hosts: ["hooks.example.com"]}}
  signature:
    keys: {{folder: ../keys, ids: [hooks]}}
    webhook: {{preset: sha256-hex}}
  rules: [{{name: signed, decision: allow}}]
"""


def _write_setup(root: Path) -> Path:
    keys = root / "keys"
    keys.mkdir(parents=True)
    keys.joinpath("client-1.pem").write_bytes(KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    keys.joinpath("hooks.secret").write_bytes(HMAC_SECRET)
    policies = root / "policies"
    policies.mkdir()
    policies.joinpath("signed.yaml").write_text(POLICIES)
    return policies


@pytest.fixture(scope="module")
def stack(tmp_path_factory, extauthz_factory, envoy_factory, echo_upstream):
    policies = _write_setup(tmp_path_factory.mktemp("signature-e2e"))
    sidecar = extauthz_factory(policies)
    envoy = envoy_factory(ext_authz=sidecar.target, upstream_port=echo_upstream.port,
                          max_request_bytes=BUFFER_LIMIT, allow_partial_message=True)
    return envoy


def _send(port: int, method: str, target: str, headers: list[tuple[str, str]], body: bytes = b"",
          host: str = HOST) -> tuple[int, dict[str, str], bytes]:
    """Send exactly these header lines (duplicates kept, order kept)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host)
        for name, value in headers:
            conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body or None)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def _signed(method: str, target: str, body: bytes, *, components=COMPONENTS, nonce: str | None = "auto",
            created: int | None = None, extra: dict[str, str] | None = None,
            host: str = HOST) -> list[tuple[str, str]]:
    fields = {"x-tenant": "acme", "content-type": "application/json", "content-digest": content_digest(body),
              **(extra or {})}
    if nonce == "auto":
        nonce = f"n-{time.monotonic_ns()}"
    message = Message(method=method, scheme="http", authority=host, target=target, fields=fields)
    signed = sign_message(message, components, key_id="client-1", algorithm="ed25519", private_key=KEY,
                          created=created or int(time.time()), nonce=nonce)
    return [*fields.items(), ("Signature-Input", signed.signature_input), ("Signature", signed.signature)]


def _reason(body: bytes) -> str:
    return json.loads(body)["reason"]


BODY = json.dumps({"transfer": {"amount": 125, "currency": "EUR"}, "memo": "e2e"}).encode()


def test_signed_post_with_json_body_passes(stack) -> None:
    status, _, raw = _send(stack.port, "POST", "/api/transfers?dry=1", _signed("POST", "/api/transfers?dry=1", BODY),
                           BODY)
    assert status == 200, raw
    echo = json.loads(raw)
    assert echo["body"] == BODY.decode()
    assert echo["headers"]["x-signed-by"] == ["client-1"]


def test_one_body_byte_changed_is_denied(stack) -> None:
    headers = _signed("POST", "/api/transfers", BODY)
    tampered = BODY.replace(b"125", b"925")
    status, _, raw = _send(stack.port, "POST", "/api/transfers", headers, tampered)
    assert (status, _reason(raw)) == (401, "content_digest_mismatch")


def test_replayed_nonce_is_denied(stack) -> None:
    headers = _signed("POST", "/api/transfers", BODY, nonce="once-only")
    assert _send(stack.port, "POST", "/api/transfers", headers, BODY)[0] == 200
    status, _, raw = _send(stack.port, "POST", "/api/transfers", headers, BODY)
    assert (status, _reason(raw)) == (401, "signature_replayed")


def test_expired_signature_is_denied(stack) -> None:
    headers = _signed("POST", "/api/transfers", BODY, created=int(time.time()) - 600)
    status, _, raw = _send(stack.port, "POST", "/api/transfers", headers, BODY)
    assert (status, _reason(raw)) == (401, "signature_expired")


def test_missing_covered_header_is_denied(stack) -> None:
    headers = [h for h in _signed("POST", "/api/transfers", BODY) if h[0] != "x-tenant"]
    status, _, raw = _send(stack.port, "POST", "/api/transfers", headers, BODY)
    assert (status, _reason(raw)) == (401, "signature_component_missing")


def test_uncovered_required_header_gets_accept_signature(stack) -> None:
    headers = _signed("POST", "/api/transfers", BODY, components=("@method", "@authority", "@path", "content-digest"))
    status, response_headers, raw = _send(stack.port, "POST", "/api/transfers", headers, BODY)
    assert (status, _reason(raw)) == (401, "signature_coverage_insufficient")
    assert response_headers["accept-signature"] == (
        'sig1=("@method" "@authority" "@path" "@query" "x-tenant" "content-digest");created')
    assert response_headers["want-content-digest"] == "sha-512=10, sha-256=5"


def test_body_over_envoy_buffer_limit_is_denied(stack) -> None:
    big = json.dumps({"blob": "x" * (BUFFER_LIMIT * 3)}).encode()
    status, _, raw = _send(stack.port, "POST", "/api/upload", _signed("POST", "/api/upload", big), big)
    assert (status, _reason(raw)) == (413, "body_truncated")


def test_derived_components_match_what_envoy_sends(stack) -> None:
    """Every request-derived component, over a target with escapes, '+', an empty value and a port."""
    target = "/derived/items%2Ccsv?q=caf%C3%A9+au+lait&empty=&x=1%2B2"
    components = ("@method", "@authority", "@scheme", "@target-uri", "@request-target", "@path", "@query",
                  '"@query-param";name="q"', '"@query-param";name="empty"', "x-tenant")
    for host in (HOST, f"{HOST}:80", f"{HOST.upper()}:8080"):
        headers = _signed("GET", target, b"", components=components, nonce=None, host=host)
        status, _, raw = _send(stack.port, "GET", target, headers, host=host)
        assert status == 200, (host, raw)


def test_envoy_path_normalization_changes_what_is_signed(stack) -> None:
    """Envoy (normalize_path, merge_slashes) rewrites :path before ext_authz: sign the normalized form."""
    raw_target = "/derived/a/../b//c"
    headers = _signed("GET", raw_target, b"", components=("@method", "@path"), nonce=None)
    status, _, raw = _send(stack.port, "GET", raw_target, headers)
    assert (status, _reason(raw)) == (401, "signature_invalid")
    headers = _signed("GET", "/derived/b/c", b"", components=("@method", "@path"), nonce=None)
    assert _send(stack.port, "GET", raw_target, headers)[0] == 200


def test_duplicated_covered_header_is_joined_by_envoy_with_a_bare_comma(stack) -> None:
    """RFC 9421 combines field lines with ", "; Envoy's ext_authz headers map joins them with ",".

    A covered header sent on several lines therefore verifies only if signed as Envoy joins it;
    clients must send covered headers once (documented).
    """
    for signed_as, ok in (("a, b", False), ("a,b", True)):
        status, raw = _send_header_on_two_lines(stack.port, signed_as)
        assert (status == 200) is ok, (signed_as, raw)


def _send_header_on_two_lines(port: int, signed_as: str) -> tuple[int, bytes]:
    """A GET covering x-multi, signed as if its value were ``signed_as``, sent as "a" and "b" lines."""
    headers = _signed("GET", "/derived/dup", b"", components=("@method", "x-multi"), nonce=None,
                      extra={"x-multi": signed_as})
    headers = [h for h in headers if h[0] != "x-multi"] + [("X-Multi", "a"), ("X-Multi", "b")]
    status, _, raw = _send(port, "GET", "/derived/dup", headers)
    return status, raw


@pytest.fixture(scope="module")
def raw_headers_stack(tmp_path_factory, extauthz_factory, envoy_factory, echo_upstream):
    """The same sidecar behind an Envoy whose ext_authz sends encode_raw_headers (one entry per line)."""

    def encode_raw_headers(config: dict) -> None:
        for listener in config["static_resources"]["listeners"]:
            for chain in listener["filter_chains"]:
                for f in chain["filters"]:
                    for http_filter in f.get("typed_config", {}).get("http_filters", []):
                        if http_filter["name"] == "envoy.filters.http.ext_authz":
                            http_filter["typed_config"]["encode_raw_headers"] = True

    sidecar = extauthz_factory(_write_setup(tmp_path_factory.mktemp("signature-raw")))
    return envoy_factory(ext_authz=sidecar.target, upstream_port=echo_upstream.port, mutate=encode_raw_headers)


@pytest.mark.grpc_only("encode_raw_headers is an option of the gRPC CheckRequest")
def test_duplicated_covered_header_is_combined_as_rfc9421_says_with_encode_raw_headers(raw_headers_stack) -> None:
    """With encode_raw_headers Envoy hands over every field line, and the sidecar combines them with
    ", " as RFC 9421 does; policies still see the ","-joined value."""
    for signed_as, ok in (("a, b", True), ("a,b", False)):
        status, raw = _send_header_on_two_lines(raw_headers_stack.port, signed_as)
        assert (status == 200) is ok, (signed_as, raw)
    headers = _signed("POST", "/api/transfers", BODY)  # one line per header: as with the headers map
    assert _send(raw_headers_stack.port, "POST", "/api/transfers", headers, BODY)[0] == 200


def test_webhook_hmac_through_envoy(stack) -> None:
    body = b'{"zen": "Keep it logically awesome."}'
    good = [("X-Hub-Signature-256", sign_webhook("sha256-hex", HMAC_SECRET, body))]
    assert _send(stack.port, "POST", "/hook", good, body, host="hooks.example.com")[0] == 200
    status, _, raw = _send(stack.port, "POST", "/hook", good, body[:-2] + b"!}", host="hooks.example.com")
    assert (status, _reason(raw)) == (401, "signature_invalid")


# --- replay protection shared by replicas through Redis ------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> Iterator[str]:
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    port = _procs.free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = _procs.ManagedProcess("redis", [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                           "--appendonly", "no", "--dir", str(workdir)], workdir / "redis.log")
    try:
        _procs.wait_for_tcp("127.0.0.1", port, 10, proc=proc)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.stop()


def test_nonce_replayed_to_another_replica_is_denied(tmp_path_factory, extauthz_factory, envoy_factory,
                                                     echo_upstream, redis_url) -> None:
    policies = _write_setup(tmp_path_factory.mktemp("signature-redis"))
    envoys = []
    for _ in range(2):
        sidecar = extauthz_factory(policies, extra_args=["--redis-url", redis_url])
        envoys.append(envoy_factory(ext_authz=sidecar.target, upstream_port=echo_upstream.port))
    headers = _signed("POST", "/api/transfers", BODY, nonce=f"shared-{time.time_ns()}")
    assert _send(envoys[0].port, "POST", "/api/transfers", headers, BODY)[0] == 200
    status, _, raw = _send(envoys[1].port, "POST", "/api/transfers", headers, BODY)
    assert (status, _reason(raw)) == (401, "signature_replayed")
