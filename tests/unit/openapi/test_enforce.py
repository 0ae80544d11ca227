"""One request against a spec: the operation, then security, parameters and body, first violation wins."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openapi_material import ANONYMOUS, READER, minimal, request

from extauthz.openapi import evaluate, operation_view

OK = {"responses": {"200": {"description": "ok"}}}
CUSTOMER = {"name": "customerId", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1}}
SECURITY = {"components": {"securitySchemes": {"oauth": {"type": "oauth2", "flows": {}}}},
            "security": [{"oauth": ["shop:read"]}]}

SHOP = minimal({
    "/health": {"get": {"operationId": "health", "security": [], **OK}},
    "/customers/{customerId}/orders": {
        "parameters": [CUSTOMER],
        "get": {"operationId": "listOrders", "parameters": [
            {"name": "limit", "in": "query", "schema": {"type": "integer", "maximum": 100}},
            {"name": "status", "in": "query", "explode": False,
             "schema": {"type": "array", "items": {"type": "string", "enum": ["open", "paid"]}}},
            {"name": "empty", "in": "query", "allowEmptyValue": True, "schema": {"type": "integer"}},
            {"name": "x-tenant", "in": "header", "schema": {"type": "string", "pattern": "^[a-z]+$"}},
            {"name": "session", "in": "cookie", "schema": {"type": "string", "minLength": 4}},
        ], **OK},
        "post": {"operationId": "createOrder", "security": [{"oauth": ["shop:write"]}],
                 "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}},
                                                               "multipart/form-data": {},
                                                               "image/*": {}}}, **OK},
        "delete": {"operationId": "purge", "deprecated": True, **OK},
    },
    "/filters": {"get": {"operationId": "filter", "security": [], "parameters": [
        {"name": "price", "in": "query", "style": "deepObject",
         "schema": {"type": "object", "properties": {"min": {"type": "number"}}, "additionalProperties": False}},
        {"name": "who", "in": "query", "schema": {"type": "object", "properties": {
            "role": {"type": "string"}, "age": {"type": "integer", "minimum": 18}}}},
    ], **OK}},
}, **SECURITY)


@pytest.fixture
def shop(compiled):
    return compiled(SHOP)


def _check(spec, method, path, identity=READER, **kw):
    return evaluate(spec, request(method, path, **kw), identity)


def _violation(spec, method, path, identity=READER, **kw):
    outcome = _check(spec, method, path, identity, **kw)
    assert outcome.violation is not None, outcome
    v = outcome.violation
    return v.status, v.reason, v.location, v.constraint


def test_a_valid_request_and_what_rules_see(shop):
    outcome = _check(shop, "GET", "/customers/7/orders?limit=5&status=open,paid&empty=",
                     headers={"x-tenant": "acme", "cookie": "session=abcd; other=1"})
    assert outcome.violation is None
    assert outcome.operation.label == "listOrders"
    view = operation_view(outcome.operation, outcome.params, outcome.query)
    assert view == {"id": "listOrders", "method": "GET", "path": "/customers/{customerId}/orders",
                    "label": "listOrders", "params": {"customerId": 7}, "query": {"limit": 5, "status": ["open", "paid"]},
                    "deprecated": False, "tags": []}


def test_unknown_paths_and_methods(shop):
    assert _violation(shop, "GET", "/admin") == (404, "openapi_unknown_path", "path", "paths")
    outcome = _check(shop, "PUT", "/customers/7/orders")
    assert outcome.violation.status == 405 and outcome.violation.reason == "openapi_method_not_allowed"
    assert outcome.violation.headers == (("allow", "DELETE, GET, HEAD, POST"),)


def test_head_is_implied_by_get_unless_disabled(shop, compiled):
    assert _check(shop, "HEAD", "/health").violation is None
    assert _violation(compiled(SHOP, head_from_get=False), "HEAD", "/health")[0] == 405


def test_cors_preflight(shop, compiled):
    preflight = {"origin": "https://shop.example.com", "access-control-request-method": "POST"}
    assert _violation(shop, "OPTIONS", "/customers/7/orders", headers=preflight)[0] == 405
    allowing = compiled(SHOP, cors_preflight=True)
    assert _check(allowing, "OPTIONS", "/customers/7/orders", ANONYMOUS, headers=preflight).preflight
    undocumented = {**preflight, "access-control-request-method": "PATCH"}
    assert _violation(allowing, "OPTIONS", "/customers/7/orders", headers=undocumented)[0] == 405
    assert _violation(allowing, "OPTIONS", "/customers/7/orders", headers={"origin": "x"})[0] == 405


def test_deprecated_operations(shop, compiled):
    assert _check(shop, "DELETE", "/customers/7/orders").violation is None
    assert _violation(compiled(SHOP, deprecated="deny"), "DELETE", "/customers/7/orders")[:2] == \
        (403, "openapi_deprecated_operation")


def test_security_comes_before_parameters(shop, compiled):
    # An anonymous caller learns nothing about the parameters of an operation it may not call.
    assert _violation(shop, "GET", "/customers/0/orders?limit=x", ANONYMOUS)[:2] == (401, "credentials_missing")
    outcome = _check(shop, "POST", "/customers/7/orders", body="{}", headers={"content-type": "application/json"})
    assert (outcome.violation.status, outcome.violation.reason, outcome.violation.scope) == \
        (403, "insufficient_scope", "shop:write")
    assert _check(shop, "GET", "/health", ANONYMOUS).violation is None
    assert _check(shop, "GET", "/customers/7/orders", ANONYMOUS).violation.challenges == ("Bearer",)
    assert _check(compiled(SHOP, security="ignore"), "GET", "/customers/7/orders", ANONYMOUS).violation is None


@pytest.mark.parametrize("path, location, constraint", [
    ("/customers/0/orders", "path.customerId", "minimum"),
    ("/customers/x/orders", "path.customerId", "type"),
    ("/customers/7/orders?limit=101", "query.limit", "maximum"),
    ("/customers/7/orders?limit=1&limit=2", "query.limit", "style"),
    ("/customers/7/orders?status=open,lost", "query.status/1", "enum"),
    ("/customers/7/orders?empty=x", "query.empty", "type"),
    ("/customers/7/orders?limit=%ff", "query.limit", "encoding"),
])
def test_parameter_violations(shop, path, location, constraint):
    assert _violation(shop, "GET", path) == (400, "openapi_invalid_parameter", location, constraint)


def test_messages_name_the_operation_and_location_never_the_value(shop):
    outcome = _check(shop, "GET", "/customers/7/orders?limit=123456789")
    assert outcome.violation.message == "listOrders: query.limit: must be <= 100 (maximum)"
    outcome = _check(shop, "GET", "/customers/7/orders", headers={"x-tenant": "Secret-Tenant"})
    assert "Secret" not in outcome.violation.message and outcome.violation.location == "header.x-tenant"


def test_undeclared_query_parameters(shop, compiled):
    assert _violation(shop, "GET", "/health?debug=1") == (400, "openapi_unknown_parameter", "query", "parameters")
    assert _check(compiled(SHOP, unknown_query="allow"), "GET", "/health?debug=1").violation is None


def test_object_query_parameters(shop):
    assert _check(shop, "GET", "/filters?price[min]=2.5&role=admin&age=30").violation is None
    outcome = _check(shop, "GET", "/filters?price[min]=2.5&role=admin&age=30")
    assert outcome.query == {"price": {"min": 2.5}, "who": {"role": "admin", "age": 30}}
    assert _violation(shop, "GET", "/filters?price[max]=3")[2:] == ("query.price", "additionalProperties")
    assert _violation(shop, "GET", "/filters?age=12")[2:] == ("query.who/age", "minimum")
    assert _violation(shop, "GET", "/filters?price[min]=1&price[min]=2")[3] == "style"


def test_header_and_cookie_parameters(shop, compiled):
    assert _violation(shop, "GET", "/customers/7/orders", headers={"x-tenant": "ACME"})[2:] == \
        ("header.x-tenant", "pattern")
    assert _violation(shop, "GET", "/customers/7/orders", headers={"cookie": "session=ab"})[2:] == \
        ("cookie.session", "minLength")
    assert _violation(shop, "GET", "/customers/7/orders", headers={"cookie": "session=abcd; session=efgh"})[3] == \
        "style"
    assert _check(shop, "GET", "/health", headers={"cookie": "tracking=1"}).violation is None
    strict = compiled(SHOP, unknown_cookies="deny")
    assert _violation(strict, "GET", "/customers/7/orders", headers={"cookie": "tracking=1"})[:3] == \
        (400, "openapi_unknown_parameter", "cookie")


def test_bodies_by_declaration_and_media_type(shop, compiled):
    writer = {**READER, "scopes": ["shop:read", "shop:write"]}
    post = "/customers/7/orders"
    assert _violation(shop, "GET", "/health", body="x") == (400, "openapi_body_not_allowed", "body", "requestBody")
    assert _check(compiled(SHOP, undeclared_body="allow"), "GET", "/health", body="x").violation is None
    assert _violation(shop, "POST", post, writer)[:2] == (400, "openapi_body_required")
    assert _violation(shop, "POST", post, writer, body="x")[:3] == (415, "openapi_unsupported_media_type",
                                                                    "content-type")
    assert _violation(shop, "POST", post, writer, body="x", headers={"content-type": "text/plain"})[0] == 415
    assert _violation(shop, "POST", post, writer, body="--b", headers={"content-type": "multipart/form-data"})[:2] == \
        (400, "body_malformed")
    multipart = {"content-type": "multipart/form-data; boundary=b"}
    assert _check(shop, "POST", post, writer, body='--b\r\nContent-Disposition: form-data; name="a"\r\n\r\nx\r\n--b--\r\n',
                  headers=multipart).violation is None
    assert _check(shop, "POST", post, writer, body=b"\x89PNG", headers={"content-type": "image/png"}).violation is None
    truncated = _violation(shop, "POST", post, writer, body="{", partial=True,
                           headers={"content-type": "application/json"})
    assert truncated[:2] == (413, "body_truncated")
    not_forwarded = _violation(shop, "POST", post, writer,
                               headers={"content-type": "application/json", "content-length": "20"})
    assert not_forwarded[:2] == (413, "body_truncated")


UPLOAD = minimal({"/uploads": {"post": {"operationId": "upload", "requestBody": {"content": {
    "multipart/form-data": {
        "schema": {"type": "object", "required": ["title", "file"], "additionalProperties": False,
                   "properties": {"title": {"type": "string", "maxLength": 10},
                                  "copies": {"type": "integer", "maximum": 3},
                                  "file": {"type": "string", "format": "binary"}}},
        "encoding": {"file": {"contentType": "image/png, image/*+xml"}}},
    "application/json": {"schema": {"type": "object", "properties": {"n": {"type": "integer"}}}},
    "application/x-www-form-urlencoded": {
        "schema": {"type": "object", "properties": {"n": {"type": "integer"}, "tags": {"type": "array",
                   "items": {"type": "string"}, "maxItems": 2}, "ids": {"type": "array", "items": {"type": "integer"}}}},
        "encoding": {"ids": {"style": "form", "explode": False}}},
}}, "responses": {}}}})


def _multipart(*parts: tuple[str, str | None, str, str]) -> tuple[str, dict[str, str]]:
    lines = []
    for name, filename, content_type, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        lines += ["--XyZ", f"Content-Disposition: {disposition}"]
        if content_type:
            lines.append(f"Content-Type: {content_type}")
        lines += ["", content]
    return "\r\n".join([*lines, "--XyZ--", ""]), {"content-type": "multipart/form-data; boundary=XyZ"}


def test_multipart_parts_are_checked(compiled):
    spec = compiled(UPLOAD)
    body, headers = _multipart(("title", None, "", "cat"), ("copies", None, "", "2"),
                               ("file", "cat.png", "image/png", "\x89PNG..."))
    assert _check(spec, "POST", "/uploads", body=body, headers=headers).violation is None
    body, headers = _multipart(("title", None, "", "cat"), ("file", "cat.svg", "image/svg+xml", "<svg/>"))
    assert _check(spec, "POST", "/uploads", body=body, headers=headers).violation is None
    body, headers = _multipart(("title", None, "", "cat"))
    assert _violation(spec, "POST", "/uploads", body=body, headers=headers)[1:] == \
        ("openapi_invalid_body", "body", "required")
    body, headers = _multipart(("title", None, "", "cat"), ("file", "x.exe", "application/x-msdownload", "MZ"))
    assert _violation(spec, "POST", "/uploads", body=body, headers=headers)[3] == "contentType"
    body, headers = _multipart(("title", None, "", "a very long title"), ("file", "c.png", "image/png", "x"))
    assert _violation(spec, "POST", "/uploads", body=body, headers=headers)[2:] == ("body/title", "maxLength")
    body, headers = _multipart(("title", None, "", "cat"), ("copies", None, "", "9"), ("file", "c.png", "image/png", ""))
    assert _violation(spec, "POST", "/uploads", body=body, headers=headers)[2:] == ("body/copies", "maximum")
    body, headers = _multipart(("title", None, "", "cat"), ("file", "c.png", "image/png", ""), ("admin", None, "", "1"))
    assert _violation(spec, "POST", "/uploads", body=body, headers=headers)[3] == "additionalProperties"


def test_json_and_form_bodies(compiled):
    spec = compiled(UPLOAD)
    json_type = {"content-type": "application/json"}
    assert _check(spec, "POST", "/uploads", body='{"n": 1}', headers=json_type).violation is None
    assert _violation(spec, "POST", "/uploads", body='{"n": "x"}', headers=json_type)[1:] == \
        ("openapi_invalid_body", "body/n", "type")
    for duplicated in ('{"n": 1, "n": 2}', '{"n": 1, "x": "\\u0022\\u0022", "n": 2}', '{"o": {"k": "a", "k": "b"}}'):
        assert _violation(spec, "POST", "/uploads", body=duplicated, headers=json_type)[:2] == \
            (400, "body_duplicate_key"), duplicated
    assert _check(spec, "POST", "/uploads", body='{"n": 1, "q": "a\\"b\\u0022"}', headers=json_type).violation is None
    assert _violation(spec, "POST", "/uploads", body='{"n": ', headers=json_type)[:2] == (400, "body_malformed")
    many = "[" + "1," * 10_000 + "1]"  # over the payload view's ceiling: never parsed
    assert _violation(spec, "POST", "/uploads", body=many, headers=json_type)[:2] == (413, "body_limit_exceeded")
    form = {"content-type": "application/x-www-form-urlencoded"}
    assert _check(spec, "POST", "/uploads", body="n=3&tags=a&tags=b&ids=1,2", headers=form).violation is None
    assert _violation(spec, "POST", "/uploads", body="n=x", headers=form)[2:] == ("body/n", "type")
    assert _violation(spec, "POST", "/uploads", body="tags=a&tags=b&tags=c", headers=form)[2:] == \
        ("body/tags", "maxItems")
    assert _violation(spec, "POST", "/uploads", body="ids=1,x", headers=form)[2:] == ("body/ids/1", "type")
    assert _violation(spec, "POST", "/uploads", body="n=1&n=2", headers=form)[3] == "style"
    assert _violation(spec, "POST", "/uploads", body="n=%ff", headers=form)[:2] == (400, "body_malformed")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", 'q"', "\\", "é"]),
                          st.one_of(st.integers(), st.text(alphabet='ab"\\é:', max_size=4), st.none())),
                max_size=6),
       st.booleans())
def test_the_quick_duplicate_key_check_agrees_with_the_payload_view(members, ascii_only):
    """The quote-count shortcut never misses a duplicate the payload view's exact check finds."""
    import json

    from extauthz.openapi.body import _has_duplicate_keys
    from extauthz.payload.json_body import parse_json

    raw = ("{" + ",".join(f"{json.dumps(k, ensure_ascii=ascii_only)}: {json.dumps(v, ensure_ascii=ascii_only)}"
                          for k, v in members) + "}").encode()
    document = parse_json(raw)
    assert _has_duplicate_keys(document) == document.has_duplicate_keys() == (len({k for k, _ in members}) <
                                                                                 len(members))
