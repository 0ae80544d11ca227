"""Choosing the policies for a request: every matching layer, then the most specific deciding policy.

Specificity compares, in order: the host (exact over wildcard, a longer wildcard suffix over a
shorter one, over none), the path (exact over prefix, a longer pattern over a shorter one, over
none), then the methods (a list over none). Two deciding policies that could tie for one request
are refused at load time, so the choice never depends on file order. Layers are not ranked against
each other: every layer that matches runs, in the order the compiler gives them.

Routes are indexed by host: exact hosts in one dictionary, wildcards by the suffix they name,
routes for any host apart. A host's candidates are a few dictionary lookups (one per label of the
host), whatever the number of policies, and are remembered per host (bounded), so a request pays for
the routes of its own host only, and a host that no layer names pays one dictionary lookup for
layers. The load-time checks over the whole set (ties, shadows) use the same kind of grouping, so a
set of ten thousand policies is checked in time proportional to its size.
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


def _dot_suffixes(host: str) -> Iterator[str]:
    """The suffixes of ``host`` a wildcard can name, longest first: ``.b.c`` and ``.c`` for ``a.b.c``
    (``*.b.c`` and ``*.c`` match it; a wildcard needs at least one character before its dot)."""
    i = host.find(".", 1)
    while i > 0:
        yield host[i:]
        i = host.find(".", i + 1)


class _HostIndex(Generic[P]):
    """Routes by host pattern: exact hosts, wildcards by their suffix (``.example.com``), and routes
    for any host. Each bucket keeps the order the routes were given in."""

    __slots__ = ("any", "exact", "wildcard")

    def __init__(self, routes: Sequence[Route[P]]) -> None:
        exact: dict[str, list[Route[P]]] = {}
        wildcard: dict[str, list[Route[P]]] = {}
        any_host: list[Route[P]] = []
        for route in routes:
            if not route.host:
                any_host.append(route)
            elif route.host.startswith("*."):
                wildcard.setdefault(route.host[1:], []).append(route)
            else:
                exact.setdefault(route.host, []).append(route)
        self.exact = {host: tuple(found) for host, found in exact.items()}
        self.wildcard = {suffix: tuple(found) for suffix, found in wildcard.items()}
        self.any = tuple(any_host)

    def matching(self, host: str) -> list[tuple[Route[P], ...]]:
        """The buckets whose routes match ``host``: its exact host, then wildcards from the longest
        suffix to the shortest, then any host (the order of host specificity)."""
        buckets = []
        found = self.exact.get(host)
        if found is not None:
            buckets.append(found)
        if self.wildcard:
            for suffix in _dot_suffixes(host):
                found = self.wildcard.get(suffix)
                if found is not None:
                    buckets.append(found)
        if self.any:
            buckets.append(self.any)
        return buckets


class Router(Generic[P]):
    """Routes requests to the deciding target; built once per policy set, read-only afterwards."""

    __slots__ = ("_by_host", "_fold_case", "_index", "_routes")

    def __init__(self, routes: Sequence[Route[P]]) -> None:
        self._routes = sorted(routes, key=lambda r: r.rank, reverse=True)
        # Built from the sorted routes, so a host's buckets joined in host order are exactly the
        # routes that match it, in the order they are tried.
        self._index = _HostIndex(self._routes)
        self._by_host: dict[str, tuple[Route[P], ...]] = {}
        self._fold_case = any(r.fold_case for r in routes)

    @property
    def routes(self) -> tuple[Route[P], ...]:
        """Every route, in the order they are tried (most specific first)."""
        return tuple(self._routes)

    def _candidates(self, host: str) -> tuple[Route[P], ...]:
        found = self._by_host.get(host)
        if found is None:
            buckets = self._index.matching(host)
            found = buckets[0] if len(buckets) == 1 else tuple(r for bucket in buckets for r in bucket)
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

    __slots__ = ("_by_host", "_by_target", "_fold_case", "_index", "_position", "_routes")

    def __init__(self, routes: Sequence[Route[P]]) -> None:
        self._routes = tuple(routes)  # already in layer order
        self._index = _HostIndex(self._routes)
        self._position = {id(route): i for i, route in enumerate(self._routes)}
        self._by_target: dict[int, tuple[Route[P], ...]] | None = None
        #: host -> the answer when it does not depend on path and method, else the candidates.
        self._by_host: dict[str, tuple[P, ...] | list[tuple[P, tuple[Route[P], ...] | None]]] = {}
        self._fold_case = any(r.fold_case for r in routes)

    def __bool__(self) -> bool:
        return bool(self._routes)

    def routes_of(self, target: P) -> tuple[Route[P], ...]:
        if self._by_target is None:
            grouped: dict[int, list[Route[P]]] = {}
            for route in self._routes:
                grouped.setdefault(id(route.target), []).append(route)
            self._by_target = {key: tuple(found) for key, found in grouped.items()}
        return self._by_target.get(id(target), ())

    def _candidates(self, host: str) -> tuple[P, ...] | list[tuple[P, tuple[Route[P], ...] | None]]:
        buckets = self._index.matching(host)
        matching = [r for bucket in buckets for r in bucket]
        if len(buckets) > 1:
            matching.sort(key=lambda r: self._position[id(r)])  # back into layer order
        grouped: dict[int, tuple[P, list[Route[P]]]] = {}
        for route in matching:
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


def _path_keys(path: str) -> list[str]:
    """Every route path pattern that matches ``path``: any path, and each prefix pattern up to it."""
    keys = [""]
    i = path.find("/")
    while i >= 0:
        keys.append(path[: i + 1] + "*")
        i = path.find("/", i + 1)
    return keys


def find_shadows(routes: Sequence[Route[P]]) -> list[Shadow[P]]:
    """Pairs where host specificity hides a narrower path: ``api.example.com /*`` decides
    ``api.example.com/admin/x`` although ``*.example.com /admin/*`` names that path more narrowly.

    Not an error (it is how selection is documented to work), but rarely what the author meant, so
    ``extauthz validate`` warns about each pair with one request where it happens.

    A winner has a broader path pattern than the shadowed route, one that matches the shadowed
    route's example path, and a host its host pattern covers; routes are indexed by (path pattern,
    each suffix of their host), so each shadowed route looks up only its few possible winners.
    """
    narrow_paths = [r for r in routes if r.path and r.host_rank[0] < 2]  # broader hosts with a path
    if not narrow_paths:
        return []
    position = {id(route): i for i, route in enumerate(routes)}
    # (path pattern, "" for any host or a host suffix such as "example.com") -> routes with a host
    # under it, in the given order.
    index: dict[tuple[str, str], list[Route[P]]] = {}
    for route in routes:
        if not route.host:
            continue
        name = route.host[2:] if route.host.startswith("*.") else route.host
        index.setdefault((route.path, ""), []).append(route)
        for suffix in _dot_suffixes(name):
            index.setdefault((route.path, suffix[1:]), []).append(route)
    found: list[Shadow[P]] = []
    seen: set[tuple[int, int]] = set()
    for broad_host in narrow_paths:
        host_key = broad_host.host[2:] if broad_host.host else ""
        example = broad_host.path[:-1] + "x" if broad_host.path.endswith("/*") else broad_host.path
        path_keys = dict.fromkeys([*_path_keys(example), *_path_keys(example.lower())])
        candidates: list[Route[P]] = []
        for path_key in path_keys:
            candidates.extend(index.get((path_key, host_key), ()))
        candidates.sort(key=lambda r: position[id(r)])
        for winner in candidates:
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
