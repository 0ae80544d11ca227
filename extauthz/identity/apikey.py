"""API keys for partners and scripts: looked up by SHA-256, never stored in clear.

The key records live in a mounted Secret: a file, or a folder whose every visible file holds
records (YAML or JSON), watched and re-read in the background::

    - id: acme-prod-1                  # stable id: logs, revocation
      owner: acme                      # becomes identity.subject
      sha256: 9f86d08...               # hex SHA-256 of the key (the key itself is never stored)
      scopes: [orders:read]
      expires: 2026-12-31T00:00:00Z    # optional
      metadata: {tier: gold}           # optional, exposed as identity.claims.metadata

The presented key is hashed and the digest looked up; the table holds only digests, and the digest
of an unknown key tells an attacker nothing about the stored ones, so the lookup does not leak key
material through timing (the match is then confirmed with a constant-time comparison). Keys must be
random (at least 128 bits): a fast hash is adequate for random keys, not for passwords.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extauthz import clock
from extauthz.context import CheckContext
from extauthz.identity import Identity, Rejected, make_identity, source_kind
from extauthz.identity.credentials import CredentialLocation, extract_first, locations_from_spec
from extauthz.identity.revocation import RevocationList, revocation_from_spec
from extauthz.policy.build import BuildContext, Spec
from extauthz.safe_yaml import load_single
from extauthz.watched import WatchedPath, visible_files

__all__ = ["ApiKeySource", "ApiKeyTable", "read_key_records"]

_FIELDS = {"keys", "in", "revocation", "maxKeyBytes"}
_RECORD_FIELDS = {"id", "owner", "sha256", "scopes", "expires", "metadata"}
_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEY_CHARS = re.compile(r"[\x21-\x7e]+")
DEFAULT_LOCATION = CredentialLocation("header", "x-api-key")


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    owner: str
    digest: bytes
    #: Seconds since the epoch; None for keys that do not expire.
    expires: float | None
    identity: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ApiKeyTable:
    by_digest: dict[bytes, KeyRecord]


def _expiry(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime.datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=datetime.UTC)
        return moment.timestamp()
    if isinstance(value, datetime.date):
        return datetime.datetime(value.year, value.month, value.day, tzinfo=datetime.UTC).timestamp()
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
        if not math.isfinite(seconds) or abs(seconds) > 1e11:  # the year 5138: a typo, not a date
            raise ValueError(f"{where}: expires is not a plausible time in seconds since the epoch")
        return seconds
    if isinstance(value, str):
        try:
            moment = datetime.datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{where}: expires must be an ISO 8601 time or seconds since the epoch") from None
        return (moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)).timestamp()
    raise ValueError(f"{where}: expires must be an ISO 8601 time or seconds since the epoch")


def _records(path: Path) -> list[tuple[str, Any]]:
    files = visible_files(path) if path.is_dir() else [path]
    out: list[tuple[str, Any]] = []
    for file in files:
        # YamlInputError is a ValueError naming the file and line, never quoting the records.
        document = load_single(file.read_bytes(), file.name)
        if isinstance(document, dict) and "keys" in document:
            document = document["keys"]
        if document is None:
            continue
        if not isinstance(document, list):
            raise ValueError(f"{file.name}: expected a list of key records")
        out.extend((f"{file.name}[{i}]", item) for i, item in enumerate(document))
    return out


def read_key_records(path: Path, source: str = "") -> ApiKeyTable:
    """Parse every record; raise ValueError naming the first bad one (never showing a hash)."""
    by_digest: dict[bytes, KeyRecord] = {}
    ids: set[str] = set()
    for where, item in _records(path):
        if not isinstance(item, dict):
            raise ValueError(f"{where}: a key record is a mapping")
        unknown = set(item) - _RECORD_FIELDS
        if unknown:
            raise ValueError(f"{where}: unknown fields {sorted(unknown)}")
        key_id, owner, digest_hex = item.get("id"), item.get("owner"), item.get("sha256")
        if not isinstance(key_id, str) or not key_id or not isinstance(owner, str) or not owner:
            raise ValueError(f"{where}: id and owner are required strings")
        if key_id in ids:
            raise ValueError(f"{where}: duplicate id {key_id!r}")
        if not isinstance(digest_hex, str) or _HEX64.fullmatch(digest_hex.lower()) is None:
            raise ValueError(f"{where}: sha256 must be 64 hex digits (the SHA-256 of the key)")
        digest = bytes.fromhex(digest_hex)
        if digest in by_digest:
            raise ValueError(f"{where}: the same key hash appears twice")
        scopes = item.get("scopes") or []
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            raise ValueError(f"{where}: scopes must be a list of strings")
        metadata = item.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise ValueError(f"{where}: metadata must be a mapping")
        expires = _expiry(item.get("expires"), where)
        claims = {"key_id": key_id, "owner": owner, "metadata": _plain(metadata)}
        if expires is not None:
            claims["expires"] = int(expires)
        identity = make_identity("apiKey", source, owner, claims, list(scopes), key_id=key_id, owner=owner)
        ids.add(key_id)
        by_digest[digest] = KeyRecord(key_id, owner, digest, expires, identity)
    return ApiKeyTable(by_digest)


def _plain(value: Any) -> Any:
    """YAML values CEL can read: dates become ISO strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, datetime.date):
        return value.isoformat()
    return value


@source_kind("apiKey")
class ApiKeySource:
    kind = "apiKey"
    challenge_scheme = "ApiKey"

    def __init__(self, name: str, table: WatchedPath[ApiKeyTable], locations: tuple[CredentialLocation, ...],
                 revocation: RevocationList | None = None, max_key_bytes: int = 512) -> None:
        self.name = name
        self.table = table
        self.locations = locations
        self.revocation = revocation
        self.max_key_bytes = max_key_bytes
        self.may_wait = revocation is not None and revocation.may_wait
        first = locations[0]
        if first.kind == "header" and first.name == "authorization" and first.scheme:
            self.challenge_scheme = first.scheme

    async def authenticate(self, ctx: CheckContext) -> Identity | None:
        found = extract_first(self.locations, ctx.request)
        if found is None:
            return None
        key, location = found
        if not key or len(key) > self.max_key_bytes or _KEY_CHARS.fullmatch(key) is None:
            raise Rejected("malformed_api_key", "API key is malformed")
        table = self.table.value
        if table is None:
            raise Rejected("unknown_api_key", "API key is not valid")
        digest = hashlib.sha256(key.encode()).digest()
        record = table.by_digest.get(digest)
        if record is None or not hmac.compare_digest(record.digest, digest):
            raise Rejected("unknown_api_key", "API key is not valid")
        if record.expires is not None and clock.wall() > record.expires:
            raise Rejected("api_key_expired", "API key has expired")
        if self.revocation is not None and await self.revocation.is_revoked(record.id):
            raise Rejected("api_key_revoked", "API key has been revoked")
        if not location.forward:
            ctx.remove_headers.append(location.name)
        return record.identity

    @classmethod
    def from_spec(cls, name: str, spec: Spec, build: BuildContext) -> ApiKeySource | None:
        if not spec.is_mapping(allowed=_FIELDS):
            return None
        keys = spec.str("keys", required=True)
        if keys is None:
            return None
        table = build.watched(spec.child("keys"), keys, lambda p: read_key_records(p, name),
                              what="API key records", key=(name,))
        revocation = revocation_from_spec(spec.child("revocation"), build)
        locations = locations_from_spec(spec.child("in"), DEFAULT_LOCATION)
        max_bytes = spec.int("maxKeyBytes", 512, min=16, max=8192)
        return cls(name, table, locations, revocation, max_bytes)
