"""HTTP Basic: htpasswd files of bcrypt/argon2id hashes, weak schemes refused, the verification
thread pool and its bound, the keyed cache of successful verifications and its invalidation."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import threading
from pathlib import Path

import bcrypt
import pytest
from argon2 import PasswordHasher
from material import authorizer as make_authorizer
from material import decide, decide_now, exposed, public_jwk, rsa_key, write_policy, www_authenticate

from extauthz.identity import Rejected
from extauthz.identity.basic import (
    BasicSource,
    HashPolicy,
    PasswordPool,
    Verifier,
    cache_key,
    check_password,
    decode_basic,
    parse_htpasswd,
    read_htpasswd,
)
from extauthz.policy.model import PolicySetError

#: The cheapest hashes the tests allow themselves (the policy lowers its minimums to match).
LOW = HashPolicy(min_bcrypt_cost=4, min_argon2_memory_kib=8, min_argon2_iterations=1, min_argon2_parallelism=1)
LOW_SPEC = "minBcryptCost: 4\nminArgon2: {memoryKiB: 8, iterations: 1, parallelism: 1}"
ARGON2 = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
PASSWORDS = {"alice": "correct horse", "bob": "b0b-s3cret:with colon", "carol": "pässwörd ✓", "dave": "d"}


def _bcrypt(password: str, prefix: bytes = b"2b") -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4, prefix=prefix)).decode()


def _htpasswd_text() -> str:
    return "\n".join([
        "# users of the test",
        f"alice:{_bcrypt(PASSWORDS['alice'])}:admins,reports",
        "",
        f"bob:{_bcrypt(PASSWORDS['bob'], b'2a')}",
        f"carol:{ARGON2.hash(PASSWORDS['carol'])}",
        f"dave:{_bcrypt(PASSWORDS['dave']).replace('$2b$', '$2y$', 1)}",
    ]) + "\n"


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    path = tmp_path / "secrets" / "htpasswd"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_htpasswd_text())
    return path


def _auth(tmp_path: Path, extra: str = LOW_SPEC, rules: str | None = None):
    spec = "identity:\n  - name: staff\n    basic:\n      htpasswd: ../secrets/htpasswd\n"
    for line in extra.strip("\n").splitlines():
        spec += "      " + line + "\n"
    return make_authorizer(write_policy(tmp_path / "policies", spec, rules=rules))


def _basic(user: str, password: str) -> dict:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"headers": {"authorization": f"Basic {token}"}}


def _source(auth) -> BasicSource:
    policy = auth.policy_set.policies[0]
    check = next(c for c in policy.checks if hasattr(c, "entries"))
    source = check.entries[0].source
    assert isinstance(source, BasicSource)
    return source


def _replace(path: Path, text: str) -> None:
    """Write a new version the way a Secret update does (a new file swapped in)."""
    new = path.with_name(path.name + ".new")
    new.write_text(text)
    os.replace(new, path)


# --- success -------------------------------------------------------------------------------------
def test_every_accepted_scheme_authenticates(tmp_path, htpasswd):
    auth = _auth(tmp_path)
    for user, password in PASSWORDS.items():
        d = decide_now(auth, _basic(user, password))
        assert d.allowed, (user, d.reason)
        identity = d.identity
        assert (identity["kind"], identity["source"], identity["subject"], identity["user"]) == (
            "basic", "staff", user, user)
        assert identity["scopes"] == []
        assert "authorization" in d.remove_headers  # the password is not passed upstream by default
        assert "attempted_user" not in (d.attributes or {})
    assert decide_now(auth, _basic("alice", PASSWORDS["alice"])).identity["groups"] == ["admins", "reports"]
    assert decide_now(auth, _basic("bob", PASSWORDS["bob"])).identity["groups"] == []


def test_forward_true_keeps_the_header(tmp_path, htpasswd):
    auth = _auth(tmp_path, LOW_SPEC + "\nforward: true")
    d = decide_now(auth, _basic("alice", PASSWORDS["alice"]))
    assert d.allowed and "authorization" not in d.remove_headers


def test_rules_read_user_and_groups(tmp_path, htpasswd):
    rules = """
    rules:
      - name: admins
        when: "identity.kind == 'basic' && 'admins' in identity.groups && identity.user == identity.subject"
        decision: allow
    """
    auth = _auth(tmp_path, rules=rules)
    assert decide_now(auth, _basic("alice", PASSWORDS["alice"])).allowed
    d = decide_now(auth, _basic("bob", PASSWORDS["bob"]))
    assert (d.status, d.reason) == (403, "no_rule_matched")


# --- failures ------------------------------------------------------------------------------------
def test_wrong_password_and_unknown_user_look_the_same(tmp_path, htpasswd):
    auth = _auth(tmp_path, LOW_SPEC + '\nrealm: Reports "EU" \\ staff')
    for user, password in [("alice", "wrong"), ("carol", "pässwörd"), ("mallory", "correct horse"),
                           ("alice", PASSWORDS["bob"])]:
        d = decide_now(auth, _basic(user, password))
        assert (d.status, d.reason, d.rule) == (401, "invalid_credentials", "identity/staff")
        assert d.message == "user name or password is not valid"
        assert www_authenticate(d) == ['Basic realm="Reports \\"EU\\" \\\\ staff", charset="UTF-8"']
        assert d.attributes["attempted_user"] == user
        assert password not in exposed(d)
        assert _basic(user, password)["headers"]["authorization"].split()[1] not in exposed(d)


def test_missing_credentials_challenge_with_the_realm(tmp_path, htpasswd):
    d = decide_now(_auth(tmp_path), {})
    assert (d.status, d.reason) == (401, "credentials_missing")
    assert www_authenticate(d) == ['Basic realm="p", charset="UTF-8"']  # default realm: the policy name
    d = decide_now(_auth(tmp_path), {"headers": {"authorization": "Bearer abc"}})
    assert d.reason == "credentials_missing"  # another scheme is not ours


@pytest.mark.parametrize(("value", "reason", "words"), [
    ("Basic !!!!", "malformed_basic_credentials", "base64"),
    ("Basic YWxpY2U", "malformed_basic_credentials", "base64"),  # no padding
    ("Basic " + base64.b64encode(b"alice").decode(), "malformed_basic_credentials", "':'"),
    ("Basic " + base64.b64encode(b"al\xffice:pw").decode(), "malformed_basic_credentials", "UTF-8"),
    ("Basic " + base64.b64encode(b":pw").decode(), "malformed_basic_credentials", "empty user"),
    ("Basic " + base64.b64encode(b"alice:p\x00w").decode(), "malformed_basic_credentials", "control"),
    ("Basic " + base64.b64encode(b"al\nice:pw").decode(), "malformed_basic_credentials", "control"),
    ("Basic ", "malformed_basic_credentials", "empty"),
    ("Basic " + base64.b64encode(b"alice:" + b"x" * 2000).decode(), "basic_credentials_too_large", "larger"),
])
def test_malformed_headers(tmp_path, htpasswd, value, reason, words):
    d = decide_now(_auth(tmp_path), {"headers": {"authorization": value}})
    assert (d.status, d.reason) == (401, reason)
    assert words in d.message
    assert www_authenticate(d) == ['Basic realm="p", charset="UTF-8"']
    assert "attempted_user" not in (d.attributes or {})


def test_two_credentials_are_ambiguous(tmp_path, htpasswd):
    auth = _auth(tmp_path)
    good = _basic("alice", PASSWORDS["alice"])["headers"]["authorization"]
    d = decide_now(auth, {"headers": {"authorization": f"{good}, Bearer forged"}})
    assert (d.status, d.reason) == (400, "ambiguous_credentials")


def test_decode_basic_direct():
    user, password = decode_basic(base64.b64encode("ü:a:b".encode()).decode(), 1024)
    assert (user, password) == ("ü", b"a:b")
    with pytest.raises(Rejected) as caught:
        decode_basic("QQ==" * 400, 64)
    assert caught.value.reason == "basic_credentials_too_large"


# --- the file ------------------------------------------------------------------------------------
def test_weak_and_malformed_lines_are_refused_with_line_and_user_never_the_hash(tmp_path):
    weak = {
        "plain": "hunter2hunter2",
        "des": "abJnggxhB/yWI",
        "md5": "$apr1$r31.....$HqJZimcKQFAMYayBlzkrA/",
        "md5crypt": "$1$saltsalt$2vnaRpHa6Jxjz5n83ok8Z0",
        "sha1": "{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=",
        "sha512": "$6$saltsalt$qFmFH.bQmmtXzyBY0s9v7Oicd2z4XSIecDzlB5KiA2/jctKu9YherNiHHHnHdo2DRhn0aMl3w39K8Y1BXmJNo.",
        "argon2i": "$argon2i$v=19$m=65536,t=3,p=4$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG",
        "weakcost": _bcrypt("x"),
        "x2": _bcrypt("x").replace("$2b$", "$2x$", 1),
    }
    lines = [f"{user}:{hash_}" for user, hash_ in weak.items()]
    lines += ["no-colon-here", "dup:" + _bcrypt("a"), "dup:" + _bcrypt("b"), " spaced :" + _bcrypt("c")]
    text = "\n".join(lines)
    with pytest.raises(ValueError) as caught:
        parse_htpasswd(text, HashPolicy(min_bcrypt_cost=5))
    message = str(caught.value)
    for number, user in enumerate(weak, 1):
        assert f"line {number}: user {user!r}" in message
    for hash_ in weak.values():
        assert hash_ not in message
        assert hash_[-20:] not in message
    for words in ["plaintext", "DES", "$apr1$", "$1$", "SHA-crypt", "{SHA}", "argon2i and argon2d",
                  "bcrypt cost 4 is below the minimum 5", "unsupported bcrypt variant",
                  "line 10: expected user:hash", "line 12: user 'dup' already appears on line 11",
                  "line 13: the user name"]:
        assert words in message, words


def test_odd_characters_in_a_hash_are_refused_without_quoting_it():
    bad = _bcrypt("x")[:-1] + "é"
    argon = ARGON2.hash("x")[:-2] + "é="
    with pytest.raises(ValueError) as caught:
        parse_htpasswd(f"a:{bad}\nb:{argon}\nc:$2b$04$ spaced", LOW)
    message = str(caught.value)
    assert "line 1: user 'a': the hash has characters" in message and "line 2: user 'b'" in message
    assert "line 3: user 'c'" in message and "é" not in message


def test_argon2_below_minimum_and_empty_files(tmp_path):
    with pytest.raises(ValueError, match=r"line 1: user 'u': argon2id parameters m=8,t=1,p=1 are below the minimum"):
        parse_htpasswd("u:" + ARGON2.hash("x"), HashPolicy())
    with pytest.raises(ValueError, match="no users"):
        parse_htpasswd("# nobody\n\n", LOW)
    path = tmp_path / "h"
    path.write_bytes(b"u:\xff\xfe")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_htpasswd(path, LOW)


def test_default_minimum_refuses_cheap_hashes_at_load(tmp_path, htpasswd):
    with pytest.raises(PolicySetError) as caught:
        _auth(tmp_path, extra="")
    message = str(caught.value)
    assert "bcrypt cost 4 is below the minimum 10" in message and "user 'alice'" in message
    assert "argon2id parameters" in message and "user 'carol'" in message
    assert "$2b$" not in message


def test_policy_errors(tmp_path, htpasswd):
    cases = [
        ("realm: \"caf\u00e9\"", "printable ASCII"),
        ("minArgon2: {memoryKiB: 4}", "between 8 and 1048576"),
        ("cacheDuration: 2h", "at most 1h"),
        ("maxConcurrent: 0", "between 1 and 1024"),
        ("unknown: 1", "unknown field"),
    ]
    for extra, words in cases:
        with pytest.raises(PolicySetError, match=words):
            _auth(tmp_path, ("minBcryptCost: 4\n" if "minArgon2" in extra else LOW_SPEC + "\n") + extra)
    with pytest.raises(PolicySetError, match="between 4 and 16"):
        _auth(tmp_path, "minBcryptCost: 3")
    spec = "identity:\n  - name: staff\n    basic: {htpasswd: ../secrets/htpasswd, minBcryptCost: 4}\n" \
           "    requiredScopes: [x]\n"
    with pytest.raises(PolicySetError, match="basic identities have no scopes"):
        make_authorizer(write_policy(tmp_path / "p2", spec))
    with pytest.raises(PolicySetError, match="htpasswd"):
        make_authorizer(write_policy(tmp_path / "p3", "identity:\n  - name: s\n    basic: {htpasswd: missing}\n"))


def test_unknown_users_are_verified_against_a_dummy_of_the_common_cost():
    text = "\n".join([f"a:{ARGON2.hash('x')}", f"b:{ARGON2.hash('y')}", f"c:{_bcrypt('z')}"])
    table = parse_htpasswd(text, LOW)
    assert table.dummy.scheme == "argon2id"
    assert table.dummy.cost == table.accounts["a"].cost
    assert not check_password(table.dummy.scheme, table.dummy.hash, b"x")
    table = parse_htpasswd(f"c:{_bcrypt('z')}", LOW)
    assert table.dummy.hash.startswith(b"$2b$04$")


def test_unknown_users_go_through_the_verifier(tmp_path, htpasswd):
    """With every verification slot taken an unknown user is refused 503 like a known one: it was
    about to be verified (against the dummy), not refused at once."""
    auth = _auth(tmp_path)
    source = _source(auth)
    source.verifier = Verifier(source.verifier.pool, 1)
    assert source.verifier._slots.acquire(blocking=False)
    try:
        for user in ("alice", "nobody"):
            d = decide_now(auth, _basic(user, "wrong"))
            assert (d.status, d.reason) == (503, "verification_overloaded")
            assert www_authenticate(d) == []
            assert "attempted_user" not in (d.attributes or {})
    finally:
        source.verifier._slots.release()
    assert decide_now(auth, _basic("nobody", "wrong")).reason == "invalid_credentials"


# --- cache ---------------------------------------------------------------------------------------
def test_successes_are_cached_under_a_keyed_hash(tmp_path, htpasswd):
    auth = _auth(tmp_path)
    source = _source(auth)
    first = decide_now(auth, _basic("alice", PASSWORDS["alice"]))
    assert first.allowed and not any("cached" in s for s in first.steps)
    again = decide_now(auth, _basic("alice", PASSWORDS["alice"]))
    assert again.allowed and any("verified earlier (cached)" in s for s in again.steps)
    assert len(source.cache) == 1
    (key,) = source.cache._entries
    password = PASSWORDS["alice"].encode()
    assert key == cache_key("alice", password)
    assert key not in (hashlib.sha256(password).digest(), hashlib.sha256(b"alice:" + password).digest())
    # A wrong password is never served from the cache, and failures are not cached.
    assert decide_now(auth, _basic("alice", "wrong")).reason == "invalid_credentials"
    assert len(source.cache) == 1
    # The framing keeps ("ab", "c...") and ("a", "bc...") apart.
    assert cache_key("ab", b"c") != cache_key("a", b"bc")


def test_cache_can_be_turned_off_and_expires(tmp_path, htpasswd):
    auth = _auth(tmp_path, LOW_SPEC + "\ncacheDuration: 0")
    assert _source(auth).cache is None
    for _ in range(2):
        d = decide_now(auth, _basic("alice", PASSWORDS["alice"]))
        assert d.allowed and not any("cached" in s for s in d.steps)
    auth = _auth(tmp_path, LOW_SPEC + "\ncacheDuration: 60s")
    source = _source(auth)
    decide_now(auth, _basic("alice", PASSWORDS["alice"]))
    key = cache_key("alice", PASSWORDS["alice"].encode())
    expires_at, _ = source.cache._entries[key]
    assert source.cache.get(key, now=expires_at + 0.001) is None


def test_a_changed_file_invalidates_the_cache(tmp_path, htpasswd):
    auth = _auth(tmp_path)
    source = _source(auth)
    assert decide_now(auth, _basic("alice", PASSWORDS["alice"])).allowed
    assert decide_now(auth, _basic("bob", PASSWORDS["bob"])).allowed
    assert len(source.cache) == 2
    # alice's password changes, bob is removed.
    _replace(htpasswd, f"alice:{_bcrypt('new password')}\ncarol:{ARGON2.hash('c')}\n")
    assert source.table.refresh()
    d = decide_now(auth, _basic("alice", PASSWORDS["alice"]))
    assert (d.status, d.reason) == (401, "invalid_credentials")
    assert decide_now(auth, _basic("bob", PASSWORDS["bob"])).reason == "invalid_credentials"
    assert decide_now(auth, _basic("alice", "new password")).allowed
    assert len(source.cache) == 1


def test_a_broken_new_file_keeps_the_last_good_one(tmp_path, htpasswd):
    auth = _auth(tmp_path)
    source = _source(auth)
    _replace(htpasswd, "alice:plaintext-password\n")
    assert not source.table.refresh()
    assert "line 1: user 'alice'" in source.table.error and "plaintext-password" not in source.table.error
    assert decide_now(auth, _basic("alice", PASSWORDS["alice"])).allowed


# --- the verification bound -------------------------------------------------------------------------
def test_concurrency_bound_fails_closed_and_frees_slots(tmp_path, htpasswd):
    table = read_htpasswd(htpasswd, LOW)
    account = table.accounts["alice"]
    pool = PasswordPool(threads=1)
    verifier = Verifier(pool, 2)
    gate = threading.Event()

    async def run() -> None:
        blocker = pool.executor().submit(gate.wait, 10)  # the one thread is busy: verifications queue
        first = asyncio.ensure_future(verifier.verify(account, PASSWORDS["alice"].encode()))
        second = asyncio.ensure_future(verifier.verify(account, b"wrong"))
        await asyncio.sleep(0)
        with pytest.raises(Rejected) as caught:
            await verifier.verify(account, b"third")
        assert (caught.value.status, caught.value.reason) == (503, "verification_overloaded")
        assert verifier.busy()
        # A waiting request that goes away (the Check's deadline) gives its queued slot back.
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        assert not verifier.busy()
        gate.set()
        assert await first is True
        await asyncio.wrap_future(blocker)
        assert not verifier.busy()
        assert await verifier.verify(account, b"wrong") is False

    try:
        asyncio.run(run())
    finally:
        gate.set()
        asyncio.run(pool.aclose())


def test_concurrent_requests_within_the_bound(tmp_path, htpasswd):
    auth = _auth(tmp_path, LOW_SPEC + "\ncacheDuration: 0")

    async def run() -> list:
        samples = [_basic(u, p) for u, p in PASSWORDS.items()] * 2
        return await asyncio.gather(*(decide(auth, s) for s in samples))

    decisions = asyncio.run(run())
    assert all(d.allowed for d in decisions)


def test_the_header_is_a_credential_location(tmp_path, htpasswd):
    auth = _auth(tmp_path)
    assert ("header", "authorization") in auth.policy_set.policies[0].credential_locations
    assert "authorization" in auth.policy_set.credential_names("header")


def test_a_verification_that_straddles_a_reload_is_not_cached(tmp_path, htpasswd):
    """Verified against the old hash while the new file arrived: answered, but never remembered."""
    auth = _auth(tmp_path)
    source = _source(auth)
    pool = PasswordPool(threads=1)
    source.verifier = Verifier(pool, 1)
    gate = threading.Event()

    async def run():
        blocker = pool.executor().submit(gate.wait, 10)
        pending = asyncio.ensure_future(decide(auth, _basic("alice", PASSWORDS["alice"])))
        for _ in range(1000):  # until the request holds the one slot (its verification is queued)
            if source.verifier.busy():
                break
            await asyncio.sleep(0.001)
        assert source.verifier.busy()
        _replace(htpasswd, f"alice:{_bcrypt('rotated')}\n")
        assert source.table.refresh()
        gate.set()
        await asyncio.wrap_future(blocker)
        return await pending

    try:
        assert asyncio.run(run()).allowed
    finally:
        gate.set()
        asyncio.run(pool.aclose())
    assert len(source.cache) == 0
    assert decide_now(auth, _basic("alice", PASSWORDS["alice"])).reason == "invalid_credentials"


def test_missing_credentials_challenge_every_scheme(tmp_path, htpasswd):
    (tmp_path / "policies").mkdir(parents=True, exist_ok=True)
    (tmp_path / "policies" / "jwks.json").write_text(json.dumps({"keys": [public_jwk(rsa_key(), "k1")]}))
    spec = """
    identity:
      - name: users
        jwt: {issuer: https://idp.test, audiences: [a], jwksFile: jwks.json}
      - name: staff
        basic: {htpasswd: ../secrets/htpasswd, minBcryptCost: 4, minArgon2: {memoryKiB: 8, iterations: 1}, realm: r}
    """
    d = decide_now(make_authorizer(write_policy(tmp_path / "policies", spec)), {})
    assert www_authenticate(d) == ["Bearer", 'Basic realm="r", charset="UTF-8"']


def test_verifications_are_counted(tmp_path, htpasswd):
    from extauthz.telemetry import metrics

    installed = metrics.Metrics()
    metrics.install(installed)
    try:
        auth = _auth(tmp_path)

        def value(name: str, **labels: str) -> float:
            return installed.registry.get_sample_value(name, labels) or 0

        for user, password in [("alice", PASSWORDS["alice"]), ("alice", PASSWORDS["alice"]), ("alice", "x"),
                               ("nobody", "x")]:
            decide_now(auth, _basic(user, password))
        assert value("extauthz_password_verifications_total", result="match") == 1  # the second was cached
        assert value("extauthz_password_verifications_total", result="mismatch") == 2
        assert value("extauthz_password_verification_seconds_count") == 3
        source = _source(auth)
        source.verifier = Verifier(source.verifier.pool, 1)
        assert source.verifier._slots.acquire(blocking=False)
        decide_now(auth, _basic("alice", "y"))
        source.verifier._slots.release()
        assert value("extauthz_password_verifications_total", result="overloaded") == 1
    finally:
        metrics.install(None)


def test_a_reload_between_reading_the_table_and_its_generation_never_caches_an_old_password(
        tmp_path: Path, htpasswd: Path) -> None:  # fmt: skip
    """The watcher installs a new file on its own thread, so it may land while a request reads the
    user table: here it lands exactly when the table is read. That request was checked against the
    file it started with; the old password must not stay cached under the new file."""
    from extauthz.watched import WatchedPath

    auth = _auth(tmp_path)
    source = _source(auth)
    watched = source.table
    _replace(htpasswd, f"alice:{_bcrypt('rotated')}\n")

    class ReloadWhenRead(WatchedPath):
        fired = False

        def __getattribute__(self, name: str) -> object:
            value = object.__getattribute__(self, name)
            if name == "value" and not ReloadWhenRead.fired:
                ReloadWhenRead.fired = True
                assert WatchedPath.refresh(self)
            return value

    watched.__class__ = ReloadWhenRead
    try:
        decide_now(auth, _basic("alice", PASSWORDS["alice"]))
    finally:
        watched.__class__ = WatchedPath
    assert not decide_now(auth, _basic("alice", PASSWORDS["alice"])).allowed
    assert decide_now(auth, _basic("alice", "rotated")).allowed
