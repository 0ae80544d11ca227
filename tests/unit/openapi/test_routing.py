"""Routing: base paths, concrete before templated, segments never crossed, mixed segments."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extauthz.openapi.routing import Router, TemplateError


def _router(*templates: str, bases: tuple[str, ...] = ("",), ignore: bool = False) -> Router:
    router = Router(bases, ignore_trailing_slash=ignore)
    for template in templates:
        router.add(template)
    return router


def _match(router: Router, path: str):
    found = router.match(path)
    return None if found is None else (found[0].template, found[1])


def test_concrete_paths_win_and_the_next_branch_is_tried():
    router = _router("/users/{id}", "/users/me", "/users/{id}/orders", "/users/me/profile")
    assert _match(router, "/users/me") == ("/users/me", {})
    assert _match(router, "/users/42") == ("/users/{id}", {"id": "42"})
    # "me" has no "orders" below it: the templated branch is tried next
    assert _match(router, "/users/me/orders") == ("/users/{id}/orders", {"id": "me"})
    assert _match(router, "/users/me/profile") == ("/users/me/profile", {})


def test_a_template_segment_never_crosses_a_slash():
    router = _router("/files/{name}")
    assert _match(router, "/files/a") == ("/files/{name}", {"name": "a"})
    assert _match(router, "/files/a/b") is None
    assert _match(router, "/files/") is None  # an empty segment is not a value
    assert _match(router, "/files") is None


def test_mixed_segments_prefer_more_literal_text():
    router = _router("/Accounts/{sid}.json", "/Accounts/{sid}", "/reports/{year}-{month}")
    assert _match(router, "/Accounts/AC1.json") == ("/Accounts/{sid}.json", {"sid": "AC1"})
    assert _match(router, "/Accounts/AC1") == ("/Accounts/{sid}", {"sid": "AC1"})
    assert _match(router, "/reports/2024-06") == ("/reports/{year}-{month}", {"year": "2024", "month": "06"})


def test_base_paths_longest_first():
    router = _router("/health", "/v2/health", bases=("/api", "/api/v1"))
    assert _match(router, "/api/v1/health") == ("/health", {})
    assert _match(router, "/api/health") == ("/health", {})
    assert _match(router, "/api/v2/health") == ("/v2/health", {})
    assert _match(router, "/health") is None
    assert _match(router, "/apix/health") is None


def test_root_template_under_a_base_path():
    router = _router("/", bases=("/api",))
    assert _match(router, "/api") == ("/", {})
    assert _match(router, "/api/") == ("/", {})


def test_trailing_slash_strict_and_ignored():
    assert _match(_router("/users"), "/users/") is None
    assert _match(_router("/users", ignore=True), "/users/") == ("/users", {})
    assert _match(_router("/users/", ignore=True), "/users") == ("/users/", {})


def test_literal_segments_match_the_normalized_form():
    router = _router("/files/a b", "/x/{id}")
    assert _match(router, "/files/a%20b") == ("/files/a b", {})
    assert _match(router, "/x/a%2Cb") == ("/x/{id}", {"id": "a%2Cb"})  # values keep their escapes


@pytest.mark.parametrize("templates, problem", [
    (("/a/{x}", "/a/{y}"), "same path"),
    (("/a/{x}/{x}",), "twice"),
    (("/a/{x",), "unbalanced"),
    (("a/b",), "start with"),
])
def test_bad_templates(templates, problem):
    with pytest.raises(TemplateError, match=problem):
        _router(*templates)


_SEGMENT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.~", min_size=1, max_size=8)
_VALUE = st.text(alphabet="ABCxyz0123456789-_.~%2C", min_size=1, max_size=10)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_SEGMENT, st.booleans()), min_size=1, max_size=6), st.data())
def test_a_path_built_from_a_template_matches_it_with_its_values(parts, data):
    template = "/" + "/".join("{" + f"p{i}" + "}" if is_param else text for i, (text, is_param) in enumerate(parts))
    router = _router(template)
    values = {f"p{i}": data.draw(_VALUE) for i, (_, is_param) in enumerate(parts) if is_param}
    path = "/" + "/".join(values[f"p{i}"] if is_param else text for i, (text, is_param) in enumerate(parts))
    found = router.match(path)
    assert found is not None and found[0].template == template and found[1] == values


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="/abc{}%.-_~09", max_size=40))
def test_matching_arbitrary_paths_never_raises(path):
    router = _router("/a/{x}", "/a/b/{y}.json", "/{z}")
    found = router.match("/" + path.lstrip("/"))
    if found is not None:
        assert all("/" not in v for v in found[1].values())
