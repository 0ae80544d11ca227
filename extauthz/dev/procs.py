"""Child processes for the local stack (``extauthz dev``) and the test and benchmark harness.

Every server listens on 127.0.0.1 on a port the kernel chose, is waited for until it answers, and is
stopped by its pid (SIGTERM, then SIGKILL): never by name. Standard library only.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "LIVE_PROCESSES",
    "LOOPBACK",
    "ManagedProcess",
    "StartupError",
    "free_port",
    "http_get",
    "wait_for_http",
    "wait_for_tcp",
]

LOOPBACK = "127.0.0.1"


class StartupError(RuntimeError):
    """A helper process did not become ready (message includes its log tail)."""


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
    """A child process whose stdout+stderr go to a log file (or, with ``log_path`` None, to this
    process's own); stopped by pid (SIGTERM, then SIGKILL)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path | str | None,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_path) if log_path is not None else None
        self._log = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
            self._log.write(f"$ {' '.join(self.argv)}\n".encode())
            self._log.flush()
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT if self._log is not None else None,
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
        if self.log_path is None:
            return "<output went to the terminal>"
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
            if self._log is not None and not self._log.closed:
                self._log.close()
            if self in LIVE_PROCESSES:
                LIVE_PROCESSES.remove(self)
        return self.popen.returncode

    def __repr__(self) -> str:
        return f"<ManagedProcess {self.name} pid={self.pid} rc={self.returncode}>"
