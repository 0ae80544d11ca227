"""API keys: hashed records in a watched Secret folder, constant-time lookup, expiry, revocation."""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from pathlib import Path

import pytest
from material import authorizer as make_authorizer
from material import decide_now, exposed, write_policy, www_authenticate

from extauthz.identity.apikey import read_key_records
from extauthz.policy.model import PolicySetError

KEY = "ak_" + secrets.token_urlsafe(32)
OTHER = "ak_" + secrets.token_urlsafe(32)


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _records(folder: Path, text: str, name: str = "acme.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    return _records(tmp_path / "secrets" / "apikeys", f"""
- id: acme-1
  owner: acme
  sha256: {_sha(KEY)}
  scopes: [reports:read]
  metadata: {{tier: gold, since: 2024-01-01}}
- id: old-1
  owner: oldco
  sha256: {_sha(OTHER)}
  expires: 2001-01-01T00:00:00Z
""")


def _auth(tmp_path: Path, extra: str = ""):
    spec = "identity:\n  - name: partners\n    apiKey:\n      keys: ../secrets/apikeys\n"
    for line in extra.strip("\n").splitlines():
        spec += "      " + line + "\n"
    return make_authorizer(write_policy(tmp_path / "policies", spec))


def test_valid_key(tmp_path, keys):
    d = decide_now(_auth(tmp_path), {"headers": {"x-api-key": KEY}})
    assert d.allowed
    identity = d.identity
    assert (identity["kind"], identity["source"], identity["subject"]) == ("apiKey", "partners", "acme")
    assert (identity["key_id"], identity["owner"], identity["scopes"]) == ("acme-1", "acme", ["reports:read"])
    assert identity["claims"]["metadata"] == {"tier": "gold", "since": "2024-01-01"}


def test_unknown_expired_and_malformed_keys(tmp_path, keys):
    auth = _auth(tmp_path)
    for key, reason in [("ak_wrong", "unknown_api_key"), (OTHER, "api_key_expired"), ("bad key", "malformed_api_key"),
                        ("x" * 1000, "malformed_api_key")]:
        d = decide_now(auth, {"headers": {"x-api-key": key}})
        assert (d.status, d.reason) == (401, reason)
        assert www_authenticate(d)[0].startswith('ApiKey error="invalid_token"')
        assert key not in exposed(d)
    assert decide_now(auth, {}).reason == "credentials_missing"


def test_key_in_authorization_scheme_or_query(tmp_path, keys):
    auth = _auth(tmp_path, "in: [{header: authorization, scheme: ApiKey}, {query: api_key}]")
    assert decide_now(auth, {"headers": {"authorization": f"ApiKey {KEY}"}}).allowed
    assert decide_now(auth, {"path": f"/?api_key={KEY}"}).allowed
    d = decide_now(auth, {"headers": {"authorization": "ApiKey nope"}})
    assert www_authenticate(d)[0].startswith("ApiKey ")
    assert decide_now(auth, {"headers": {"x-api-key": KEY}}).reason == "credentials_missing"


def test_revoked_key_id(tmp_path, keys):
    (tmp_path / "secrets" / "revoked-keys.txt").write_text("acme-1  # leaked in a build log\n")
    d = decide_now(_auth(tmp_path, "revocation: {file: ../secrets/revoked-keys.txt}"), {"headers": {"x-api-key": KEY}})
    assert d.reason == "api_key_revoked"


def test_folder_is_watched_and_a_broken_update_keeps_the_last_good_keys(tmp_path, keys, caplog):
    auth = _auth(tmp_path)
    source = auth.policy_set.policies[0].checks[0].entries[0].source
    new_key = "ak_" + secrets.token_urlsafe(32)
    _records(keys, f"- {{id: new-1, owner: newco, sha256: {_sha(new_key)}}}\n", name="newco.yaml")
    assert source.table.refresh()
    assert decide_now(auth, {"headers": {"x-api-key": new_key}}).identity["owner"] == "newco"
    (keys / "newco.yaml").write_text("- {id: broken, owner: x, sha256: nothex}\n")
    future = time.time_ns() + 5 * 10**9
    os.utime(keys / "newco.yaml", ns=(future, future))
    assert not source.table.refresh()
    assert "keeping the previous version" in caplog.text
    assert decide_now(auth, {"headers": {"x-api-key": new_key}}).allowed


def test_kubernetes_secret_layout(tmp_path):
    """A Secret volume: visible names are symlinks into ..data; dot-entries are never read."""
    folder = tmp_path / "secrets" / "apikeys"
    data = folder / "..2024_01_01"
    data.mkdir(parents=True)
    (data / "acme.yaml").write_text(f"- {{id: a, owner: acme, sha256: {_sha(KEY)}}}\n")
    (folder / "..data").symlink_to(data.name)
    (folder / "acme.yaml").symlink_to("..data/acme.yaml")
    assert decide_now(_auth(tmp_path), {"headers": {"x-api-key": KEY}}).allowed


@pytest.mark.parametrize(("text", "message"), [
    ("- {id: a, owner: b}", "sha256 must be 64 hex digits"),
    (f"- {{id: a, owner: b, sha256: {_sha(KEY)}}}\n- {{id: a, owner: c, sha256: {_sha(OTHER)}}}", "duplicate id"),
    (f"- {{id: a, owner: b, sha256: {_sha(KEY)}}}\n- {{id: c, owner: c, sha256: {_sha(KEY)}}}", "appears twice"),
    (f"- {{id: a, owner: b, sha256: {_sha(KEY)}, expires: soon}}", "expires must be"),
    (f"- {{id: a, owner: b, sha256: {_sha(KEY)}, color: red}}", "unknown fields"),
    (f"- {{id: a, owner: b, sha256: {_sha(KEY)}, expires: 1{'0' * 400}}}", "not a plausible time"),
    (f"- {{id: a, owner: b, sha256: {_sha(KEY)}, expires: .inf}}", "not a plausible time"),
    ("{not: [a list", "invalid YAML"),
])
def test_bad_records_are_reported_without_showing_hashes(tmp_path, text, message):
    folder = _records(tmp_path / "secrets" / "apikeys", text)
    with pytest.raises(ValueError, match=message) as excinfo:
        read_key_records(folder)
    assert _sha(KEY) not in str(excinfo.value)
    with pytest.raises(PolicySetError, match=message):
        _auth(tmp_path)


def test_keys_option_is_required(tmp_path):
    with pytest.raises(PolicySetError, match="keys: is required"):
        make_authorizer(write_policy(tmp_path / "p", "identity:\n  - name: k\n    apiKey: {}\n"))


def test_a_yaml_bomb_in_a_key_file_is_refused_naming_file_and_line(tmp_path, yaml_bomb):
    folder = _records(tmp_path / "secrets" / "apikeys", f"- {{id: a, owner: b, sha256: {_sha(KEY)}}}\n")
    (folder / "zz-bomb.yaml").write_text("keys:\n" + yaml_bomb(levels=5))
    with pytest.raises(ValueError, match=r"zz-bomb.yaml:2: YAML anchors are not allowed \(found &a\)"):
        read_key_records(folder)
    with pytest.raises(PolicySetError, match=r"zz-bomb\.yaml:2: YAML anchors are not allowed"):
        _auth(tmp_path)
