"""Key sets over real HTTP: start-up fetch, rotation on an unknown kid, outages, OIDC discovery."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from material import ISSUER, bearer, claims, decide, ec_key, mint, public_jwk, rsa_key, write_policy

from extauthz.identity.jwks import parse_jwks
from extauthz.policy import Services, load_folder

REMOTE_SPEC = """
identity:
  - name: users
    jwt:
      issuer: {issuer}
      audiences: [orders-api]
      {keys}
      jwksRefresh: {{interval: 1h, minInterval: {min_interval}, wait: 2s}}
"""


async def _started(folder: Path, services: Services):
    from extauthz.decision import Authorizer

    policy_set = load_folder(folder, services)
    for service in services.all():
        if hasattr(service, "start") and not getattr(service, "started", False):
            await service.start()
    return Authorizer(policy_set)


async def _close(services: Services) -> None:
    for service in services.all():
        if hasattr(service, "aclose"):
            await service.aclose()


def _write(tmp_path: Path, keys: str, *, issuer: str = ISSUER, min_interval: str = "0s") -> Path:
    return write_policy(tmp_path / "policies", REMOTE_SPEC.format(issuer=issuer, keys=keys, min_interval=min_interval))


@pytest.fixture
def fetch_metrics():
    """A Metrics installed as the process' for the test (what /metrics would show)."""
    from extauthz.telemetry import metrics

    installed = metrics.Metrics()
    metrics.install(installed)
    yield lambda name, **labels: installed.registry.get_sample_value(name, labels) or 0
    metrics.install(None)


def test_jwks_url_rotation_and_outage(tmp_path, json_server, signing_key, fetch_metrics):
    new_key = ec_key()
    json_server.routes["/jwks"] = (200, {"keys": [public_jwk(signing_key, "k1")]})
    folder = _write(tmp_path, f"jwksUrl: {json_server.url('/jwks')}", min_interval="0s")

    async def main() -> None:
        services = Services()
        try:
            auth = await _started(folder, services)
            assert json_server.calls["/jwks"] == 1
            assert (await decide(auth, bearer(mint(signing_key)))).allowed

            # Rotation: a token signed with a new key arrives before the next scheduled refresh;
            # its unknown kid triggers one fetch, which the request waits for.
            json_server.routes["/jwks"] = (200, {"keys": [public_jwk(signing_key, "k1"), public_jwk(new_key, "k2")]})
            d = await decide(auth, bearer(mint(new_key, kid="k2", alg="ES256")))
            assert d.allowed, d.steps
            assert json_server.calls["/jwks"] == 2

            # The server goes away: fetches fail, the last good keys keep serving.
            json_server.stop()
            d = await decide(auth, bearer(mint(signing_key, kid="k-unknown")))
            assert d.reason == "unknown_key"
            assert (await decide(auth, bearer(mint(signing_key)))).allowed
            assert (await decide(auth, bearer(mint(new_key, kid="k2", alg="ES256")))).allowed
        finally:
            await _close(services)

    asyncio.run(main())
    assert fetch_metrics("extauthz_jwks_fetches_total", result="ok") >= 2
    assert fetch_metrics("extauthz_fetch_duration_seconds_count", kind="jwks") >= 2


def test_unknown_kids_trigger_at_most_one_fetch_per_interval(tmp_path, json_server, signing_key):
    json_server.routes["/jwks"] = (200, {"keys": [public_jwk(signing_key, "k1")]})
    folder = _write(tmp_path, f"jwksUrl: {json_server.url('/jwks')}", min_interval="1h")

    async def main() -> None:
        services = Services()
        try:
            auth = await _started(folder, services)
            results = await asyncio.gather(*(decide(auth, bearer(mint(signing_key, kid=f"rand-{i}")))
                                             for i in range(30)))
            assert {d.reason for d in results} == {"unknown_key"}
            assert json_server.calls["/jwks"] == 1  # only the start-up fetch: min interval not over
        finally:
            await _close(services)

    asyncio.run(main())


def test_concurrent_unknown_kids_share_one_fetch(tmp_path, json_server, signing_key):
    new_key = rsa_key(fresh=True)
    json_server.routes["/jwks"] = (200, {"keys": [public_jwk(signing_key, "k1")]})
    folder = _write(tmp_path, f"jwksUrl: {json_server.url('/jwks')}", min_interval="0s")

    async def main() -> None:
        services = Services()
        try:
            auth = await _started(folder, services)

            def slow(_request):
                time.sleep(0.2)
                return 200, {"keys": [public_jwk(signing_key, "k1"), public_jwk(new_key, "k2")]}

            json_server.routes["/jwks"] = slow
            token = mint(new_key, kid="k2")
            results = await asyncio.gather(*(decide(auth, bearer(token)) for _ in range(10)))
            assert all(d.allowed for d in results)
            assert json_server.calls["/jwks"] == 2
        finally:
            await _close(services)

    asyncio.run(main())


def test_no_keys_yet_is_503_never_an_allow(tmp_path, json_server, signing_key, fetch_metrics):
    json_server.routes["/jwks"] = (500, {"error": "down"})
    folder = _write(tmp_path, f"jwksUrl: {json_server.url('/jwks')}")

    async def main() -> None:
        services = Services()
        try:
            auth = await _started(folder, services)
            d = await decide(auth, bearer(mint(signing_key)))
            assert (d.allowed, d.status, d.reason) == (False, 503, "keys_unavailable")
            assert not [v for k, v in d.client_headers if k == "www-authenticate"]
            assert fetch_metrics("extauthz_jwks_fetches_total", result="error") >= 1
            assert fetch_metrics("extauthz_jwks_fetches_total", result="ok") == 0
        finally:
            await _close(services)

    asyncio.run(main())


def test_oidc_discovery(tmp_path, json_server, signing_key):
    issuer = json_server.url("")
    json_server.routes["/.well-known/openid-configuration"] = (
        200, {"issuer": issuer, "jwks_uri": json_server.url("/keys")})
    json_server.routes["/keys"] = (200, {"keys": [public_jwk(signing_key, "k1")]})
    folder = _write(tmp_path, "discovery: true", issuer=issuer)

    async def main() -> None:
        services = Services()
        try:
            auth = await _started(folder, services)
            assert (await decide(auth, bearer(mint(signing_key, claims(iss=issuer))))).allowed
            assert json_server.calls == {"/.well-known/openid-configuration": 1, "/keys": 1}
        finally:
            await _close(services)

    asyncio.run(main())


def test_discovery_naming_another_issuer_gives_no_keys(tmp_path, json_server, signing_key):
    issuer = json_server.url("")
    json_server.routes["/.well-known/openid-configuration"] = (
        200, {"issuer": "https://evil.test", "jwks_uri": json_server.url("/keys")})
    json_server.routes["/keys"] = (200, {"keys": [public_jwk(signing_key, "k1")]})
    folder = _write(tmp_path, "discovery: true", issuer=issuer)

    async def main() -> None:
        services = Services()
        try:
            auth = await _started(folder, services)
            d = await decide(auth, bearer(mint(signing_key, claims(iss=issuer))))
            assert d.reason == "keys_unavailable"
            assert "/keys" not in json_server.calls
        finally:
            await _close(services)

    asyncio.run(main())


def test_oversized_or_redirecting_jwks_is_not_used(tmp_path, json_server, signing_key):
    json_server.routes["/jwks"] = (200, b"{" + b" " * (2 * 1024 * 1024) + b"}")
    json_server.routes["/moved"] = (302, {"keys": [public_jwk(signing_key, "k1")]})
    for path in ("/jwks", "/moved"):
        folder = _write(tmp_path / path.strip("/"), f"jwksUrl: {json_server.url(path)}")

        async def main(folder: Path = folder) -> None:
            services = Services()
            try:
                auth = await _started(folder, services)
                assert (await decide(auth, bearer(mint(signing_key)))).reason == "keys_unavailable"
            finally:
                await _close(services)

        asyncio.run(main())


def test_one_fetcher_per_url_across_policies_and_reloads(tmp_path, json_server, signing_key):
    json_server.routes["/jwks"] = (200, {"keys": [public_jwk(signing_key, "k1")]})
    folder = _write(tmp_path, f"jwksUrl: {json_server.url('/jwks')}")
    services = Services()
    load_folder(folder, services)
    load_folder(folder, services)
    assert len([s for s in services.all() if type(s).__name__ == "RemoteKeys"]) == 1


def test_parse_jwks_reports_what_it_skips():
    key = ec_key()
    keys = parse_jwks({"keys": [
        public_jwk(key, "a"),
        public_jwk(key, "b", alg="ES384"),  # alg does not fit the P-256 curve
        public_jwk(key, "c", key_ops=["encrypt"]),
        {"kty": "RSA", "kid": 5},
        {"kty": "OKP", "crv": "X25519", "x": "AAAA"},
    ]})
    assert [k.kid for k in keys.keys] == ["a", "b"]
    assert keys.candidates("b", "ES256") == ()
    assert len(keys.skipped) == 3
    with pytest.raises(ValueError, match="not a JSON Web Key Set"):
        parse_jwks({"keys": "nope"})
    with pytest.raises(ValueError, match="no usable signing key"):
        parse_jwks({"keys": []})
