"""Envoy's HTTP ext_authz protocol (extauthz.wire.http_authz): a real sidecar, a real asyncio client
speaking HTTP/1.1 to its port: the mapping, the answers, keep-alive and pipelining, the limits."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
import pytest

from extauthz.api.envoy.service.auth.v3 import external_auth_pb2_grpc
from extauthz.decision import Authorizer, Decision
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
from extauthz.wire.http_authz import HttpAuthzLimits, HttpAuthzServer, _Resume, http_response_bytes

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


def _pki_client(**names: Any) -> str:
    """A client certificate's PEM (tests/unit/identity/material.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "identity"))
    import material

    return material.Pki("http-mode-ca").client("partner", **names).pem


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
    # The client's content-length (Envoy sends its own, for the body it forwards) comes from the
    # optional x-extauthz-content-length; without it the view has none.
    for sent, seen in (("v1:5", "5"), ("v1:", None), (None, None)):
        headers = {**envoy_headers(), "content-length": "0"}
        if sent is not None:
            headers["x-extauthz-content-length"] = sent
        view = request_from_http(HttpParts("POST", "/", headers))
        assert view.headers.get("content-length") == seen
        assert "x-extauthz-content-length" not in view.headers
    with pytest.raises(BadRequest, match=r"x-extauthz-content-length.*without the 'v1:' prefix") as unmarked_length:
        request_from_http(HttpParts("POST", "/", {**envoy_headers(), "x-extauthz-content-length": "5"}))
    assert unmarked_length.value.status == 500
    # As in gRPC mode: no URI SAN, the certificate's first DNS SAN; neither, the subject.
    partner = _pki_client(dns=("a.example.com", "b.example.com"))
    headers = envoy_headers(peer_cert=quote(partner), peer_subject="CN=partner")
    assert request_from_http(HttpParts("GET", "/", headers)).source.principal == "a.example.com"
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


@pytest.mark.parametrize("mode", ["inline", "tasks", "inline-then-task"])
def test_keep_alive_pipelining_and_head(folder: Path, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Answers come back in request order whether a decision is made as its request completes (no
    policy waits on I/O), in a Task of its own (some policy may), or starts inline and suspends."""
    if mode == "tasks":
        monkeypatch.setattr(HttpAuthzServer, "eager", lambda self: False)
    if mode == "inline-then-task":
        original = Authorizer.check_http

        def suspending(self: Authorizer, parts: HttpParts, path_prefix: str = "") -> Any:
            async def decide() -> Decision:
                await asyncio.sleep(0)
                return await original(self, parts, path_prefix)

            return decide()

        monkeypatch.setattr(Authorizer, "check_http", suspending)

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
            # A WebSocket handshake is judged like any request (we never switch protocols), then the
            # connection closes: nothing after it is read (it could be a body llhttp skipped,
            # smuggled as the next request).
            upgrade = raw_request("GET", "/x", {"x-tenant": "a", "connection": "upgrade", "upgrade": "websocket"})
            writer.write(upgrade + raw_request("GET", "/allowed-by-nobody", {"x-tenant": "a"}))
            status, headers, _ = await asyncio.wait_for(read_response(reader), 5)
            assert status == 200 and headers["connection"] == "close"
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            # The same with a body that is itself a request (x-tenant a is allowed, b denied): one
            # answer, the denial, and the smuggled request is never decided.
            reader, writer = await connect(sc)
            smuggled = raw_request("GET", "/x", {"x-tenant": "a"})
            writer.write(raw_request("POST", "/x", {"x-tenant": "b", "connection": "upgrade", "upgrade": "websocket"},
                                     smuggled))
            assert (await asyncio.wait_for(read_response(reader), 5))[0] == 403
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            reader, writer = await connect(sc)
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
    # Allowed without metadata: the answer is kept and given again, the same bytes as a fresh one;
    # with metadata, or closing, it is built each time; one that cannot be written is never kept.
    first = http_response_bytes(allowed, "deny")
    assert http_response_bytes(allowed, "deny") is first
    assert first == (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nx-user: alice\r\n"
                     b"x-envoy-auth-headers-to-remove: authorization,cookie\r\nratelimit: r=1\r\n\r\n")
    assert http_response_bytes(allowed, "deny", close=True) == first[:-2] + b"connection: close\r\n\r\n"
    for _ in range(2):
        with pytest.raises(ValueError):
            http_response_bytes(decision, "deny")
    listed = Decision(True, 200, "allowed", "", "id", upstream_headers=[("x-user", "alice")])  # type: ignore[arg-type]
    assert b"x-user: alice\r\n" in http_response_bytes(listed, "deny")


def test_http_only_sidecar_refuses_policies_reading_what_only_grpc_sends(
        policy_dir: Callable[..., Path], policy_yaml: Callable[[str, str], str]) -> None:
    from extauthz.policy import PolicySetError

    spec = 'match: {paths: [/x]}\nrules:\n  - {name: r, when: "context[\'tenant\'] == \'a\'", decision: allow}\n'
    folder = policy_dir(**{"a.yaml": policy_yaml("a", spec)})
    sc = Sidecar(Settings(policies=folder, listen="", http_authz_listen="127.0.0.1:1"))
    with pytest.raises(PolicySetError, match=r"context.*only to a gRPC"):
        sc.load_initial()
    Sidecar(Settings(policies=folder, http_authz_listen="127.0.0.1:1")).load_initial()  # gRPC served too: fine


async def _await(awaitable: Any) -> Any:
    return await awaitable


def test_a_decision_that_suspends_is_carried_on_by_a_task() -> None:
    """The inline path runs a decision up to its first suspension; a Task finishes it, with what it
    awaited, and a cancellation reaches it."""

    async def decide(future: asyncio.Future[bytes]) -> bytes:
        await asyncio.sleep(0)
        return b"answer:" + await future

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        coro = decide(future)
        yielded = coro.send(None)  # suspends in asyncio.sleep(0)
        task = loop.create_task(_await(_Resume(coro, yielded)))
        loop.call_later(0.01, future.set_result, b"ok")
        assert await task == b"answer:ok"
        waiting = decide(loop.create_future())
        task = loop.create_task(_await(_Resume(waiting, waiting.send(None))))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())


def test_decision_log_and_spans_are_those_of_a_grpc_check(folder: Path, tmp_path: Path) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from extauthz.telemetry.decision_log import DecisionLogConfig
    from extauthz.telemetry.tracing import SubjectHasher, Tracing, _default_propagator

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider, _default_propagator(), SubjectHasher("hash", b"k"))
    log_file = tmp_path / "decisions.log"
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    async def scenario() -> None:
        async with sidecar(folder, tracing=tracing,
                           decision_log=DecisionLogConfig(destination=str(log_file), allow_sample=1.0)) as sc:
            headers = {"x-tenant": "b", "x-request-id": "log-1", "traceparent": parent}
            assert (await ask(sc, "GET", "/x", {**headers, **envoy_headers(peer_uri_san="spiffe://td/w")}))[0] == 403

    asyncio.run(scenario())
    record = json.loads(log_file.read_text().splitlines()[-1])
    assert (record["decision_id"], record["policy"], record["host"], record["path"]) == ("log-1", "a",
                                                                                         "api.example.com", "/x")
    assert (record["source_address"], record["source_principal"]) == ("10.1.2.3", "spiffe://td/w")
    spans = {span.name: span for span in exporter.get_finished_spans()}
    check = spans["extauthz.check"]
    assert f"{check.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"  # Envoy's span is the parent
    assert check.attributes["extauthz.decision"] == "deny"


def test_command_line(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from extauthz.cli import main

    assert main(["serve", "--policies", str(folder), "--listen", "off", "--decision-log", "off"]) == 2
    assert "--listen off needs --http-authz-listen" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--policies", str(folder), "--http-authz-path-prefix", "authz/"])
    assert exited.value.code == 2
    assert "a path prefix starts with '/'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--policies", str(folder), "--http-authz-listen", "unix:/tmp/x.sock"])
    assert "takes HOST:PORT" in capsys.readouterr().err


def test_http_only_sidecar_serves_and_stops(folder: Path) -> None:
    async def scenario() -> None:
        async with sidecar(folder, listen="") as sc:
            assert sc.grpc_server is None and sc.readiness()[0]
            assert (await ask(sc, "GET", "/x", {"x-tenant": "a"}))[0] == 200
            reader, writer = await connect(sc)  # an idle keep-alive connection is closed at stop
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()

    asyncio.run(scenario())


def test_the_headers_envoy_must_let_upstream_are_logged(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="extauthz.server")
    Sidecar(Settings(policies=folder, http_authz_listen="127.0.0.1:1")).load_initial()
    assert "allowed_upstream_headers must match the headers policies set: x-checked" in caplog.text


def test_pipelining_beyond_the_limit_pauses_reading(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(HttpAuthzServer, "eager", lambda self: False)  # every decision in a Task

    async def scenario() -> None:
        async with sidecar(folder, http_authz_limits=HttpAuthzLimits(max_pipelined=2)) as sc:
            reader, writer = await connect(sc)
            writer.write(b"".join(raw_request("GET", "/x", {"x-tenant": "ab"[i % 2]}) for i in range(40)))
            answers = [(await asyncio.wait_for(read_response(reader), 5))[0] for _ in range(40)]
            assert answers == [200, 403] * 20
            writer.close()

    asyncio.run(scenario())


class _Transport(asyncio.Transport):
    """An in-memory transport: what the connection wrote, and whether it closed."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "written after close"
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def test_arbitrary_bytes_never_escape_as_an_exception_or_an_allow(folder: Path) -> None:
    """Whatever arrives (split anywhere), the connection answers well-formed denials, or allows only
    what a whole valid request earned, and never raises."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from extauthz.wire.http_authz import _Connection

    valid = raw_request("GET", "/x", {"x-tenant": "a"})
    pieces = st.sampled_from([valid, b"GET /x HTTP/1.1\r\n", b"\r\n", b"x-a: b\r\n", b"content-length: 3\r\n",
                              b"transfer-encoding: chunked\r\n", b"0\r\n\r\n", b"\x00\xff", b"POST", b" ", b":"])
    loop = asyncio.new_event_loop()
    sc = Sidecar(Settings(policies=folder, listen="", http_authz_listen="127.0.0.1:0", http_port=_free_port()))
    loop.run_until_complete(sc.start())

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(st.one_of(pieces, st.binary(max_size=40)), max_size=8), st.integers(1, 64))
    def feed(chunks: list[bytes], step: int) -> None:
        async def run() -> None:
            assert sc.http_authz is not None
            transport = _Transport()
            connection = _Connection(sc.http_authz)
            connection.connection_made(transport)
            data = b"".join(chunks)
            for start in range(0, len(data), step):
                connection.data_received(data[start:start + step])
            for _ in range(3):
                await asyncio.sleep(0)
            written = bytes(transport.written)
            assert written == b"" or written.startswith(b"HTTP/1.1 ")
            allowed = written.count(b"HTTP/1.1 200 OK")
            assert allowed <= data.count(valid)
            connection.connection_lost(None)

        loop.run_until_complete(run())

    try:
        feed()
    finally:
        loop.run_until_complete(sc.stop())
        loop.close()


def http_parts_from_check(message: Any) -> HttpParts:
    """The request Envoy's HTTP mode sends for the client request a CheckRequest describes, with
    docs/http-mode.md's configuration (every header allowed, every x-extauthz-* header set)."""
    http = message.attributes.request.http
    attrs = message.attributes
    body = http.raw_body or http.body.encode()
    headers = {name: value for name, value in http.headers.items() if not name.startswith(":")}
    client_length = headers.pop("content-length", "")
    headers.update({"host": "127.0.0.1:9192", "content-length": str(len(body)), "x-envoy-internal": "true"})

    def address(peer: Any) -> str:
        socket_address = peer.address.socket_address
        if not socket_address.address:
            return ""
        host = f"[{socket_address.address}]" if ":" in socket_address.address else socket_address.address
        return f"{host}:{socket_address.port_value}"

    envoy = {
        "x-extauthz-authority": http.headers.get(":authority", http.host),
        "x-extauthz-scheme": http.scheme,
        "x-extauthz-protocol": http.protocol,
        "x-extauthz-stream-id": http.id,
        "x-extauthz-peer-address": address(attrs.source),
        "x-extauthz-local-address": address(attrs.destination),
        "x-extauthz-peer-uri-san": attrs.source.principal,
        "x-extauthz-peer-subject": "",
        "x-extauthz-peer-cert": attrs.source.certificate,
        "x-extauthz-sni": attrs.tls_session.sni,
        "x-extauthz-tls-version": "",
        "x-extauthz-content-length": client_length,
    }
    headers.update({name: ENVOY_VALUE_PREFIX + value for name, value in envoy.items()})
    return HttpParts(http.method, http.path, headers, body)


def test_every_bundled_policy_test_decides_the_same_in_http_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bundled policies' PolicyTest cases, written for the gRPC mode, pass unchanged when every
    request goes through Envoy's HTTP mode instead: a policy cannot tell the two apart. (Cases whose
    request has route context extensions, which the HTTP mode cannot carry, stay on gRPC.)"""
    from extauthz.policytest.runner import load_for_tests, run_suites

    grpc_check = Authorizer.check
    through_http: list[str] = []

    async def via_http(self: Authorizer, message: Any, *, explain: bool = False) -> Decision:
        if message.attributes.context_extensions:
            return await grpc_check(self, message, explain=explain)
        through_http.append(message.attributes.request.http.path)
        return await self.check_http(http_parts_from_check(message), explain=explain)

    monkeypatch.setattr(Authorizer, "check", via_http)
    policy_set, suites, store = load_for_tests(Path(__file__).resolve().parents[2] / "policies")
    results = run_suites(policy_set, suites, store)
    failed = [f"{result.suite.name} / {result.case.name}: {'; '.join(result.problems)}"
              for result in results if not result.passed]
    assert not failed, "\n".join(failed)
    assert len(through_http) > 50
