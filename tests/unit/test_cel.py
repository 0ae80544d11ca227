"""CEL: compile-time checking, dependency analysis, and memoized evaluation."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor

import extauthz
from extauthz.api.celvars import variables_pb2 as celvars_pb2
from extauthz.cel import BOOL, HEADER_VALUE, INTEGER, KEY, STRING, VARIABLES, CelError, compile_expression
from extauthz.context import ANONYMOUS, CheckContext, accessor_for
from extauthz.request import request_from_check
from extauthz.samples import check_request_from_sample


def ctx_for(**sample) -> CheckContext:
    return CheckContext(request=request_from_check(check_request_from_sample(sample)))


def compile_(source: str, **kw):
    return compile_expression(source, accessor_for, **kw)


def test_dependencies_are_the_exact_paths_read() -> None:
    expr = compile_("request.method == 'GET' && request.headers['x-tenant'] == 'a' && has(request.headers.y)")
    assert expr.paths == (("request", "headers", "x-tenant"), ("request", "headers", "y"), ("request", "method"))


def test_whole_map_dependency_when_index_is_dynamic() -> None:
    expr = compile_("request.headers[request.query['h']] == 'x'")
    assert expr.paths == (("request", "headers"), ("request", "query", "h"))


def test_comprehension_over_headers() -> None:
    expr = compile_("request.headers.exists(k, k.startsWith('x-'))", expect="bool")
    assert expr.evaluate(ctx_for(headers={"x-a": "1"})) is True
    assert expr.evaluate(ctx_for(headers={"a": "1"})) is False


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("request.methd == 'GET'", "unknown field 'methd' on request"),
        ("source.adress == ''", "unknown field 'adress' on source"),
        ("nope == 1", "undeclared reference to 'nope'"),
        ("request.method ==", "Syntax error"),
        ("'a' + 1", "no matching overload"),
        ("", "non-empty"),
    ],
)
def test_compile_errors(source: str, message: str) -> None:
    with pytest.raises(CelError) as info:
        compile_(source, expect="bool")
    assert message in str(info.value)


def test_type_expectation() -> None:
    with pytest.raises(CelError, match="expected bool"):
        compile_("'prefix' + request.path", expect="bool")
    compile_("identity.claims.admin", expect="bool")  # dyn: checked at run time


def test_allowed_roots() -> None:
    with pytest.raises(CelError, match="not available here"):
        compile_("identity.subject", allowed={"request"})


def test_evaluation_and_memo() -> None:
    expr = compile_("request.method == 'DELETE'")
    assert expr.evaluate(ctx_for(method="DELETE")) is True
    assert expr.evaluate(ctx_for(method="GET")) is False
    assert expr.evaluate(ctx_for(method="DELETE")) is True
    assert len(expr._memo) == 2


def test_memo_never_confuses_types() -> None:
    expr = compile_("identity.claims.flag == true")
    a = CheckContext(request=ctx_for().request, identity={"claims": {"flag": True}})
    b = CheckContext(request=ctx_for().request, identity={"claims": {"flag": 1}})
    assert expr.evaluate(a) is True
    assert expr.evaluate(b) is False  # 1 == true is false in CEL; the memo must not reuse True
    assert expr.evaluate(a) is True


def test_one_input_memo_keys_strings_absence_and_other_types_apart() -> None:
    """One-input expressions key the memo by the value itself when it is a string or absent."""
    expr = compile_("request.headers[?'x-tenant'].orValue('none') + '!'")
    seen = [expr.evaluate(ctx_for(headers={"x-tenant": t} if t else {})) for t in ("a", None, "b", None, "a", "none")]
    assert seen == ["a!", "none!", "b!", "none!", "a!", "none!"]
    expr = compile_("identity.claims.v == 1")
    for value, expected in [("1", False), (1, True), (True, False), ("1", False), (1, True), (None, False)]:
        ctx = CheckContext(request=ctx_for().request, identity={"claims": {"v": value}})
        assert expr.evaluate(ctx) is expected, value


def test_missing_header_is_an_error_but_optional_syntax_works() -> None:
    with pytest.raises(CelError, match=r"^NOT_FOUND: Key not found in map$") as info:
        compile_("request.headers['x-tenant'] == 'a'").evaluate(ctx_for())
    assert "x-tenant" in info.value.detail  # for explain; the text that is logged quotes nothing
    expr = compile_("request.headers[?'x-tenant'].orValue('none')")
    assert expr.evaluate(ctx_for()) == "none"
    assert expr.evaluate(ctx_for(headers={"x-tenant": "acme"})) == "acme"
    assert compile_("has(request.headers.x)").evaluate(ctx_for()) is False


def test_plain_reads_skip_the_runtime_with_the_same_results() -> None:
    plain = compile_("request.headers['x-tenant']")
    assert plain._direct is not None
    assert plain.evaluate(ctx_for(headers={"x-tenant": "acme"})) == "acme"
    with pytest.raises(CelError, match=r"^NOT_FOUND: Key not found in map$") as info:  # the runtime's own error
        plain.evaluate(ctx_for())
    assert "x-tenant" in info.value.detail
    assert compile_("request.method").evaluate(ctx_for(method="PUT")) == "PUT"
    # Not a string or bool (a number, a map): through the runtime, whose conversions apply.
    assert compile_("request.size").evaluate(ctx_for()) == compile_("request.size + 0").evaluate(ctx_for())
    assert compile_("request.headers").evaluate(ctx_for(headers={"a": "b"}))["a"] == "b"
    for source in ("has(request.headers.x)", "request.headers[?'x']", "request.method == 'GET'"):
        assert compile_(source)._direct is None, source
    assert compile_("has(request.headers.x)").evaluate(ctx_for(headers={"x": "1"})) is True


def test_every_request_field_is_readable() -> None:
    ctx = ctx_for(method="POST", host="h.com", path="/p?q=1&q=2", headers={"a": "b"}, body="hi",
                  source={"address": "10.0.0.1", "port": 9, "principal": "p", "labels": {"l": "v"}},
                  destination={"address": "10.0.0.2"}, sni="sni.h.com", context={"k": "v"}, id="rid")
    checks = {
        "request.method": "POST", "request.host": "h.com", "request.path": "/p", "request.raw_path": "/p?q=1&q=2",
        "request.query.q": "1", "request.query_all.q": ["1", "2"], "request.body": "hi", "request.raw_body": b"hi",
        "request.id": "rid", "request.scheme": "http", "request.protocol": "HTTP/1.1", "request.size": 2,
        "request.partial_body": False, "source.address": "10.0.0.1", "source.port": 9, "source.principal": "p",
        "source.labels.l": "v", "destination.address": "10.0.0.2", "tls.sni": "sni.h.com", "context.k": "v",
        "identity.kind": "anonymous",
    }
    for source, expected in checks.items():
        assert compile_(source).evaluate(ctx) == expected, source


def test_invalid_utf8_body_is_absent_as_text() -> None:
    message = check_request_from_sample({"method": "POST"})
    message.attributes.request.http.raw_body = b"\xff"
    ctx = CheckContext(request=request_from_check(message))
    assert compile_("has(request.body)").evaluate(ctx) is False
    assert compile_("request.raw_body == b'\\xff'").evaluate(ctx) is True


@pytest.mark.parametrize(("expression", "summary"), [
    ("{'k': true}[request.headers['x-api-key']]", "NOT_FOUND: Key not found in map"),
    ("request.headers['x-api-key'].matches(request.headers['x-api-key'] + '(')",
     "INVALID_ARGUMENT: invalid regular expression"),
    ("[1, 2][size(request.headers['x-api-key'])] == 1", "UNKNOWN: Index error"),
    ("int(request.headers['x-api-key']) > 1", "INVALID_ARGUMENT: cannot convert string to int"),
])  # fmt: skip
def test_evaluation_errors_never_quote_request_values(expression: str, summary: str) -> None:
    """A runtime message can hold the evaluated values (here a credential); its str() is what logs,
    decision logs and spans get."""
    with pytest.raises(CelError) as info:
        compile_(expression).evaluate(ctx_for(headers={"x-api-key": "SECRET-KEY-999"}))
    assert str(info.value) == summary
    assert "SECRET-KEY-999" in info.value.detail or "SECRET" not in info.value.detail


# --- static types --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("source", "message"), [
    ("request.method + 1 == 2", "at 1:16: found no matching overload for '_+_' applied to '(string, int)'"),
    ("request.size + 'x' == ''", "'(int, string)'"),
    ("request.partial_body == 'yes'", "'(bool, string)'"),
    ("request.headers['x'] == 1", "'(string, int)'"),
    ("request.query.q > 1", "'(string, int)'"),
    ("request.raw_body == 'text'", "'(bytes, string)'"),
    ("source.port == '443'", "'(int, string)'"),
    ("source.labels.app == 1", "'(string, int)'"),
    ("destination.client_ip == ''", "unknown field 'client_ip' on destination"),
    ("tls.sni.size() == '3'", "'(int, string)'"),
    ("context['route'] + 1 == 2", "'(string, int)'"),
    ("identity.kind == 1", "'(string, int)'"),
    ("identity.subject > 1", "'(string, int)'"),
    ("'a' + identity.scopes == 'a'", "'(string, list(string))'"),
    ("identity.certificate_bound == 'yes'", "'(bool, string)'"),
    ("identity.subjet == 'x'", "unknown field 'subjet' on identity (known: "),
    ("identity.spiffe.ns == 'x'", "unknown field 'ns' on identity.spiffe"),
])  # fmt: skip
def test_type_errors_on_variables_are_load_errors(source: str, message: str) -> None:
    with pytest.raises(CelError) as info:
        compile_(source)
    assert message in str(info.value)


def test_type_errors_point_at_the_problem() -> None:
    with pytest.raises(CelError) as info:
        compile_("request.method == 'GET' &&\n  request.methd == 'x'", expect="bool")
    assert str(info.value).splitlines() == [
        "at 2:10: unknown field 'methd' on request (known: body, fragment, headers, host, id, method, operation, "
        "partial_body, path, protocol, query, query_all, raw_body, raw_path, scheme, size)",
        " |   request.methd == 'x'",
        " | .........^",
    ]
    with pytest.raises(CelError) as info:
        compile_("  request.headers['x']", expect="bool")
    assert str(info.value).splitlines() == [
        "at 1:3: expression has type string, expected bool", " |   request.headers['x']", " | ..^",
    ]


@pytest.mark.parametrize(("source", "expect", "message"), [
    ("request.headers['x']", BOOL, "has type string, expected bool"),
    ("request.headers", KEY, "has type map<string, string>, expected a string, an integer or a bool"),
    ("request.headers[?'x']", KEY, "has type optional_type<string> (an optional value: add .orValue(<default>))"),
    ("request", STRING, "has type request (a whole variable: read one of its fields)"),
    ("identity.spiffe", STRING, "has type identity.spiffe"),
    ("request.size", STRING, "has type int, expected string"),
    ("request.method", INTEGER, "has type string, expected an integer"),
    ("1.5", INTEGER, "has type double"),
    ("request.query_all", HEADER_VALUE, "has type map<string, list<dyn>>"),
    ("[request.headers]", HEADER_VALUE, "has type list<map<string, string>>"),
    ("timestamp('2026-01-01T00:00:00Z')", HEADER_VALUE, "has type timestamp"),
])  # fmt: skip
def test_each_site_rejects_what_it_cannot_use(source: str, expect: frozenset[str], message: str) -> None:
    with pytest.raises(CelError) as info:
        compile_(source, expect=expect)
    assert message in str(info.value)


@pytest.mark.parametrize(("source", "expect"), [
    ("request.method == 'GET'", BOOL),
    ("identity.claims.admin", BOOL),  # claims are dynamic: checked where the value is used
    ("metadata['envoy.filters.http.jwt_authn'].payload.sub", STRING),
    ("request.query_all.a[0]", STRING),  # list(dyn): a proto map cannot declare list(string)
    ("dyn(context['k'])", BOOL),  # dyn() opts out of the check
    ("identity.subject", KEY), ("request.size", KEY), ("1u", KEY), ("request.partial_body", KEY),
    ("request.size * 2", INTEGER), ("uint(request.size)", INTEGER),
    ("request.size", HEADER_VALUE), ("identity.scopes", HEADER_VALUE), ("request.raw_body", HEADER_VALUE),
    ("null", HEADER_VALUE), ("[1, 'a']", HEADER_VALUE), ("2.5", HEADER_VALUE), ("true", HEADER_VALUE),
])  # fmt: skip
def test_each_site_accepts_its_types_and_dyn(source: str, expect: frozenset[str]) -> None:
    compile_(source, expect=expect)


_PYTHON_TYPES = {
    FieldDescriptor.TYPE_STRING: str, FieldDescriptor.TYPE_BYTES: bytes, FieldDescriptor.TYPE_INT64: int,
    FieldDescriptor.TYPE_BOOL: bool,
}  # fmt: skip


def _rich_ctx() -> CheckContext:
    ctx = ctx_for(method="POST", host="h.com", path="/p?q=1&q=2#frag", headers={"a": "b"}, body="hi",
                  source={"address": "10.0.0.1", "port": 9, "principal": "p", "labels": {"l": "v"}, "service": "s"},
                  destination={"address": "10.0.0.2", "port": 443, "principal": "d", "labels": {"m": "w"}},
                  sni="sni.h.com", context={"k": "v"}, id="rid")
    ctx.operation = {"id": "getThing", "label": "getThing", "method": "POST", "path": "/p", "params": {"id": 7},
                     "query": {"q": "1"}, "deprecated": False, "tags": ["things"]}  # as openapi.operation_view
    return ctx


@pytest.mark.parametrize("variable", ["request", "source", "destination", "tls"])
def test_declared_types_are_what_the_accessors_give(variable: str) -> None:
    """The checker trusts variables.proto; the values come from extauthz/context.py's accessors.
    They agree (a number declared where the accessor gives a string would make a checked
    expression fail on every request)."""
    message = celvars_pb2.DESCRIPTOR.message_types_by_name[variable.capitalize()]
    assert set(message.fields_by_name) == VARIABLES[variable]
    ctx = _rich_ctx()
    for field in message.fields:
        value = accessor_for((variable, field.name))(ctx)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            assert type(value) is dict, field.name
            for item in value.values():
                if value_field.message_type is None:
                    assert type(item) is _PYTHON_TYPES[value_field.type], field.name
                else:  # query_all: ListValue
                    assert type(item) is list and all(type(v) is str for v in item), field.name
        elif field.message_type is not None and field.message_type.full_name == "google.protobuf.Struct":
            assert type(value) is dict, field.name
        elif field.message_type is not None:  # request.operation: a map with the message's fields
            assert type(value) is dict and set(value) == set(field.message_type.fields_by_name), field.name
            for sub in field.message_type.fields:
                if sub.message_type is not None:
                    assert type(value[sub.name]) is dict, (field.name, sub.name)
                elif sub.is_repeated:
                    assert all(type(v) is _PYTHON_TYPES[sub.type] for v in value[sub.name]), (field.name, sub.name)
                else:
                    assert type(value[sub.name]) is _PYTHON_TYPES[sub.type], (field.name, sub.name)
        else:
            assert type(value) is _PYTHON_TYPES[field.type], (field.name, value)


def test_request_operation_is_what_operation_view_gives() -> None:
    """request.operation is built by the openapi package: every declared field, of its type."""
    from extauthz.openapi.enforce import operation_view
    from extauthz.openapi.model import Operation

    operation = Operation(method="GET", template="/t/{id}", operation_id="getT", label="getT", path_params=(),
                          query={}, query_objects=(), headers=(), cookies={}, body=None, security=(),
                          deprecated=True, mode="enforce", tags=("a",))
    view = operation_view(operation, {"id": 1}, {"q": "x"})
    assert set(view) == set(celvars_pb2.DESCRIPTOR.message_types_by_name["Operation"].fields_by_name)


def test_every_identity_field_any_source_sets_is_declared() -> None:
    """An identity field that variables.proto lacks could never be read: a load error everywhere."""
    declared = VARIABLES["identity"]
    assert declared is not None
    assert set(ANONYMOUS) <= declared
    set_here: set[str] = set()
    for path in Path(extauthz.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "make_identity":
                set_here.update(k.arg for k in node.keywords if k.arg is not None)
            elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store) \
                    and getattr(node.value, "id", None) == "identity" and isinstance(node.slice, ast.Constant):
                set_here.add(node.slice.value)
    set_here -= {"claims", "scopes"}  # make_identity's own parameters
    assert set_here, "the scan found nothing: has make_identity moved?"
    assert set_here <= declared, set_here - declared
    spiffe = celvars_pb2.DESCRIPTOR.message_types_by_name["Spiffe"]
    assert set(spiffe.fields_by_name) == {"trust_domain", "path", "namespace", "service_account"}


# --- the compile cache -----------------------------------------------------------------------------------
def test_an_expression_compiled_again_is_the_same_program() -> None:
    first = compile_("request.method == 'GET' && request.path.startsWith('/cache/')", expect=BOOL)
    again = compile_("request.method == 'GET' && request.path.startsWith('/cache/')", expect=BOOL)
    assert again is first
    assert again.evaluate(ctx_for(method="GET", path="/cache/x")) is True


def test_the_cache_never_answers_for_another_expected_type() -> None:
    as_string = compile_("request.headers[?'x-cache-type'].orValue('a')", expect=STRING)
    with pytest.raises(CelError, match="expected bool"):
        compile_("request.headers[?'x-cache-type'].orValue('a')", expect=BOOL)
    as_key = compile_("request.headers[?'x-cache-type'].orValue('a')", expect=KEY)
    assert as_key is not as_string and as_key.result_type == as_string.result_type == "string"
    # And the other way round: a bool program is not handed to a site that wants a string.
    compile_("request.method == 'X-CACHE'", expect=BOOL)
    with pytest.raises(CelError, match="expected string"):
        compile_("request.method == 'X-CACHE'", expect=STRING)
    # Nor to a site that allows fewer variables.
    compile_("request.method == 'Y-CACHE'", expect=BOOL)
    with pytest.raises(CelError, match="'request' is not available here"):
        compile_("request.method == 'Y-CACHE'", expect=BOOL, allowed={"identity"})


def test_a_failed_compile_fails_again_with_the_same_message() -> None:
    with pytest.raises(CelError) as first:
        compile_("request.methd == 'cache-miss'", expect=BOOL)
    with pytest.raises(CelError) as again:
        compile_("request.methd == 'cache-miss'", expect=BOOL)
    assert str(again.value) == str(first.value) and "unknown field 'methd'" in str(first.value)


def test_the_cache_holds_only_what_something_else_holds() -> None:
    import gc

    from extauthz import cel

    source = "request.method == 'CACHE-WEAK'"
    expr = compile_(source, expect=BOOL)
    key = (source, BOOL, None, accessor_for)
    assert cel._COMPILED.get(key) is expr
    del expr
    gc.collect()
    assert cel._COMPILED.get(key) is None
