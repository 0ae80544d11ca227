"""Decision log: one JSON line per decision, denies always, allows sampled, secrets never."""

from __future__ import annotations

import asyncio
import io
import json
import random
import string
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from extauthz.decision import Authorizer, Decision
from extauthz.policy import load_folder
from extauthz.samples import check_request_from_sample
from extauthz.telemetry import metrics
from extauthz.telemetry.decision_log import REDACTED, DecisionLog, DecisionLogConfig, decision_record
from extauthz.telemetry.metrics import Metrics
from extauthz.telemetry.tracing import SubjectHasher

SECRET = "s3cr3t-token-value"
ORDERS = """
match: {paths: [/api/orders]}
rules:
  - {name: no-deletes, when: "request.method == 'DELETE'", decision: deny, message: "orders cannot be deleted"}
  - {name: reads, when: "request.method == 'GET'", decision: allow}
"""


class _Stream(io.BytesIO):
    """A BytesIO that keeps its bytes readable after the log closes (it never closes)."""

    def close(self) -> None:
        pass


def _lines(stream: _Stream) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def _run(folder: Path, config: DecisionLogConfig, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    stream = _Stream()
    decision_log = DecisionLog(config, stream=stream, subjects=SubjectHasher("hash", b"k"))
    authorizer = Authorizer(load_folder(folder))
    authorizer.observers.append(decision_log.observe)

    async def go() -> None:
        for sample in samples:
            await authorizer.check(check_request_from_sample(sample))

    asyncio.run(go())
    decision_log.close()
    return _lines(stream)


@pytest.fixture
def orders(policy_dir, policy_yaml) -> Path:
    return policy_dir(**{"o.yaml": policy_yaml("orders", ORDERS)})


def test_fields_of_a_deny(orders: Path) -> None:
    [line] = _run(orders, DecisionLogConfig(), [{
        "method": "DELETE", "host": "Orders.Example.com", "path": "/api/orders?id=7&token=" + SECRET,
        "id": "req-1", "source": {"address": "10.1.2.3", "port": 5555, "principal": "spiffe://x/ns/a/sa/b"},
        "headers": {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                    "authorization": "Bearer " + SECRET},
    }])  # fmt: skip
    assert line["decision"] == "deny" and line["status"] == 403 and line["reason"] == "denied_by_rule"
    assert line["decision_id"] == "req-1"
    assert line["policy"] == "orders" and line["rule"] == "no-deletes" and line["dry_run"] is False
    assert line["message"] == "orders cannot be deleted"
    assert line["method"] == "DELETE" and line["host"] == "orders.example.com" and line["path"] == "/api/orders"
    assert line["query_params"] == ["id", "token"]  # names only by default
    assert line["source_address"] == "10.1.2.3" and line["source_principal"] == "spiffe://x/ns/a/sa/b"
    assert line["identity"] == {"kind": "anonymous", "source": ""}
    # without tracing, the ids forwarded by the client still join the line to the trace
    assert line["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736" and line["span_id"] == "00f067aa0ba902b7"
    assert isinstance(line["latency_ms"], float) and line["latency_ms"] >= 0
    assert line["time"].endswith("Z") and "T" in line["time"]
    assert "headers" not in line
    assert SECRET not in json.dumps(line)


def test_allows_are_sampled_denies_never(orders: Path) -> None:
    samples = [{"method": "GET", "path": "/api/orders"}] * 20 + [{"method": "DELETE", "path": "/api/orders"}] * 5
    assert len(_run(orders, DecisionLogConfig(allow_sample=0.0), samples)) == 5
    assert len(_run(orders, DecisionLogConfig(allow_sample=1.0), samples)) == 25
    some = _run(orders, DecisionLogConfig(allow_sample=0.5), samples * 8)
    allows = sum(1 for line in some if line["decision"] == "allow")
    assert sum(1 for line in some if line["decision"] == "deny") == 40
    assert 30 < allows < 130  # 160 allows at one half


def test_headers_only_on_the_allow_list_and_credentials_redacted(orders: Path) -> None:
    config = DecisionLogConfig(headers=DecisionLogConfig.header_list("X-Tenant, authorization,cookie,user-agent"),
                               query="full")  # fmt: skip
    [line] = _run(orders, config, [{
        "method": "DELETE", "path": f"/api/orders?page=2&access_token={SECRET}&sig={SECRET}",
        "headers": {"x-tenant": "acme", "authorization": "Bearer " + SECRET, "cookie": "sid=" + SECRET,
                    "x-other": "not-listed"},
    }])  # fmt: skip
    assert line["headers"] == {"x-tenant": "acme", "authorization": REDACTED, "cookie": REDACTED}
    assert line["query"] == {"page": "2", "access_token": REDACTED, "sig": REDACTED}
    assert SECRET not in json.dumps(line) and "not-listed" not in json.dumps(line)


CREDENTIAL_PARAMS = ["pass", "pwd", "otp", "pin", "hmac", "ticket", "PIN", "user_password", "access-token",
                     "apiKey", "X-Amz-Credential", "SAMLResponse", "totp", "2fa", "mfa_code", "csrf", "session_id",
                     "client-secret", "passphrase", "auth[password]", "cvv", "sid"]
ORDINARY = {"page": "2", "q": "shoes", "sort": "price-desc", "shipping": "express", "category": "running-shoes-size-10",
            "opinion": "yes", "passenger": "2", "keyword": "red", "date": "2024-01-01T00:00:00Z",
            "id": "12345678901234567890", "ref": "spring_sale_2024_email",
            "order": "550e8400-e29b-41d4-a716-446655440000"}


def _query_logged(orders: Path, query: str) -> dict[str, str]:
    [line] = _run(orders, DecisionLogConfig(query="full"), [{"method": "DELETE", "path": f"/api/orders?{query}"}])
    return line["query"]


def test_credential_like_query_names_are_redacted_and_ordinary_ones_kept(orders: Path) -> None:
    logged = _query_logged(orders, urlencode({**{name: "hunter2" for name in CREDENTIAL_PARAMS}, **ORDINARY}))
    assert logged == {**dict.fromkeys(CREDENTIAL_PARAMS, REDACTED), **ORDINARY}


@pytest.mark.parametrize("value", [
    "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl",  # a signed JWT
    "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9.",                               # an unsigned one
    "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9.",
    "ghp_" + "aB3dE5fG7hI9jK1lM3nO5pQ7rS9tU1vW3xY5",                          # a vendor token
    "Zq3xV9kT2mW7rB4nY8cP1dL6hF0sJ5gK",                                      # base64url
    "4b0a34412d7aaeecb6e2337680f27ff8e62e8fa7",                              # hex
    "Cm9XqN2Uh/Q1xHoM6h1kUbyeSVPVL0j2VcQ==",                                 # base64
])
def test_values_that_look_like_credentials_are_redacted_whatever_the_name(orders: Path, value: str) -> None:
    assert _query_logged(orders, urlencode({"page": "2", "state": value})) == {"page": "2", "state": REDACTED}


def test_the_random_value_heuristic_on_many_random_and_ordinary_values() -> None:
    from extauthz.telemetry.decision_log import _secret_value

    rng = random.Random(7)
    alphabets = [string.hexdigits.lower()[:16], string.ascii_letters + string.digits + "-_",
                 string.ascii_lowercase + string.digits]
    tokens = ["".join(rng.choice(alphabet) for _ in range(32)) for alphabet in alphabets for _ in range(300)]
    assert sum(map(_secret_value, tokens)) >= 0.9 * len(tokens)
    vocabulary = ["shoes", "red", "size", "10", "2024", "sale", "men", "q1", "report", "Blue", "XL"]
    slugs = [rng.choice("-_.").join(rng.choice(vocabulary) for _ in range(6)) for _ in range(300)]
    assert not any(_secret_value(slug) for slug in [*slugs, "12345678901234567890" * 3, "RunningShoesForMen"])


def test_subject_modes_and_dry_run() -> None:
    identity = {"kind": "jwt", "source": "bearer", "subject": "alice", "claims": {"email": "a@x"}}
    decision = Decision(True, 200, "no_rule_matched", "no rule", "d1", policy="p", dry_run=True, would_deny=True,
                        identity=identity, attributes={"quota": "per-user", "quota_remaining": 3,
                                                       "session_cookie": SECRET})  # fmt: skip
    plain = decision_record(decision, 0.0, DecisionLogConfig(), SubjectHasher("hash", b"k"))
    assert plain["identity"] == {"kind": "jwt", "source": "bearer", "subject": "alice"}
    assert plain["decision"] == "dry_run_deny" and plain["dry_run"] is True and plain["message"] == "no rule"
    assert plain["attributes"] == {"quota": "per-user", "quota_remaining": 3, "session_cookie": REDACTED}
    hashed = decision_record(decision, 0.0, DecisionLogConfig(subject="hash"), SubjectHasher("hash", b"k"))
    assert "subject" not in hashed["identity"] and len(hashed["identity"]["subject_hash"]) == 32
    none = decision_record(decision, 0.0, DecisionLogConfig(subject="none"), SubjectHasher("hash", b"k"))
    assert none["identity"] == {"kind": "jwt", "source": "bearer"}
    assert "claims" not in json.dumps(plain)
    assert plain["time"] == "1970-01-01T00:00:00.000Z"


def test_dry_run_would_deny_is_logged_even_with_no_allow_sampling() -> None:
    stream = _Stream()
    decision_log = DecisionLog(DecisionLogConfig(allow_sample=0.0), stream=stream)
    decision_log.observe(Decision(True, 200, "allowed", "", "a"))
    decision_log.observe(Decision(True, 200, "no_rule_matched", "", "b", dry_run=True, would_deny=True))
    decision_log.close()
    assert [line["decision_id"] for line in _lines(stream)] == ["b"]


def test_a_slow_writer_drops_and_counts_instead_of_blocking() -> None:
    installed = Metrics()
    metrics.install(installed)
    release = threading.Event()

    class Blocked(_Stream):
        def write(self, data: bytes) -> int:  # type: ignore[override]
            release.wait(5)
            return super().write(data)

    stream = Blocked()
    decision_log = DecisionLog(DecisionLogConfig(max_pending=2), stream=stream)
    for i in range(50):
        decision_log.observe(Decision(False, 403, "no_policy", "", f"d{i}"))
    assert decision_log.dropped >= 40
    assert installed.decision_log_dropped._value.get() == decision_log.dropped
    release.set()
    decision_log.close()
    assert 1 <= len(_lines(stream)) <= 10


def test_file_destination(tmp_path: Path) -> None:
    target = tmp_path / "decisions.jsonl"
    decision_log = DecisionLog(DecisionLogConfig(destination=str(target)))
    decision_log.observe(Decision(False, 403, "no_policy", "no policy applies", "d1"))
    decision_log.close()
    assert json.loads(target.read_text())["reason"] == "no_policy"


@pytest.mark.parametrize("bad", [{"allow_sample": 1.5}, {"subject": "reversible"}, {"query": "values"}])
def test_bad_configuration_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        DecisionLogConfig(**bad)
    assert not DecisionLogConfig(destination="off").enabled


PARTNER_KEYS = """
match: {paths: [/partners]}
identity:
  - name: partners
    apiKey:
      keys: keys.json
      in: [{query: pk}, {header: x-partner}]
rules:
  - {name: partners, when: "identity.kind == 'apiKey'", decision: allow}
"""


def test_credential_locations_of_the_policies_are_always_redacted(policy_dir, policy_yaml) -> None:
    """Names no list of well-known secrets knows (?pk=, x-partner) are credentials when a policy
    reads one from them: redacted even with --decision-log-query full and on the header allow-list."""
    folder = policy_dir(**{"p.yaml": policy_yaml("partners", PARTNER_KEYS), "keys.json": "[]"})
    stream = _Stream()
    config = DecisionLogConfig(query="full", headers=("x-partner", "x-tenant", "x-goog-api-key"))
    authorizer = Authorizer(load_folder(folder))
    decision_log = DecisionLog(config, stream=stream, subjects=SubjectHasher("hash", b"k"),
                               policies=lambda: authorizer.policy_set)  # fmt: skip
    authorizer.observers.append(decision_log.observe)

    async def go() -> None:
        for sample in ({"path": "/partners?pk=KEY-1&page=2"}, {"path": "/partners?PK=KEY-2", "headers": {
                "x-partner": "KEY-3", "x-tenant": "acme", "x-goog-api-key": "KEY-4"}}):  # fmt: skip
            await authorizer.check(check_request_from_sample(sample))

    asyncio.run(go())
    decision_log.close()
    first, second = _lines(stream)
    assert first["query"] == {"pk": REDACTED, "page": "2"}
    assert second["query"] == {"PK": REDACTED}
    assert second["headers"] == {"x-partner": REDACTED, "x-tenant": "acme", "x-goog-api-key": REDACTED}
    assert "KEY-" not in stream.getvalue().decode()


LOOKUP = """
match: {paths: [/lookup]}
rules:
  - {name: pattern, when: "'x-session' in request.headers && request.path.matches(request.headers['x-session'])",
     decision: allow}
  - {name: known-key, when: "{'k-live-1': true}[request.headers['x-api-key']]", decision: allow}
"""


@pytest.mark.parametrize("headers", [{"x-api-key": SECRET}, {"x-session": SECRET + "("}])
def test_a_failing_rule_never_puts_the_value_it_evaluated_in_the_log(policy_dir, policy_yaml, headers) -> None:
    """The CEL runtime quotes the map key it missed and the regular expression it could not parse:
    here a credential. The decision log says which rule failed and how, never with what."""
    folder = policy_dir(**{"l.yaml": policy_yaml("lookup", LOOKUP)})
    [line] = _run(folder, DecisionLogConfig(), [{"path": "/lookup", "headers": headers}])
    assert (line["status"], line["reason"]) == (503, "internal_error")
    assert line["attributes"]["error"].startswith(("rule known-key: NOT_FOUND", "rule pattern: INVALID_ARGUMENT"))
    assert SECRET not in json.dumps(line)


_WORKER = """
import sys, time
from extauthz.decision import Decision
from extauthz.telemetry.decision_log import DecisionLog, DecisionLogConfig
log = DecisionLog(DecisionLogConfig())  # stdout: the pipe every worker shares
time.sleep(max(0.0, float(sys.argv[3]) - time.time()))  # all workers write at the same time
for i in range(int(sys.argv[1])):
    log.observe(Decision(False, 403, "denied_by_rule", sys.argv[2] * 600, f"{sys.argv[2]}-{i}"))
log.close(timeout=20)
"""


def test_workers_sharing_stdout_never_interleave_lines() -> None:
    """With --workers every worker writes decision lines to the same stdout pipe: a write of more
    than PIPE_BUF bytes may be split by another worker's, so each write holds whole lines and at
    most PIPE_BUF bytes."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    lines_each, start = 4000, time.time() + 2.0
    workers = [subprocess.Popen([sys.executable, "-c", _WORKER, str(lines_each), name, str(start)], stdout=write_end)
               for name in ("a", "b", "c")]  # fmt: skip
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        output = pipe.read()
    for worker in workers:
        assert worker.wait(timeout=60) == 0
    records = [json.loads(line) for line in output.splitlines()]  # a torn line would not parse
    assert len(records) == 3 * lines_each
    assert {r["decision_id"][0] for r in records} == {"a", "b", "c"}


def test_the_attempted_user_follows_the_subject_setting() -> None:
    """A failed login's user name names a person (or is a mistyped password): shown like the subject."""
    decision = Decision(False, 401, "invalid_credentials", "no", "d2", policy="p",
                        attributes={"attempted_user": "alice", "identity_kind": "basic"})
    hasher = SubjectHasher("hash", b"k")
    plain = decision_record(decision, 0.0, DecisionLogConfig(), hasher)
    assert plain["attributes"] == {"attempted_user": "alice", "identity_kind": "basic"}
    hashed = decision_record(decision, 0.0, DecisionLogConfig(subject="hash"), hasher)
    assert hashed["attributes"] == {"attempted_user_hash": hasher.attributes("alice")["extauthz.identity.subject_hash"],
                                    "identity_kind": "basic"}
    assert "alice" not in json.dumps(hashed)
    none = decision_record(decision, 0.0, DecisionLogConfig(subject="none"), hasher)
    assert none["attributes"] == {"identity_kind": "basic"}
