"""Envoy's Access Log Service on a real sidecar: a real gRPC client streams StreamAccessLogsMessage
batches the way Envoy's http_grpc logger does, and the outcomes reach whoever waits for them."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest

from extauthz.api.envoy.data.accesslog.v3 import accesslog_pb2
from extauthz.api.envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from extauthz.outcomes import Outcome, access_log_service, outcomes_for
from extauthz.server import Settings, Sidecar

POLICY = """
match: {paths: [/x]}
rules:
  - {name: everyone, decision: allow}
"""
METHOD = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _metrics(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data.decode().partition("\r\n\r\n")[2]


def _entry(request_id: str, status: int, *, kind: int = accesslog_pb2.DownstreamEnd,
           flags: dict[str, bool] | None = None, uaex: bool = False) -> accesslog_pb2.HTTPAccessLogEntry:
    entry = accesslog_pb2.HTTPAccessLogEntry()
    entry.request.request_id = request_id
    entry.response.response_code.value = status
    entry.common_properties.access_log_type = kind  # type: ignore[assignment]
    entry.common_properties.response_flags.SetInParent()
    for name, value in (flags or {}).items():
        setattr(entry.common_properties.response_flags, name, value)
    if uaex:
        entry.common_properties.response_flags.unauthorized_details.reason = (
            accesslog_pb2.ResponseFlags.Unauthorized.EXTERNAL_SERVICE)
    return entry


def _batch(*entries: accesslog_pb2.HTTPAccessLogEntry, name: str = "") -> bytes:
    message = als_pb2.StreamAccessLogsMessage()
    if name:
        message.identifier.log_name = name
    message.http_logs.log_entry.extend(entries)
    return message.SerializeToString()


async def _stream_raw(target: str, messages: list[bytes]) -> bytes:
    """Stream raw bytes (garbage included) on the service's method, then end the stream."""
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.stream_unary(METHOD)  # no serializers: bytes on the wire as given

        async def requests():  # type: ignore[no-untyped-def]
            for message in messages:
                yield message

        return await call(requests(), timeout=10)  # type: ignore[no-any-return]


def _sidecar(folder, **settings) -> Sidecar:  # type: ignore[no-untyped-def]
    return Sidecar(Settings(policies=folder, listen=f"127.0.0.1:{_free_port()}", http_port=_free_port(),
                            grace=30.0, **settings))


def test_streamed_entries_reach_the_waiting_decisions(policy_dir, policy_yaml) -> None:
    async def scenario() -> None:
        sc = _sidecar(policy_dir(**{"a.yaml": policy_yaml("a", POLICY)}))
        await sc.start()
        try:
            join = outcomes_for(sc.services)
            assert join.enabled
            seen: dict[str, list[Outcome]] = {}
            for request_id in ("login-1", "login-2", "probe-1", "denied-1"):
                join.expect(request_id, lambda o, rid=request_id: seen.setdefault(rid, []).append(o))
            reply = await _stream_raw(sc.settings.listen, [
                _batch(_entry("login-1", 401), _entry("nobody-waits", 200), name="extauthz-outcomes"),
                b"\xff\xff\xff not a protobuf",  # skipped, the stream goes on
                # a start-of-request entry is not the outcome: login-2 keeps waiting for its last line
                _batch(_entry("login-2", 0, kind=accesslog_pb2.DownstreamStart)),
                _batch(_entry("login-2", 200), _entry("probe-1", 404, flags={"no_route_found": True}),
                       _entry("denied-1", 403, uaex=True),
                       _entry("reset-1", 0, flags={"upstream_connection_failure": True,
                                                   "upstream_retry_limit_exceeded": True})),
            ])
            assert als_pb2.StreamAccessLogsResponse.FromString(reply) == als_pb2.StreamAccessLogsResponse()
            assert seen == {
                "login-1": [Outcome("login-1", 401, "")],
                "login-2": [Outcome("login-2", 200, "")],
                "probe-1": [Outcome("probe-1", 404, "NR")],
                "denied-1": [Outcome("denied-1", 403, "UAEX")],
            }
            assert seen["denied-1"][0].by_authz and len(join) == 0
            text = await _metrics(sc.settings.http_port)
            assert 'extauthz_access_log_entries_total{result="joined"} 4.0' in text
            assert 'extauthz_access_log_entries_total{result="unjoined"} 2.0' in text
            assert 'extauthz_access_log_entries_total{result="intermediate"} 1.0' in text
            assert "extauthz_access_log_malformed_messages_total 1.0" in text
            assert "extauthz_access_log_streams 0.0" in text
        finally:
            await sc.stop()

    asyncio.run(scenario())


def test_generated_stub_and_flag_names(policy_dir, policy_yaml) -> None:
    """The generated client speaks the same method; flags come out in Envoy's short form and order."""
    async def scenario() -> None:
        sc = _sidecar(policy_dir(**{"a.yaml": policy_yaml("a", POLICY)}))
        await sc.start()
        try:
            join = outcomes_for(sc.services)
            got: list[Outcome] = []
            join.expect("r", got.append)

            async def requests():  # type: ignore[no-untyped-def]
                yield als_pb2.StreamAccessLogsMessage.FromString(
                    _batch(_entry("r", 503, flags={"upstream_connection_failure": True,
                                                   "upstream_retry_limit_exceeded": True, "no_healthy_upstream": True})))

            async with grpc.aio.insecure_channel(sc.settings.listen) as channel:
                await als_pb2_grpc.AccessLogServiceStub(channel).StreamAccessLogs(requests(), timeout=10)
            assert got == [Outcome("r", 503, "UH,UF,URX")]
        finally:
            await sc.stop()

    asyncio.run(scenario())


def test_stop_ends_open_streams_without_waiting_for_the_grace_period(policy_dir, policy_yaml) -> None:
    async def scenario() -> None:
        sc = _sidecar(policy_dir(**{"a.yaml": policy_yaml("a", POLICY)}))
        await sc.start()
        stream_open = asyncio.Event()
        never = asyncio.Event()

        async def requests():  # type: ignore[no-untyped-def]
            yield _batch(_entry("x", 200), name="held-open")
            stream_open.set()
            await never.wait()  # Envoy keeps its stream open for the life of the connection

        async with grpc.aio.insecure_channel(sc.settings.listen) as channel:
            call = channel.stream_unary(METHOD)(requests(), timeout=60)
            await asyncio.wait_for(stream_open.wait(), 10)
            while sc.access_logs is not None and not sc.access_logs._open:
                await asyncio.sleep(0.01)
            # grace is 30 s: a stream that held the shutdown would hit the bound below
            await asyncio.wait_for(sc.stop(), 15)
            assert await call == b""  # answered: the stream ended cleanly

    asyncio.run(scenario())


def test_streams_are_bounded(policy_dir, policy_yaml, monkeypatch) -> None:
    monkeypatch.setattr(access_log_service, "MAX_STREAMS", 1)

    async def scenario() -> None:
        sc = _sidecar(policy_dir(**{"a.yaml": policy_yaml("a", POLICY)}))
        await sc.start()
        first_open = asyncio.Event()
        release = asyncio.Event()

        async def held():  # type: ignore[no-untyped-def]
            yield _batch(_entry("x", 200))
            first_open.set()
            await release.wait()

        try:
            async with grpc.aio.insecure_channel(sc.settings.listen) as channel:
                first = channel.stream_unary(METHOD)(held(), timeout=30)
                await asyncio.wait_for(first_open.wait(), 10)
                while sc.access_logs is not None and not sc.access_logs._open:
                    await asyncio.sleep(0.01)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await _stream_raw(sc.settings.listen, [_batch(_entry("y", 200))])
                assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                release.set()
                await first
            assert "extauthz_access_log_refused_streams_total 1.0" in await _metrics(sc.settings.http_port)
        finally:
            await sc.stop()

    asyncio.run(scenario())


def test_access_logs_off(policy_dir, policy_yaml) -> None:
    """--access-logs off: the method is not served and checks are told that no outcome will come."""
    async def scenario() -> None:
        sc = _sidecar(policy_dir(**{"a.yaml": policy_yaml("a", POLICY)}), access_logs=False)
        await sc.start()
        try:
            assert sc.access_logs is None and not outcomes_for(sc.services).enabled
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _stream_raw(sc.settings.listen, [_batch(_entry("x", 200))])
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        finally:
            await sc.stop()

    asyncio.run(scenario())


def test_expired_outcomes_are_counted_and_missing_streams_reported(policy_dir, policy_yaml, caplog) -> None:
    async def scenario() -> None:
        sc = _sidecar(policy_dir(**{"a.yaml": policy_yaml("a", POLICY)}))
        await sc.start()
        try:
            join = outcomes_for(sc.services)
            join.ttl = 0.0
            join.expect("never-logged", lambda o: None)
            await asyncio.sleep(0.01)
            assert sc.access_logs is not None
            sc.access_logs.publish()
            assert len(join) == 0
            text = await _metrics(sc.settings.http_port)
            assert "extauthz_outcomes_expired_total 1.0" in text
            assert "extauthz_outcomes_waiting 0.0" in text
        finally:
            await sc.stop()

    asyncio.run(scenario())
    assert any("no access-log stream has connected" in r.getMessage() for r in caplog.records)


DETECT = """
match: {paths: [/login]}
detect:
  - name: password-guessing
    failures: {upstream: [401]}
    by: client_ip
    threshold: 10
    window: 10m
    action: {block: {duration: 1m}}
rules:
  - {name: everyone, decision: allow}
"""


def test_without_access_logs_detectors_that_need_outcomes_say_so_and_the_rest_works(policy_dir, policy_yaml,
                                                                                     caplog) -> None:
    async def scenario() -> None:
        sc = _sidecar(policy_dir(**{"login.yaml": policy_yaml("login", DETECT)}), access_logs=False)
        await sc.start()
        try:
            async with grpc.aio.insecure_channel(sc.settings.listen) as channel:
                from extauthz.api.envoy.service.auth.v3 import external_auth_pb2_grpc
                from extauthz.samples import check_request_from_sample

                stub = external_auth_pb2_grpc.AuthorizationStub(channel)
                reply = await stub.Check(check_request_from_sample({"method": "POST", "path": "/login"}), timeout=5)
            assert reply.WhichOneof("http_response") == "ok_response"
            assert len(outcomes_for(sc.services)) == 0  # nothing waits for outcomes that will not come
        finally:
            await sc.stop()

    asyncio.run(scenario())
    assert any("password-guessing" in r.getMessage() and "no access logs" in r.getMessage() for r in caplog.records)


def test_serve_flag_and_environment(monkeypatch, capsys) -> None:
    """``--access-logs on|off`` (EXTAUTHZ_ACCESS_LOGS) reaches the sidecar's settings; anything else
    is a usage error."""
    import extauthz.server
    from extauthz.cli import _parser, main

    seen: list[Settings] = []

    async def fake_serve(settings: Settings) -> None:
        seen.append(settings)

    monkeypatch.setattr(extauthz.server, "serve", fake_serve)
    assert main(["serve", "--policies", "policies", "--event-loop", "asyncio", "--access-logs", "off"]) == 0
    monkeypatch.setenv("EXTAUTHZ_ACCESS_LOGS", "ON")
    assert main(["serve", "--policies", "policies", "--event-loop", "asyncio"]) == 0
    assert [s.access_logs for s in seen] == [False, True]
    assert _parser().parse_args(["serve"]).access_logs == "on"
    monkeypatch.setenv("EXTAUTHZ_ACCESS_LOGS", "maybe")
    with pytest.raises(SystemExit) as info:
        main(["serve", "--policies", "policies"])
    assert info.value.code == 2 and "--access-logs: invalid choice" in capsys.readouterr().err
