"""Choosing the policies for a request: every matching layer, then the most specific deciding policy.

Specificity compares, in order: the host (exact over wildcard, a longer wildcard suffix over a
shorter one, over none), the path (exact over prefix, a longer pattern over a shorter one, over
none), then the methods (a list over none). Two deciding policies that could tie for one request
are refused at load time, so the choice never depends on file order. Layers are not ranked against
each other: every layer that matches runs, in the order the compiler gives them.

Host candidates are computed once per host and remembered (bounded), so a request pays for the
routes of its own host only, and a host that no layer names pays one dictionary lookup for layers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["LayerRouter", "Loss", "Route", "Router", "Shadow", "find_shadows", "find_ties"]

P = TypeVar("P")

_HOST_CACHE_LIMIT = 2048


@dataclass(frozen=True, slots=True)
class Route(Generic[P]):
    """One (host pattern, path pattern, methods) a policy claims. Empty pattern = any.

    ``fold_case`` routes compare the path case-insensitively (their pattern is stored lower-case).
    """

    host: str
    path: str
    methods: frozenset[str]
    target: P
    fold_case: bool = False

    @property
    def host_rank(self) -> tuple[int, int]:
        if not self.host:
            return (0, 0)
        if self.host.startswith("*."):
            return (1, len(self.host))
        return (2, len(self.host))

    @property
    def path_rank(self) -> tuple[int, int]:
        if not self.path:
            return (0, 0)
        if self.path.endswith("/*"):
            return (1, len(self.path))
        return (2, len(self.path))

    @property
    def rank(self) -> tuple[int, int, int, int, int]:
        return (*self.host_rank, *self.path_rank, 1 if self.methods else 0)

    def host_matches(self, host: str) -> bool:
        if not self.host:
            return True
        if self.host.startswith("*."):
            return host.endswith(self.host[1:]) and len(host) > len(self.host) - 1
        return host == self.host

    def path_matches(self, path: str) -> bool:
        if not self.path:
            return True
        if self.path.endswith("/*"):
            return path.startswith(self.path[:-1])
        return path == self.path

    def matches(self, path: str, method: str) -> bool:
        return self.path_matches(path) and (not self.methods or method in self.methods)

    def describe(self) -> str:
        methods = ",".join(sorted(self.methods)) or "*"
        case = " (any case)" if self.fold_case else ""
        return f"host {self.host or '*'}, path {self.path or '*'}{case}, methods {methods}"


def _path_key(route: Route[P]) -> str:
    return route.path.lower() if route.fold_case else route.path


def _paths_collide(a: Route[P], b: Route[P]) -> bool:
    """Same pattern for some request: identical, or equal ignoring case where either folds case."""
    if a.path == b.path:
        return True
    return (a.fold_case or b.fold_case) and a.path.lower() == b.path.lower()


def find_ties(routes: Sequence[Route[P]]) -> list[tuple[Route[P], Route[P]]]:
    """Pairs of routes of different targets that would tie for some request."""
    ties = []
    by_key: dict[tuple[str, str], list[Route[P]]] = {}
    for route in routes:
        by_key.setdefault((route.host, route.path.lower()), []).append(route)
    for group in by_key.values():
        for i, a in enumerate(group):
            for b in group[i + 1 :]:
                if a.target is b.target or not _paths_collide(a, b):
                    continue
                if bool(a.methods) == bool(b.methods) and (not a.methods or a.methods & b.methods):
                    ties.append((a, b))
    return ties


@dataclass(frozen=True, slots=True)
class Loss(Generic[P]):
    """A route that matched a request but lost to the winner, and why."""

    route: Route[P]
    why: str


def _why_lost(winner: Route[P], loser: Route[P]) -> str:
    if winner.host_rank != loser.host_rank:
        return f"host {winner.host or '*'} is more specific than {loser.host or '*'} (hosts are compared first)"
    if winner.path_rank != loser.path_rank:
        return f"path {winner.path or '*'} is more specific than {loser.path or '*'}"
    return "a method list is more specific than none"


class Router(Generic[P]):
    """Routes requests to the deciding target; built once per policy set, read-only afterwards."""

    __slots__ = ("_by_host", "_fold_case", "_routes")

    def __init__(self, routes: Sequence[Route[P]]) -> None:
        self._routes = sorted(routes, key=lambda r: r.rank, reverse=True)
        self._by_host: dict[str, tuple[Route[P], ...]] = {}
        self._fold_case = any(r.fold_case for r in routes)

    @property
    def routes(self) -> tuple[Route[P], ...]:
        """Every route, in the order they are tried (most specific first)."""
        return tuple(self._routes)

    def _candidates(self, host: str) -> tuple[Route[P], ...]:
        found = self._by_host.get(host)
        if found is None:
            found = tuple(r for r in self._routes if r.host_matches(host))
            if len(self._by_host) >= _HOST_CACHE_LIMIT:
                self._by_host.clear()  # bounded: hosts come from clients
            self._by_host[host] = found
        return found

    def _matching(self, host: str, path: str, method: str) -> Iterator[Route[P]]:
        lower = path.lower() if self._fold_case else path
        for route in self._candidates(host):
            if route.matches(lower if route.fold_case else path, method):
                yield route

    def select(self, host: str, path: str, method: str) -> Route[P] | None:
        return next(self._matching(host, path, method), None)

    def explain(self, host: str, path: str, method: str) -> tuple[Route[P] | None, list[Loss[P]]]:
        """The winner and every other route that matched, with why it lost (for ``explain``)."""
        matched = list(self._matching(host, path, method))
        if not matched:
            return None, []
        winner = matched[0]
        return winner, [Loss(r, _why_lost(winner, r)) for r in matched[1:] if r.target is not winner.target]


class LayerRouter(Generic[P]):
    """Every layer that matches a request, in layer order. Layers with several routes run once.

    Per host, the candidates are remembered as the layers that match every request to it (a mesh-wide
    layer) and those that still depend on path or method; a host whose layers are all of the first
    kind gets its answer from one dictionary lookup.
    """

    __slots__ = ("_by_host", "_fold_case", "_routes")

    def __init__(self, routes: Sequence[Route[P]]) -> None:
        self._routes = tuple(routes)  # already in layer order
        #: host -> the answer when it does not depend on path and method, else the candidates.
        self._by_host: dict[str, tuple[P, ...] | list[tuple[P, tuple[Route[P], ...] | None]]] = {}
        self._fold_case = any(r.fold_case for r in routes)

    def __bool__(self) -> bool:
        return bool(self._routes)

    def routes_of(self, target: P) -> tuple[Route[P], ...]:
        return tuple(r for r in self._routes if r.target is target)

    def _candidates(self, host: str) -> tuple[P, ...] | list[tuple[P, tuple[Route[P], ...] | None]]:
        grouped: dict[int, tuple[P, list[Route[P]]]] = {}
        for route in self._routes:
            if route.host_matches(host):
                grouped.setdefault(id(route.target), (route.target, []))[1].append(route)
        # None: the layer matches every request to this host.
        candidates = [
            (target, None if any(not r.path and not r.methods for r in routes) else tuple(routes))
            for target, routes in grouped.values()
        ]
        if all(routes is None for _, routes in candidates):
            return tuple(target for target, _ in candidates)
        return candidates

    def select(self, host: str, path: str, method: str) -> tuple[P, ...]:
        found = self._by_host.get(host)
        if found is None:
            found = self._candidates(host)
            if len(self._by_host) >= _HOST_CACHE_LIMIT:
                self._by_host.clear()  # bounded: hosts come from clients
            self._by_host[host] = found
        if isinstance(found, tuple):
            return found
        lower = path.lower() if self._fold_case else path
        selected = []
        for target, routes in found:
            if routes is None:
                selected.append(target)
                continue
            for route in routes:
                if route.matches(lower if route.fold_case else path, method):
                    selected.append(target)
                    break
        return tuple(selected)


@dataclass(frozen=True, slots=True)
class Shadow(Generic[P]):
    """A deciding route that wins, on its host, over a route with a narrower path for a broader host."""

    winner: Route[P]
    shadowed: Route[P]
    example: tuple[str, str, str]  # host, path, method of one request where it happens


def _example_host(specific: Route[P], broad: Route[P]) -> str | None:
    """A host both patterns match, ``specific`` being the more specific host pattern; None if none."""
    if specific.host.startswith("*."):
        host = "x" + specific.host[1:]
    else:
        host = specific.host or ("x" + broad.host[1:] if broad.host.startswith("*.") else "example.com")
    return host if specific.host_matches(host) and broad.host_matches(host) else None


def _example_path(narrow: Route[P], broad: Route[P]) -> str | None:
    """A path both patterns match, ``narrow`` having the more specific path; None if none."""
    path = narrow.path[:-1] + "x" if narrow.path.endswith("/*") else narrow.path
    folded = path.lower()
    ok_narrow = narrow.path_matches(folded if narrow.fold_case else path)
    ok_broad = broad.path_matches(folded if broad.fold_case else path)
    return path if ok_narrow and ok_broad else None


def find_shadows(routes: Sequence[Route[P]]) -> list[Shadow[P]]:
    """Pairs where host specificity hides a narrower path: ``api.example.com /*`` decides
    ``api.example.com/admin/x`` although ``*.example.com /admin/*`` names that path more narrowly.

    Not an error (it is how selection is documented to work), but rarely what the author meant, so
    ``extauthz validate`` warns about each pair with one request where it happens.
    """
    narrow_paths = [r for r in routes if r.path and r.host_rank[0] < 2]  # broader hosts with a path
    if not narrow_paths:
        return []
    found: list[Shadow[P]] = []
    seen: set[tuple[int, int]] = set()
    for broad_host in narrow_paths:
        for winner in routes:
            if winner.target is broad_host.target or winner.host_rank <= broad_host.host_rank:
                continue
            if winner.path_rank >= broad_host.path_rank:
                continue
            if winner.methods and broad_host.methods and not winner.methods & broad_host.methods:
                continue
            host = _example_host(winner, broad_host)
            path = _example_path(broad_host, winner) if host is not None else None
            if host is None or path is None:
                continue
            key = (id(winner.target), id(broad_host))
            if key in seen:
                continue
            seen.add(key)
            methods = sorted(winner.methods & broad_host.methods) if winner.methods and broad_host.methods else sorted(
                winner.methods or broad_host.methods)
            found.append(Shadow(winner, broad_host, (host, path, methods[0] if methods else "GET")))
    return found
