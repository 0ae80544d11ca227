"""CEL: compile-time checking, dependency analysis, and memoized evaluation."""

from __future__ import annotations

import pytest

from extauthz.cel import CelError, compile_expression
from extauthz.context import CheckContext, accessor_for
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
