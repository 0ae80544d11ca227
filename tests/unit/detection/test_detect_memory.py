"""The ``detect:`` policy section in process: brute force, enumeration, spikes, throttles, dry runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from detect_helpers import ACME, GLOBEX, build, decide, request

from extauthz import clock
from extauthz.policy import PolicySetError

BRUTE = """
- name: guessing
  failures: {identity: true}
  by: client_ip
  threshold: 10
  window: 10m
  action: {block: {duration: 5m, status: 429, escalation: 2, maxDuration: 1h}}
"""


@pytest.fixture
def fixed_clock():
    with clock.fixed(1_800_000_000.0):
        yield


def test_brute_force_from_one_address_is_blocked_at_the_eleventh_attempt(tmp_path: Path, fixed_clock) -> None:
    auth = build(tmp_path / "p", BRUTE)
    for attempt in range(10):
        d = decide(auth, request(f"ak_wrong_guess_{attempt}"))
        assert (d.allowed, d.status) == (False, 401), attempt
    assert decide(auth, request("ak_wrong_guess_10")).reason == "abuse_blocked"
    eleventh = decide(auth, request(ACME))  # even the right key: a blocked client learns nothing
    assert (eleventh.allowed, eleventh.status, eleventh.reason, eleventh.rule) == (False, 429, "abuse_blocked",
                                                                                    "detect:guessing")
    assert dict(eleventh.client_headers)["retry-after"] == "300"
    # Another address is not affected.
    assert decide(auth, request(ACME, ip="198.51.100.9")).allowed
    assert decide(auth, request("ak_wrong", ip="198.51.100.9")).status == 401
    # The block ends on time, not later.
    clock.set_fixed(clock.wall() + 299)
    assert decide(auth, request(ACME)).reason == "abuse_blocked"
    clock.set_fixed(clock.wall() + 1)
    assert decide(auth, request(ACME)).allowed


def test_repeat_offenders_are_blocked_longer(tmp_path: Path, fixed_clock) -> None:
    auth = build(tmp_path / "p", BRUTE)
    for _ in range(10):
        decide(auth, request("ak_wrong"))
    first = decide(auth, request(ACME))
    assert dict(first.client_headers)["retry-after"] == "300"
    clock.set_fixed(clock.wall() + 300)
    for _ in range(10):
        decide(auth, request("ak_wrong"))
    second = decide(auth, request(ACME))
    assert dict(second.client_headers)["retry-after"] == "600"


def test_the_tripping_failure_is_reported_in_the_decision(tmp_path: Path, fixed_clock) -> None:
    auth = build(tmp_path / "p", BRUTE)
    for _ in range(9):
        assert "detections" not in (decide(auth, request("ak_wrong")).attributes or {})
    tenth = decide(auth, request("ak_wrong"))
    assert tenth.status == 401
    assert tenth.attributes["detections"] == "guessing:block:300s"


def test_missing_credentials_are_not_failures(tmp_path: Path, fixed_clock) -> None:
    auth = build(tmp_path / "p", BRUTE)
    for _ in range(20):
        assert decide(auth, request(None)).reason == "credentials_missing"
    assert decide(auth, request(ACME)).allowed


ENUMERATION = """
- name: order-walking
  distinct: {pathSegment: 2}
  by: subject
  when: "request.path.startsWith('/orders/')"
  threshold: 20
  window: 5m
  action: {block: {duration: 10m, status: 403}}
"""


def test_enumeration_blocks_the_walker_not_a_reader_of_its_own_few_objects(tmp_path: Path, fixed_clock) -> None:
    auth = build(tmp_path / "p", ENUMERATION)
    for order in range(1, 21):
        assert decide(auth, request(ACME, path=f"/orders/{order}")).allowed, order
    walker = decide(auth, request(ACME, path="/orders/21"))
    assert (walker.allowed, walker.status, walker.reason) == (False, 403, "abuse_blocked")
    assert walker.attributes["detections"] == "order-walking:block:600s"
    assert decide(auth, request(ACME, path="/orders/1")).reason == "abuse_blocked"
    # Another identity (other address too, irrelevant here) reading its own three orders, many times.
    for _ in range(30):
        for order in (7, 8, 9):
            assert decide(auth, request(GLOBEX, path=f"/orders/{order}")).allowed


SPIKE = """
- name: burst
  spike: {interval: 1m, baseline: 10, warmup: 5, minCount: 20, factor: 4}
  by: subject
  action: {throttle: {limit: 10, window: 1m, duration: 10m}}
"""


def _minute(auth, key: str, count: int) -> list:
    decisions = [decide(auth, request(key)) for _ in range(count)]
    clock.set_fixed(clock.wall() + 60)
    return decisions


def test_a_spike_against_a_quiet_baseline_is_throttled_a_busy_account_is_not(tmp_path: Path, fixed_clock) -> None:
    auth = build(tmp_path / "p", SPIKE)
    for _ in range(10):  # quiet: 3 a minute; busy: 40 a minute (each its own baseline)
        assert all(d.allowed for d in _minute(auth, ACME, 3))
        assert all(d.allowed for d in _minute(auth, GLOBEX, 40))
    # The busy account stays busy: never flagged.
    busy = [decide(auth, request(GLOBEX)) for _ in range(45)]
    assert all(d.allowed for d in busy) and not any((d.attributes or {}).get("detections") for d in busy)
    # The quiet one bursts: flagged within the minute (at the 20th request, past minCount and 4x its baseline).
    burst = [decide(auth, request(ACME)) for _ in range(20)]
    assert [bool((d.attributes or {}).get("detections")) for d in burst].index(True) == 19
    assert burst[-1].attributes["detections"] == "burst:throttle:600s"
    # Then a temporary quota of 10 a minute: the burst allowance, then 429 throttled.
    after = [decide(auth, request(ACME)) for _ in range(11)]
    assert all(d.allowed for d in after[:10])
    assert (after[10].status, after[10].reason) == (429, "abuse_throttled")


def test_dry_run_reports_and_never_refuses(tmp_path: Path, fixed_clock) -> None:
    auth = build(tmp_path / "p", BRUTE.replace("  by: client_ip", "  by: client_ip\n  mode: dry-run"))
    reports = [decide(auth, request("ak_wrong")) for _ in range(10)]
    assert reports[-1].attributes["detections"] == "guessing:dry_run_block"
    assert decide(auth, request(ACME)).allowed


def test_log_action_counts_and_lets_through(tmp_path: Path, fixed_clock) -> None:
    auth = build(tmp_path / "p", ENUMERATION.replace("  action: {block: {duration: 10m, status: 403}}",
                                                     "  action: log"))
    decisions = [decide(auth, request(ACME, path=f"/orders/{i}")) for i in range(1, 30)]
    assert all(d.allowed for d in decisions)
    assert decisions[20].attributes["detections"] == "order-walking:log"


@pytest.mark.parametrize(("detect", "message"), [
    ("- {name: x, failures: {identity: true}, by: subject, threshold: 3, window: 1m, action: log}",
     "a failed identity check has no subject"),
    ("- {name: x, distinct: {pathSegment: 2}, threshold: 3, window: 1m, action: {block: {duration: 1m, status: 500}}}",
     "must be 429 or 403"),
    ("- {name: x, spike: {factor: 1}, action: log}", "must be more than 1"),
    ("- {name: x, failures: {identity: true}, threshold: 3, action: log}", "is required"),
    ("- {name: x, failures: {identity: true}, threshold: 3, window: 1m}", "is required"),
    ("- {name: x, distinct: {}, threshold: 3, window: 1m, action: log}", "exactly one of value"),
])
def test_bad_detectors_are_refused_with_a_clear_error(tmp_path: Path, detect: str, message: str) -> None:
    with pytest.raises(PolicySetError, match=message):
        build(tmp_path / "p", detect)


UPSTREAM = """
- name: login-failures
  failures: {identity: false, upstream: [401, 403]}
  by: client_ip
  when: "request.path == '/login'"
  threshold: 3
  window: 10m
  action: {block: {duration: 1m}}
- name: probing
  distinct: {value: request.path, statuses: [404]}
  by: client_ip
  threshold: 2
  window: 10m
  action: {block: {duration: 1m, status: 403}}
"""


def test_upstream_outcomes_feed_failures_and_distinct_404s(tmp_path: Path, fixed_clock) -> None:
    from extauthz.outcomes import Outcome, outcomes_for
    from extauthz.policy import Services

    services = Services()
    auth = build(tmp_path / "p", UPSTREAM, services=services)
    join = outcomes_for(services)
    ids = iter(range(1000))

    def call(path: str, status: int, flags: str = "", ip: str = "203.0.113.7"):
        rid = f"req-{next(ids)}"
        sample = request(ACME, path=path, ip=ip)
        sample["headers"]["x-request-id"] = rid
        d = decide(auth, sample)
        if d.allowed:
            join.deliver(Outcome(rid, status, flags))
        return d

    # The upstream's 401s on /login: three trip the detector, the fourth request is blocked.
    for _ in range(3):
        assert call("/login", 401).allowed
    assert call("/login", 200).reason == "abuse_blocked"
    # Our own denials (UAEX) and other statuses are not counted; other routes are not watched.
    for _ in range(5):
        assert call("/login", 401, "UAEX", ip="198.51.100.1").allowed
        assert call("/other", 401, ip="198.51.100.1").allowed
    # Distinct 404 paths: two are fine, the third trips; repeats of one path do not count.
    for path in ("/a", "/a", "/a", "/b"):
        assert call(path, 404, ip="192.0.2.5").allowed
    assert call("/c", 404, ip="192.0.2.5").allowed  # its outcome trips the detector after the decision
    assert call("/d", 200, ip="192.0.2.5").reason == "abuse_blocked"


BASIC_POLICY = f"""apiVersion: extauthz.dev/v1
kind: AuthPolicy
metadata: {{name: ops}}
spec:
  match: {{hosts: [ops.example.com]}}
  identity:
    - name: staff
      basic: {{htpasswd: {Path(__file__).resolve().parents[3]}/examples/keys/identity/htpasswd, realm: ops}}
  rules:
    - {{name: all, decision: allow}}
  detect:
    - name: per-user
      failures: {{identity: true}}
      by: username
      threshold: 3
      window: 10m
      action: {{block: {{duration: 5m, status: 429}}}}
    - name: per-address
      failures: {{identity: true}}
      by: client_ip
      threshold: 5
      window: 10m
      action: {{block: {{duration: 5m, status: 429}}}}
"""


def _basic(user: str, password: str, ip: str = "10.1.1.1") -> dict:
    import base64

    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"host": "ops.example.com", "path": "/status", "headers": {"authorization": f"Basic {token}"},
            "source": {"address": ip, "port": 40000}}  # fmt: skip


def test_basic_failures_block_the_user_name_and_the_address_before_any_hash(tmp_path: Path, fixed_clock) -> None:
    """HTTP Basic's rejected user name (attempted_user) keys a detector; a blocked address is refused
    before the identity check runs, so no password hash is spent on it."""
    from extauthz.decision import Authorizer
    from extauthz.policy import Services, load_folder

    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "ops.yaml").write_text(BASIC_POLICY)
    auth = Authorizer(load_folder(folder, Services()), check_timeout=5.0)
    # Three wrong passwords for bob from three addresses: bob is blocked, from anywhere.
    for n in range(3):
        assert decide(auth, _basic("bob", f"guess-{n}", ip=f"10.2.2.{n}")).status == 401
    blocked = decide(auth, _basic("bob", "example-bob-Hk4w9tLs", ip="10.3.3.3"))
    assert (blocked.status, blocked.reason, blocked.rule) == (429, "abuse_blocked", "detect:per-user")
    # alice from another address is not affected.
    assert decide(auth, _basic("alice", "wrong", ip="10.4.4.4")).status == 401
    # Five failures from one address (five users): the address is blocked before any verification.
    for n in range(5):
        assert decide(auth, _basic(f"user{n}", "wrong", ip="10.5.5.5")).status == 401
    early = decide(auth, _basic("alice", "anything", ip="10.5.5.5"))
    assert (early.status, early.reason, early.rule) == (429, "abuse_blocked", "detect:per-address")
    assert any("before the identity check" in step for step in early.steps or ())


STUFFING = BASIC_POLICY.split("  detect:\n")[0] + """  detect:
    - name: stuffing
      distinct: {of: username, failures: true}
      by: client_ip
      threshold: 3
      window: 10m
      action: {block: {duration: 5m, status: 403}}
"""


def test_credential_stuffing_many_user_names_from_one_address(tmp_path: Path, fixed_clock) -> None:
    from extauthz.decision import Authorizer
    from extauthz.policy import Services, load_folder

    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "ops.yaml").write_text(STUFFING)
    auth = Authorizer(load_folder(folder, Services()), check_timeout=5.0)
    # One user's wrong passwords, many times: one distinct user name, not stuffing.
    for n in range(5):
        assert decide(auth, _basic("bob", f"guess-{n}", ip="10.6.6.6")).status == 401
    # Three more user names from that address: the fourth distinct one trips (that attempt keeps its 401).
    for user in ("alice", "carol", "dave"):
        assert decide(auth, _basic(user, "Winter2025!", ip="10.6.6.6")).status == 401
    blocked = decide(auth, _basic("bob", "example-bob-Hk4w9tLs", ip="10.6.6.6"))
    assert (blocked.status, blocked.reason, blocked.rule) == (403, "abuse_blocked", "detect:stuffing")
    # Successful logins are not counted: another address signing in as bob many times is fine.
    for _ in range(5):
        assert decide(auth, _basic("bob", "example-bob-Hk4w9tLs", ip="10.7.7.7")).allowed


def test_the_in_process_store_is_bounded_and_expires() -> None:
    from extauthz.detection import OP_DISTINCT, OP_FAIL, Detector, MemoryDetections, Op

    now = [0]
    store = MemoryDetections(max_keys=100, max_values=500, clock_ms=lambda: now[0])
    walk = Detector(policy="p", name="w", op=OP_DISTINCT, threshold=50, window_ms=60_000, store_action=0, action=0,
                    dry_run=False)
    fail = Detector(policy="p", name="f", op=OP_FAIL, threshold=50, window_ms=60_000, store_action=0, action=0,
                    dry_run=False)
    for key in range(300):
        for value in range(20):
            store.run([Op(OP_DISTINCT, walk, f"{key:032x}", "", str(value)), Op(OP_FAIL, fail, f"{key:032x}")])
    assert store.values_held <= 500 and store.entries() <= 200
    now[0] += 61_000  # every window is over: the sweeps empty the tables a few entries at a time
    for _ in range(200):
        store.run([])
    assert store.entries() == 0 and store.values_held == 0
