"""OAuth 2.0 token introspection (RFC 7662) against a real HTTP endpoint on loopback."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path

import pytest
from material import Pki, decide, decide_now, exposed, write_policy, www_authenticate
from material import authorizer as make_authorizer

from extauthz.policy import Services
from extauthz.policy.model import PolicySetError

TOKEN = "opaque-token-AbC123"
CLIENT_SECRET = "s3cr3t/with+chars"


def _auth(tmp_path: Path, endpoint: str, extra: str = "", services: Services | None = None):
    folder = tmp_path / "policies"
    secrets = tmp_path / "secrets"
    secrets.mkdir(parents=True, exist_ok=True)
    (secrets / "client-secret").write_text(CLIENT_SECRET + "\n")
    spec = f"""identity:
  - name: legacy
    oauth2Introspection:
      endpoint: {endpoint}
      clientId: orders-api
      clientSecretFile: ../secrets/client-secret
"""
    for line in extra.strip("\n").splitlines():
        spec += "      " + line + "\n"
    return make_authorizer(write_policy(folder, spec), services)


def _active(**extra):
    def route(request):
        token = request["form"].get("token")
        if token != TOKEN:
            return 200, {"active": False}
        return 200, {"active": True, "sub": "alice", "client_id": "mobile-app", "scope": "orders:read",
                     "exp": int(time.time()) + 600, **extra}

    return route


def _bearer(token: str = TOKEN) -> dict:
    return {"headers": {"authorization": f"Bearer {token}"}}


def test_active_token_is_accepted_and_cached(tmp_path, json_server):
    json_server.routes["/introspect"] = _active(tenant="acme")
    auth = _auth(tmp_path, json_server.url("/introspect"))

    async def main():
        first = await decide(auth, _bearer())
        second = await decide(auth, _bearer())
        return first, second

    first, second = asyncio.run(main())
    assert first.allowed and second.allowed
    identity = first.identity
    assert (identity["kind"], identity["subject"], identity["scopes"]) == ("oauth2Introspection", "alice", ["orders:read"])
    assert identity["client_id"] == "mobile-app" and identity["claims"]["tenant"] == "acme"
    assert json_server.calls["/introspect"] == 1
    request = json_server.requests[0]
    assert request["method"] == "POST"
    assert request["form"] == {"token": TOKEN, "token_type_hint": "access_token"}
    user, _, password = base64.b64decode(request["headers"]["Authorization"].split()[1]).decode().partition(":")
    assert (user, password) == ("orders-api", "s3cr3t%2Fwith%2Bchars")  # RFC 6749 2.3.1 form-encoding


def test_client_secret_post(tmp_path, json_server):
    json_server.routes["/introspect"] = _active()
    auth = _auth(tmp_path, json_server.url("/introspect"), "authMethod: post")
    assert decide_now(auth, _bearer()).allowed
    form = json_server.requests[0]["form"]
    assert form["client_id"] == "orders-api" and form["client_secret"] == CLIENT_SECRET
    assert "Authorization" not in json_server.requests[0]["headers"]


def test_inactive_token(tmp_path, json_server):
    from extauthz.telemetry import metrics

    installed = metrics.Metrics()
    metrics.install(installed)
    json_server.routes["/introspect"] = _active()
    auth = _auth(tmp_path, json_server.url("/introspect"))
    async def main():
        return await decide(auth, _bearer()), await decide(auth, _bearer("revoked-token"))

    try:
        first, d = asyncio.run(main())
    finally:
        metrics.install(None)
    assert first.allowed
    for result in ("active", "inactive"):
        assert installed.registry.get_sample_value("extauthz_introspection_requests_total", {"result": result}) == 1
    assert installed.registry.get_sample_value("extauthz_fetch_duration_seconds_count", {"kind": "introspection"}) == 2
    assert (d.status, d.reason) == (401, "token_inactive")
    assert www_authenticate(d) == ['Bearer error="invalid_token", error_description="token is not active"']
    assert "revoked-token" not in exposed(d)


@pytest.mark.parametrize(("response", "extra", "reason"), [
    ({"active": True, "sub": "a", "exp": int(time.time()) - 5}, "", "token_expired"),
    ({"active": True, "sub": "a", "aud": "other"}, "audiences: [orders-api]", "wrong_audience"),
    ({"active": True, "sub": "a", "iss": "https://evil"}, "issuer: https://idp.test", "wrong_issuer"),
    ({"active": True}, "", "missing_claim"),
    ({"active": "true", "sub": "a"}, "", "token_inactive"),
    ({"active": True, "sub": "a", "cnf": {"jkt": "x"}}, "", "unsupported_token_binding"),
])
def test_active_but_unacceptable(tmp_path, json_server, response, extra, reason):
    json_server.routes["/introspect"] = (200, response)
    d = decide_now(_auth(tmp_path, json_server.url("/introspect"), extra), _bearer())
    assert (d.status, d.reason) == (401, reason)


@pytest.mark.parametrize("route", [(500, {"error": "oops"}), (200, b"not json"), (200, b"[1, 2]"), (401, {})])
def test_endpoint_failures_are_503(tmp_path, json_server, route):
    json_server.routes["/introspect"] = route
    d = decide_now(_auth(tmp_path, json_server.url("/introspect")), _bearer())
    assert (d.allowed, d.status, d.reason) == (False, 503, "introspection_unavailable")


def test_unreachable_endpoint_is_503_and_not_cached(tmp_path, json_server):
    json_server.routes["/introspect"] = _active()
    url = json_server.url("/introspect")
    json_server.stop()
    auth = _auth(tmp_path, url)
    d = decide_now(auth, _bearer())
    assert (d.allowed, d.status, d.reason) == (False, 503, "introspection_unavailable")


def test_slow_endpoint_times_out_as_503(tmp_path, json_server):
    def slow(request):
        time.sleep(0.6)
        return _active()(request)

    json_server.routes["/introspect"] = slow
    d = decide_now(_auth(tmp_path, json_server.url("/introspect"), "timeout: 200ms"), _bearer())
    assert (d.status, d.reason) == (503, "introspection_unavailable")


def test_concurrent_lookups_share_one_call(tmp_path, json_server):
    def slow(request):
        time.sleep(0.2)
        return _active()(request)

    json_server.routes["/introspect"] = slow
    auth = _auth(tmp_path, json_server.url("/introspect"))

    async def main():
        return await asyncio.gather(*(decide(auth, _bearer()) for _ in range(20)))

    results = asyncio.run(main())
    assert all(d.allowed for d in results)
    assert json_server.calls["/introspect"] == 1


def test_cache_duration_caps_the_token_lifetime(tmp_path, json_server):
    json_server.routes["/introspect"] = _active()
    auth = _auth(tmp_path, json_server.url("/introspect"), "cacheDuration: 50ms")

    async def main():
        await decide(auth, _bearer())
        await asyncio.sleep(0.1)
        await decide(auth, _bearer())

    asyncio.run(main())
    assert json_server.calls["/introspect"] == 2


def test_certificate_bound_opaque_token(tmp_path, json_server):
    pki = Pki()
    client, other = pki.client(uris=("spiffe://x/a",)), pki.client(uris=("spiffe://x/b",))
    json_server.routes["/introspect"] = _active(cnf={"x5t#S256": client.thumbprint})
    auth = _auth(tmp_path, json_server.url("/introspect"))
    ok = decide_now(auth, {**_bearer(), "source": {"principal": "spiffe://x/a", "certificate": client.pem}})
    assert ok.allowed
    wrong = decide_now(auth, {**_bearer(), "source": {"principal": "spiffe://x/b", "certificate": other.pem}})
    assert wrong.reason == "bound_certificate_mismatch"
    assert decide_now(auth, _bearer()).reason == "bound_certificate_missing"


def test_token_shape_is_checked_before_any_call(tmp_path, json_server):
    json_server.routes["/introspect"] = _active()
    auth = _auth(tmp_path, json_server.url("/introspect"))
    assert decide_now(auth, _bearer("has\"quote")).reason == "malformed_token"
    assert decide_now(auth, _bearer("x" * 5000)).reason == "token_too_large"
    assert json_server.calls == {}


def test_configuration_errors(tmp_path):
    with pytest.raises(PolicySetError) as excinfo:
        _auth(tmp_path, "http://idp.example.com/introspect", "authMethod: jwt\ntimeout: 1h")
    text = str(excinfo.value)
    assert "must use https" in text and "must be one of" in text and "between" in text
