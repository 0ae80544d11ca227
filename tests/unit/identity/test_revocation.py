"""Revocation denylists: a watched file, and a Redis set when the sidecar has a shared store."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from material import ISSUER, bearer, claims, decide, mint, public_jwk, write_policy

from extauthz.identity.revocation import RevocationList, parse_denylist
from extauthz.policy import Services, load_folder
from extauthz.stores.memory import MemoryStore
from extauthz.watched import WatchedPath


def test_denylist_file_format(tmp_path: Path):
    path = tmp_path / "revoked.txt"
    path.write_text("# comment\n\njti-1\n  jti-2   # trailing comment\n")
    assert parse_denylist(path) == frozenset({"jti-1", "jti-2"})
    path.write_text("two words\n")
    with pytest.raises(ValueError, match="line 1"):
        parse_denylist(path)


def test_file_and_store_are_both_consulted(tmp_path: Path):
    path = tmp_path / "revoked.txt"
    path.write_text("from-file\n")
    watched = WatchedPath(path, parse_denylist, what="revocation list")
    watched.refresh()
    store = MemoryStore()
    store.add_member("revoked", "from-store")
    revocation = RevocationList(watched, store, "revoked")

    async def main():
        return [await revocation.is_revoked(x) for x in ("from-file", "from-store", "fine", "")]

    assert asyncio.run(main()) == [True, True, False, False]
    assert revocation.may_wait


def _redis_or_skip(request: pytest.FixtureRequest):
    try:
        return request.getfixturevalue("redis_server")
    except pytest.FixtureLookupError:
        pytest.skip("the redis_server fixture is not available")


def _jwt_policy_with_a_revocation_set(tmp_path: Path, signing_key, extra: str = "") -> Path:
    """A policy folder: JWTs from a local key set, revoked by id in the Redis set extauthz:revoked:jti."""
    import json

    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "jwks.json").write_text(json.dumps({"keys": [public_jwk(signing_key, "k1")]}))
    write_policy(folder, f"""identity:
  - name: users
    jwt:
      issuer: {ISSUER}
      audiences: [orders-api]
      jwksFile: jwks.json
      revocation: {{redisSet: "extauthz:revoked:jti"{extra}}}
""")
    return folder


def test_redis_set_revokes_tokens_and_redis_down_fails_closed(request, tmp_path: Path, signing_key):
    redis = _redis_or_skip(request)
    folder = _jwt_policy_with_a_revocation_set(tmp_path, signing_key)

    async def main() -> None:
        from extauthz.decision import Authorizer

        services = Services(settings={"redis_url": redis.url})
        auth = Authorizer(load_folder(folder, services))
        try:
            for service in services.all():
                if hasattr(service, "start") and not getattr(service, "started", False):
                    await service.start()
            assert auth.policy_set.policies[0].may_wait
            client = redis.client()
            client.sadd("extauthz:revoked:jti", "jti-stolen")
            assert (await decide(auth, bearer(mint(signing_key, claims(jti="jti-stolen"))))).reason == "token_revoked"
            fine = mint(signing_key, claims(jti="jti-fine"))
            assert (await decide(auth, bearer(fine))).allowed
            redis.kill()
            started = time.monotonic()
            d = await decide(auth, bearer(fine))
            assert (d.allowed, d.status, d.reason) == (False, 503, "revocation_unavailable"), d.steps
            assert time.monotonic() - started < 2
        finally:
            for service in services.all():
                if hasattr(service, "aclose"):
                    await service.aclose()

    asyncio.run(main())


def test_a_set_without_redis_does_what_the_policy_says(tmp_path: Path):
    """A sidecar without --redis-url: withoutRedis deny (the default) refuses, skip goes on with the
    file alone. A set named in a policy is never silently skipped."""
    path = tmp_path / "revoked.txt"
    path.write_text("from-file\n")
    watched = WatchedPath(path, parse_denylist, what="revocation list")
    watched.refresh()

    async def main(revocation: RevocationList) -> list[object]:
        out: list[object] = []
        for item in ("from-file", "fine", ""):
            try:
                out.append(await revocation.is_revoked(item))
            except Exception as exc:  # Rejected
                out.append(getattr(exc, "reason", exc))
        return out

    assert asyncio.run(main(RevocationList(watched, None, "revoked", deny_without_store=True))) == [
        True, "revocation_unavailable", False]
    assert asyncio.run(main(RevocationList(watched, None, "revoked", deny_without_store=False))) == [True, False, False]


@pytest.mark.parametrize(("without_redis", "settings", "reason"), [
    ("", {}, "revocation_unavailable"),                # serve without --redis-url: deny by default
    ("withoutRedis: skip", {}, None),                  # the policy says the file alone will do
    ("", {"offline": True}, None),                     # extauthz test/explain/validate: the set is skipped
])
def test_without_redis_through_the_policy(tmp_path: Path, signing_key, without_redis: str, settings: dict,
                                          reason: str | None):
    from extauthz.decision import Authorizer

    folder = _jwt_policy_with_a_revocation_set(tmp_path, signing_key, f", {without_redis}" if without_redis else "")
    auth = Authorizer(load_folder(folder, Services(settings=settings)))
    d = asyncio.run(decide(auth, bearer(mint(signing_key, claims(jti="jti-1")))))
    assert (d.allowed, d.reason if not d.allowed else None) == (reason is None, reason), d.steps


def test_without_redis_is_validated(tmp_path: Path):
    from extauthz.policy.model import PolicySetError

    for revocation, message in (("{redisSet: r, withoutRedis: allow}", "must be one of"),
                                ("{file: x.txt, withoutRedis: skip}", "applies to redisSet only")):
        folder = tmp_path / message.split()[0]
        folder.mkdir(parents=True)
        (folder / "x.txt").write_text("")
        write_policy(folder, f"identity:\n  - name: k\n    apiKey: {{keys: keys.json, revocation: {revocation}}}\n")
        (folder / "keys.json").write_text("[]")
        with pytest.raises(PolicySetError, match=message):
            load_folder(folder)
