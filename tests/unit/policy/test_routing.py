"""The routing indexes answer exactly what scanning every route answers, and the set-wide checks find
exactly what comparing every pair finds (they are indexed so ten thousand policies load quickly)."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from extauthz.policy.routing import LayerRouter, Route, Router, Shadow, find_shadows
from extauthz.policy.routing import _example_host as example_host
from extauthz.policy.routing import _example_path as example_path

HOST_PATTERNS = ["", "a.b.c", "b.c", "x.b.c", "c", "*.b.c", "*.c", "*.x.b.c", "*.a.b.c", "other.org", "*.org"]
REQUEST_HOSTS = ["a.b.c", "b.c", "x.b.c", "y.x.b.c", "c", "q.c", "other.org", "z.a.b.c", "", "nomatch"]
PATHS = [("", False), ("/*", False), ("/a/*", False), ("/a/b/*", False), ("/a", False), ("/a/b", False),
         ("/a/*", True), ("/a/b", True)]
REQUEST_PATHS = ["/", "/a", "/a/", "/a/b", "/a/b/c", "/A/b", "/A/B/c", "/z"]
METHODS = [frozenset(), frozenset({"GET"}), frozenset({"POST"}), frozenset({"GET", "POST"})]


@st.composite
def route_sets(draw) -> list[Route]:
    targets = [f"p{i}" for i in range(draw(st.integers(1, 8)))]
    routes = []
    for _ in range(draw(st.integers(0, 14))):
        path, fold = draw(st.sampled_from(PATHS))
        routes.append(Route(draw(st.sampled_from(HOST_PATTERNS)), path, draw(st.sampled_from(METHODS)),
                            draw(st.sampled_from(targets)), fold))
    return routes


def _brute_select(routes: list[Route], host: str, path: str, method: str) -> Route | None:
    for route in sorted(routes, key=lambda r: r.rank, reverse=True):
        if route.host_matches(host) and route.matches(path.lower() if route.fold_case else path, method):
            return route
    return None


@settings(max_examples=150, deadline=None)
@given(route_sets())
def test_the_router_answers_what_a_scan_of_every_route_answers(routes: list[Route]) -> None:
    router = Router(routes)
    ordered = sorted(routes, key=lambda r: r.rank, reverse=True)
    for host in REQUEST_HOSTS:
        assert list(router._candidates(host)) == [r for r in ordered if r.host_matches(host)]
        for path, method in itertools.product(REQUEST_PATHS, ("GET", "POST")):
            assert router.select(host, path, method) is _brute_select(routes, host, path, method)


@settings(max_examples=150, deadline=None)
@given(route_sets())
def test_the_layer_router_answers_what_a_scan_of_every_route_answers(routes: list[Route]) -> None:
    routes = sorted(routes, key=lambda r: r.target)  # the compiler hands them over layer by layer
    router = LayerRouter(routes)
    layers = list(dict.fromkeys(r.target for r in routes))
    for host, path, method in itertools.product(REQUEST_HOSTS, REQUEST_PATHS, ("GET", "POST")):
        expected = tuple(
            layer for layer in layers
            if any(r.target == layer and r.host_matches(host) and r.matches(path.lower() if r.fold_case else path,
                                                                             method) for r in routes)
        )
        assert router.select(host, path, method) == expected
    for layer in layers:
        assert router.routes_of(layer) == tuple(r for r in routes if r.target is layer)


def _brute_shadows(routes: list[Route]) -> list[Shadow]:
    """Every pair compared: what find_shadows did before it was indexed."""
    found: list[Shadow] = []
    seen: set[tuple[int, int]] = set()
    for broad in (r for r in routes if r.path and r.host_rank[0] < 2):
        for winner in routes:
            if winner.target is broad.target or winner.host_rank <= broad.host_rank:
                continue
            if winner.path_rank >= broad.path_rank:
                continue
            if winner.methods and broad.methods and not winner.methods & broad.methods:
                continue
            host = example_host(winner, broad)
            path = example_path(broad, winner) if host is not None else None
            if host is None or path is None or (id(winner.target), id(broad)) in seen:
                continue
            seen.add((id(winner.target), id(broad)))
            both = winner.methods & broad.methods if winner.methods and broad.methods else winner.methods or broad.methods
            found.append(Shadow(winner, broad, (host, path, min(both) if both else "GET")))
    return found


@settings(max_examples=300, deadline=None)
@given(route_sets())
def test_find_shadows_finds_what_comparing_every_pair_finds(routes: list[Route]) -> None:
    assert find_shadows(routes) == _brute_shadows(routes)


def test_find_shadows_is_linear_in_the_routes_that_cannot_shadow() -> None:
    """Ten thousand hosts with their own paths and one mesh-wide admin route: every host shadows it
    once, and nothing else is compared."""
    routes = [Route(f"svc-{i}.example.com", "/api/*", frozenset(), f"svc-{i}") for i in range(10_000)]
    routes.append(Route("*.example.com", "/api/admin/*", frozenset(), "admin"))
    routes.append(Route("*.other.org", "/api/admin/*", frozenset(), "other"))
    shadows = find_shadows(routes)
    assert len(shadows) == 10_000
    assert {s.shadowed.target for s in shadows} == {"admin"}
    assert shadows[0].example == ("svc-0.example.com", "/api/admin/x", "GET")
