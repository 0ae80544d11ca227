"""Operators: the admin endpoint on the probes port, ``extauthz blocks``, and the detection metrics."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from detect_helpers import ACME, build, decide_async, policy, request

from extauthz.api.envoy.service.auth.v3 import external_auth_pb2_grpc
from extauthz.cli import main
from extauthz.policy import Services
from extauthz.samples import check_request_from_sample
from extauthz.server import Settings, Sidecar, StartupError
from extauthz.stores import store_for

BRUTE = """
- name: guessing
  failures: {identity: true}
  by: client_ip
  threshold: 3
  window: 10m
  action: {block: {duration: 5m, status: 403}}
"""
TOKEN = "s3cret-admin-token-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _http(port: int, method: str, path: str, token: str | None = None) -> tuple[int, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    status = int(head.split()[1])
    return status, json.loads(body) if body.startswith("{") else body


def test_admin_endpoint_lists_shows_and_lifts_blocks_with_a_bearer_token(tmp_path: Path) -> None:
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "api.yaml").write_text(policy(BRUTE))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")

    async def scenario() -> None:
        sc = Sidecar(Settings(policies=folder, listen=f"127.0.0.1:{_free_port()}", http_port=_free_port(),
                              grace=1.0, admin_token_file=str(token_file)))
        await sc.start()
        port = sc.settings.http_port
        try:
            async with grpc.aio.insecure_channel(sc.settings.listen) as channel:
                stub = external_auth_pb2_grpc.AuthorizationStub(channel)
                for _ in range(4):
                    reply = await stub.Check(check_request_from_sample(request("ak_wrong")), timeout=5)
                assert reply.denied_response.status.code == 403  # the fourth: blocked
            assert (await _http(port, "GET", "/admin/blocks"))[0] == 401
            assert (await _http(port, "GET", "/admin/blocks", "wrong-token-wrong-token"))[0] == 401
            status, listed = await _http(port, "GET", "/admin/blocks", TOKEN)
            assert status == 200 and len(listed["blocks"]) == 1
            block = listed["blocks"][0]
            assert (block["policy"], block["detector"], block["key"], block["action"], block["status"]) == (
                "api", "guessing", "203.0.113.7", "block", 403)
            assert 0 < block["remaining_s"] <= 300
            status, shown = await _http(port, "GET", f"/admin/blocks/{block['id']}", TOKEN)
            assert status == 200 and shown["offences"] == 1
            assert (await _http(port, "GET", "/admin/blocks/not-an-id", TOKEN))[0] == 400
            status, metrics = await _http(port, "GET", "/metrics")
            assert 'extauthz_detections_total{action="block",detector="guessing",policy="api"} 1.0' in metrics
            assert "extauthz_blocks_active 1.0" in metrics
            # extauthz blocks against this sidecar's endpoint (the CLI blocks: in a thread).
            code = await asyncio.to_thread(main, ["blocks", "lift", block["id"], "--url", f"http://127.0.0.1:{port}",
                                                  "--admin-token-file", str(token_file)])
            assert code == 0
            assert (await _http(port, "GET", "/admin/blocks", TOKEN))[1]["blocks"] == []
            async with grpc.aio.insecure_channel(sc.settings.listen) as channel:
                stub = external_auth_pb2_grpc.AuthorizationStub(channel)
                reply = await stub.Check(check_request_from_sample(request(ACME)), timeout=5)
                assert reply.WhichOneof("http_response") == "ok_response"
        finally:
            await sc.stop()

    asyncio.run(scenario())


def test_no_token_file_no_endpoint_and_a_short_token_is_refused_at_start(tmp_path: Path) -> None:
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "api.yaml").write_text(policy(BRUTE))
    short = tmp_path / "short"
    short.write_text("abc")
    with pytest.raises(StartupError, match="shorter than 16"):
        Sidecar(Settings(policies=folder, admin_token_file=str(short)))


def test_blocks_cli_against_redis(tmp_path: Path, redis_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    async def make_block() -> None:
        services = Services(settings={"redis_url": redis_server.url})
        auth = build(tmp_path / "p", BRUTE, services=services)
        store = store_for(services)
        await store.start()  # type: ignore[attr-defined]
        try:
            for _ in range(3):
                await decide_async(auth, request("ak_wrong"))
        finally:
            await store.aclose()  # type: ignore[attr-defined]

    asyncio.run(make_block())
    assert main(["blocks", "list", "--redis-url", redis_server.url, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["blocks"]
    assert [(b["detector"], b["key"]) for b in listed] == [("guessing", "203.0.113.7")]
    block_id = listed[0]["id"]
    assert main(["blocks", "show", block_id, "--redis-url", redis_server.url]) == 0
    assert "offences: 1" in capsys.readouterr().out
    assert main(["blocks", "lift", block_id, "--redis-url", redis_server.url]) == 0
    assert "lifted" in capsys.readouterr().out
    assert main(["blocks", "lift", block_id, "--redis-url", redis_server.url]) == 1
    assert main(["blocks", "show", "bad", "--redis-url", redis_server.url]) == 2
