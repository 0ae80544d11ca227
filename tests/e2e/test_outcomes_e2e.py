"""Outcomes through a real Envoy: its http_grpc access log (deploy/envoy/envoy.yaml as deployed)
streams every request's final entry to the sidecar's Access Log Service, where it joins the
decision of the same x-request-id.

The application answers 401 to a wrong password and 404 to an unknown path. The sidecar runs with
one test-only check (tests/e2e/outcome_probe_sidecar.py) that waits for the outcome of every request
and logs it, so what is checked here is the access-log path alone, without any detector.
"""

from __future__ import annotations

import http.client
import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import _procs
import pytest
from _procs import LOOPBACK, ManagedProcess, free_port, wait_for_http

HERE = Path(__file__).resolve().parent

POLICY = """\
apiVersion: extauthz.dev/v1
kind: AuthPolicy
metadata:
  name: shop
spec:
  match:
    paths: ["/login", "/admin", "/admin/*", "/"]
  outcome_probe: {}
  rules:
    - name: no-admin
      when: "request.path.startsWith('/admin/secret')"
      decision: deny
      message: "not here"
    - name: everyone-else
      decision: allow
"""


@pytest.fixture(scope="module")
def login_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    port = free_port()
    proc = ManagedProcess("login-upstream", [sys.executable, str(HERE / "login_upstream.py"),
                                             "--listen", f"{LOOPBACK}:{port}"],
                          tmp_path_factory.mktemp("login") / "login-upstream.log")
    try:
        wait_for_http(f"http://{LOOPBACK}:{port}/healthz", 20, proc=proc)
        yield port
    finally:
        proc.stop()


class ProbeSidecar:
    def __init__(self, proc: ManagedProcess, grpc_port: int, http_port: int) -> None:
        self.proc, self.grpc_port, self.http_port = proc, grpc_port, http_port

    @property
    def target(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    def outcomes(self) -> dict[str, tuple[int, str]]:
        """request id -> (status, flags), from the probe's log lines."""
        text = self.proc.log_path.read_text(errors="replace") if self.proc.log_path else ""
        found = {}
        for match in re.finditer(r"outcome (\S+) (\d+) (\S+)", text):
            found[match.group(1)] = (int(match.group(2)), "" if match.group(3) == "-" else match.group(3))
        return found

    def decision_ids(self) -> list[str]:
        text = self.proc.log_path.read_text(errors="replace") if self.proc.log_path else ""
        ids = []
        for line in text.splitlines():
            if line.startswith("{") and '"decision_id"' in line:
                try:
                    ids.append(json.loads(line)["decision_id"])
                except (ValueError, KeyError):
                    continue
        return ids

    def metric(self, name: str) -> float:
        status, body = _procs.http_get(LOOPBACK, self.http_port, "/metrics")
        assert status == 200
        for line in body.decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProbeSidecar]:
    workdir = tmp_path_factory.mktemp("probe-sidecar")
    policies = workdir / "policies"
    policies.mkdir()
    (policies / "shop.yaml").write_text(POLICY)
    grpc_port, http_port = free_port(), free_port()
    proc = ManagedProcess("extauthz-probe", [
        sys.executable, str(HERE / "outcome_probe_sidecar.py"), "serve", "--policies", str(policies),
        "--listen", f"{LOOPBACK}:{grpc_port}", "--http-port", str(http_port), "--log-format", "text",
        "--decision-log-allow-sample", "1",
    ], workdir / "extauthz-probe.log", env=_procs._python_env(), cwd=_procs.REPO_ROOT)
    try:
        wait_for_http(f"http://{LOOPBACK}:{http_port}/readyz", 20, proc=proc)
        yield ProbeSidecar(proc, grpc_port, http_port)
    finally:
        proc.stop(10)


@pytest.fixture(scope="module")
def envoy(envoy_factory, sidecar: ProbeSidecar, login_app: int):  # type: ignore[no-untyped-def]
    return envoy_factory(ext_authz=sidecar.target, upstream_port=login_app)


def _request(envoy, method: str, path: str, *, body: str | None = None,  # type: ignore[no-untyped-def]
             headers: dict[str, str] | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection(LOOPBACK, envoy.port, timeout=10)
    try:
        extra = {"Content-Type": "application/x-www-form-urlencoded"} if body is not None else {}
        conn.request(method, path, body=body, headers={**extra, **(headers or {})})
        response = conn.getresponse()
        response.read()
        return response.status, response.getheader("x-request-id") or ""
    finally:
        conn.close()


def _wait_for(predicate, what: str, timeout: float = 15.0):  # type: ignore[no-untyped-def]
    """Poll until ``predicate()`` is truthy (a bound on waiting, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_outcomes_of_upstream_answers_and_denials_join_their_decisions(envoy, sidecar: ProbeSidecar) -> None:
    cases = [
        ("POST", "/login", "user=alice&password=wrong", 401, ""),
        ("POST", "/login", "user=alice&password=right", 200, ""),
        ("GET", "/admin/probe", None, 404, ""),
    ]
    for method, path, body, status, _ in cases:
        got, _ = _request(envoy, method, path, body=body)
        assert got == status
    # Envoy does not return x-request-id to the client: find our decisions by order in the decision log
    ids = _wait_for(lambda: (d := sidecar.decision_ids()) and len(d) >= len(cases) and d, "decisions")
    sent = ids[-len(cases):]
    outcomes = _wait_for(lambda: (o := sidecar.outcomes()) and all(i in o for i in sent) and o, "outcomes")
    assert [outcomes[i] for i in sent] == [(401, ""), (200, ""), (404, "")]


def test_a_denial_by_the_sidecar_comes_back_flagged_uaex(envoy, sidecar: ProbeSidecar) -> None:
    """Detectors must tell the upstream's answers from the sidecar's own: Envoy flags the latter UAEX."""
    before = set(sidecar.decision_ids())
    assert _request(envoy, "GET", "/admin/secret")[0] == 403
    [denied] = _wait_for(lambda: [i for i in sidecar.decision_ids() if i not in before], "the denial")
    assert _wait_for(lambda: sidecar.outcomes().get(denied), "its outcome") == (403, "UAEX")


def test_a_client_cannot_choose_the_request_id(envoy, sidecar: ProbeSidecar) -> None:
    """Envoy replaces the client's x-request-id, so the ids the join trusts are Envoy's own."""
    before = set(sidecar.decision_ids())
    assert _request(envoy, "POST", "/login", body="user=a&password=x",
                    headers={"x-request-id": "chosen-by-the-client"})[0] == 401
    [decided] = _wait_for(lambda: [i for i in sidecar.decision_ids() if i not in before], "the decision")
    assert decided != "chosen-by-the-client"
    assert _wait_for(lambda: sidecar.outcomes().get(decided), "its outcome") == (401, "")
    assert "chosen-by-the-client" not in sidecar.outcomes()


def test_stream_is_open_and_counted(envoy, sidecar: ProbeSidecar) -> None:
    _request(envoy, "POST", "/login", body="user=a&password=x")
    assert _wait_for(lambda: sidecar.metric("extauthz_access_log_streams"), "an open stream") >= 1
    assert sidecar.metric('extauthz_access_log_entries_total{result="joined"}') >= 1
    assert sidecar.metric('extauthz_access_log_entries_total{result="unjoined"}') == 0
    assert sidecar.metric("extauthz_access_log_malformed_messages_total") == 0


# --- a detector counting the application's 401s -----------------------------------------------------

DETECT_POLICY = """\
apiVersion: extauthz.dev/v1
kind: AuthPolicy
metadata:
  name: login
spec:
  match:
    paths: ["/login"]
  detect:
    - name: password-guessing
      failures: {upstream: [401]}
      by: client_ip
      threshold: 10
      window: 10m
      action: {block: {duration: 3s, status: 429}}
  rules:
    - name: everyone
      decision: allow
"""
BLOCK_SECONDS = 3


@pytest.fixture(scope="module")
def guarded(extauthz_factory, envoy_factory, login_app: int, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The real sidecar (``python -m extauthz serve``) with a failures detector, behind a real Envoy."""
    policies = tmp_path_factory.mktemp("detect-policies")
    (policies / "login.yaml").write_text(DETECT_POLICY)
    sidecar = extauthz_factory(policies, extra_args=["--decision-log", "off"])
    return sidecar, envoy_factory(ext_authz=sidecar.target, upstream_port=login_app)


def _login(envoy, password: str, source: str) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    """POST /login from the loopback address ``source`` (Envoy sees it as the client's address)."""
    conn = http.client.HTTPConnection(LOOPBACK, envoy.port, timeout=10, source_address=(source, 0))
    try:
        conn.request("POST", "/login", body=f"user=alice&password={password}",
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        response = conn.getresponse()
        response.read()
        return response.status, response.getheader("retry-after") or ""
    finally:
        conn.close()


def _joined(sidecar) -> float:  # type: ignore[no-untyped-def]
    status, body = _procs.http_get(LOOPBACK, sidecar.http_port, "/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith('extauthz_access_log_entries_total{result="joined"} '):
            return float(line.split()[1])
    return 0.0


def test_the_eleventh_failed_login_from_one_address_is_blocked_until_the_block_ends(guarded) -> None:
    _eleventh_failure_blocked(*guarded)


def test_the_same_in_envoys_http_ext_authz_mode(extauthz_factory, envoy_factory, login_app,
                                                tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    """deploy/envoy/envoy-http.yaml: decisions over HTTP, the access log over the sidecar's gRPC port."""
    policies = tmp_path_factory.mktemp("detect-http-policies")
    (policies / "login.yaml").write_text(DETECT_POLICY)
    sidecar = extauthz_factory(policies, extra_args=["--decision-log", "off"], mode="http")
    envoy = envoy_factory(ext_authz=sidecar.target, mode="http", upstream_port=login_app,
                          access_log_service=f"{LOOPBACK}:{sidecar.grpc_port}")
    _eleventh_failure_blocked(sidecar, envoy)


def _eleventh_failure_blocked(sidecar, envoy) -> None:  # type: ignore[no-untyped-def]
    attacker, neighbour = "127.0.0.1", "127.0.0.2"
    for attempt in range(1, 11):
        assert _login(envoy, "wrong", attacker)[0] == 401, f"attempt {attempt} reaches the application"
        # the application's 401 comes back through Envoy's access log; the next attempt waits for it
        # to be counted (an attacker faster than the 100 ms flush gets at most that much ahead)
        _wait_for(lambda attempt=attempt: _joined(sidecar) >= attempt, f"outcome {attempt} joined")
    status, retry_after = _login(envoy, "wrong", attacker)
    assert status == 429, "the 11th failed login is blocked by the sidecar"
    assert 1 <= int(retry_after) <= BLOCK_SECONDS
    assert _login(envoy, "right", attacker)[0] == 429, "a blocked client learns nothing from a right guess"
    assert _login(envoy, "wrong", neighbour)[0] == 401, "another address is not blocked"
    assert _login(envoy, "right", neighbour)[0] == 200
    time.sleep(BLOCK_SECONDS + 0.5)  # the block's own duration: it ends on time
    assert _login(envoy, "right", attacker)[0] == 200, "the block has ended"


def test_with_workers_each_outcome_joins_in_the_worker_that_decided(extauthz_factory, envoy_factory, login_app,
                                                                   tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    """``--workers 2``: Envoy sends a request's Check and its access-log entry over the same
    connection, so the entry reaches the worker process whose join waits for it."""
    policies = tmp_path_factory.mktemp("workers-policies")
    (policies / "login.yaml").write_text(DETECT_POLICY.replace("threshold: 10", "threshold: 1000"))
    sidecar = extauthz_factory(policies, extra_args=["--workers", "2", "--decision-log", "off"])
    envoy = envoy_factory(ext_authz=sidecar.target, upstream_port=login_app)
    for _ in range(30):
        assert _login(envoy, "wrong", "127.0.0.1")[0] == 401
    _wait_for(lambda: _joined(sidecar) >= 30, "30 outcomes joined")
    status, body = _procs.http_get(LOOPBACK, sidecar.http_port, "/metrics")
    assert status == 200 and 'extauthz_access_log_entries_total{result="unjoined"} 0.0' in body.decode()
