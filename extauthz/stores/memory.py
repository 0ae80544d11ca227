"""In-process store: exact for one process, lost on restart."""

from __future__ import annotations

import time


class MemoryStore:
    """State kept in this process's memory, bounded and expiring."""

    def __init__(self, max_keys: int = 1_000_000) -> None:
        self._seen: dict[str, float] = {}
        self._max_keys = max_keys
        self._sets: dict[str, set[str]] = {}

    async def is_member(self, set_name: str, member: str) -> bool:
        return member in self._sets.get(set_name, ())

    def add_member(self, set_name: str, member: str) -> None:
        """Put ``member`` into a set (what an operator does with SADD on Redis)."""
        self._sets.setdefault(set_name, set()).add(member)

    async def remember_once(self, key: str, ttl: float) -> bool:
        now = time.monotonic()
        expires = self._seen.get(key)
        if expires is not None and expires > now:
            return False
        if len(self._seen) >= self._max_keys:
            self._evict(now)
        self._seen[key] = now + ttl
        return True

    def _evict(self, now: float) -> None:
        for key in [k for k, exp in self._seen.items() if exp <= now]:
            del self._seen[key]
        if len(self._seen) >= self._max_keys:
            # Still full of live entries: refusing new ones would deny everyone, dropping the
            # oldest half keeps replay protection for the most recent requests.
            for key in list(self._seen)[: len(self._seen) // 2]:
                del self._seen[key]
