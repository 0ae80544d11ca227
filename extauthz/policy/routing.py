"""Choosing the policy for a request: the most specific match wins.

Specificity compares, in order: the host (exact over wildcard, a longer wildcard suffix over a
shorter one, over none), the path (exact over prefix, a longer pattern over a shorter one, over
none), then the methods (a list over none). Two policies that could tie for one request are
refused at load time, so the choice never depends on file order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Route", "Router", "find_ties"]

P = TypeVar("P")

_HOST_CACHE_LIMIT = 2048


@dataclass(frozen=True, slots=True)
class Route(Generic[P]):
    """One (host pattern, path pattern, methods) a policy claims. Empty pattern = any."""

    host: str
    path: str
    methods: frozenset[str]
    target: P

    @property
    def rank(self) -> tuple[int, int, int, int, int]:
        if not self.host:
            host = (0, 0)
        elif self.host.startswith("*."):
            host = (1, len(self.host))
        else:
            host = (2, len(self.host))
        if not self.path:
            path = (0, 0)
        elif self.path.endswith("/*"):
            path = (1, len(self.path))
        else:
            path = (2, len(self.path))
        return (*host, *path, 1 if self.methods else 0)

    def host_matches(self, host: str) -> bool:
        if not self.host:
            return True
        if self.host.startswith("*."):
            return host.endswith(self.host[1:]) and len(host) > len(self.host) - 1
        return host == self.host

    def matches(self, path: str, method: str) -> bool:
        if self.path:
            if self.path.endswith("/*"):
                if not path.startswith(self.path[:-1]):
                    return False
            elif path != self.path:
                return False
        return not self.methods or method in self.methods


def find_ties(routes: Sequence[Route[P]]) -> list[tuple[Route[P], Route[P]]]:
    """Pairs of routes of different targets that would tie for some request."""
    ties = []
    by_key: dict[tuple[str, str], list[Route[P]]] = {}
    for route in routes:
        by_key.setdefault((route.host, route.path), []).append(route)
    for group in by_key.values():
        for i, a in enumerate(group):
            for b in group[i + 1 :]:
                if a.target is b.target:
                    continue
                if bool(a.methods) == bool(b.methods) and (not a.methods or a.methods & b.methods):
                    ties.append((a, b))
    return ties


class Router(Generic[P]):
    """Routes requests to targets; built once per policy set, read-only afterwards."""

    __slots__ = ("_by_host", "_routes")

    def __init__(self, routes: Sequence[Route[P]]) -> None:
        self._routes = sorted(routes, key=lambda r: r.rank, reverse=True)
        self._by_host: dict[str, tuple[Route[P], ...]] = {}

    def _candidates(self, host: str) -> tuple[Route[P], ...]:
        found = self._by_host.get(host)
        if found is None:
            found = tuple(r for r in self._routes if r.host_matches(host))
            if len(self._by_host) >= _HOST_CACHE_LIMIT:
                self._by_host.clear()  # bounded: hosts come from clients
            self._by_host[host] = found
        return found

    def select(self, host: str, path: str, method: str) -> Route[P] | None:
        for route in self._candidates(host):
            if route.matches(path, method):
                return route
        return None
