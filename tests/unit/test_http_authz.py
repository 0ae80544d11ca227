"""Envoy's HTTP ext_authz protocol (extauthz.wire.http_authz): a real sidecar, a real asyncio client
speaking HTTP/1.1 to its port: the mapping, the answers, keep-alive and pipelining, the limits."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from extauthz.api.envoy.service.auth.v3 import external_auth_pb2_grpc
from extauthz.decision import Decision
from extauthz.request import (
    ENVOY_HEADERS,
    ENVOY_VALUE_PREFIX,
    BadRequest,
    HttpParts,
    request_from_check,
    request_from_http,
)
from extauthz.samples import check_request_from_sample
from extauthz.server import Settings, Sidecar
from extauthz.wire.http_authz import HttpAuthzLimits, http_response_bytes

POLICY = """
match: {hosts: [api.example.com], paths: [/x]}
response:
  headers:
    x-checked: "'yes'"
rules:
  - {name: gets, when: "request.method == 'GET' && request.headers[?'x-tenant'].orValue('') == 'a'", decision: allow}
  - {name: spiffe, when: "source.principal == 'spiffe://td/ns/a/sa/b'", decision: allow}
  - {name: posts, when: "request.method == 'POST' && request.body == 'hello'", decision: allow}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def envoy_headers(**values: str) -> dict[str, str]:
    """The headers Envoy's headers_to_add set on every authorization request ("v1:" and the value)."""
    found = dict.fromkeys(ENVOY_HEADERS, "")
    found["x-extauthz-authority"] = "api.example.com"
    found["x-extauthz-peer-address"] = "10.1.2.3:40000"
    found["x-extauthz-local-address"] = "10.0.0.1:8443"
    found["x-extauthz-scheme"] = "https"
    found["x-extauthz-protocol"] = "HTTP/1.1"
    found["x-extauthz-stream-id"] = "12345"
    found.update({f"x-extauthz-{k.replace('_', '-')}": v for k, v in values.items()})
    return {name: ENVOY_VALUE_PREFIX + value for name, value in found.items()}


def raw_request(method: str, target: str, headers: dict[str, str], body: bytes = b"", *,
                envoy: bool = True) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "host: 127.0.0.1:9292"]  # Envoy sends the cluster's host
    every = {**(envoy_headers() if envoy else {}), **headers}
    lines += [f"{name}: {value}" for name, value in every.items()]
    lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def read_response(reader: asyncio.StreamReader, *, head: bool = False) -> tuple[int, dict[str, str], bytes]:
    status_line = await reader.readline()
    assert status_line, "connection closed before an answer"
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = b"" if head else await reader.readexactly(length)
    return status, headers, body


@asynccontextmanager
async def sidecar(folder: Path, **settings: Any) -> AsyncIterator[Sidecar]:
    options: dict[str, Any] = {"listen": f"127.0.0.1:{_free_port()}", "http_port": _free_port(), "grace": 0.5,
                               "http_authz_listen": f"127.0.0.1:{_free_port()}"}
    options.update(settings)
    sc = Sidecar(Settings(policies=folder, **options))
    await sc.start()
    try:
        yield sc
    finally:
        await sc.stop()


async def connect(sc: Sidecar) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert sc.http_authz is not None
    return await asyncio.open_connection("127.0.0.1", sc.http_authz.port)


async def ask(sc: Sidecar, method: str, target: str, headers: dict[str, str], body: bytes = b"",
              **kw: Any) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await connect(sc)
    writer.write(raw_request(method, target, headers, body, **kw))
    await writer.drain()
    try:
        return await asyncio.wait_for(read_response(reader, head=method == "HEAD"), 5)
    finally:
        writer.close()


@pytest.fixture
def folder(policy_dir: Callable[..., Path], policy_yaml: Callable[[str, str], str]) -> Path:
    return policy_dir(**{"a.yaml": policy_yaml("a", POLICY)})


def test_allow_and_deny_through_the_http_port(folder: Path) -> None:
    async def scenario() -> None:
        decisions: list[Decision] = []
        async with sidecar(folder) as sc:
            sc.authorizer.observers.append(decisions.append)
            status, headers, body = await ask(sc, "GET", "/x?q=1", {"x-tenant": "a", "x-request-id": "r-1"})
            assert (status, body) == (200, b"")
            assert headers["x-checked"] == "yes"
            assert "x-extauthz-decision-id" not in headers  # --dynamic-metadata deny: not on allows
            status, headers, body = await ask(sc, "GET", "/x", {"x-tenant": "b", "x-request-id": "r-2"})
            assert status == 403
            assert headers["content-type"] == "application/json"
            assert json.loads(body) == {"error": "no rule allowed the request", "reason": "no_rule_matched",
                                        "decision_id": "r-2"} or json.loads(body)["decision_id"] == "r-2"
            assert headers["x-extauthz-decision-id"] == "r-2"
            assert headers["x-extauthz-policy"] == "a"
            assert headers["x-extauthz-reason"] == json.loads(body)["reason"]
        assert [d.decision_id for d in decisions] == ["r-1", "r-2"]
        assert decisions[0].request is not None and decisions[0].request.raw_query == "q=1"

    asyncio.run(scenario())


def test_same_decision_as_grpc_for_the_same_request(folder: Path) -> None:
    """The pipeline cannot tell the two apart: same status, reason, rule, headers, body."""

    async def scenario() -> None:
        async with sidecar(folder) as sc:
            for tenant in ("a", "b"):
                sample = {"method": "GET", "host": "api.example.com", "path": "/x",
                          "headers": {"x-tenant": tenant, "x-request-id": f"id-{tenant}"}}
                async with grpc.aio.insecure_channel(sc.settings.listen) as channel:
                    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
                    grpc_answer = await stub.Check(check_request_from_sample(sample), timeout=5)
                status, headers, body = await ask(sc, "GET", "/x", {"x-tenant": tenant,
                                                                     "x-request-id": f"id-{tenant}"})
                if grpc_answer.HasField("ok_response"):
                    assert status == 200
                    assert {h.header.key: h.header.value for h in grpc_answer.ok_response.headers} == {
                        "x-checked": "yes"}
                    assert headers["x-checked"] == "yes"
                else:
                    denied = grpc_answer.denied_response
                    assert status == denied.status.code
                    assert body.decode() == denied.body

    asyncio.run(scenario())


def test_peer_identity_comes_from_envoys_headers_only(folder: Path) -> None:
    async def scenario() -> None:
        async with sidecar(folder) as sc:
            # Envoy's headers_to_add carry the verified SAN: the workload is who it says.
            status, _, _ = await ask(sc, "GET", "/x", envoy_headers(peer_uri_san="spiffe://td/ns/a/sa/b,spiffe://x"))
            assert status == 200
            # Envoy's config sets them (overwriting the client's): a request without them means it
            # does not, and is refused rather than trusting whatever arrived.
            status, _, body = await ask(sc, "GET", "/x", {"x-extauthz-peer-uri-san": "spiffe://td/ns/a/sa/b"},
                                        envoy=False)
            assert status == 500
            assert json.loads(body)["reason"] == "envoy_header_missing"
            # Sent twice (the client's and Envoy's appended): refused.
            reader, writer = await connect(sc)
            request = raw_request("GET", "/x", {}).replace(
                b"\r\n\r\n", b"\r\nx-extauthz-peer-uri-san: spiffe://td/ns/a/sa/b\r\n\r\n")
            writer.write(request)
            status, _, body = await read_response(reader)
            writer.close()
            assert status == 400 and json.loads(body)["reason"] == "duplicate_header"

    asyncio.run(scenario())


def test_request_view_mapping() -> None:
    cert = "-----BEGIN%20CERTIFICATE-----%0AMIIB-----END%20CERTIFICATE-----%0A"
    headers = {"host": "127.0.0.1:9292", "x-tenant": "a", "content-length": "5", "x-envoy-internal": "true",
               "x-envoy-expected-rq-timeout-ms": "500", "x-envoy-auth-partial-body": "true",
               **envoy_headers(peer_uri_san="spiffe://td/a", peer_cert=cert, sni="api.example.com",
                               tls_version="TLSv1.3", peer_address="[::1]:5000", authority="API.Example.com:443")}
    request = request_from_http(HttpParts("POST", "/authz/a/../b?x=1", headers, b"hello"), "/authz")
    assert (request.method, request.host, request.path, request.raw_path, request.raw_query) == (
        "POST", "api.example.com", "/b", "/a/../b?x=1", "x=1")
    assert request.body == b"hello" and request.partial_body
    assert request.headers[":authority"] == "API.Example.com:443"
    assert request.headers[":path"] == "/a/../b?x=1"
    assert request.headers[":method"] == "POST" and request.headers[":scheme"] == "https"
    assert request.headers == {"x-tenant": "a", "x-envoy-auth-partial-body": "true", ":authority": "API.Example.com:443",
                               ":path": "/a/../b?x=1", ":method": "POST", ":scheme": "https"}
    assert not any(name.startswith("x-extauthz-") for name in request.headers)
    assert request.source.address == "::1" and request.source.port == 5000
    assert request.source.principal == "spiffe://td/a"
    assert request.source.certificate.startswith("-----BEGIN CERTIFICATE-----\n")
    assert request.source_address == "::1"
    assert (request.destination.address, request.destination.port) == ("10.0.0.1", 8443)
    assert (request.sni, request.tls_version, request.scheme, request.protocol, request.id) == (
        "api.example.com", "TLSv1.3", "https", "HTTP/1.1", "12345")
    assert request.context_extensions == {} and request.metadata == {}
    assert request.size == -1 and request.timestamp == 0.0
    # The subject stands in for the principal when the certificate has no URI SAN, as in gRPC mode.
    headers = envoy_headers(peer_subject="CN=client")
    assert request_from_http(HttpParts("GET", "/", headers)).source.principal == "CN=client"
    with pytest.raises(BadRequest, match="prefix"):
        request_from_http(HttpParts("GET", "/other/x", envoy_headers()), "/authz")
    with pytest.raises(BadRequest) as missing:
        request_from_http(HttpParts("GET", "/x", {"host": "h"}))
    assert missing.value.status == 500
    # A value without "v1:" is not Envoy's (or Envoy is configured without it): refused too.
    unmarked = {**envoy_headers(), "x-extauthz-peer-uri-san": "spiffe://td/ns/a/sa/b"}
    with pytest.raises(BadRequest, match=r"x-extauthz-peer-uri-san.*v1:%DOWNSTREAM_PEER_URI_SAN%") as missing:
        request_from_http(HttpParts("GET", "/x", unmarked))
    assert missing.value.status == 500
    # The gRPC view of the same request has the same fields.
    grpc_view = request_from_check(check_request_from_sample({"method": "GET", "host": "h", "path": "/x"}))
    http_view = request_from_http(HttpParts("GET", "/x", envoy_headers(authority="h")))
    assert grpc_view[:5] == http_view[:5]


def test_keep_alive_pipelining_and_head(folder: Path) -> None:
    async def scenario() -> None:
        async with sidecar(folder) as sc:
            reader, writer = await connect(sc)
            batch = b"".join(raw_request("GET", "/x", {"x-tenant": t, "x-request-id": f"p{i}"})
                             for i, t in enumerate(["a", "b", "a", "b"] * 5))
            writer.write(batch[:7])  # split anywhere: the parser keeps its state between reads
            await writer.drain()
            writer.write(batch[7:])
            answers = [await asyncio.wait_for(read_response(reader), 5) for _ in range(20)]
            assert [a[0] for a in answers] == [200, 403, 200, 403] * 5
            assert [a[1].get("x-extauthz-decision-id") for a in answers[1::2]] == [f"p{i}" for i in range(1, 20, 2)]
            # HEAD: the denial's headers and length, no body
            writer.write(raw_request("HEAD", "/x", {"x-tenant": "b"}))
            status, headers, _ = await asyncio.wait_for(read_response(reader, head=True), 5)
            assert status == 403 and int(headers["content-length"]) > 0
            # and the connection still serves the next request
            writer.write(raw_request("GET", "/x", {"x-tenant": "a"}))
            assert (await asyncio.wait_for(read_response(reader), 5))[0] == 200
            # Connection: close is honoured
            writer.write(raw_request("GET", "/x", {"x-tenant": "a", "connection": "close"}))
            status, headers, _ = await asyncio.wait_for(read_response(reader), 5)
            assert status == 200 and headers["connection"] == "close"
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()

    asyncio.run(scenario())


def test_body_with_request_body(folder: Path) -> None:
    async def scenario() -> None:
        async with sidecar(folder) as sc:
            assert (await ask(sc, "POST", "/x", {}, b"hello"))[0] == 200
            assert (await ask(sc, "POST", "/x", {}, b"hullo"))[0] == 403
            reader, writer = await connect(sc)  # chunked works too
            head = raw_request("POST", "/x", {"transfer-encoding": "chunked"}).replace(b"content-length: 0\r\n", b"")
            writer.write(head + b"3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n")
            assert (await asyncio.wait_for(read_response(reader), 5))[0] == 200
            writer.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("payload", "status", "reason"),
    [
        (b"GET /x HTTP/1.1\r\nhost: a\r\nbad header\r\n\r\n", 400, "malformed_request"),
        (b"NOT A REQUEST\r\n\r\n", 400, "malformed_request"),
        (b"GET /x HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n", 400,
         "malformed_request"),
        (b"GET /x HTTP/1.1\r\nhost: a\r\nx-big: " + b"a" * 5000 + b"\r\n\r\n", 431, "headers_too_large"),
        (b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 3000\r\n\r\n" + b"a" * 3000, 413, "body_too_large"),
    ],
)
def test_malformed_and_oversized_requests_are_clear_denials(folder: Path, payload: bytes, status: int,
                                                            reason: str) -> None:
    async def scenario() -> None:
        decisions: list[Decision] = []
        limits = HttpAuthzLimits(max_header_bytes=4096, max_body_bytes=2048)
        async with sidecar(folder, http_authz_limits=limits) as sc:
            sc.authorizer.observers.append(decisions.append)
            reader, writer = await connect(sc)
            writer.write(payload)
            got, headers, body = await asyncio.wait_for(read_response(reader), 5)
            assert (got, json.loads(body)["reason"]) == (status, reason)
            assert headers["connection"] == "close"
            assert await asyncio.wait_for(reader.read(), 5) == b""  # and the connection is closed
            writer.close()
        assert [d.reason for d in decisions] == [reason]

    asyncio.run(scenario())


def test_slow_and_idle_connections_are_closed(folder: Path) -> None:
    async def scenario() -> None:
        limits = HttpAuthzLimits(request_timeout=0.5, idle_timeout=1.0)
        async with sidecar(folder, http_authz_limits=limits) as sc:
            slow_reader, slow = await connect(sc)
            slow.write(b"GET /x HTTP/1.1\r\nhost: a\r\n")  # and never the rest
            idle_reader, idle = await connect(sc)
            assert await asyncio.wait_for(slow_reader.read(), 10) == b""
            assert await asyncio.wait_for(idle_reader.read(), 10) == b""
            slow.close()
            idle.close()

    asyncio.run(scenario())


def test_answers_that_cannot_be_encoded_deny() -> None:
    decision = Decision(True, 200, "allowed", "", "id", upstream_headers=(("x-user", "a\r\nx-admin: 1"),))
    with pytest.raises(ValueError):
        http_response_bytes(decision)
    allowed = Decision(True, 200, "allowed", "", "id", upstream_headers=(("x-user", "alice"),),
                       remove_headers=("authorization", "cookie"), client_headers=(("ratelimit", "r=1"),))
    answer = http_response_bytes(allowed, "all")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n")
    assert b"x-user: alice\r\n" in answer
    assert b"x-envoy-auth-headers-to-remove: authorization,cookie\r\n" in answer
    assert b"x-extauthz-decision-id: id\r\n" in answer and answer.endswith(b"\r\n\r\n")
    denied = Decision(False, 401, "unauthenticated", "no token", "id",
                      client_headers=(("www-authenticate", "Bearer"), ("www-authenticate", 'Basic realm="x"')))
    answer = http_response_bytes(denied, "off")
    assert answer.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert b'www-authenticate: Bearer, Basic realm="x"\r\n' in answer
    assert b"x-extauthz" not in answer


def test_http_only_sidecar_refuses_policies_reading_what_only_grpc_sends(
        policy_dir: Callable[..., Path], policy_yaml: Callable[[str, str], str]) -> None:
    from extauthz.policy import PolicySetError

    spec = 'match: {paths: [/x]}\nrules:\n  - {name: r, when: "context[\'tenant\'] == \'a\'", decision: allow}\n'
    folder = policy_dir(**{"a.yaml": policy_yaml("a", spec)})
    sc = Sidecar(Settings(policies=folder, listen="", http_authz_listen="127.0.0.1:1"))
    with pytest.raises(PolicySetError, match=r"context.*only to a gRPC"):
        sc.load_initial()
    Sidecar(Settings(policies=folder, http_authz_listen="127.0.0.1:1")).load_initial()  # gRPC served too: fine
