"""A bounded in-memory cache whose entries expire at a given time (verified tokens, introspection).

Keys are digests of credentials, never the credentials themselves. When full, expired entries go
first, then the oldest tenth: a flood of distinct tokens can slow the cache down, never grow it.
"""

from __future__ import annotations

import hashlib
from typing import Generic, TypeVar

from extauthz import clock

__all__ = ["ExpiringCache", "credential_digest"]

V = TypeVar("V")


def credential_digest(credential: str) -> bytes:
    """The cache key of a credential: SHA-256, so memory dumps and logs never hold the credential."""
    return hashlib.sha256(credential.encode("utf-8", "surrogateescape")).digest()


class ExpiringCache(Generic[V]):
    __slots__ = ("_entries", "max_entries")

    def __init__(self, max_entries: int = 10_000) -> None:
        self.max_entries = max(1, max_entries)
        self._entries: dict[bytes, tuple[float, V]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, now: float | None = None) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= (clock.wall() if now is None else now):
            self._entries.pop(key, None)
            return None
        return entry[1]

    def put(self, key: bytes, value: V, expires_at: float, now: float | None = None) -> None:
        now = clock.wall() if now is None else now
        if expires_at <= now:
            return
        entries = self._entries
        if key not in entries and len(entries) >= self.max_entries:
            for stale in [k for k, (exp, _) in entries.items() if exp <= now]:
                del entries[stale]
            if len(entries) >= self.max_entries:
                for old in list(entries)[: max(1, len(entries) // 10)]:
                    del entries[old]
        entries[key] = (expires_at, value)

    def discard(self, key: bytes) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()
