"""The sidecar behind a real Envoy: decisions, headers, bypass attempts, outages and live reload."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import _procs
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.authz_modes]

request = _procs.http_request
ORDERS = {"Host": "orders.example.com"}


@pytest.fixture(scope="module")
def sidecar(extauthz_factory):
    return extauthz_factory(_procs.DEFAULT_POLICIES)


@pytest.fixture(scope="module")
def envoy(envoy_factory, sidecar, echo_upstream):
    return envoy_factory(ext_authz=sidecar.target, upstream_port=echo_upstream.port)


@pytest.fixture(scope="module")
def lenient_envoy(envoy_factory, sidecar, echo_upstream):
    """An Envoy whose path normalization is off, as a misconfigured proxy might be: our own must hold."""

    def lenient(config: dict) -> None:
        for listener in config["static_resources"]["listeners"]:
            for chain in listener["filter_chains"]:
                for f in chain["filters"]:
                    hcm = f.get("typed_config", {})
                    for key in ("normalize_path", "merge_slashes", "path_with_escaped_slashes_action"):
                        hcm.pop(key, None)

    return envoy_factory(ext_authz=sidecar.target, upstream_port=echo_upstream.port, mutate=lenient)


def _echo(body: bytes) -> dict:
    return json.loads(body)


def test_allowed_request_gets_policy_headers_and_spoofs_are_overwritten(envoy, echo_upstream) -> None:
    status, _, body = request(envoy.port, "GET", "/api/orders/7",
                              headers={**ORDERS, "x-tenant": "acme", "x-orders-tenant": "spoofed"})
    assert status == 200
    seen = _echo(body)
    assert seen["path"] == "/api/orders/7"
    assert seen["headers"]["x-orders-tenant"] == ["acme"]


def test_dry_run_would_deny_reaches_upstream_without_the_policys_headers(envoy, echo_upstream) -> None:
    """catalog-trial (dry-run) would deny a caller outside 10/8, Envoy's peer here: the request goes
    through, but the x-catalog-caller it claims for itself is removed by Envoy, not passed on."""
    status, _, body = request(envoy.port, "GET", "/items",
                              headers={"Host": "catalog.example.com", "x-catalog-caller": "10.0.0.1"})
    assert status == 200
    seen = _echo(body)
    assert seen["path"] == "/items"
    assert "x-catalog-caller" not in seen["headers"]


def test_denied_request_never_reaches_upstream(envoy, echo_upstream) -> None:
    before = echo_upstream.request_count()
    status, headers, body = request(envoy.port, "DELETE", "/api/orders/7", headers=ORDERS)
    assert status == 403
    assert headers["content-type"] == "application/json"
    payload = json.loads(body)
    assert payload["reason"] == "denied_by_rule"
    assert payload["error"] == "orders cannot be deleted"
    assert payload["decision_id"]
    assert echo_upstream.request_count() == before


def test_decision_id_is_envoys_request_id(envoy) -> None:
    # At the edge Envoy replaces a client's x-request-id with its own UUID; the decision id is that.
    status, _, body = request(envoy.port, "DELETE", "/api/orders/7", headers={**ORDERS, "x-request-id": "trace-me-42"})
    assert status == 403
    decision_id = json.loads(body)["decision_id"]
    assert decision_id != "trace-me-42"
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", decision_id)


def test_no_policy_is_403(envoy) -> None:
    status, _, body = request(envoy.port, "GET", "/", headers={"Host": "nobody.example.net"})
    assert status == 403
    assert json.loads(body)["reason"] == "no_policy"


BYPASSES = ["/admin", "//admin", "/./admin", "/a/../admin", "/%61dmin", "/admin;x", "/admin/..;/admin",
            "/ADMIN", "/admin%2f..%2fapi", "/admin%00", "/%2e%2e/admin"]


@pytest.mark.parametrize("path", BYPASSES)
@pytest.mark.parametrize("which", ["envoy", "lenient_envoy"])
def test_admin_bypass_spellings_never_reach_upstream(request_fixture, which: str, path: str, echo_upstream) -> None:
    proxy = request_fixture(which)
    before = echo_upstream.request_count()
    for host in ("orders.example.com", "orders.example.com.", "ORDERS.example.com:80"):
        status, _, _ = request(proxy.port, "GET", path, headers={"Host": host})
        assert status in (400, 403, 404), (which, path, host, status)
    assert echo_upstream.request_count() == before


@pytest.fixture
def request_fixture(request):
    return request.getfixturevalue


def test_admin_namespace_principal_is_needed(envoy) -> None:
    # Plain-text traffic carries no principal, so even the right path is refused.
    status, _, _ = request(envoy.port, "GET", "/admin/users", headers=ORDERS)
    assert status == 403


def test_sidecar_down_means_503_and_nothing_passes(envoy_factory, extauthz_factory, echo_upstream) -> None:
    sidecar = extauthz_factory(_procs.DEFAULT_POLICIES)
    proxy = envoy_factory(ext_authz=sidecar.target, upstream_port=echo_upstream.port)
    assert request(proxy.port, "GET", "/api/orders", headers=ORDERS)[0] == 200
    sidecar.stop()
    before = echo_upstream.request_count()
    for _ in range(5):
        status, _, _ = request(proxy.port, "GET", "/api/orders", headers=ORDERS)
        assert status == 503
    assert echo_upstream.request_count() == before


def test_policy_change_mid_run(tmp_path: Path, envoy_factory, extauthz_factory, echo_upstream) -> None:
    folder = tmp_path / "policies"
    shutil.copytree(_procs.DEFAULT_POLICIES, folder)
    shutil.copytree(_procs.REPO_ROOT / "examples", tmp_path / "examples")  # keys the policies reference
    sidecar = extauthz_factory(folder, extra_args=["--reload-interval", "0.2"])
    proxy = envoy_factory(ext_authz=sidecar.target, upstream_port=echo_upstream.port)
    assert request(proxy.port, "POST", "/api/orders", headers=ORDERS)[0] == 200

    orders = folder / "orders.yaml"
    orders.write_text(orders.read_text().replace("['GET', 'HEAD', 'POST', 'PUT']", "['GET', 'HEAD']"))
    deadline = time.monotonic() + 5
    status = 200
    while time.monotonic() < deadline and status == 200:
        status = request(proxy.port, "POST", "/api/orders", headers=ORDERS)[0]
        time.sleep(0.05)
    assert status == 403, "the new policy did not take effect"

    # A broken edit is refused: the last good set keeps deciding.
    orders.write_text("apiVersion: extauthz.dev/v1\nkind: AuthPolicy\nmetadata: {name: orders-api}\nspec: {mode: x}\n")
    time.sleep(1.0)
    assert request(proxy.port, "POST", "/api/orders", headers=ORDERS)[0] == 403
    assert request(proxy.port, "GET", "/api/orders", headers=ORDERS)[0] == 200
    status, body = _procs.http_get("127.0.0.1", sidecar.http_port, "/readyz")
    detail = json.loads(body)
    assert status == 200 and detail["last_reload"]["ok"] is False
    assert "orders.yaml:4" in detail["last_reload"]["errors"][0]


def test_large_body_and_odd_headers_do_not_break_the_sidecar(envoy) -> None:
    body = b"x" * 200_000  # larger than the 64 KiB Envoy forwards: arrives partial
    status, _, _ = request(envoy.port, "POST", "/api/orders", body=body, headers={**ORDERS, "Content-Type": "text/plain"})
    assert status == 200
    status, _, _ = request(envoy.port, "GET", "/api/orders", headers={**ORDERS, "x-big": "y" * 30_000})
    assert status in (200, 431)
    status, _, _ = request(envoy.port, "GET", "/api/orders", headers={**ORDERS, "x-bin": "caf\xe9"})
    assert status in (200, 400)
    assert request(envoy.port, "GET", "/api/orders", headers=ORDERS)[0] == 200


def _access_log_line(envoy, request_id: str) -> dict:
    """Envoy's JSON access log line for ``request_id`` (Envoy flushes its log about once a second)."""
    deadline = time.monotonic() + 10
    while True:
        for line in envoy.proc.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{") and f'"{request_id}"' in line:
                return json.loads(line)
        assert time.monotonic() < deadline, f"no access log line for {request_id}"
        time.sleep(0.2)


def test_envoys_access_log_names_the_policy_rule_and_reason_of_a_denial(envoy) -> None:
    """The dynamic metadata reaches Envoy with a denial, so the shipped access log says why; an
    allowed request carries none by default (--dynamic-metadata deny) and its line shows nulls."""
    status, _, body = request(envoy.port, "DELETE", "/api/orders/7?token=secret-value", headers=ORDERS)
    assert status == 403
    decision_id = json.loads(body)["decision_id"]
    denied = _access_log_line(envoy, decision_id)
    assert denied["authz_decision_id"] == decision_id
    assert (denied["authz_policy"], denied["authz_rule"], denied["authz_reason"]) == (
        "orders-api", "no-deletes", "denied_by_rule")
    assert denied["path"] == "/api/orders/7" and "secret-value" not in json.dumps(denied)
    status, _, body = request(envoy.port, "GET", "/api/orders/7", headers=ORDERS)
    assert status == 200
    allowed_id = json.loads(body)["headers"]["x-request-id"][0]
    allowed = _access_log_line(envoy, allowed_id)
    assert allowed["status"] == 200 and allowed["authz_reason"] is None
