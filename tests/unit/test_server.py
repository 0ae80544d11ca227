"""The sidecar process parts: gRPC Check and health, HTTP probes, live reload, graceful stop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extauthz.api.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from extauthz.samples import check_request_from_sample
from extauthz.server import Settings, Sidecar

ALLOW_GET = """
match: {paths: [/x]}
rules:
  - {name: gets, when: "request.method == 'GET'", decision: allow}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


async def _check(sc: Sidecar, **sample) -> external_auth_pb2.CheckResponse:
    async with grpc.aio.insecure_channel(sc.settings.listen) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        return await stub.Check(check_request_from_sample(sample), timeout=5)


def run(coro):
    return asyncio.run(coro)


def test_check_health_and_probes(policy_dir, policy_yaml) -> None:
    async def scenario() -> None:
        folder = policy_dir(**{"a.yaml": policy_yaml("a", ALLOW_GET)})
        sc = Sidecar(Settings(policies=folder, listen=f"127.0.0.1:{_free_port()}", http_port=_free_port(), grace=1.0))
        await sc.start()
        try:
            allowed = await _check(sc, method="GET", path="/x")
            denied = await _check(sc, method="POST", path="/x")
            assert allowed.WhichOneof("http_response") == "ok_response"
            assert denied.denied_response.status.code == 403
            async with grpc.aio.insecure_channel(sc.settings.listen) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                for service in ("", "envoy.service.auth.v3.Authorization"):
                    reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                    assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert (await _http_get(sc.settings.http_port, "/healthz"))[0] == 200
            status, body = await _http_get(sc.settings.http_port, "/readyz")
            assert status == 200 and json.loads(body)["policies"] == 1
            status, body = await _http_get(sc.settings.http_port, "/metrics")
            assert status == 200 and 'extauthz_checks_total{decision="allow",policy="a",reason="allowed"} 1.0' in body
            assert (await _http_get(sc.settings.http_port, "/nope"))[0] == 404
        finally:
            await sc.stop()

    run(scenario())


@pytest.mark.parametrize("mode", ["deny", "all", "off"])
def test_dynamic_metadata_setting(policy_dir, policy_yaml, mode: str) -> None:
    async def scenario() -> None:
        folder = policy_dir(**{"a.yaml": policy_yaml("a", ALLOW_GET)})
        sc = Sidecar(Settings(policies=folder, listen=f"127.0.0.1:{_free_port()}", http_port=_free_port(),
                              grace=1.0, dynamic_metadata=mode))  # fmt: skip
        await sc.start()
        try:
            allowed = await _check(sc, method="GET", path="/x", headers={"x-request-id": "rid-1"})
            denied = await _check(sc, method="POST", path="/x", headers={"x-request-id": "rid-2"})
        finally:
            await sc.stop()
        assert allowed.WhichOneof("http_response") == "ok_response"
        assert allowed.HasField("dynamic_metadata") is (mode == "all")
        assert denied.HasField("dynamic_metadata") is (mode != "off")
        if mode != "off":
            fields = denied.dynamic_metadata.fields
            assert (fields["decision_id"].string_value, fields["policy"].string_value) == ("rid-2", "a")

    run(scenario())


def test_unknown_dynamic_metadata_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dynamic_metadata must be one of"):
        Settings(policies=tmp_path, dynamic_metadata="some")
    env = {**os.environ, "EXTAUTHZ_DYNAMIC_METADATA": "some"}
    res = subprocess.run([sys.executable, "-m", "extauthz", "serve", "--policies", str(tmp_path)], env=env,
                         capture_output=True, timeout=60)  # fmt: skip
    assert res.returncode == 2 and b"--dynamic-metadata: invalid choice 'some'" in res.stderr


def test_malformed_check_request_is_a_clear_deny(policy_dir, policy_yaml) -> None:
    async def scenario() -> None:
        folder = policy_dir(**{"a.yaml": policy_yaml("a", ALLOW_GET)})
        sc = Sidecar(Settings(policies=folder, listen=f"127.0.0.1:{_free_port()}", http_port=_free_port(), grace=1.0))
        await sc.start()
        try:
            async with grpc.aio.insecure_channel(sc.settings.listen) as channel:
                call = channel.unary_unary("/envoy.service.auth.v3.Authorization/Check")
                # A string field (path) holding invalid UTF-8 cannot be parsed as a CheckRequest.
                bad = b"\x0a\x0a\x22\x08\x12\x06\x22\x04\xff\xfe\xfd\xfc"
                raw = await call(bad, timeout=5)
                response = external_auth_pb2.CheckResponse.FromString(raw)
                assert response.denied_response.status.code == 400
                assert json.loads(response.denied_response.body)["reason"] == "malformed_request"
                garbage = await call(b"\xff" * 64, timeout=5)
                assert external_auth_pb2.CheckResponse.FromString(garbage).denied_response.status.code == 400
                # The server is still serving afterwards.
                assert (await _check(sc, method="GET", path="/x")).status.code == 0
            # Counted as denials like any other (the decision log gets them from the same observers).
            sc.metrics.flush()
            counted = sc.metrics.registry.get_sample_value(
                "extauthz_checks_total", {"decision": "deny", "reason": "malformed_request", "policy": "-"})
            assert counted == 2
        finally:
            await sc.stop()

    run(scenario())


def test_live_reload_and_bad_set_keeps_last_good(policy_dir, policy_yaml) -> None:
    async def scenario() -> None:
        folder = policy_dir(**{"a.yaml": policy_yaml("a", ALLOW_GET)})
        sc = Sidecar(Settings(policies=folder, listen=f"127.0.0.1:{_free_port()}", http_port=_free_port(),
                              reload_interval=0.05, grace=1.0))
        await sc.start()
        try:
            assert (await _check(sc, method="POST", path="/x")).denied_response.status.code == 403
            (folder / "a.yaml").write_text(policy_yaml("a", "match: {paths: [/x]}\nrules:\n  - {name: all, decision: allow}"))
            deadline = time.monotonic() + 5
            while sc.authorizer.generation < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert sc.authorizer.generation == 2
            assert (await _check(sc, method="POST", path="/x")).status.code == 0

            (folder / "a.yaml").write_text("apiVersion: extauthz.dev/v1\nkind: AuthPolicy\nmetadata: {name: a}\nspec:\n  rules: [{name: r, decision: perhaps}]\n")
            deadline = time.monotonic() + 5
            while sc.last_reload["ok"] and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert sc.last_reload["ok"] is False
            assert "a.yaml:5" in sc.last_reload["errors"][0] and "decision" in sc.last_reload["errors"][0]
            assert sc.authorizer.generation == 2
            assert (await _check(sc, method="POST", path="/x")).status.code == 0  # last good set still serves
            status, body = await _http_get(sc.settings.http_port, "/readyz")
            detail = json.loads(body)
            assert status == 200 and detail["last_reload"]["ok"] is False
            _, metrics = await _http_get(sc.settings.http_port, "/metrics")
            assert 'extauthz_policy_reloads_total{result="error"} 1.0' in metrics
        finally:
            await sc.stop()

    run(scenario())


def _start_cli(folder: Path, *extra: str) -> tuple[subprocess.Popen[str], int, int]:
    grpc_port, http_port = _free_port(), _free_port()
    log = (folder.parent / "sidecar.log").open("w")  # a file, not a pipe nobody reads
    proc = subprocess.Popen(
        [sys.executable, "-m", "extauthz", "serve", "--policies", str(folder), "--listen", f"127.0.0.1:{grpc_port}",
         "--http-port", str(http_port), *extra],
        stdout=log, stderr=subprocess.STDOUT, text=True,
    )
    return proc, grpc_port, http_port


def test_invalid_set_at_startup_is_a_clear_error_exit(policy_dir) -> None:
    folder = policy_dir(**{"a.yaml": "apiVersion: extauthz.dev/v1\nkind: AuthPolicy\nmetadata: {name: a}\nspec: {mode: x}\n"})
    proc, _, _ = _start_cli(folder)
    proc.wait(timeout=60)
    out = (folder.parent / "sidecar.log").read_text()
    assert proc.returncode == 2
    assert "a.yaml:4: document 1 (a): spec.mode: must be one of: enforce, dry-run" in out
    assert "not starting" in out


def test_sigterm_finishes_in_flight_then_exits(policy_dir, policy_yaml) -> None:
    folder = policy_dir(**{"a.yaml": policy_yaml("a", ALLOW_GET)})
    proc, grpc_port, http_port = _start_cli(folder, "--grace", "5")
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                status, _ = asyncio.run(_http_get(http_port, "/readyz"))
                if status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        else:
            pytest.fail("sidecar did not become ready")

        async def load_then_term() -> tuple[list[int], list[grpc.StatusCode]]:
            answers: list[int] = []
            errors: list[grpc.StatusCode] = []
            async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                stub = external_auth_pb2_grpc.AuthorizationStub(channel)
                request = check_request_from_sample({"method": "GET", "path": "/x"})

                async def worker() -> None:
                    for _ in range(2000):  # bounded
                        try:
                            answers.append((await stub.Check(request, timeout=5)).status.code)
                        except grpc.aio.AioRpcError as exc:
                            errors.append(exc.code())
                            return

                workers = [asyncio.create_task(worker()) for _ in range(4)]
                await asyncio.sleep(0.3)
                os.kill(proc.pid, signal.SIGTERM)
                await asyncio.gather(*workers)
            return answers, errors

        answers, errors = asyncio.run(load_then_term())
        # Every answer is the right one; calls after the stop fail as unavailable, never as an allow.
        assert answers and set(answers) == {0}
        assert set(errors) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}
        proc.wait(timeout=20)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_unix_socket_listener(policy_dir, policy_yaml, tmp_path: Path) -> None:
    async def scenario() -> None:
        folder = policy_dir(**{"a.yaml": policy_yaml("a", ALLOW_GET)})
        sock = f"unix:{tmp_path / 'extauthz.sock'}"
        sc = Sidecar(Settings(policies=folder, listen=f"127.0.0.1:{_free_port()}", unix_socket=sock,
                              http_port=_free_port(), grace=1.0))
        await sc.start()
        try:
            async with grpc.aio.insecure_channel(sock) as channel:
                stub = external_auth_pb2_grpc.AuthorizationStub(channel)
                reply = await stub.Check(check_request_from_sample({"method": "GET", "path": "/x"}), timeout=5)
                assert reply.status.code == 0
        finally:
            await sc.stop()

    run(scenario())


def test_large_check_request_within_the_configured_limit(policy_dir, policy_yaml) -> None:
    async def scenario() -> None:
        folder = policy_dir(**{"a.yaml": policy_yaml("a", ALLOW_GET)})
        sc = Sidecar(Settings(policies=folder, listen=f"127.0.0.1:{_free_port()}", http_port=_free_port(),
                              max_message_bytes=8 * 1024 * 1024, grace=1.0))
        await sc.start()
        try:
            message = check_request_from_sample({"method": "GET", "path": "/x"})
            message.attributes.request.http.raw_body = b"b" * (6 * 1024 * 1024)
            async with grpc.aio.insecure_channel(sc.settings.listen, options=[
                ("grpc.max_send_message_length", 16 * 1024 * 1024)]) as channel:
                stub = external_auth_pb2_grpc.AuthorizationStub(channel)
                assert (await stub.Check(message, timeout=10)).status.code == 0
                message.attributes.request.http.raw_body = b"b" * (9 * 1024 * 1024)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Check(message, timeout=10)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            await sc.stop()

    run(scenario())


@pytest.mark.parametrize("trace_subject", [None, "plain", "none"])
def test_decision_log_subject_hash_is_keyed_and_its_own(policy_dir, policy_yaml, tmp_path, monkeypatch,
                                                        trace_subject: str | None) -> None:
    """--decision-log-subject hash: keyed with EXTAUTHZ_SUBJECT_HASH_KEY (so replicas and restarts
    agree), and a hash whatever EXTAUTHZ_TRACE_SUBJECT says of spans (plain there must not leak)."""
    from extauthz.decision import Decision
    from extauthz.telemetry.decision_log import DecisionLogConfig, decision_record
    from extauthz.telemetry.tracing import tracing_from_env

    monkeypatch.setenv("EXTAUTHZ_SUBJECT_HASH_KEY", "shared-key")
    tracing = None
    if trace_subject is not None:
        tracing = tracing_from_env({"OTEL_TRACES_EXPORTER": "console", "EXTAUTHZ_TRACE_EXPORT": "inprocess",
                                    "EXTAUTHZ_SUBJECT_HASH_KEY": "shared-key", "EXTAUTHZ_TRACE_SUBJECT": trace_subject})
    folder = policy_dir(**{"a.yaml": policy_yaml("a", ALLOW_GET)})
    config = DecisionLogConfig(destination=str(tmp_path / "log"), subject="hash")
    sc = Sidecar(Settings(policies=folder, listen=f"127.0.0.1:{_free_port()}", http_port=_free_port(),
                          decision_log=config, tracing=tracing))  # fmt: skip
    try:
        decision = Decision(True, 200, "allowed", "", "d1", identity={"kind": "jwt", "subject": "alice"})
        logged = decision_record(decision, 0.0, config, sc.decision_log.subjects)["identity"]
    finally:
        sc.decision_log.close()
        if tracing is not None:
            tracing.shutdown()
    expected = __import__("hmac").new(b"shared-key", b"alice", "sha256").hexdigest()[:32]
    assert logged == {"kind": "jwt", "source": "", "subject_hash": expected}


OPENAPI_POLICY = """
match: {hosts: [shop.example.com]}
openapi: {spec: shop.openapi.json}
rules: [{name: documented, decision: allow}]
"""
SHOP_SPEC = {
    "openapi": "3.0.3", "info": {"title": "Shop", "version": "1"}, "servers": [{"url": "/api"}],
    "paths": {"/items/{id}": {"parameters": [{"name": "id", "in": "path", "required": True,
                                              "schema": {"type": "integer"}}],
                              "get": {"operationId": "getItem", "responses": {}},
                              "delete": {"operationId": "dropItem", "deprecated": True, "responses": {}}},
              "/items": {"get": {"operationId": "listItems", "responses": {}}}},
}


def test_api_inventory_endpoint_metrics_and_cli(policy_dir, policy_yaml, tmp_path: Path, capsys) -> None:
    from extauthz.cli import main
    from extauthz.telemetry.decision_log import DecisionLogConfig

    log_file = tmp_path / "decisions.log"

    async def scenario() -> None:
        folder = policy_dir(**{"shop.yaml": policy_yaml("shop", OPENAPI_POLICY)})
        (folder / "shop.openapi.json").write_text(json.dumps(SHOP_SPEC))
        sc = Sidecar(Settings(policies=folder, listen=f"127.0.0.1:{_free_port()}", http_port=_free_port(),
                              grace=1.0, decision_log=DecisionLogConfig(str(log_file), allow_sample=1.0)))
        await sc.start()
        try:
            for path, method in [("/api/items/1", "GET"), ("/api/items/2", "GET"), ("/api/items/x", "GET"),
                                 ("/api/items/3", "DELETE"), ("/api/admin/users/12", "GET"),
                                 ("/api/admin/users/13", "POST")]:
                await _check(sc, method=method, path=path, host="shop.example.com")
            status, body = await _http_get(sc.settings.http_port, "/inventory")
            assert status == 200
            (policy,) = json.loads(body)["policies"]
            usage = {o["operation"]: o["requests"] for o in policy["operations"]}
            assert usage == {"getItem": 3, "dropItem": 1, "listItems": 0}
            assert [(s["path"], s["requests"]) for s in policy["shadow"]] == [("/api/admin/users/{userId}", 2)]
            _, metrics = await _http_get(sc.settings.http_port, "/metrics")
            assert 'extauthz_openapi_requests_total{decision="allow",operation="getItem",policy="shop"} 2.0' in metrics
            assert ('extauthz_openapi_violations_total{mode="enforce",operation="getItem",'
                    'policy="shop",reason="openapi_invalid_parameter"} 1.0') in metrics
            assert 'extauthz_openapi_shadow_requests_total{policy="shop"} 2.0' in metrics
            assert 'extauthz_openapi_shadow_endpoints{policy="shop"} 1.0' in metrics
            code = await asyncio.to_thread(main, ["inventory", "--url", f"127.0.0.1:{sc.settings.http_port}"])
            assert code == 0
        finally:
            await sc.stop()

    run(scenario())
    text = capsys.readouterr().out
    assert "documented and used: 2 of 3 operations" in text
    assert "documented, never used: 1\n    GET /items  [listItems]" in text
    assert "deprecated, still used: 1" in text
    assert "GET,POST /api/admin/users/{userId}  2 requests, status 403" not in text
    assert "GET,POST /api/admin/users/{userId}  2 requests, status 404: 2" in text
    # The same report from the decision log (every allow logged here), with the policies for the spec.
    folder = tmp_path / "policies"
    assert main(["inventory", "--decision-log", str(log_file), "--policies", str(folder), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (policy,) = report["policies"]
    assert {o["operation"]: o["requests"] for o in policy["operations"]} == {"getItem": 3, "dropItem": 1,
                                                                            "listItems": 0}
    assert report["source"]["decision_log_lines"] == 6
    assert main(["inventory", "--decision-log", str(log_file), "--format", "openapi"]) == 0
    skeleton = capsys.readouterr().out
    assert "/api/admin/users/{userId}:" in skeleton and "post:" in skeleton


def test_workers_share_their_inventory_through_files(policy_dir, policy_yaml, tmp_path: Path, monkeypatch) -> None:
    folder = policy_dir(**{"shop.yaml": policy_yaml("shop", OPENAPI_POLICY)})
    (folder / "shop.openapi.json").write_text(json.dumps(SHOP_SPEC))
    shared = tmp_path / "multiproc"
    shared.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(shared))

    async def scenario() -> dict:
        sc = Sidecar(Settings(policies=folder, listen=f"127.0.0.1:{_free_port()}", http_port=_free_port(), grace=1.0))
        sc.load_initial()
        sc.inventory.record("shop", "GET", "/api/items/1", "allow", 200, "jwt", {"openapi_operation": "getItem"})
        other = sc.inventory.snapshot()  # what another worker wrote: the same counts again
        (shared / "inventory-999999.json").write_text(json.dumps(other))
        sc._write_inventory(sc.inventory.snapshot())
        assert (shared / f"inventory-{os.getpid()}.json").exists()
        return await sc.inventory_report()

    report = run(scenario())
    (policy,) = report["policies"]
    assert {o["operation"]: o["requests"] for o in policy["operations"]}["getItem"] == 2
