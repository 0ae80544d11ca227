"""Layers: LayerPolicy documents run before the deciding policy, can deny, never allow."""

from __future__ import annotations

import asyncio
import hashlib
import textwrap

import pytest

from extauthz.decision import Authorizer, Decision
from extauthz.policy import PolicySetError, load_folder
from extauthz.samples import check_request_from_sample


def layer_yaml(name: str, spec: str) -> str:
    body = textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ")
    return f"apiVersion: extauthz.dev/v1\nkind: LayerPolicy\nmetadata:\n  name: {name}\nspec:\n{body}\n"


def decide(policy_set, **sample) -> Decision:
    sample.setdefault("source", {"address": "198.51.100.7"})
    return asyncio.run(Authorizer(policy_set).check(check_request_from_sample(sample), explain=True))


SHOP = """
match: {hosts: [api.shop.test]}
rules:
  - {name: everyone, decision: allow}
response:
  headers:
    x-shop: "'yes'"
"""

ADMIN = """
match: {hosts: ['*.shop.test'], paths: ['/admin/*']}
rules:
  - {name: admins, when: "request.headers[?'x-role'].orValue('') == 'admin'", decision: allow}
response:
  headers:
    x-user: "'admin'"
"""

DENYLIST = """
order: -10
network:
  deny: ["203.0.113.0/24", "2001:db8::/32"]
rules:
  - {name: no-trace, when: "request.method == 'TRACE'", decision: deny, status: 405, message: trace is disabled}
"""


@pytest.fixture
def folder(policy_dir, policy_yaml):
    def write(*docs: str):
        return policy_dir(**{"p.yaml": "---\n".join(docs)})

    return write


def test_layer_denial_is_final_and_names_the_layer(folder, policy_yaml) -> None:
    policy_set = load_folder(folder(policy_yaml("shop", SHOP), layer_yaml("denylist", DENYLIST)))
    d = decide(policy_set, host="api.shop.test", path="/", source={"address": "203.0.113.9"})
    assert (d.allowed, d.status, d.reason, d.policy) == (False, 403, "denied_by_network", "denylist")
    assert d.attributes["layers"] == ["denylist:deny"]
    d = decide(policy_set, host="api.shop.test", path="/", method="TRACE")
    assert (d.allowed, d.status, d.reason, d.policy, d.rule) == (False, 405, "denied_by_rule", "denylist", "no-trace")


def test_layer_that_passes_hands_the_request_to_its_deciding_policy(folder, policy_yaml) -> None:
    policy_set = load_folder(folder(policy_yaml("shop", SHOP), layer_yaml("denylist", DENYLIST)))
    d = decide(policy_set, host="api.shop.test", path="/")
    assert (d.allowed, d.policy, d.rule) == (True, "shop", "everyone")
    assert d.attributes["layers"] == ["denylist:pass"]
    assert any("layer denylist" in step for step in d.steps)


def test_a_layer_never_allows_on_its_own(folder, policy_yaml) -> None:
    policy_set = load_folder(folder(policy_yaml("shop", SHOP), layer_yaml("denylist", DENYLIST)))
    d = decide(policy_set, host="elsewhere.test", path="/")
    assert (d.allowed, d.status, d.reason) == (False, 403, "no_policy")
    assert d.attributes["layers"] == ["denylist:pass"]


def test_allow_in_a_layer_and_pass_in_a_policy_are_load_errors(folder, policy_yaml) -> None:
    with pytest.raises(PolicySetError) as info:
        load_folder(folder(layer_yaml("l", "rules:\n  - {name: r, decision: allow}")))
    assert "a layer never allows a request: use 'pass'" in str(info.value)
    with pytest.raises(PolicySetError) as info:
        load_folder(folder(policy_yaml("p", "rules:\n  - {name: r, decision: pass}")))
    assert "'pass' is for LayerPolicy rules" in str(info.value)


@pytest.mark.parametrize("order", ["1001", "'1'", "true", "1.5"])
def test_layer_order_must_be_a_bounded_integer(folder, order: str) -> None:
    with pytest.raises(PolicySetError) as info:
        load_folder(folder(layer_yaml("l", f"order: {order}")))
    assert "spec.order: must be an integer between -1000 and 1000" in str(info.value)


def test_order_is_only_for_layers(folder, policy_yaml) -> None:
    with pytest.raises(PolicySetError) as info:
        load_folder(folder(policy_yaml("p", "order: 1")))
    assert "order is for LayerPolicy documents" in str(info.value)


def test_layers_run_by_order_then_name(folder, policy_yaml) -> None:
    policy_set = load_folder(folder(
        policy_yaml("shop", SHOP),
        layer_yaml("b", "order: 5"), layer_yaml("a", "order: 5"), layer_yaml("z", "order: -1"),
        layer_yaml("other-host", "match: {hosts: [other.test]}"),
    ))
    assert [layer.name for layer in policy_set.layers] == ["z", "other-host", "a", "b"]
    d = decide(policy_set, host="api.shop.test", path="/")
    assert d.attributes["layers"] == ["z:pass", "a:pass", "b:pass"]


def test_first_rule_that_holds_decides_in_a_layer(folder, policy_yaml) -> None:
    spec = """
    rules:
      - {name: partners, when: "request.headers[?'x-partner'].hasValue()", decision: pass}
      - {name: no-admin, when: "request.path.startsWith('/admin')", decision: deny}
    """
    policy_set = load_folder(folder(policy_yaml("shop", SHOP + "\nmode: enforce"), layer_yaml("guard", spec)))
    assert decide(policy_set, host="api.shop.test", path="/admin").reason == "denied_by_rule"
    assert decide(policy_set, host="api.shop.test", path="/admin", headers={"x-partner": "1"}).allowed
    assert decide(policy_set, host="api.shop.test", path="/").allowed


def test_dry_run_layer_records_and_hands_on_without_its_headers(folder, policy_yaml) -> None:
    spec = """
    mode: dry-run
    rules:
      - {name: no-curl, when: "request.headers[?'user-agent'].orValue('').startsWith('curl')", decision: deny}
    response:
      headers:
        x-screened: "'yes'"
    """
    policy_set = load_folder(folder(policy_yaml("shop", SHOP), layer_yaml("screen", spec)))
    d = decide(policy_set, host="api.shop.test", path="/", headers={"user-agent": "curl/8", "x-screened": "forged"})
    assert (d.allowed, d.reason, d.policy, d.would_deny) == (True, "allowed", "shop", False)
    assert d.attributes["layers"] == ["screen:would_deny"]
    assert d.attributes["layer_would_deny"] == ["screen:denied_by_rule"]
    assert "x-screened" in d.remove_headers
    assert "x-screened" not in dict(d.upstream_headers)
    d = decide(policy_set, host="api.shop.test", path="/")
    assert dict(d.upstream_headers)["x-screened"] == "yes"
    assert "x-screened" not in d.remove_headers  # the layer that ran set it: it is not foreign


def test_identity_established_by_a_layer_is_seen_by_the_deciding_policy(folder, policy_yaml, tmp_path) -> None:
    keys = tmp_path / "keys.yaml"
    digest = hashlib.sha256(b"k-0123456789abcdef0123456789abcdef").hexdigest()
    keys.write_text(f"- id: k1\n  owner: svc-a\n  sha256: {digest}\n")
    layer = f"""
    identity:
      - name: keys
        apiKey: {{keys: {keys}}}
    """
    policy = """
    match: {hosts: [api.shop.test]}
    rules:
      - {name: svc-a, when: "identity.subject == 'svc-a'", decision: allow}
    """
    policy_set = load_folder(folder(policy_yaml("shop", policy), layer_yaml("tokens", layer)))
    d = decide(policy_set, host="api.shop.test", path="/", headers={"x-api-key": "k-0123456789abcdef0123456789abcdef"})
    assert (d.allowed, d.rule) == (True, "svc-a")
    d = decide(policy_set, host="api.shop.test", path="/")
    assert (d.allowed, d.status, d.policy) == (False, 401, "tokens")


def test_headers_other_policies_set_never_come_from_the_client(folder, policy_yaml) -> None:
    public = "match: {hosts: [api.shop.test], paths: [/public]}\nrules:\n  - {name: all, decision: allow}"
    policy_set = load_folder(folder(policy_yaml("shop", SHOP), policy_yaml("admin", ADMIN),
                                    policy_yaml("public", public)))
    d = decide(policy_set, host="api.shop.test", path="/public", headers={"x-user": "admin", "x-shop": "no"})
    assert d.allowed and d.policy == "public"
    assert {"x-user", "x-shop"} <= set(d.remove_headers)
    d = decide(policy_set, host="api.shop.test", path="/", headers={"x-user": "admin"})
    assert d.policy == "shop" and "x-user" in d.remove_headers and "x-shop" not in d.remove_headers
    assert dict(d.upstream_headers)["x-shop"] == "yes"


def test_explain_names_layers_winner_and_losers(folder, policy_yaml) -> None:
    policy_set = load_folder(folder(policy_yaml("shop", SHOP), policy_yaml("admin", ADMIN),
                                    layer_yaml("denylist", DENYLIST)))
    d = decide(policy_set, host="api.shop.test", path="/admin/x")
    assert d.policy == "shop"
    text = "\n".join(d.steps)
    assert "layer denylist (p.yaml, order -10) matches" in text
    assert "policy shop (p.yaml) selected" in text
    assert "policy admin also matches (host *.shop.test, path /admin/*, methods *) but loses: host api.shop.test " \
           "is more specific than *.shop.test (hosts are compared first)" in text


def test_shadowed_narrow_path_is_reported(folder, policy_yaml) -> None:
    policy_set = load_folder(folder(policy_yaml("shop", SHOP), policy_yaml("admin", ADMIN)))
    [shadow] = policy_set.shadows
    assert (shadow.winner.target.name, shadow.shadowed.target.name) == ("shop", "admin")
    assert shadow.example == ("api.shop.test", "/admin/x", "GET")


def test_no_shadow_when_hosts_do_not_overlap(folder, policy_yaml) -> None:
    other = "match: {hosts: [api.other.test]}\nrules:\n  - {name: all, decision: allow}"
    policy_set = load_folder(folder(policy_yaml("other", other), policy_yaml("admin", ADMIN)))
    assert policy_set.shadows == ()


@pytest.mark.parametrize("field", ["hosts", "paths", "methods"])
def test_empty_match_lists_are_load_errors(folder, policy_yaml, field: str) -> None:
    for kind in (policy_yaml, layer_yaml):
        with pytest.raises(PolicySetError) as info:
            load_folder(folder(kind("p", f"match: {{{field}: []}}")))
        assert f"spec.match.{field}: must not be empty (omit the field to match any)" in str(info.value)


def test_case_insensitive_paths(folder, policy_yaml) -> None:
    admin = "match: {paths: ['/Admin/*'], pathCase: insensitive}\nrules:\n  - {name: refuse, decision: deny}"
    rest = "rules:\n  - {name: rest, decision: allow}"
    policy_set = load_folder(folder(policy_yaml("admin", admin), policy_yaml("rest", rest)))
    for path in ("/admin/x", "/ADMIN/x", "/aDmIn/users"):
        assert decide(policy_set, host="h", path=path).policy == "admin"
    assert decide(policy_set, host="h", path="/adminx").policy == "rest"
    # Case-sensitive by default.
    policy_set = load_folder(folder(policy_yaml("admin", admin.replace(", pathCase: insensitive", "")),
                                    policy_yaml("rest", rest)))
    assert decide(policy_set, host="h", path="/ADMIN/x").policy == "rest"


def test_case_insensitive_paths_tie_with_their_other_spellings(folder, policy_yaml) -> None:
    with pytest.raises(PolicySetError) as info:
        load_folder(folder(policy_yaml("a", "match: {paths: [/x/*], pathCase: insensitive}"),
                           policy_yaml("b", "match: {paths: [/X/*]}")))
    assert "ties with policy 'a'" in str(info.value)


def test_case_insensitive_layer(folder, policy_yaml) -> None:
    layer = """
    match: {paths: ['/internal/*'], pathCase: insensitive}
    rules:
      - {name: never, decision: deny}
    """
    policy_set = load_folder(folder(policy_yaml("shop", SHOP), layer_yaml("internal", layer)))
    d = decide(policy_set, host="api.shop.test", path="/INTERNAL/metrics")
    assert (d.allowed, d.policy) == (False, "internal")


def test_validate_warns_about_shadows_and_prints_routes(folder, policy_yaml, capsys) -> None:
    from extauthz.cli import main

    path = folder(policy_yaml("shop", SHOP), policy_yaml("admin", ADMIN), layer_yaml("denylist", DENYLIST))
    assert main(["validate", "--routes", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "warning: policy 'admin' (p.yaml: host *.shop.test, path /admin/*, methods *) does not decide" in err
    assert "'shop' (api.shop.test)" in err and "e.g. GET api.shop.test/admin/x" in err
    lines = out.splitlines()
    assert lines[0].startswith("ok: 3 policies")
    assert lines[1].split() == ["kind", "order", "host", "path", "methods", "policy", "mode", "file"]
    assert lines[2].split() == ["layer", "-10", "*", "*", "*", "denylist", "enforce", "p.yaml"]
    assert lines[3].split() == ["policy", "api.shop.test", "*", "*", "shop", "enforce", "p.yaml"]
    assert lines[4].split() == ["policy", "*.shop.test", "/admin/*", "*", "admin", "enforce", "p.yaml"]
    assert main(["routes", str(path)]) == 0
    assert capsys.readouterr().out.splitlines() == lines[1:]


def test_layer_outcomes_are_counted(folder, policy_yaml) -> None:
    from extauthz.telemetry.metrics import Metrics

    policy_set = load_folder(folder(policy_yaml("shop", SHOP), layer_yaml("denylist", DENYLIST)))
    metrics = Metrics()
    for method in ("GET", "GET", "TRACE"):
        metrics.observe(decide(policy_set, host="api.shop.test", path="/", method=method))
    metrics.flush()
    text = metrics.exposition().decode()
    assert 'extauthz_layer_decisions_total{layer="denylist",outcome="pass"} 2.0' in text
    assert 'extauthz_layer_decisions_total{layer="denylist",outcome="deny"} 1.0' in text


def test_a_dry_run_layer_still_refuses_ambiguous_credentials(folder, policy_yaml, tmp_path) -> None:
    layer = """
    mode: dry-run
    identity:
      - name: keys
        apiKey: {keys: KEYS}
      - name: public
        anonymous: {}
    """.replace("KEYS", str(tmp_path / "keys.yaml"))
    (tmp_path / "keys.yaml").write_text("[]\n")
    policy_set = load_folder(folder(policy_yaml("shop", SHOP), layer_yaml("tokens", layer)))
    msg = check_request_from_sample({"host": "api.shop.test", "path": "/", "source": {"address": "192.0.2.1"}})
    msg.attributes.request.http.ClearField("headers")
    for name, value in ((":authority", "api.shop.test"), (":path", "/"), (":method", "GET"),
                        ("x-api-key", "k1"), ("x-api-key", "k2")):
        entry = msg.attributes.request.http.header_map.headers.add()
        entry.key, entry.raw_value = name, value.encode()
    d = asyncio.run(Authorizer(policy_set).check(msg))
    assert (d.allowed, d.status, d.reason, d.policy, d.dry_run) == (False, 400, "ambiguous_credentials", "tokens",
                                                                     False)
