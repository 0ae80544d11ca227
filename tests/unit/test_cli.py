"""The command line: validate, explain and test, as a platform engineer uses them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from extauthz.cli import main

ORDERS = """
match: {hosts: [orders.example.com], paths: [/api/orders, /api/orders/*]}
rules:
  - {name: no-deletes, when: "request.method == 'DELETE'", decision: deny, message: no deletes}
  - {name: rest, decision: allow}
response:
  headers:
    x-tenant-id: "request.headers[?'x-tenant'].orValue('none')"
"""

TESTS = """
apiVersion: extauthz.dev/v1
kind: PolicyTest
metadata: {name: orders-tests}
spec:
  cases:
    - name: reads are allowed
      request: {method: GET, host: orders.example.com, path: /api/orders/1, headers: {x-tenant: acme}}
      expect: {decision: allow, policy: orders, rule: rest, headers: {x-tenant-id: acme}}
    - name: deletes are denied
      request: {method: DELETE, host: orders.example.com, path: /api/orders/1}
      expect: {decision: deny, status: 403, reason: denied_by_rule, rule: no-deletes}
"""


def test_validate_ok(policy_dir, policy_yaml, capsys) -> None:
    folder = policy_dir(**{"orders.yaml": policy_yaml("orders", ORDERS), "orders_test.yaml": TESTS})
    assert main(["validate", str(folder)]) == 0
    assert "ok: 1 policies, 1 test documents" in capsys.readouterr().out


def test_validate_lists_every_error(policy_dir, policy_yaml, capsys) -> None:
    folder = policy_dir(**{"a.yaml": policy_yaml("a", "mode: x"), "b.yaml": policy_yaml("b", "rules: [{name: r}]")})
    assert main(["validate", str(folder)]) == 1
    err = capsys.readouterr().err
    assert "a.yaml:6: document 1 (a): spec.mode:" in err
    assert "b.yaml:6: document 1 (b): spec.rules[0].decision: is required" in err
    assert "2 error(s)" in err


def test_explain(policy_dir, policy_yaml, tmp_path: Path, capsys) -> None:
    folder = policy_dir(**{"orders.yaml": policy_yaml("orders", ORDERS)})
    request = tmp_path / "req.json"
    request.write_text(json.dumps({"method": "DELETE", "host": "orders.example.com", "path": "/api/orders/9"}))
    assert main(["explain", "--policies", str(folder), "--request", str(request)]) == 0
    out = capsys.readouterr().out
    assert "decision: DENY 403 reason=denied_by_rule" in out
    assert "policy:   orders  rule: no-deletes" in out
    assert "rule no-deletes: when holds -> deny" in out
    assert main(["explain", "--policies", str(folder), "--request", str(request), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rule"] == "no-deletes"


def test_explain_rejects_a_bad_request_file(policy_dir, policy_yaml, tmp_path: Path, capsys) -> None:
    folder = policy_dir(**{"orders.yaml": policy_yaml("orders", ORDERS)})
    request = tmp_path / "req.json"
    request.write_text(json.dumps({"methd": "GET"}))
    assert main(["explain", "--policies", str(folder), "--request", str(request)]) == 1
    assert "unknown request fields ['methd']" in capsys.readouterr().err


def test_policy_tests_pass_and_fail(policy_dir, policy_yaml, capsys) -> None:
    folder = policy_dir(**{"orders.yaml": policy_yaml("orders", ORDERS), "orders_test.yaml": TESTS})
    assert main(["test", str(folder), "-v"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "2 passed, 0 failed" in out
    (folder / "orders_test.yaml").write_text(TESTS.replace("decision: deny, status: 403", "decision: allow, status: 403"))
    assert main(["test", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "FAIL orders_test.yaml:10 orders-tests: deletes are denied" in out
    assert "decision: expected 'allow', got 'deny'" in out


def test_bundled_example_policies_validate_and_pass_their_tests(capsys) -> None:
    folder = Path(__file__).resolve().parents[2] / "policies"
    assert main(["validate", str(folder)]) == 0
    assert main(["test", str(folder)]) == 0


@pytest.mark.parametrize("command", [["validate"], ["test"]])
def test_missing_arguments_exit_with_usage(command: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(command)
    assert info.value.code == 2


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("EXTAUTHZ_XFF_TRUSTED_HOPS", "20", "--xff-trusted-hops: must be between 0 and 16"),
    ("EXTAUTHZ_LOG_LEVEL", "verbose", "--log-level: invalid choice 'verbose'"),
    ("EXTAUTHZ_HTTP_PORT", "abc", "--http-port: not a number"),
    ("EXTAUTHZ_EVENT_LOOP", "tokio", "--event-loop: invalid choice"),
    ("EXTAUTHZ_LOG_FORMAT", "xml", "--log-format: invalid choice"),
    ("EXTAUTHZ_CHECK_TIMEOUT", "nan", "--check-timeout: must be at least"),
    ("EXTAUTHZ_DECISION_LOG_ALLOW_SAMPLE", "2", "--decision-log-allow-sample: must be between 0 and 1"),
    ("EXTAUTHZ_WORKERS", "0", "--workers: must be between 1 and 64"),
])
def test_environment_values_are_checked_like_flags(monkeypatch, capsys, variable: str, value: str, message: str) -> None:
    """A bad EXTAUTHZ_* value is the same usage error (exit 2) as the bad flag, never a traceback."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as info:
        main(["serve", "--policies", "policies"])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_choices_from_the_environment_ignore_case(monkeypatch) -> None:
    from extauthz.cli import _parser

    monkeypatch.setenv("EXTAUTHZ_LOG_LEVEL", "INFO")
    monkeypatch.setenv("EXTAUTHZ_LOG_FORMAT", " Text ")
    ns = _parser().parse_args(["serve"])
    assert (ns.log_level, ns.log_format) == ("info", "text")


def test_environment_does_not_break_other_commands(monkeypatch, capsys) -> None:
    monkeypatch.setenv("EXTAUTHZ_HTTP_PORT", "abc")
    folder = Path(__file__).resolve().parents[2] / "policies"
    assert main(["validate", str(folder)]) == 0


@pytest.mark.parametrize(("url", "extra", "message"), [
    ("redis://127.0.0.1:1/0?timeout=1s", [], "the Redis timeout (1s) must be shorter than --check-timeout (0.4s)"),
    ("redis://127.0.0.1:1/0?timeout=300ms", ["--check-timeout", "0.3"], "(0.3s) must be shorter than"),
    ("redis://127.0.0.1:1/0?bogus=1", [], "bogus"),
])
def test_a_redis_timeout_that_outlasts_the_check_is_refused_at_start(capsys, url: str, extra: list[str],
                                                                      message: str) -> None:  # fmt: skip
    """A stuck Redis must fail a quota within the Check's time, so that onStoreError decides, not a 503."""
    assert main(["serve", "--policies", "policies", "--redis-url", url, *extra]) == 2
    err = capsys.readouterr().err
    assert "not starting" in err and message in err
