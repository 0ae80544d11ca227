"""OpenAPI enforcement end to end: client -> real Envoy (body forwarded to ext_authz) -> sidecar -> echo.

One API is described twice, as OpenAPI 3.0 (JSON) and 3.1 (YAML), served on two hosts by two
policies; every test runs against both. What is checked is what a client sees through Envoy: the
status, the JSON denial body naming operation, location and constraint, the Allow and
WWW-Authenticate headers, and that Envoy's own handling (path normalization, a body cut at
max_request_bytes) reaches the sidecar as the policy expects. The inventory endpoint is read last.

``openapi_stack`` is the one fixture that creates the Envoy + sidecar pair.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import _procs
import pytest
import yaml

pytestmark = [pytest.mark.e2e, pytest.mark.authz_modes]

BUFFER_LIMIT = 2048
KEY = "ak_e2e_openapi_0123456789abcdefghij"
READER_KEY = "ak_e2e_openapi_reader_0123456789abc"
HOSTS = {"3.0": "v30.shop.example.com", "3.1": "v31.shop.example.com"}


def _spec(version: str) -> dict[str, Any]:
    """The same API in either version: only how nullability and exclusive bounds are spelled differs."""
    v30 = version == "3.0"
    note = {"type": "string", "nullable": True, "maxLength": 20} if v30 else {"type": ["string", "null"],
                                                                              "maxLength": 20}
    price = {"type": "number", "minimum": 0, "exclusiveMinimum": True} if v30 else {"type": "number",
                                                                                  "exclusiveMinimum": 0}
    item = {"type": "object", "required": ["name", "price"], "additionalProperties": False, "properties": {
        "id": {"type": "integer", "readOnly": True}, "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "price": price, "note": note, "tags": {"type": "array", "maxItems": 3, "items": {"type": "string"}}}}
    return {
        "openapi": "3.0.3" if v30 else "3.1.0",
        "info": {"title": f"Items {version}", "version": "1"},
        "servers": [{"url": "https://shop.example.com/api"}],
        "security": [{"key": ["items:read"]}],
        "components": {"schemas": {"Item": item},
                       "securitySchemes": {"key": {"type": "apiKey", "in": "header", "name": "x-api-key"}}},
        "paths": {
            "/items": {
                "get": {"operationId": "listItems", "parameters": [
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 50}}],
                    "responses": {"200": {"description": "ok"}}},
                "post": {"operationId": "createItem", "security": [{"key": ["items:write"]}],
                         "requestBody": {"required": True, "content": {
                             "application/json": {"schema": {"$ref": "#/components/schemas/Item"}},
                             "application/x-www-form-urlencoded": {"schema": {"$ref": "#/components/schemas/Item"}}}},
                         "responses": {"201": {"description": "created"}}},
            },
            "/items/{itemId}": {
                "parameters": [{"name": "itemId", "in": "path", "required": True,
                                "schema": {"type": "integer", "minimum": 1}}],
                "get": {"operationId": "getItem", "responses": {"200": {"description": "ok"}}},
            },
        },
    }


def _policy(version: str) -> str:
    name = "items-v30" if version == "3.0" else "items-v31"
    spec = "items-30.openapi.json" if version == "3.0" else "items-31.openapi.yaml"
    return f"""apiVersion: extauthz.dev/v1
kind: AuthPolicy
metadata: {{name: {name}}}
spec:
  match: {{hosts: ["{HOSTS[version]}"]}}
  identity:
    - name: partners
      apiKey: {{keys: ../keys/keys.yaml}}
    - name: visitors
      anonymous: {{}}
  openapi:
    spec: {spec}
  rules:
    - name: documented
      decision: allow
  response:
    headers: {{x-operation: "request.operation.id", x-item: "string(request.operation.params.itemId)"}}
"""


class _NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # the sidecar refuses YAML anchors and aliases
        return True


@dataclass(frozen=True)
class Stack:
    envoy: Any
    sidecar: Any

    def send(self, version: str, method: str, target: str, *, body: bytes | None = None,
             headers: dict[str, str] | None = None, key: str | None = KEY) -> tuple[int, dict[str, str], bytes]:
        sent = {"host": HOSTS[version], **({"x-api-key": key} if key else {}), **(headers or {})}
        return _procs.http_request(self.envoy.port, method, target, body=body, headers=sent)


@pytest.fixture(scope="module")
def openapi_stack(tmp_path_factory, extauthz_factory, envoy_factory, echo_upstream) -> Stack:
    """The Envoy + sidecar pair every test here talks to (Envoy forwards bodies up to BUFFER_LIMIT)."""
    root = tmp_path_factory.mktemp("openapi-e2e")
    keys = root / "keys"
    keys.mkdir()
    records = [{"id": "writer", "owner": "acme", "sha256": hashlib.sha256(KEY.encode()).hexdigest(),
                "scopes": ["items:read", "items:write"]},
               {"id": "reader", "owner": "globex", "sha256": hashlib.sha256(READER_KEY.encode()).hexdigest(),
                "scopes": ["items:read"]}]
    (keys / "keys.yaml").write_text(yaml.safe_dump(records))
    policies = root / "policies"
    policies.mkdir()
    (policies / "items-30.openapi.json").write_text(json.dumps(_spec("3.0")))
    (policies / "items-31.openapi.yaml").write_text(yaml.dump(_spec("3.1"), Dumper=_NoAliases))
    (policies / "items.yaml").write_text(_policy("3.0") + "---\n" + _policy("3.1"))
    sidecar = extauthz_factory(policies)
    envoy = envoy_factory(ext_authz=sidecar.target, upstream_port=echo_upstream.port,
                          max_request_bytes=BUFFER_LIMIT, allow_partial_message=True)
    return Stack(envoy, sidecar)


def _denial(body: bytes) -> dict[str, Any]:
    return json.loads(body)


VERSIONS = pytest.mark.parametrize("version", ["3.0", "3.1"])


def _json(document: Any) -> tuple[bytes, dict[str, str]]:
    return json.dumps(document).encode(), {"content-type": "application/json"}


@VERSIONS
def test_a_documented_request_reaches_the_upstream_with_its_operation(openapi_stack, version):
    status, _, body = openapi_stack.send(version, "GET", "/api/items/7")
    assert status == 200
    echoed = json.loads(body)
    assert echoed["headers"]["x-operation"] == ["getItem"] and echoed["headers"]["x-item"] == ["7"]


@VERSIONS
def test_envoy_normalizes_the_path_before_we_match_it(openapi_stack, version):
    status, _, body = openapi_stack.send(version, "GET", "/api/other/../items//7")
    assert status == 200 and json.loads(body)["path"] == "/api/items/7"


@VERSIONS
def test_undocumented_paths_and_methods(openapi_stack, version):
    status, _, body = openapi_stack.send(version, "GET", "/api/admin/export")
    assert status == 404 and _denial(body)["reason"] == "openapi_unknown_path"
    status, headers, body = openapi_stack.send(version, "PUT", "/api/items/7", body=b"")
    assert status == 405 and _denial(body)["reason"] == "openapi_method_not_allowed"
    assert headers["allow"] == "GET, HEAD"


@VERSIONS
def test_parameters_are_validated(openapi_stack, version):
    status, _, body = openapi_stack.send(version, "GET", "/api/items?limit=500")
    denial = _denial(body)
    assert status == 400 and denial["reason"] == "openapi_invalid_parameter"
    assert denial["error"] == "listItems: query.limit: must be <= 50 (maximum)"
    status, _, body = openapi_stack.send(version, "GET", "/api/items/0")
    assert status == 400 and "path.itemId" in _denial(body)["error"]
    status, _, body = openapi_stack.send(version, "GET", "/api/items?debug=1")
    assert status == 400 and _denial(body)["reason"] == "openapi_unknown_parameter"


@VERSIONS
def test_security_requirements(openapi_stack, version):
    status, headers, body = openapi_stack.send(version, "GET", "/api/items", key=None)
    assert status == 401 and _denial(body)["reason"] == "credentials_missing"
    payload, content_type = _json({"name": "tea", "price": 3})
    status, headers, body = openapi_stack.send(version, "POST", "/api/items", body=payload, headers=content_type,
                                               key=READER_KEY)
    assert status == 403 and _denial(body)["reason"] == "insufficient_scope"
    assert 'scope="items:write"' in headers["www-authenticate"]


@VERSIONS
def test_json_bodies(openapi_stack, version):
    payload, content_type = _json({"name": "tea", "price": 3.5, "note": None, "tags": ["green"]})
    status, _, body = openapi_stack.send(version, "POST", "/api/items", body=payload, headers=content_type)
    assert status == 200 and json.loads(body)["body"] == payload.decode()
    for document, location, constraint in [
        ({"name": "tea", "price": 0}, "body/price", "exclusiveMinimum"),
        ({"name": "tea", "price": 1, "id": 9}, "body/id", "readOnly"),
        ({"name": "tea", "price": 1, "admin": True}, "body", "additionalProperties"),
        ({"name": "tea"}, "body", "required"),
        ({"name": "tea", "price": 1, "tags": ["a", "b", "c", "d"]}, "body/tags", "maxItems"),
    ]:
        payload, content_type = _json(document)
        status, _, body = openapi_stack.send(version, "POST", "/api/items", body=payload, headers=content_type)
        denial = _denial(body)
        assert (status, denial["reason"]) == (400, "openapi_invalid_body"), document
        assert denial["error"].startswith(f"createItem: {location}: ") and f"({constraint})" in denial["error"]
    status, _, body = openapi_stack.send(version, "POST", "/api/items", body=b'{"name": ', headers=content_type)
    assert status == 400 and _denial(body)["reason"] == "body_malformed"
    status, _, body = openapi_stack.send(version, "POST", "/api/items", body=b'{"name": "a", "name": "b", "price": 1}',
                                         headers=content_type)
    assert status == 400 and _denial(body)["reason"] == "body_duplicate_key"


@VERSIONS
def test_form_bodies_and_media_types(openapi_stack, version):
    form = {"content-type": "application/x-www-form-urlencoded"}
    status, _, _ = openapi_stack.send(version, "POST", "/api/items", body=b"name=tea&price=2.5&tags=a&tags=b",
                                      headers=form)
    assert status == 200
    status, _, body = openapi_stack.send(version, "POST", "/api/items", body=b"name=tea&price=free", headers=form)
    assert status == 400 and "body/price" in _denial(body)["error"]
    status, _, body = openapi_stack.send(version, "POST", "/api/items", body=b"tea",
                                         headers={"content-type": "text/plain"})
    assert status == 415 and _denial(body)["reason"] == "openapi_unsupported_media_type"


@VERSIONS
def test_a_body_envoy_cut_never_passes_the_schema(openapi_stack, version):
    payload, content_type = _json({"name": "tea", "price": 1, "note": None, "tags": ["x" * (BUFFER_LIMIT * 2)]})
    status, _, body = openapi_stack.send(version, "POST", "/api/items", body=payload, headers=content_type)
    assert status == 413 and _denial(body)["reason"] == "body_truncated"


def test_the_inventory_shows_documented_and_shadow_endpoints(openapi_stack):
    openapi_stack.send("3.1", "GET", "/api/internal/users/42")
    status, body = _procs.http_get("127.0.0.1", openapi_stack.sidecar.http_port, "/inventory")
    assert status == 200
    policies = {p["policy"]: p for p in json.loads(body)["policies"]}
    assert set(policies) == {"items-v30", "items-v31"}
    v31 = policies["items-v31"]
    assert {o["operation"] for o in v31["operations"] if o["requests"]} >= {"getItem", "listItems", "createItem"}
    assert "/api/internal/users/{userId}" in {s["path"] for s in v31["shadow"]}
