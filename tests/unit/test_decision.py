"""The decision pipeline: default deny, first matching rule, dry-run, fail closed, Envoy responses."""

from __future__ import annotations

import asyncio
import json
from typing import ClassVar

import pytest

from extauthz.api.envoy.config.core.v3 import base_pb2
from extauthz.checks import Phase
from extauthz.context import CheckContext, Denial
from extauthz.decision import Authorizer, Decision
from extauthz.policy import load_folder
from extauthz.policy.compiler import CompiledPolicy
from extauthz.responses import to_check_response
from extauthz.samples import check_request_from_sample

ORDERS = """
match:
  hosts: [orders.example.com]
  paths: [/api/orders, /api/orders/*]
rules:
  - name: no-deletes
    when: "request.method == 'DELETE'"
    decision: deny
    status: 403
    message: orders cannot be deleted
  - name: tenant-required
    when: "!has(request.headers.x_tenant) && !('x-tenant' in request.headers)"
    decision: deny
    status: 400
    message: x-tenant is required
  - name: everyone-else
    decision: allow
response:
  headers:
    x-orders-tenant: "request.headers['x-tenant']"
    x-orders-method: "request.method"
    x-user: "request.headers['x-never-sent']"
"""


@pytest.fixture
def authorizer(policy_dir, policy_yaml) -> Authorizer:
    docs = [
        policy_yaml("orders", ORDERS),
        policy_yaml("trial", "match: {hosts: [trial.example.com]}\nmode: dry-run\nrules:\n  - {name: never, when: 'false', decision: allow}"),
        policy_yaml("broken", "match: {hosts: [broken.example.com]}\nrules:\n  - {name: r, when: \"request.headers['missing'] == 'x'\", decision: allow}"),
        policy_yaml("silent", "match: {hosts: [silent.example.com]}"),
        policy_yaml("typed", "match: {hosts: [typed.example.com]}\nrules:\n  - {name: r, when: \"dyn(context['k'])\", decision: allow}"),  # dyn(): a string passes the load
    ]
    return Authorizer(load_folder(policy_dir(**{"p.yaml": "---\n".join(docs)})))


def decide(authorizer: Authorizer, **sample) -> Decision:
    return asyncio.run(authorizer.check(check_request_from_sample(sample), explain=True))


def test_allow_with_headers(authorizer) -> None:
    d = decide(authorizer, host="orders.example.com", path="/api/orders/1", headers={"x-tenant": "acme"}, id="r-1")
    assert (d.allowed, d.status, d.reason, d.policy, d.rule) == (True, 200, "allowed", "orders", "everyone-else")
    assert dict(d.upstream_headers) == {"x-orders-tenant": "acme", "x-orders-method": "GET"}
    assert d.remove_headers == ("x-user",)  # never left to the client to supply
    assert d.decision_id == "r-1"


def test_first_matching_rule_decides(authorizer) -> None:
    d = decide(authorizer, method="DELETE", host="orders.example.com", path="/api/orders/1", headers={"x-tenant": "a"})
    assert (d.allowed, d.status, d.reason, d.rule, d.message) == (False, 403, "denied_by_rule", "no-deletes", "orders cannot be deleted")
    d = decide(authorizer, host="orders.example.com", path="/api/orders")
    assert (d.status, d.rule) == (400, "tenant-required")


def test_no_policy_is_403(authorizer) -> None:
    d = decide(authorizer, host="elsewhere.example.com", path="/")
    assert (d.allowed, d.status, d.reason) == (False, 403, "no_policy")


def test_no_rules_means_deny(authorizer) -> None:
    d = decide(authorizer, host="silent.example.com", path="/")
    assert (d.allowed, d.status, d.reason) == (False, 403, "no_rule_matched")


def test_bad_path_is_400_before_any_policy(authorizer) -> None:
    d = decide(authorizer, host="orders.example.com", path="/api/orders%2f..%2fadmin")
    assert (d.allowed, d.status, d.reason) == (False, 400, "invalid_path")


@pytest.mark.parametrize("path", ["//api/orders", "/./api/orders", "/x/../api/orders", "/%61pi/orders", "/api/orders;x"])
def test_bypass_spellings_reach_the_same_policy(authorizer, path: str) -> None:
    d = decide(authorizer, method="DELETE", host="ORDERS.example.com.", path=path, headers={"x-tenant": "a"})
    assert (d.allowed, d.policy, d.rule) == (False, "orders", "no-deletes")


def test_dry_run_allows_but_records(authorizer) -> None:
    d = decide(authorizer, host="trial.example.com", path="/")
    assert (d.allowed, d.would_deny, d.dry_run, d.reason) == (True, True, True, "no_rule_matched")
    response = to_check_response(d)
    assert response.WhichOneof("http_response") == "ok_response"
    assert response.dynamic_metadata.fields["would_deny"].bool_value is True


DRY_RUN_OWNED = """
match: {hosts: [keys.example.com]}
mode: dry-run
identity:
  - name: partners
    apiKey:
      keys: keys.json
      in: {header: x-api-key, forward: false}
rules:
  - {name: partners-only, when: "identity.kind == 'apiKey'", decision: allow}
response:
  headers:
    x-partner: "identity.subject"
"""


def test_dry_run_would_deny_strips_every_header_the_policy_owns(policy_dir, policy_yaml) -> None:
    """The response and credential checks do not run after a would-deny: a client's own x-partner,
    or the credential the policy keeps from the upstream, must not reach it anyway."""
    import hashlib

    keys = json.dumps([{"id": "k1", "owner": "acme", "sha256": hashlib.sha256(b"good-key-0123456789").hexdigest()}])
    authorizer = Authorizer(load_folder(policy_dir(**{"p.yaml": policy_yaml("keys", DRY_RUN_OWNED), "keys.json": keys})))
    for headers, removed in (({"x-partner": "admin"}, {"x-partner"}),
                             ({"x-partner": "admin", "x-api-key": "wrong-key-0123456789"}, {"x-api-key", "x-partner"})):
        d = decide(authorizer, host="keys.example.com", path="/", headers=headers)
        assert (d.allowed, d.would_deny) == (True, True)
        assert d.upstream_headers == ()
        assert set(d.remove_headers) == removed
        response = to_check_response(d)
        assert set(response.ok_response.headers_to_remove) == removed
    d = decide(authorizer, host="keys.example.com", path="/", headers={"x-partner": "admin", "x-api-key": "good-key-0123456789"})
    assert (d.allowed, d.would_deny, d.upstream_headers, d.remove_headers) == (True, False, (("x-partner", "acme"),), ("x-api-key",))


def test_dry_run_would_deny_keeps_a_credential_in_another_scheme(policy_dir, policy_yaml) -> None:
    """The policy strips Authorization only in its own scheme: an upstream's Basic credentials, which
    the trial does not read, must reach it unchanged (a dry-run is how a migration is tried)."""
    spec = DRY_RUN_OWNED.replace("in: {header: x-api-key, forward: false}",
                                 "in: {header: authorization, scheme: ApiKey, forward: false}")
    authorizer = Authorizer(load_folder(policy_dir(**{"p.yaml": policy_yaml("keys", spec), "keys.json": "[]"})))
    basic = decide(authorizer, host="keys.example.com", path="/", headers={"authorization": "Basic dXNlcjpwYXNz"})
    assert (basic.allowed, basic.would_deny, basic.remove_headers) == (True, True, ("x-partner",))
    ours = decide(authorizer, host="keys.example.com", path="/", headers={"authorization": "ApiKey wrong-key-012345"})
    assert (ours.allowed, ours.would_deny, set(ours.remove_headers)) == (True, True, {"authorization", "x-partner"})


def test_rule_error_is_503_never_allow(authorizer) -> None:
    d = decide(authorizer, host="broken.example.com", path="/")
    assert (d.allowed, d.status, d.reason) == (False, 503, "internal_error")
    assert d.attributes["error"] == "rule r: NOT_FOUND: Key not found in map"  # logged: quotes no value
    assert any("missing" in step for step in d.steps or ())  # explain says which key


def test_non_bool_condition_is_503(authorizer) -> None:
    d = decide(authorizer, host="typed.example.com", path="/", context={"k": "not a bool"})
    assert (d.allowed, d.status, d.reason) == (False, 503, "internal_error")


class _Exploding:
    may_wait: ClassVar[bool] = False

    async def check(self, ctx: CheckContext) -> Denial | None:
        raise RuntimeError("boom")


class _Slow:
    may_wait: ClassVar[bool] = True

    async def check(self, ctx: CheckContext) -> Denial | None:
        await asyncio.sleep(5)
        return None


class _Allow:
    may_wait: ClassVar[bool] = False

    async def check(self, ctx: CheckContext) -> Denial | None:
        return None


def _with_checks(authorizer: Authorizer, *checks, may_wait: bool = False) -> None:
    policy = CompiledPolicy("custom", "x.yaml", False, checks, tuple("c" for _ in checks), may_wait)
    authorizer.policy_set.router._by_host.clear()
    for route in authorizer.policy_set.router._routes:
        if route.host == "silent.example.com":
            object.__setattr__(route, "target", policy)


def test_exception_in_a_check_is_503(authorizer) -> None:
    _with_checks(authorizer, _Allow(), _Exploding())
    d = decide(authorizer, host="silent.example.com", path="/")
    assert (d.allowed, d.status, d.reason) == (False, 503, "internal_error")


def test_timeout_is_503(authorizer) -> None:
    authorizer.check_timeout = 0.05
    _with_checks(authorizer, _Slow(), may_wait=True)
    d = decide(authorizer, host="silent.example.com", path="/")
    assert (d.allowed, d.status, d.reason) == (False, 503, "internal_error")


def test_not_ready_without_policies() -> None:
    d = asyncio.run(Authorizer().check(check_request_from_sample({"path": "/"})))
    assert (d.allowed, d.status, d.reason) == (False, 503, "not_ready")


def test_observer_failures_do_not_change_the_decision(authorizer) -> None:
    seen: list[Decision] = []
    authorizer.observers.append(lambda d: 1 / 0)
    authorizer.observers.append(seen.append)
    d = decide(authorizer, host="silent.example.com", path="/")
    assert seen == [d] and not d.allowed


def test_denied_check_response_shape(authorizer) -> None:
    d = decide(authorizer, method="DELETE", host="orders.example.com", path="/api/orders", headers={"x-tenant": "a"}, id="rid")
    response = to_check_response(d)
    assert response.status.code == 7
    denied = response.denied_response
    assert denied.status.code == 403
    assert json.loads(denied.body) == {"error": "orders cannot be deleted", "reason": "denied_by_rule", "decision_id": "rid"}
    assert [(h.header.key, h.header.value) for h in denied.headers] == [("content-type", "application/json")]
    meta = response.dynamic_metadata.fields
    assert (meta["decision_id"].string_value, meta["policy"].string_value, meta["rule"].string_value) == ("rid", "orders", "no-deletes")


def test_allowed_check_response_shape(authorizer) -> None:
    d = decide(authorizer, host="orders.example.com", path="/api/orders", headers={"x-tenant": "acme"})
    response = to_check_response(d)
    assert response.status.code == 0
    ok = response.ok_response
    assert {(h.header.key, h.header.value) for h in ok.headers} == {("x-orders-tenant", "acme"), ("x-orders-method", "GET")}
    assert all(h.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD for h in ok.headers)
    assert list(ok.headers_to_remove) == ["x-user"]


def test_status_codes_map_to_grpc_codes() -> None:
    for status, code in ((401, 16), (403, 7), (429, 7), (503, 14)):
        response = to_check_response(Decision(False, status, "r", "m", "id"))
        assert response.status.code == code
        assert response.denied_response.status.code == status


def test_phases_are_ordered() -> None:
    assert Phase.IDENTITY < Phase.SIGNATURE < Phase.RULES < Phase.QUOTA < Phase.RESPONSE
