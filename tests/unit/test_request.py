"""The request view: normalization that cannot be tricked, and a faithful copy of what Envoy sent."""

from __future__ import annotations

import pytest

from extauthz.api.envoy.config.core.v3 import base_pb2
from extauthz.api.envoy.service.auth.v3 import external_auth_pb2
from extauthz.request import BadRequest, normalize_host, normalize_path, request_from_check
from extauthz.samples import check_request_from_sample


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/admin", "/admin"),
        ("//admin", "/admin"),
        ("///admin//x", "/admin/x"),
        ("/./admin", "/admin"),
        ("/a/../admin", "/admin"),
        ("/a/b/../../admin", "/admin"),
        ("/../../admin", "/admin"),
        ("/%61dmin", "/admin"),
        ("/%2e%2e/admin", "/admin"),
        ("/a/%2E%2E/admin", "/admin"),
        ("/admin;x", "/admin"),
        ("/admin;jsessionid=1/users", "/admin/users"),
        ("/admin/", "/admin/"),
        ("/admin/.", "/admin/"),
        ("/admin/..", "/"),
        ("/", "/"),
        ("/ADMIN", "/ADMIN"),
        ("/a%20b", "/a%20b"),
        ("/a%2ab", "/a%2Ab"),
        ("/~user/%7Ex", "/~user/~x"),
    ],
)
def test_normalize_path(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize(
    ("raw", "reason_fragment"),
    [
        ("/admin%2fsecret", "encoded '/'"),
        ("/admin%2Fsecret", "encoded '/'"),
        ("/admin%5csecret", "encoded '/' or '\\'"),
        ("/admin%00", "NUL"),
        ("/admin%", "malformed"),
        ("/admin%4", "malformed"),
        ("/admin%zz", "malformed"),
        ("/admin\\..\\x", "not allowed"),
        ("/adm\x00in", "not allowed"),
        ("/adm in", "not allowed"),
        ("/é", "not allowed"),
        ("admin", "must start"),
    ],
)
def test_normalize_path_refuses_ambiguous(raw: str, reason_fragment: str) -> None:
    with pytest.raises(BadRequest) as info:
        normalize_path(raw)
    assert info.value.reason == "invalid_path"
    assert reason_fragment in str(info.value)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Orders.Example.com", "orders.example.com"),
        ("orders.example.com:8080", "orders.example.com"),
        ("orders.example.com.", "orders.example.com"),
        ("orders.example.com.:443", "orders.example.com"),
        ("[::1]:8080", "[::1]"),
        ("10.0.0.1:80", "10.0.0.1"),
        ("", ""),
    ],
)
def test_normalize_host(raw: str, expected: str) -> None:
    assert normalize_host(raw) == expected


@pytest.mark.parametrize("raw", ["a b.com", "evil.com/x", "a.com..", "x@y\x00"])
def test_normalize_host_refuses_malformed(raw: str) -> None:
    with pytest.raises(BadRequest):
        normalize_host(raw)


PERCENT_HOSTS = ["admin%2eexample.com", "%61dmin.example.com", "admin.example.com%2e", "admin.example.com%2E:443",
                 "ADMIN%2Eexample.com", "adm%in.example.com", "admin.example.com%", "%"]


@pytest.mark.parametrize("raw", PERCENT_HOSTS)
def test_a_percent_escape_in_a_host_is_refused_not_decoded(raw: str) -> None:
    """A WHATWG URL parser upstream reads admin%2eexample.com as admin.example.com: never another host."""
    with pytest.raises(BadRequest) as info:
        normalize_host(raw)
    assert info.value.reason == "invalid_host"
    assert "percent" in str(info.value)


@pytest.mark.parametrize("raw", PERCENT_HOSTS[:3])
@pytest.mark.parametrize("where", ["authority", "host_header", "raw_header_map"])
def test_a_percent_encoded_authority_over_grpc_is_refused(raw: str, where: str) -> None:
    """Envoy passes such a Host on unchanged (see tests/e2e); from gRPC it arrives as :authority,
    as the host header, or in the raw header map."""
    if where == "raw_header_map":
        message = external_auth_pb2.CheckRequest()
        http = message.attributes.request.http
        http.method, http.path = "GET", "/"
        for key, value in ((":authority", raw), (":path", "/"), (":method", "GET")):
            http.header_map.headers.append(base_pb2.HeaderValue(key=key, raw_value=value.encode()))
    elif where == "authority":
        message = check_request_from_sample({"host": raw})
    else:
        message = check_request_from_sample({"headers": {"host": raw}})
        del message.attributes.request.http.headers[":authority"]
    with pytest.raises(BadRequest) as info:
        request_from_check(message)
    assert info.value.reason == "invalid_host"


def test_request_view_from_check() -> None:
    message = check_request_from_sample(
        {
            "method": "post",
            "host": "Orders.Example.com:443",
            "path": "/api//orders/./7?b=2&a=1&a=3",
            "headers": {"X-Tenant": "acme"},
            "body": '{"x": 1}',
            "source": {"address": "10.1.2.3", "port": 5555, "principal": "spiffe://td/ns/a/sa/b"},
            "context": {"route": "orders"},
            "id": "req-1",
        }
    )
    request = request_from_check(message)
    assert request.method == "POST"
    assert request.host == "orders.example.com"
    assert request.path == "/api/orders/7"
    assert request.raw_path == "/api//orders/./7?b=2&a=1&a=3"
    assert request.raw_query == "b=2&a=1&a=3"
    assert request.query == {"b": "2", "a": "1"}
    assert request.query_all == {"b": ("2",), "a": ("1", "3")}
    assert request.headers["x-tenant"] == "acme"
    assert request.headers[":path"] == "/api//orders/./7?b=2&a=1&a=3"
    assert request.body == b'{"x": 1}'
    assert request.source.address == "10.1.2.3" and request.source.port == 5555
    assert request.source.principal == "spiffe://td/ns/a/sa/b"
    assert request.context_extensions == {"route": "orders"}
    assert request.id == "req-1"
    assert request.partial_body is False


def test_request_is_immutable() -> None:
    request = request_from_check(check_request_from_sample({"path": "/x"}))
    with pytest.raises(AttributeError):
        request.path = "/admin"  # type: ignore[misc]


def test_certificate_is_url_decoded() -> None:
    pem = "-----BEGIN CERTIFICATE-----\nMIIB+/=\n-----END CERTIFICATE-----\n"
    request = request_from_check(check_request_from_sample({"source": {"address": "1.2.3.4", "certificate": pem}}))
    assert request.source.certificate == pem


def test_partial_body_flag_and_raw_body() -> None:
    message = check_request_from_sample({"method": "POST", "path": "/", "partial_body": True})
    message.attributes.request.http.raw_body = b"\xff\xfe not utf-8"
    request = request_from_check(message)
    assert request.partial_body is True
    assert request.body == b"\xff\xfe not utf-8"
    assert request.body_text is None


def test_duplicate_authority_in_raw_header_map_is_refused() -> None:
    message = external_auth_pb2.CheckRequest()
    http = message.attributes.request.http
    http.method, http.path, http.host = "GET", "/", "a.example.com"
    for key, value in ((":authority", "a.example.com"), (":authority", "b.example.com"), (":path", "/")):
        http.header_map.headers.append(base_pb2.HeaderValue(key=key, raw_value=value.encode()))
    with pytest.raises(BadRequest) as info:
        request_from_check(message)
    assert info.value.reason == "duplicate_header"


def test_raw_header_map_joins_duplicates_and_keeps_bytes() -> None:
    message = external_auth_pb2.CheckRequest()
    http = message.attributes.request.http
    http.method, http.path, http.host = "GET", "/", "a.example.com"
    for key, value in ((":authority", b"a.example.com"), ("x-a", b"1"), ("x-a", b"2"), ("x-bin", b"\xff")):
        http.header_map.headers.append(base_pb2.HeaderValue(key=key, raw_value=value))
    request = request_from_check(message)
    assert request.headers["x-a"] == "1,2"
    assert request.raw_headers["x-bin"] == b"\xff"
    assert request.header_lines == {"x-a": ("1", "2")}  # only what was sent more than once


def test_headers_map_has_no_separate_lines() -> None:
    request = request_from_check(check_request_from_sample({"headers": {"x-a": "1,2"}}))
    assert request.headers["x-a"] == "1,2" and request.header_lines == {}


def test_authority_and_host_that_disagree_are_refused() -> None:
    message = check_request_from_sample({"host": "a.example.com", "headers": {"host": "b.example.com"}})
    with pytest.raises(BadRequest) as info:
        request_from_check(message)
    assert info.value.reason == "ambiguous_host"


def test_joined_authority_is_refused() -> None:
    message = check_request_from_sample({"host": "a.example.com"})
    message.attributes.request.http.headers[":authority"] = "a.example.com,b.example.com"
    with pytest.raises(BadRequest):
        request_from_check(message)


def test_remembered_normalization_gives_the_same_answers_and_stays_bounded(monkeypatch) -> None:
    from extauthz import request as request_module

    monkeypatch.setattr(request_module, "_NORMALIZED", {})
    for _ in range(2):  # the second time from memory
        view = request_from_check(check_request_from_sample({"host": "API.Example.com.:8443", "path": "/a/./b//c"}))
        assert (view.host, view.path) == ("api.example.com", "/a/b/c")
        with pytest.raises(BadRequest):  # refusals are never remembered as answers
            request_from_check(check_request_from_sample({"host": "h", "path": "/a/%2F"}))
    monkeypatch.setattr(request_module, "_MEMO_ENTRIES", 8)
    for i in range(50):
        request_from_check(check_request_from_sample({"host": "h", "path": f"/p/{i}"}))
    assert len(request_module._NORMALIZED) <= 8
    long_path = "/" + "x" * 300
    assert request_from_check(check_request_from_sample({"host": "h", "path": long_path})).path == long_path
    assert (False, long_path) not in request_module._NORMALIZED


def test_source_address_reads_what_the_source_peer_would_say() -> None:
    tcp = check_request_from_sample({"path": "/x", "source": {"address": "10.1.2.3", "port": 5555}})
    pipe = check_request_from_sample({"path": "/x", "source": {}})
    pipe.attributes.source.address.pipe.path = "/run/envoy.sock"
    for message, expected in ((tcp, "10.1.2.3"), (pipe, "/run/envoy.sock"),
                              (check_request_from_sample({"path": "/x", "source": {}}), "")):  # fmt: skip
        request = request_from_check(message)
        assert request.source_address == expected  # before the peer is built ...
        assert request.source.address == expected
        assert request.source_address == expected  # ... and after
