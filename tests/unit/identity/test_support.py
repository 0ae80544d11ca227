"""The identity helpers: credential locations, the expiring cache, watched files."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from extauthz.api.envoy.config.core.v3 import base_pb2
from extauthz.identity import Rejected
from extauthz.identity.cache import ExpiringCache, credential_digest
from extauthz.identity.credentials import CredentialLocation
from extauthz.request import request_from_check
from extauthz.samples import check_request_from_sample
from extauthz.watched import WatchedPath


def _request(path: str = "/", headers: dict | None = None):
    return request_from_check(check_request_from_sample({"path": path, "headers": headers or {}}))


def test_header_scheme_query_and_cookie_locations():
    bearer = CredentialLocation("header", "authorization", "Bearer")
    assert bearer.extract(_request(headers={"authorization": "Bearer  abc "})) == "abc"
    assert bearer.extract(_request(headers={"authorization": "Basic abc"})) is None
    assert bearer.extract(_request(headers={"authorization": "Bearer"})) == ""
    assert CredentialLocation("query", "t").extract(_request("/?t=a%2Bb")) == "a+b"
    cookie = CredentialLocation("cookie", "s")
    assert cookie.extract(_request(headers={"cookie": 'a=1; s="quoted"; b=2'})) == "quoted"
    assert cookie.extract(_request(headers={"cookie": "ss=1; xs=2"})) is None
    with pytest.raises(Rejected) as excinfo:
        cookie.extract(_request(headers={"cookie": "s=1, s=2"}))
    assert (excinfo.value.status, excinfo.value.reason) == (400, "ambiguous_credentials")


def _raw_request(*headers: tuple[str, str]):
    """A request as Envoy sends it with encode_raw_headers: one header_map entry per line sent."""
    message = check_request_from_sample({"host": "a.test", "path": "/"})
    message.attributes.request.http.ClearField("headers")
    for key, value in ((":authority", "a.test"), (":path", "/"), (":method", "GET"), *headers):
        message.attributes.request.http.header_map.headers.append(base_pb2.HeaderValue(key=key, raw_value=value.encode()))
    return request_from_check(message)


BEARER = CredentialLocation("header", "authorization", "Bearer")


@pytest.mark.parametrize("value", [
    "Basic eDp5, Bearer forged.jwt.token",  # one value with two credentials, ours second
    "Basic eDp5,Bearer forged.jwt.token",   # two headers as Envoy joins them
    "Bearer forged.jwt.token, Basic eDp5",  # ours first (refused before this fix too)
    "Basic eDp5, Basic eTp6",               # two credentials, neither ours
    "ApiKey k1, Bearer forged.jwt.token",
    "Basic eDp5, forged.jwt.token",         # a bare token after a comma
    "Bearer forged.jwt.token,",             # a second, empty header
    'Digest username="a", realm="r", Bearer forged.jwt.token',
])
def test_several_credentials_in_a_header_are_ambiguous_whatever_the_scheme(value: str):
    request = _request(headers={"authorization": value})
    with pytest.raises(Rejected) as excinfo:
        BEARER.extract(request)
    assert (excinfo.value.status, excinfo.value.reason) == (400, "ambiguous_credentials")
    assert BEARER.presented_in(request)  # a dry-run policy strips it when it owns the header


def test_one_credential_with_auth_params_in_another_scheme_is_not_ours():
    """RFC 9110 credentials may hold commas (auth-params, quoted strings): still one credential."""
    for value in ('Digest username="a,b", realm="r", nonce=abc, uri="/"', "Signature keyId=k1,signature=\"c2ln\""):
        request = _request(headers={"authorization": value})
        assert BEARER.extract(request) is None
        assert not BEARER.presented_in(request)


@pytest.mark.parametrize(("location", "lines"), [
    (BEARER, [("authorization", "Basic eDp5"), ("authorization", "Bearer forged.jwt.token")]),
    (BEARER, [("authorization", "Bearer a.b.c"), ("authorization", "")]),
    (CredentialLocation("header", "x-api-key"), [("x-api-key", "ak_1"), ("x-api-key", "ak_2")]),
    (CredentialLocation("header", "x-api-key"), [("x-api-key", "ak_1"), ("x-api-key", "")]),
])
def test_a_credential_header_sent_twice_is_ambiguous_in_envoys_raw_header_map(location, lines):
    request = _raw_request(*lines)
    with pytest.raises(Rejected) as excinfo:
        location.extract(request)
    assert excinfo.value.reason == "ambiguous_credentials"
    assert location.presented_in(request)


def test_expiring_cache_bounds_and_expiry():
    cache: ExpiringCache[int] = ExpiringCache(max_entries=10)
    now = 1000.0
    for i in range(25):
        cache.put(credential_digest(f"t{i}"), i, now + 60, now)
    assert len(cache) <= 10
    assert cache.get(credential_digest("t24"), now) == 24
    cache.put(b"old", 1, now + 1, now)
    assert cache.get(b"old", now + 2) is None
    cache.put(b"dead", 1, now - 1, now)
    assert cache.get(b"dead", now) is None
    assert credential_digest("secret") != b"secret" and len(credential_digest("secret")) == 32


def test_watched_file_sees_a_secret_volume_swap(tmp_path: Path):
    """Kubernetes replaces ..data atomically; the visible file name never changes."""
    folder = tmp_path / "secret"
    first, second = folder / "..v1", folder / "..v2"
    first.mkdir(parents=True)
    second.mkdir()
    (first / "value").write_text("one")
    (second / "value").write_text("two")
    (folder / "..data").symlink_to("..v1")
    (folder / "value").symlink_to("..data/value")
    watched = WatchedPath(folder / "value", lambda p: p.read_text(), what="test")
    assert watched.refresh() and watched.value == "one"
    assert not watched.refresh()
    (folder / "..data_tmp").symlink_to("..v2")
    os.replace(folder / "..data_tmp", folder / "..data")
    assert watched.refresh() and watched.value == "two" and watched.generation == 2


def test_watched_file_keeps_the_last_good_value(tmp_path: Path):
    path = tmp_path / "n"
    path.write_text("1")

    def parse(p: Path) -> int:
        return int(p.read_text())

    watched = WatchedPath(path, parse, what="number")
    watched.refresh()
    path.write_text("not a number")
    later = time.time_ns() + 10**9
    os.utime(path, ns=(later, later))
    assert not watched.refresh()
    assert watched.value == 1 and "number" in (watched.error or "")
    path.unlink()
    assert not watched.refresh() and watched.value == 1
