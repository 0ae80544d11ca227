"""The API inventory: template inference, bounded memory, documented vs shadow, reports and skeletons."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openapi_material import minimal

from extauthz.openapi.inventory import Inventory, infer_template, merge_snapshots, shadow_skeleton

OK = {"responses": {"200": {"description": "ok"}}}


@pytest.mark.parametrize("path, template", [
    ("/", "/"),
    ("/orders/8812", "/orders/{orderId}"),
    ("/users/3f1c6a2e-7d4b-4e0f-9a51-2b8c5d6e7f80/cards/77", "/users/{userId}/cards/{cardId}"),
    ("/categories/12/items", "/categories/{categoryId}/items"),
    ("/files/0123456789abcdef0123", "/files/{fileId}"),
    ("/reports/2024-06-30", "/reports/{reportId}"),
    ("/people/alice%40example.com", "/people/{peopleId}"),
    ("/keys/usr_8f3k2x", "/keys/{keyId}"),
    ("/v2/admin/export", "/v2/admin/export"),
    ("/a/1/2", "/a/{aId}/{id}"),
    ("/x/" + "t" * 30, "/x/{xId}"),
])
def test_template_inference(path, template):
    assert infer_template(path) == template


def test_templates_are_bounded():
    template = infer_template("/" + "/".join(f"s{i}x" for i in range(40)))
    assert template.count("/") == 17 and template.endswith("/{rest}")
    assert infer_template("/" + "a" * 500) == "/{id}"  # a long segment is data, never a route name


def _checks(spec):
    return {"shop": SimpleNamespace(compiled=spec)}


@pytest.fixture
def spec(compiled):
    return compiled(minimal({
        "/orders": {"get": {"operationId": "listOrders", **OK}},
        "/orders/{id}": {"parameters": [{"name": "id", "in": "path", "required": True, "schema": {}}],
                         "get": {"operationId": "getOrder", **OK},
                         "delete": {"operationId": "dropOrder", "deprecated": True, **OK}},
    }, servers=[{"url": "/api"}]))


def test_documented_and_shadow_usage(spec):
    inventory = Inventory(lambda: _checks(spec), clock=lambda: 1_700_000_000.0)
    inventory.record("shop", "GET", "/api/orders", "allow", 200, "jwt", {"openapi_operation": "listOrders"})
    inventory.record("shop", "DELETE", "/api/orders/9", "allow", 200, "jwt", {"openapi_operation": "dropOrder"})
    # refused before the openapi check (no attributes): routed against the spec
    inventory.record("shop", "GET", "/api/orders/7", "deny", 401, "anonymous", {})
    inventory.record("shop", "GET", "/api/admin/users/12", "deny", 404, "jwt",
                     {"openapi_undocumented": True, "openapi_violation": "openapi_unknown_path"})
    inventory.record("shop", "POST", "/api/admin/users/13", "deny", 404, "apiKey", {})
    inventory.record("other", "GET", "/x", "allow", 200, "jwt", {})  # no openapi section: ignored
    report = inventory.snapshot()
    (policy,) = report["policies"]
    used = {o["operation"]: o["requests"] for o in policy["operations"]}
    assert used == {"listOrders": 1, "getOrder": 1, "dropOrder": 1}
    assert policy["spec"]["base_paths"] == ["/api"]
    (shadow,) = policy["shadow"]
    assert shadow["path"] == "/api/admin/users/{userId}"
    assert shadow["methods"] == {"GET": 1, "POST": 1} and shadow["statuses"] == {"404": 2}
    assert shadow["identity_kinds"] == {"jwt": 1, "apiKey": 1}
    assert shadow["last_seen"] == "2023-11-14T22:13:20Z"
    assert inventory.pending_requests == {("shop", "listOrders", "allow"): 1, ("shop", "dropOrder", "allow"): 1,
                                         ("shop", "getOrder", "deny"): 1}
    assert inventory.pending_violations == {("shop", "-", "openapi_unknown_path", "enforce"): 1}
    assert inventory.pending_shadow == {"shop": 2}


def test_the_shadow_table_is_bounded(spec):
    inventory = Inventory(lambda: _checks(spec), max_shadow=3)
    for i in range(10):
        inventory.record("shop", "GET", f"/api/thing{i}", "deny", 404, "jwt", {"openapi_undocumented": True})
    inventory.record("shop", "GET", "/api/thing1", "deny", 404, "jwt", {"openapi_undocumented": True})
    policy = inventory.snapshot()["policies"][0]
    assert len(policy["shadow"]) == 3 and policy["shadow_dropped"] == 7
    assert policy["shadow"][0]["requests"] == 2
    for i in range(40):  # per-template tables are bounded too
        inventory.record("shop", f"M{i}", "/api/thing0", "deny", 404, f"kind{i}", {"openapi_undocumented": True})
    entry = next(s for s in inventory.snapshot()["policies"][0]["shadow"] if s["path"] == "/api/thing0")
    assert len(entry["methods"]) == 16 and len(entry["identity_kinds"]) == 16 and entry["requests"] == 41


def test_merging_worker_snapshots(spec):
    first = Inventory(lambda: _checks(spec), clock=lambda: 100.0)
    second = Inventory(lambda: _checks(spec), clock=lambda: 200.0)
    for inventory in (first, second):
        inventory.record("shop", "GET", "/api/orders", "allow", 200, "jwt", {"openapi_operation": "listOrders"})
        inventory.record("shop", "GET", "/api/x/1", "deny", 404, "jwt", {"openapi_undocumented": True})
    merged = merge_snapshots([first.snapshot(), second.snapshot()])
    policy = merged["policies"][0]
    assert next(o for o in policy["operations"] if o["operation"] == "listOrders")["requests"] == 2
    assert policy["shadow"][0]["requests"] == 2 and policy["shadow"][0]["statuses"] == {"404": 2}
    assert policy["shadow"][0]["first_seen"] < policy["shadow"][0]["last_seen"]


def test_openapi_skeleton_of_shadow_endpoints(spec):
    inventory = Inventory(lambda: _checks(spec), clock=lambda: 100.0)
    inventory.record("shop", "GET", "/api/admin/users/12", "deny", 404, "jwt", {"openapi_undocumented": True})
    inventory.record("shop", "PATCH", "/api/admin/users/12", "deny", 404, "jwt", {"openapi_undocumented": True})
    skeleton = shadow_skeleton(inventory.snapshot())
    assert skeleton["openapi"] == "3.1.0" and skeleton["servers"] == [{"url": "/api"}]
    item = skeleton["paths"]["/admin/users/{userId}"]
    assert set(item) == {"get", "patch"}
    assert item["get"]["parameters"] == [{"name": "userId", "in": "path", "required": True,
                                          "schema": {"type": "string"}}]
    assert item["get"]["x-extauthz"]["requests"] == 1



@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="ascii"), max_size=300))
def test_inferred_templates_are_bounded_and_never_raise(path):
    template = infer_template("/" + path)
    assert template.startswith("/") and template.count("/") <= 17
    assert all(len(segment) <= 64 or segment.startswith("{") for segment in template.split("/"))
