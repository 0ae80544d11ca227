"""Compiling a spec: what is checked at load (with file and pointer), servers, operations, security."""

from __future__ import annotations

import pytest
from openapi_material import minimal

from extauthz.openapi import Settings, SpecError, compile_spec

OK = {"responses": {"200": {"description": "ok"}}}


def _error(compiled, document, **settings) -> SpecError:
    with pytest.raises(SpecError) as caught:
        compiled(document, **settings)
    return caught.value


@pytest.mark.parametrize("document, pointer, problem", [
    ({"swagger": "2.0"}, "/swagger", "Swagger 2.0"),
    ({"openapi": "3.2.0", "info": {"title": "t", "version": "1"}}, "/openapi", "3.0.x or 3.1.x"),
    ({"openapi": "3.1.0"}, "/info", "title"),
    (minimal({"/a": {"get": {"parameters": [{"name": "x", "in": "body"}]}}}),
     "/paths/~1a/get/parameters/0/in", "must be one of"),
    (minimal({"/a/{id}": {"get": OK}}), "/paths/~1a~1{id}/get", "not declared"),
    (minimal({"/a": {"get": {"parameters": [{"name": "id", "in": "path", "required": True,
                                              "schema": {"type": "string"}}]}}}),
     "/paths/~1a/get/parameters/0", "not in the path"),
    (minimal({"/a/{id}": {"get": {"parameters": [{"name": "id", "in": "path", "schema": {}}]}}}),
     "/paths/~1a~1{id}/get/parameters/0/required", "must be required"),
    (minimal({"/a/{id}": {"get": {"parameters": [{"name": "id", "in": "path", "required": True, "style": "matrix",
                                                   "schema": {}}]}}}),
     "/paths/~1a~1{id}/get/parameters/0/style", "matrix"),
    (minimal({"/a": {"get": {"parameters": [{"name": "q", "in": "query"}]}}}),
     "/paths/~1a/get/parameters/0", "exactly one of schema and content"),
    (minimal({"/a": {"get": {"operationId": "x"}}, "/b": {"get": {"operationId": "x"}}}),
     "/paths/~1b/get/operationId", "also used by GET /a"),
    (minimal({"/a": {"get": {"security": [{"nope": []}]}}}), "/paths/~1a/get/security/0/nope", "does not declare"),
    (minimal({"/a": {"post": {"requestBody": {"content": {"json": {}}}}}}),
     "/paths/~1a/post/requestBody/content/json", "not a media type"),
    (minimal({"/a": {"get": {"parameters": [{"$ref": "#/components/parameters/Gone"}]}}}),
     "/components/parameters/Gone", "does not exist"),
    (minimal({"/a/{x}": {"get": {"parameters": [{"name": "x", "in": "path", "required": True, "schema": {}}]}},
              "/a/{y}": {"get": {"parameters": [{"name": "y", "in": "path", "required": True, "schema": {}}]}}}),
     "/paths/~1a~1{y}", "same path"),
    (minimal({"/a": {"get": {"parameters": [{"name": "q", "in": "query", "schema": {"type": "string",
                                                                                     "pattern": "(("}}]}}}),
     "/paths/~1a/get/parameters/0/schema/pattern", "regular expression"),
    (minimal({"/a": {"get": OK}}, servers=[{"url": "/{v}"}]), "/servers/0/url", "no default"),
])
def test_errors_name_the_pointer(compiled, document, pointer, problem):
    error = _error(compiled, document)
    assert error.file == "api.yaml"
    assert error.pointer == pointer, error
    assert problem in error.message


def test_errors_in_referenced_files_name_that_file(spec_file):
    path = spec_file(minimal({"/a": {"get": {"parameters": [{"$ref": "params.yaml#/Limit"}]}}}),
                     files={"params.yaml": {"Limit": {"name": "limit", "in": "query", "schema": {"type": "integer",
                                                                                                  "minimum": "one"}}}})
    with pytest.raises(SpecError) as caught:
        compile_spec(path, Settings())
    assert (caught.value.file, caught.value.pointer) == ("params.yaml", "/Limit/schema/minimum")


def test_a_spec_split_over_files(spec_file):
    path = spec_file(minimal({"/a": {"$ref": "paths/a.yaml"}}),
                     files={"paths/a.yaml": {"get": {"parameters": [{"$ref": "../common.yaml#/Limit"}]}},
                            "common.yaml": {"Limit": {"name": "limit", "in": "query",
                                                      "schema": {"$ref": "#/Int"}}, "Int": {"type": "integer"}}})
    spec = compile_spec(path, Settings())
    assert [p.name for p in spec.files] == ["api.yaml", "a.yaml", "common.yaml"]
    operation = spec.operations[0]
    assert operation.query["limit"].validator.is_valid(3)
    assert not operation.query["limit"].validator.is_valid("x")


def test_servers_give_base_paths(compiled):
    spec = compiled(minimal({"/a": {"get": OK}, "/b": {"servers": [{"url": "https://other.example.com/v2"}],
                                                        "get": OK}},
                            servers=[{"url": "https://api.example.com/{version}/",
                                      "variables": {"version": {"default": "v1", "enum": ["v1", "beta"]}}}]))
    assert spec.match("/v1/a")[0].template == "/a"
    assert spec.match("/beta/a")[0].template == "/a"
    assert spec.match("/v2/b")[0].template == "/b"
    assert spec.match("/v1/b") is None
    assert spec.match("/a") is None
    overridden = compiled(minimal({"/a": {"get": OK}}, servers=[{"url": "/v1"}]), base_paths=("/gateway",))
    assert overridden.match("/gateway/a") is not None and overridden.match("/v1/a") is None


def test_operation_labels_and_modes(compiled):
    spec = compiled(minimal({"/a": {"get": {"operationId": "getA", **OK}, "post": {"x-extauthz-mode": "report", **OK},
                                    "put": OK}}), operation_modes=(("PUT /a", "report"),))
    modes = {op.label: op.mode for op in spec.operations}
    assert modes == {"getA": "enforce", "POST /a": "report", "PUT /a": "report"}
    assert spec.unknown_overrides == ()
    assert compiled(minimal({"/a": {"get": OK}}), operation_modes=(("nope", "report"),)).unknown_overrides == ("nope",)


def test_security_schemes_without_an_identity_kind_must_be_mapped(compiled):
    document = minimal({"/a": {"get": OK}}, security=[{"basic": []}],
                       components={"securitySchemes": {"basic": {"type": "http", "scheme": "digest"}}})
    error = _error(compiled, document)
    assert error.pointer == "/security/0/basic" and "openapi.securitySchemes.basic.sources" in error.message
    spec = compiled(document, scheme_identities=(("basic", ("legacy",), ()),))
    scheme = spec.schemes["basic"]
    assert scheme.sources == {"legacy"} and scheme.challenge == "Digest"
    components = {"securitySchemes": {"basic": {"type": "http", "scheme": "Basic"}}}
    scheme = compiled(minimal({"/a": {"get": OK}}, security=[{"basic": []}], components=components)).schemes["basic"]
    assert scheme.kinds == {"basic"} and scheme.challenge == "Basic"  # the basic identity source
    assert compiled(document, security="ignore").operations[0].security
    assert "does not declare" in _error(compiled, document, scheme_identities=(("gone", ("x",), ()),)).message


def test_ignored_header_parameters(compiled):
    spec = compiled(minimal({"/a": {"get": {"parameters": [
        {"name": "Accept", "in": "header", "required": True, "schema": {"type": "string"}},
        {"name": "X-Tenant", "in": "header", "schema": {"type": "string"}}]}}}))
    assert [p.name for p in spec.operations[0].headers] == ["x-tenant"]


def test_mutual_tls_is_31_only(compiled):
    components = {"securitySchemes": {"mesh": {"type": "mutualTLS"}}}
    assert compiled(minimal({}, components=components)).schemes["mesh"].kinds == {"mtls"}
    assert _error(compiled, minimal({}, version="3.0.3", components=components)).pointer == \
        "/components/securitySchemes/mesh/type"
