"""The command line: validate, explain and test, as a platform engineer uses them."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from extauthz.cli import main

REPO = Path(__file__).resolve().parents[2]

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


def _extauthz(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess (this checkout first on the path), memory capped at 1 GiB so
    that a regression fails instead of swapping the machine."""

    def cap_memory() -> None:  # pragma: no cover - runs in the child
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    environ = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "extauthz", *args], capture_output=True, text=True,
                          timeout=timeout, env=environ, cwd=REPO, preexec_fn=cap_memory)


def test_validate_refuses_a_ten_level_yaml_bomb(policy_dir, policy_yaml, yaml_bomb) -> None:
    """447 bytes that stand for 9**10 strings: refused at the first anchor, validate exits 1."""
    folder = policy_dir(**{"orders.yaml": policy_yaml("orders", ORDERS), "bomb.yaml": yaml_bomb(levels=10)})
    done = _extauthz("validate", str(folder))
    assert done.returncode == 1, done.stderr
    assert ("error: bomb.yaml:1: document 1: YAML anchors are not allowed (found &a); write the value out in full"
            in done.stderr)


def test_explain_refuses_a_yaml_bomb_request_file(policy_dir, policy_yaml, yaml_bomb, tmp_path: Path,
                                                  capsys) -> None:
    folder = policy_dir(**{"orders.yaml": policy_yaml("orders", ORDERS)})
    request = tmp_path / "req.yaml"
    request.write_text("method: GET\nheaders:\n" + textwrap.indent(yaml_bomb(levels=5), "  "))
    assert main(["explain", "--policies", str(folder), "--request", str(request)]) == 1
    assert f"error: request file {request}:3: YAML anchors are not allowed (found &a)" in capsys.readouterr().err


def test_version(capsys) -> None:
    from extauthz.cli import _version

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"extauthz {_version()}\n"
    done = _extauthz("--version")
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, f"extauthz {_version()}", "")


@pytest.mark.parametrize(("args", "message"), [
    (["--listen", "127.0.0.1:99999"], "argument --listen: port 99999 is out of range (1-65535)"),
    (["--listen", "127.0.0.1:0"], "argument --listen: port 0 is out of range (1-65535)"),
    (["--listen", "127.0.0.1:abc"], "argument --listen: port 'abc' is not a number"),
    (["--listen", "127.0.0.1"], "argument --listen: '127.0.0.1' is not HOST:PORT"),
    (["--listen", ":9191"], "argument --listen: ':9191' is not HOST:PORT"),
    (["--listen", "::1:9191"], "an IPv6 address goes in brackets, e.g. [::1]:9191"),
    (["--listen", "[::g]:9191"], "argument --listen: [::g] is not an IPv6 address"),
    (["--listen", "999.1.1.1:9191"], "argument --listen: '999.1.1.1' is not a host name or IP address"),
    (["--listen", "unix:"], "argument --listen: 'unix:' needs a path"),
    (["--listen", "unix:/no/such/folder/grpc.sock"], "argument --listen: folder /no/such/folder does not exist"),
    (["--listen", "unix:/tmp/" + "s" * 120], "socket path is longer than 107 bytes"),
    (["--unix-socket", "/tmp/grpc.sock"], "argument --unix-socket: '/tmp/grpc.sock' is not unix:PATH"),
    (["--unix-socket", "unix:/no/such/folder/grpc.sock"], "folder /no/such/folder does not exist"),
    (["--http-port", "0"], "argument --http-port: must be between 1 and 65535, not '0'"),
    (["--http-port", "99999"], "argument --http-port: must be between 1 and 65535, not '99999'"),
    (["--http-port", "http"], "argument --http-port: not a number: 'http'"),
    (["--http-host", "not a host"], "argument --http-host: 'not a host' is not a host name or IP address"),
    (["--decision-log", "/no/such/folder/decisions.log"], "folder /no/such/folder does not exist"),
    (["--decision-log", "/tmp"], "argument --decision-log: /tmp is a folder; give a file to append to"),
    (["--redis-password-file", "/no/such/password"], "argument --redis-password-file: /no/such/password is not a file"),
    (["--max-message-bytes", "9999999999"], "must be between 1024 and 2147483647, not '9999999999'"),
    (["--workers", "0"], "argument --workers: must be between 1 and 64, not '0'"),
    (["--policies", "/no/such/policies"], "argument --policies: folder /no/such/policies does not exist"),
])
def test_bad_serve_options_are_one_line_and_exit_2(capsys, args: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--policies", "policies", *args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("extauthz serve: error: "), err
    assert message in err and err.endswith("(see 'extauthz serve --help')\n")


def test_a_bad_address_from_the_environment_is_the_same_error(monkeypatch, capsys) -> None:
    monkeypatch.setenv("EXTAUTHZ_LISTEN", "127.0.0.1:99999")
    with pytest.raises(SystemExit) as info:
        main(["serve"])
    assert info.value.code == 2
    assert "argument --listen: port 99999 is out of range (1-65535)" in capsys.readouterr().err


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port on 127.0.0.1 that another socket is listening on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _serve_fails(*args: str) -> str:
    """Run the real `extauthz serve`; it must exit 2 with exactly one line on stderr, which is returned."""
    done = _extauthz("serve", "--policies", str(REPO / "policies"), *args, timeout=30)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_a_grpc_port_in_use_is_one_line(taken_port: int) -> None:
    line = _serve_fails("--listen", f"127.0.0.1:{taken_port}", "--http-port", str(_free_port()))
    assert line == f"extauthz: not starting: --listen 127.0.0.1:{taken_port}: cannot listen: address already in use"


def test_an_http_port_in_use_is_one_line(taken_port: int) -> None:
    line = _serve_fails("--listen", f"127.0.0.1:{_free_port()}", "--http-port", str(taken_port))
    assert line == (f"extauthz: not starting: --http-host/--http-port 127.0.0.1 {taken_port}: cannot listen: "
                    "address already in use")


def test_a_port_in_use_with_several_workers_is_one_line(taken_port: int) -> None:
    line = _serve_fails("--listen", f"127.0.0.1:{taken_port}", "--http-port", str(_free_port()), "--workers", "2")
    assert line == f"extauthz: not starting: --listen 127.0.0.1:{taken_port}: cannot listen: address already in use"


@pytest.mark.parametrize(("args", "message"), [
    (["--listen", "192.0.2.1:{port}"], "--listen 192.0.2.1:{port}: cannot listen: cannot assign requested address"),
    (["--http-host", "no-such-host.invalid"], "--http-host/--http-port no-such-host.invalid {http}: cannot listen: "
                                              "cannot resolve 'no-such-host.invalid'"),
    (["--unix-socket", "unix:/proc/extauthz.sock"], "--unix-socket unix:/proc/extauthz.sock: cannot listen: "),
    (["--decision-log", "/proc/decisions.log"], "--decision-log /proc/decisions.log: cannot open ("),
])
def test_addresses_and_files_that_cannot_be_opened_are_one_line(args: list[str], message: str) -> None:
    port, http = _free_port(), _free_port()
    args = [a.format(port=port) for a in args]
    base = ["--listen", f"127.0.0.1:{port}", "--http-port", str(http)]
    line = _serve_fails(*base, *args)
    assert line.startswith("extauthz: not starting: " + message.format(port=port, http=http)), line


def test_event_loop_uvloop_without_uvloop_is_one_line() -> None:
    code = ("import sys; sys.modules['uvloop'] = None; from extauthz.cli import main; "
            f"sys.exit(main(['serve', '--policies', {str(REPO / 'policies')!r}, '--event-loop', 'uvloop', "
            f"'--listen', '127.0.0.1:{_free_port()}', '--http-port', '{_free_port()}']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1] == "extauthz: not starting: --event-loop uvloop: uvloop is not installed"
    assert "Traceback" not in done.stderr and "never awaited" not in done.stderr
