"""The openapi check in a policy: loading, reloading, enforce and report, what rules and logs see."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path

import pytest
import yaml

from extauthz.decision import Authorizer
from extauthz.policy import Services, load_folder
from extauthz.policy.model import PolicySetError
from extauthz.samples import check_request_from_sample

KEY = "ak_test_0123456789abcdefghijklmnop"
SPEC = {
    "openapi": "3.1.0",
    "info": {"title": "Orders", "version": "2"},
    "servers": [{"url": "/api"}],
    "components": {"securitySchemes": {"key": {"type": "apiKey", "in": "header", "name": "x-api-key"}}},
    "security": [{"key": ["orders:read"]}],
    "paths": {
        "/health": {"get": {"operationId": "health", "security": [], "responses": {}}},
        "/customers/{customerId}/orders": {
            "parameters": [{"name": "customerId", "in": "path", "required": True, "schema": {"type": "string"}}],
            "get": {"operationId": "listOrders", "parameters": [
                {"name": "limit", "in": "query", "schema": {"type": "integer", "maximum": 10}}], "responses": {}},
            "delete": {"operationId": "purgeOrders", "security": [{"key": ["orders:admin"]}], "responses": {}},
        },
    },
}
POLICY = """
match: {hosts: [orders.example.com]}
identity:
  - name: partners
    apiKey: {keys: ../keys.yaml}
  - name: visitors
    anonymous: {}
openapi:
  spec: orders.openapi.yaml
{extra}
rules:
  - name: own-orders
    when: "has(request.operation.params.customerId) && request.operation.params.customerId != identity.subject"
    decision: deny
  - name: documented
    decision: allow
"""


@pytest.fixture
def folder(policy_dir, policy_yaml):
    def write(extra: str = "", spec: dict | None = None) -> Path:
        records = [{"id": "acme-1", "owner": "acme", "sha256": hashlib.sha256(KEY.encode()).hexdigest(),
                    "scopes": ["orders:read"]}]
        folder = policy_dir(**{"orders.yaml": policy_yaml("orders", POLICY.replace("{extra}", extra))})
        (folder.parent / "keys.yaml").write_text(yaml.safe_dump(records))
        (folder / "orders.openapi.yaml").write_text(json.dumps(spec or SPEC))
        return folder

    return write


def _decide(folder: Path, method: str, path: str, key: str | None = KEY, services: Services | None = None,
            authorizer: Authorizer | None = None):
    authorizer = authorizer or Authorizer(load_folder(folder, services))
    headers = {"x-api-key": key} if key else {}
    sample = {"method": method, "path": path, "host": "orders.example.com", "headers": headers}
    return asyncio.run(authorizer.check(check_request_from_sample(sample), explain=True))


def test_specs_beside_policies_are_not_read_as_policies(folder):
    policy_set = load_folder(folder())
    assert [p.name for p in policy_set.policies] == ["orders"]
    assert policy_set.policies[0].check_names == ("identity", "openapi", "rules")


def test_documented_requests_go_on_to_the_rules(folder):
    d = _decide(folder(), "GET", "/api/customers/acme/orders?limit=3")
    assert (d.allowed, d.rule) == (True, "documented")
    assert d.attributes["openapi_operation"] == "listOrders"
    assert any("openapi: operation listOrders: valid" in s for s in d.steps)


def test_rules_see_the_operation_bola(folder):
    d = _decide(folder(), "GET", "/api/customers/globex/orders")
    assert (d.allowed, d.status, d.reason, d.rule) == (False, 403, "denied_by_rule", "own-orders")


def test_violations_deny_with_operation_location_and_constraint(folder):
    d = _decide(folder(), "GET", "/api/customers/acme/orders?limit=11")
    assert (d.status, d.reason, d.rule) == (400, "openapi_invalid_parameter", "openapi/listOrders")
    assert d.message == "listOrders: query.limit: must be <= 10 (maximum)"
    assert {k: v for k, v in d.attributes.items() if k.startswith("openapi_")} == {
        "openapi_operation": "listOrders", "openapi_violation": "openapi_invalid_parameter",
        "openapi_location": "query.limit", "openapi_constraint": "maximum"}


def test_shadow_endpoints_are_404_and_marked(folder):
    d = _decide(folder(), "GET", "/api/internal/debug")
    assert (d.status, d.reason, d.rule) == (404, "openapi_unknown_path", "openapi")
    assert d.attributes["openapi_undocumented"] is True


def test_security_against_the_established_identity(folder):
    d = _decide(folder(), "GET", "/api/customers/acme/orders", key=None)
    assert (d.status, d.reason) == (401, "credentials_missing")  # the anonymous entry let it reach the check
    d = _decide(folder(), "DELETE", "/api/customers/acme/orders")
    assert (d.status, d.reason) == (403, "insufficient_scope")
    challenge = dict(d.client_headers)["www-authenticate"]
    assert 'error="insufficient_scope"' in challenge and 'scope="orders:admin"' in challenge
    assert _decide(folder(), "GET", "/api/health", key=None).allowed


def test_report_mode_for_the_section_and_per_operation(folder):
    d = _decide(folder("  mode: report"), "GET", "/api/customers/acme/orders?limit=11")
    assert d.allowed and d.attributes["openapi_mode"] == "report"
    assert d.attributes["openapi_violation"] == "openapi_invalid_parameter"
    d = _decide(folder("  mode: report"), "GET", "/api/nowhere")
    assert d.allowed and d.attributes["openapi_undocumented"] is True
    per_operation = folder("  operations:\n    listOrders: {mode: report}")
    assert _decide(per_operation, "GET", "/api/customers/acme/orders?limit=11").allowed
    assert not _decide(per_operation, "GET", "/api/nowhere").allowed


def test_policy_errors_name_fields_and_spec_pointers(folder):
    with pytest.raises(PolicySetError) as caught:
        load_folder(folder("  operations:\n    nope: {mode: report}\n  securitySchemes:\n    key: {sources: [ghost]}"))
    text = str(caught.value)
    assert "spec.openapi.operations: names no operation of the spec ('nope'" in text
    assert "spec.openapi.securitySchemes.key.sources[0]: names no identity source" in text
    broken = {**SPEC, "paths": {"/a/{id}": {"get": {"responses": {}}}}}
    with pytest.raises(PolicySetError) as caught:
        load_folder(folder(spec=broken))
    assert "spec.openapi.spec: OpenAPI spec" in str(caught.value)
    assert "orders.openapi.yaml#/paths/~1a~1{id}/get: path parameter 'id' of /a/{id} is not declared" in \
        str(caught.value)
    with pytest.raises(PolicySetError, match=r"spec\.openapi\.mode: must be one of: enforce, report"):
        load_folder(folder("  mode: log"))


def test_a_broken_spec_update_keeps_the_last_good_one(folder):
    root = folder()
    services = Services()
    authorizer = Authorizer(load_folder(root, services))
    check = authorizer.policy_set.policies[0].checks[1]
    watched = check.spec
    assert watched.generation == 1
    time.sleep(0.01)
    (root / "orders.openapi.yaml").write_text("openapi: 3.1.0\npaths: [broken\n")
    assert watched.refresh() is False and "not valid YAML" in watched.error
    assert _decide(root, "GET", "/api/health", key=None, authorizer=authorizer).allowed
    fixed = {**SPEC, "paths": {**SPEC["paths"], "/status": {"get": {"security": [], "responses": {}}}}}
    (root / "orders.openapi.yaml").write_text(json.dumps(fixed))
    assert watched.refresh() is True
    assert _decide(root, "GET", "/api/status", key=None, authorizer=authorizer).allowed


def test_a_change_to_a_referenced_file_reloads_the_spec(folder):
    split = {**SPEC, "paths": {"/health": {"$ref": "paths/health.json"}}}
    root = folder(spec=split)
    (root / "paths").mkdir()
    (root / "paths" / "health.json").write_text(json.dumps({"get": {"security": [], "responses": {}}}))
    authorizer = Authorizer(load_folder(root, Services()))
    watched = authorizer.policy_set.policies[0].checks[1].spec
    assert _decide(root, "GET", "/api/health", key=None, authorizer=authorizer).allowed
    time.sleep(0.01)
    (root / "paths" / "health.json").write_text(json.dumps({"post": {"security": [], "responses": {}}}))
    assert watched.refresh() is True
    assert _decide(root, "GET", "/api/health", key=None, authorizer=authorizer).status == 405


def test_request_operation_in_cel_without_an_openapi_section_is_absent(policy_dir, policy_yaml):
    folder = policy_dir(**{"p.yaml": policy_yaml("p", """
rules:
  - {name: op, when: "has(request.operation.id)", decision: allow}
""")})
    d = _decide(folder, "GET", "/x", key=None)
    assert (d.allowed, d.reason) == (False, "no_rule_matched")


def test_response_headers_can_use_the_operation(folder):
    root = folder()
    text = (root / "orders.yaml").read_text() + \
        '  response:\n    headers: {x-operation: "request.operation.id", x-template: "request.operation.path"}\n'
    (root / "orders.yaml").write_text(text)
    d = _decide(root, "GET", "/api/customers/acme/orders")
    assert dict(d.upstream_headers) == {"x-operation": "listOrders", "x-template": "/customers/{customerId}/orders"}


def test_a_layer_enforces_the_spec_for_the_deciding_policy(policy_dir):
    from extauthz.checks.openapi import openapi_checks
    from extauthz.openapi.inventory import Inventory

    layer = """apiVersion: extauthz.dev/v1
kind: LayerPolicy
metadata: {name: orders-contract}
spec:
  match: {hosts: [orders.example.com]}
  openapi: {spec: orders.openapi.yaml, security: ignore}
"""
    deciding = """apiVersion: extauthz.dev/v1
kind: AuthPolicy
metadata: {name: orders}
spec:
  match: {hosts: [orders.example.com]}
  rules:
    - {name: lists-only, when: "request.operation.id == 'listOrders'", decision: allow}
"""
    folder = policy_dir(**{"layer.yaml": layer, "orders.yaml": deciding})
    (folder / "orders.openapi.yaml").write_text(json.dumps(SPEC))
    policy_set = load_folder(folder)
    authorizer = Authorizer(policy_set)
    inventory = Inventory(lambda: openapi_checks(policy_set))
    authorizer.observers.append(inventory.observe)
    allowed = _decide(folder, "GET", "/api/customers/acme/orders", key=None, authorizer=authorizer)
    assert (allowed.allowed, allowed.policy, allowed.rule) == (True, "orders", "lists-only")
    assert _decide(folder, "GET", "/api/health", key=None, authorizer=authorizer).reason == "no_rule_matched"
    refused = _decide(folder, "GET", "/api/secret", key=None, authorizer=authorizer)
    assert (refused.status, refused.reason) == (404, "openapi_unknown_path")
    report = {p["policy"]: p for p in inventory.snapshot()["policies"]}
    assert set(report) == {"orders-contract"}  # counted under the layer whose spec judged them
    used = {o["operation"]: o["requests"] for o in report["orders-contract"]["operations"]}
    assert used["listOrders"] == 1 and used["health"] == 1
    assert [s["path"] for s in report["orders-contract"]["shadow"]] == ["/api/secret"]
