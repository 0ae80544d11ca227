"""The identity helpers: credential locations, the expiring cache, watched files."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

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
