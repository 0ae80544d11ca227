"""Policy selection: the most specific policy wins; ties are refused at load time."""

from __future__ import annotations

import pytest

from extauthz.policy import PolicySetError, load_folder


@pytest.fixture
def routed(policy_dir, policy_yaml):
    docs = [
        policy_yaml("any", "rules: []"),
        policy_yaml("host-exact", "match: {hosts: [orders.example.com]}"),
        policy_yaml("host-wild", "match: {hosts: ['*.example.com']}"),
        policy_yaml("host-wild-longer", "match: {hosts: ['*.eu.example.com']}"),
        policy_yaml("exact-path", "match: {hosts: [orders.example.com], paths: [/api/orders]}"),
        policy_yaml("prefix", "match: {hosts: [orders.example.com], paths: ['/api/*']}"),
        policy_yaml("longer-prefix", "match: {hosts: [orders.example.com], paths: ['/api/orders/*']}"),
        policy_yaml("prefix-get", "match: {hosts: [orders.example.com], paths: ['/api/orders/*'], methods: [GET]}"),
        policy_yaml("path-only", "match: {paths: [/admin]}"),
    ]
    return load_folder(policy_dir(**{"p.yaml": "---\n".join(docs)}))


@pytest.mark.parametrize(
    ("host", "path", "method", "expected"),
    [
        ("other.org", "/", "GET", "any"),
        ("other.org", "/admin", "GET", "path-only"),
        ("orders.example.com", "/", "GET", "host-exact"),
        ("orders.example.com", "/admin", "GET", "host-exact"),  # host outranks path
        ("shop.example.com", "/", "GET", "host-wild"),
        ("a.b.example.com", "/", "GET", "host-wild"),
        ("x.eu.example.com", "/", "GET", "host-wild-longer"),
        ("example.com", "/", "GET", "any"),
        ("orders.example.com", "/api/orders", "GET", "exact-path"),
        ("orders.example.com", "/api/other", "GET", "prefix"),
        ("orders.example.com", "/api/", "GET", "prefix"),
        ("orders.example.com", "/api", "GET", "host-exact"),
        ("orders.example.com", "/api/orders/1", "POST", "longer-prefix"),
        ("orders.example.com", "/api/orders/1", "GET", "prefix-get"),
        ("orders.example.com", "/api/ordersX", "GET", "prefix"),
    ],
)
def test_most_specific_wins(routed, host: str, path: str, method: str, expected: str) -> None:
    policy = routed.select(host, path, method)
    assert policy is not None and policy.name == expected


def test_selection_is_select_and_select_layers_remembered_and_bounded(routed, monkeypatch) -> None:
    """The request path asks selection(): the same answers as select/select_layers, asked once per
    (host, path, method); a full memory starts over and a long path is not kept."""
    from extauthz.policy import compiler

    cases = [("orders.example.com", "/api/orders/1", "GET"), ("other.org", "/admin", "GET"),
             ("b.com", "/", "DELETE")]
    for host, path, method in cases * 2:
        assert routed.selection(host, path, method) == (routed.select(host, path, method),
                                                        routed.select_layers(host, path, method))
    assert len(routed._selected) == len(cases)
    monkeypatch.setattr(compiler, "_SELECTED_LIMIT", 2)
    routed.selection("orders.example.com", "/api/x", "GET")
    assert len(routed._selected) == 1  # cleared, then this one kept
    long_path = "/api/" + "x" * 600
    assert routed.selection("orders.example.com", long_path, "GET")[0].name == "prefix"
    assert ("orders.example.com", long_path, "GET") not in routed._selected


def test_no_match_returns_none(policy_dir, policy_yaml) -> None:
    policy_set = load_folder(policy_dir(**{"p.yaml": policy_yaml("a", "match: {hosts: [a.com]}")}))
    assert policy_set.select("b.com", "/", "GET") is None


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("match: {hosts: [a.com]}", "match: {hosts: [A.com.]}"),
        ("match: {paths: [/x]}", "match: {paths: [/x]}"),
        ("match: {paths: [/x], methods: [GET, POST]}", "match: {paths: [/x], methods: [POST]}"),
        ("rules: []", "match: {hosts: ['*']}"),
    ],
)
def test_ties_are_validation_errors(policy_dir, policy_yaml, a: str, b: str) -> None:
    folder = policy_dir(**{"p.yaml": policy_yaml("a", a) + "---\n" + policy_yaml("b", b)})
    with pytest.raises(PolicySetError) as info:
        load_folder(folder)
    assert "ties with policy 'a'" in str(info.value)


def test_disjoint_methods_do_not_tie(policy_dir, policy_yaml) -> None:
    folder = policy_dir(**{"p.yaml": policy_yaml("a", "match: {paths: [/x], methods: [GET]}") + "---\n"
                        + policy_yaml("b", "match: {paths: [/x], methods: [POST]}")})
    policy_set = load_folder(folder)
    assert policy_set.select("h", "/x", "POST").name == "b"
    assert policy_set.select("h", "/x", "PUT") is None
