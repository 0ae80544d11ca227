"""The ``quotas:`` policy section in process: policy YAML -> Authorizer -> Decision -> CheckResponse."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from extauthz import client_ip
from extauthz.decision import Authorizer, Decision
from extauthz.policy import PolicySetError, Services, load_folder
from extauthz.responses import to_check_response
from extauthz.samples import check_request_from_sample

HOST = "api.example.com"


def request(**overrides: Any) -> dict[str, Any]:
    sample: dict[str, Any] = {"host": HOST, "path": "/v1/things", "headers": {"x-api-key": "key-alice"},
                              "source": {"address": "203.0.113.7", "port": 40000}}  # fmt: skip
    headers = overrides.pop("headers", None)
    if headers is not None:
        sample["headers"] = {**sample["headers"], **headers}
    sample.update(overrides)
    return sample


def policy(quotas: str, *, rules: str = "- {name: all, decision: allow}", mode: str = "enforce") -> str:
    indent = "\n".join("  " + line for line in quotas.strip("\n").splitlines())
    rule_lines = "\n".join("  " + line for line in rules.strip("\n").splitlines())
    return (f"apiVersion: extauthz.dev/v1\nkind: AuthPolicy\nmetadata: {{name: api}}\nspec:\n"
            f"  match: {{hosts: [{HOST}]}}\n  mode: {mode}\n  rules:\n{rule_lines}\n  quotas:\n{indent}\n")  # fmt: skip


Build = Callable[..., Authorizer]


@pytest.fixture
def build(tmp_path: Path) -> Build:
    counter = 0

    def make(quotas: str, *, settings: dict[str, Any] | None = None, **kwargs: Any) -> Authorizer:
        nonlocal counter
        counter += 1
        folder = tmp_path / f"policies{counter}"
        folder.mkdir()
        (folder / "api.yaml").write_text(policy(quotas, **kwargs))
        return Authorizer(load_folder(folder, Services(settings=settings or {})), check_timeout=2.0)

    return make


def decide(authorizer: Authorizer, sample: dict[str, Any] | None = None) -> Decision:
    return asyncio.run(authorizer.check(check_request_from_sample(sample or request()), explain=True))


def headers(decision: Decision) -> dict[str, str]:
    return dict(decision.client_headers)


PER_KEY = """
- name: per-key
  key: "request.headers['x-api-key']"
  limit: 3
  window: 1m
  headers: true
"""


def test_over_the_limit_is_429_with_retry_after_and_ratelimit_headers(build: Build) -> None:
    authorizer = build(PER_KEY)
    first = decide(authorizer)
    assert first.allowed and first.status == 200
    assert headers(first) == {"ratelimit-policy": '"per-key";q=3;w=60', "ratelimit": '"per-key";r=2;t=20'}
    # What spans and log lines carry: the tightest quota and its room, on allow as on deny.
    assert (first.attributes["quota"], first.attributes["quota_remaining"]) == ("per-key", 2)
    decide(authorizer)
    third = decide(authorizer)
    assert headers(third)["ratelimit"] == '"per-key";r=0;t=60'
    refused = decide(authorizer)
    assert (refused.allowed, refused.status, refused.reason, refused.rule) == (False, 429, "quota_exceeded",
                                                                               "quota:per-key")  # fmt: skip
    assert headers(refused) == {"retry-after": "20", "ratelimit-policy": '"per-key";q=3;w=60',
                                "ratelimit": '"per-key";r=0;t=20'}  # fmt: skip
    assert (refused.attributes["quota"], refused.attributes["quota_remaining"]) == ("per-key", 0)
    # Another key has its own counter.
    assert decide(authorizer, request(headers={"x-api-key": "key-bob"})).allowed


def test_headers_reach_envoy_on_allow_and_on_deny(build: Build) -> None:
    authorizer = build(PER_KEY.replace("limit: 3", "limit: 1"))
    allowed = to_check_response(decide(authorizer))
    added = {h.header.key: h.header.value for h in allowed.ok_response.response_headers_to_add}
    assert added == {"ratelimit-policy": '"per-key";q=1;w=60', "ratelimit": '"per-key";r=0;t=60'}
    denied = to_check_response(decide(authorizer))
    assert denied.denied_response.status.code == 429
    sent = {h.header.key: h.header.value for h in denied.denied_response.headers}
    assert sent["retry-after"] == "60" and sent["ratelimit"] == '"per-key";r=0;t=60'
    assert b'"reason":"quota_exceeded"' in denied.denied_response.body.encode()


def test_no_headers_unless_the_quota_asks(build: Build) -> None:
    authorizer = build(PER_KEY.replace("headers: true", "headers: false").replace("limit: 3", "limit: 1"))
    assert decide(authorizer).client_headers == ()
    assert headers(decide(authorizer)) == {"retry-after": "60"}


def test_the_most_restrictive_quota_decides_and_a_refusal_charges_nothing(build: Build) -> None:
    authorizer = build("""
- {name: per-key, key: "request.headers['x-api-key']", limit: 100, window: 1m, headers: true}
- {name: writes, key: "request.headers['x-api-key']", when: "request.method == 'POST'", limit: 1, window: 1h,
   headers: true}
""")
    post = request(method="POST")
    assert decide(authorizer, post).allowed
    refused = decide(authorizer, post)
    assert (refused.status, refused.rule) == (429, "quota:writes")
    assert headers(refused)["retry-after"] == "3600"
    # The per-key quota had room but was not charged by the refused request: 98 left, not 97.
    assert headers(refused)["ratelimit"] == '"per-key";r=99;t=1, "writes";r=0;t=3600'
    get = decide(authorizer)
    assert headers(get)["ratelimit"] == '"per-key";r=98;t=2'
    assert headers(get)["ratelimit-policy"] == '"per-key";q=100;w=60'


def test_cost_expressions(build: Build) -> None:
    authorizer = build("""
- name: units
  key: "request.headers['x-api-key']"
  limit: 10
  window: 1h
  cost: "request.method == 'POST' ? 4 : 1"
  headers: true
- name: bulk
  when: "request.path == '/v1/bulk'"
  limit: 5
  window: 1h
  cost: 6
""")
    assert headers(decide(authorizer, request(method="POST")))["ratelimit"] == '"units";r=6;t=1440'
    assert headers(decide(authorizer))["ratelimit"] == '"units";r=5;t=1800'
    too_big = decide(authorizer, request(path="/v1/bulk"))
    assert (too_big.status, too_big.reason, too_big.rule) == (429, "quota_cost_exceeds_burst", "quota:bulk")
    assert "retry-after" not in headers(too_big)


@pytest.mark.parametrize(
    ("quota", "problem"),
    [
        ("{name: q, key: \"request.headers['x-missing']\", limit: 5, window: 1m}", "key failed"),
        (
            # dyn(): what the checker cannot see (claims, metadata) is checked at run time
            "{name: q, key: \"dyn(request.headers['x-api-key'].size() > 0 ? [1] : [2])\", limit: 5, window: 1m}",
            "key must be a string or an integer, got list",
        ),
        ('{name: q, limit: 5, window: 1m, cost: "0 - 1"}', "cost must be an integer"),
        ("{name: q, limit: 5, window: 1m, cost: \"dyn(request.headers['x-api-key'])\"}", "cost must be an integer"),
        ("{name: q, limit: 5, window: 1m, when: \"request.headers['x-missing'] == 'x'\"}", "when failed"),
    ],
)
def test_bad_input_is_a_503_never_an_unlimited_allow(build: Build, caplog: pytest.LogCaptureFixture,
                                                     quota: str, problem: str) -> None:  # fmt: skip
    authorizer = build(f"- {quota}")
    with caplog.at_level(logging.ERROR, logger="extauthz.quota"):
        decision = decide(authorizer)
    assert (decision.allowed, decision.status, decision.reason, decision.rule) == (False, 503, "internal_error",
                                                                                   "quota:q")  # fmt: skip
    assert problem in decision.attributes["error"]
    [line] = [r.getMessage() for r in caplog.records]
    assert "policy api, quota q:" in line and problem in line
    assert "key-alice" not in line  # the key's value may be a credential: never logged


def test_bad_input_on_every_request_logs_one_line_not_one_each(build: Build,
                                                                caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """A client leaving out the header a key reads causes it on every request: every one is denied
    (and in the decision log), but the process log gets one line per quota per interval."""
    authorizer = build("- {name: q, key: \"request.headers['x-tenant']\", limit: 5, window: 1m}")
    with caplog.at_level(logging.ERROR, logger="extauthz.quota"):
        decisions = [decide(authorizer) for _ in range(20)]
    assert all(d.status == 503 for d in decisions)
    assert len(caplog.records) == 1


def test_a_huge_key_is_a_503_not_a_new_counter(build: Build, caplog: pytest.LogCaptureFixture) -> None:
    authorizer = build("- {name: q, key: \"request.headers['x-api-key']\", limit: 5, window: 1m}")
    with caplog.at_level(logging.ERROR, logger="extauthz.quota"):
        decision = decide(authorizer, request(headers={"x-api-key": "k" * 5000}))
    assert (decision.status, decision.reason) == (503, "internal_error")
    assert "key is 5000 bytes long (at most 4096)" in caplog.text and "kkkk" not in caplog.text
    assert decide(authorizer, request(headers={"x-api-key": "k" * 4096})).allowed


def test_integer_keys_and_a_keyless_global_quota(build: Build) -> None:
    authorizer = build("""
- {name: by-port, key: source.port, limit: 1, window: 1h}
- {name: total, limit: 2, window: 1h}
""")
    assert decide(authorizer).allowed
    assert decide(authorizer, request(source={"address": "203.0.113.7", "port": 40001})).allowed
    refused = decide(authorizer, request(source={"address": "203.0.113.7", "port": 40002}))
    assert refused.rule == "quota:total"


def test_shadow_quotas_report_but_never_deny(build: Build) -> None:
    authorizer = build("""
- {name: trial, key: "request.headers['x-api-key']", limit: 1, window: 1h, mode: shadow, headers: true}
""")
    first, second = decide(authorizer), decide(authorizer)
    assert first.allowed and second.allowed
    assert second.attributes["quota_shadow_exceeded"] == "trial"
    assert second.client_headers == ()  # shadow quotas are not advertised to clients
    assert any("trial (shadow" in step and "exhausted" in step for step in second.steps or ())


def test_a_shadow_quota_that_cannot_compute_its_key_never_denies(build: Build,
                                                                 caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    authorizer = build("""
- {name: trial, key: "request.headers['x-tenant']", limit: 1, window: 1h, mode: shadow}
- {name: per-key, key: "request.headers['x-api-key']", limit: 1, window: 1h}
""")
    with caplog.at_level(logging.WARNING, logger="extauthz.quota"):
        first = decide(authorizer)  # no x-tenant header: the shadow quota's key fails
    assert first.allowed and first.status == 200
    assert "quota trial: key failed" in first.attributes["quota_shadow_error"]
    assert "policy api, shadow quota trial: key failed" in caplog.text and "key-alice" not in caplog.text
    assert decide(authorizer).rule == "quota:per-key"  # the enforced quota still counts and refuses


def test_counter_keys_are_the_hashed_value_inside_a_hash_tag(build: Build, redis_server: Any) -> None:
    import hashlib

    authorizer = build(PER_KEY, settings={"redis_url": redis_server.url})
    store = authorizer.policy_set.policies[0].checks[-1].store  # type: ignore[union-attr]

    async def run() -> None:
        await store.start()
        try:
            assert (await authorizer.check(check_request_from_sample(request()))).allowed
        finally:
            await store.aclose()

    asyncio.run(run())
    digest = hashlib.blake2b(b"key-alice", digest_size=16).hexdigest()
    # One counter, named by policy and quota, the value hashed into the Cluster hash tag.
    assert redis_server.client().keys("*") == [f"extauthz:q:api:per-key:{{{digest}}}".encode()]


def test_no_ratelimit_item_says_more_is_left_than_its_policy_allows(build: Build) -> None:
    authorizer = build("- {name: q, limit: 10, window: 1m, burst: 50, headers: true}")
    sent = headers(decide(authorizer))
    assert sent["ratelimit-policy"] == '"q";q=10;w=60'
    assert sent["ratelimit"].startswith('"q";r=10;')  # 49 units are in the bucket; q says 10


def test_quotas_run_after_the_rules_so_refused_requests_are_not_charged(build: Build) -> None:
    authorizer = build(
        PER_KEY.replace("limit: 3", "limit: 1"),
        rules="""
- {name: no-deletes, when: "request.method == 'DELETE'", decision: deny}
- {name: all, decision: allow}
""",
    )
    for _ in range(3):
        assert decide(authorizer, request(method="DELETE")).reason == "denied_by_rule"
    assert decide(authorizer).allowed


def test_dry_run_policies_report_would_deny(build: Build) -> None:
    authorizer = build(PER_KEY.replace("limit: 3", "limit: 1"), mode="dry-run")
    decide(authorizer)
    trial = decide(authorizer)
    assert trial.allowed and trial.would_deny and trial.reason == "quota_exceeded"


@pytest.fixture
def trusted_hops() -> Iterator[Callable[[int], None]]:
    yield client_ip.configure
    client_ip.configure(0)


def test_per_client_ip_quota_trusts_x_forwarded_for_only_with_trusted_hops(build: Build,
                                                                           trusted_hops: Any) -> None:  # fmt: skip
    authorizer = build("- {name: per-ip, key: source.client_ip, limit: 1, window: 1h}")
    # Envoy appended its peer (a load balancer at 10.0.0.2) to what the client sent.
    spoofed = request(source={"address": "10.0.0.2"}, headers={"x-forwarded-for": "1.1.1.1, 198.51.100.9, 10.0.0.2"})
    other = request(source={"address": "10.0.0.2"}, headers={"x-forwarded-for": "2.2.2.2, 198.51.100.8, 10.0.0.2"})
    # Default: no trusted hops, the client is the peer: both requests share the balancer's counter.
    assert decide(authorizer, spoofed).allowed
    assert decide(authorizer, other).reason == "quota_exceeded"
    trusted_hops(1)  # the balancer is trusted: the client is the address it saw
    authorizer = build("- {name: per-ip, key: source.client_ip, limit: 1, window: 1h}")
    assert decide(authorizer, spoofed).allowed
    assert decide(authorizer, other).allowed
    # Changing the spoofable left part does not buy a new counter.
    again = request(source={"address": "10.0.0.2"}, headers={"x-forwarded-for": "9.9.9.9, 198.51.100.9, 10.0.0.2"})
    assert decide(authorizer, again).reason == "quota_exceeded"


@pytest.mark.parametrize(
    ("quota", "message"),
    [
        ("{key: x, limit: 1, window: 1m}", "name: is required"),
        ("{name: Bad_Name, limit: 1, window: 1m}", "lower-case letters"),
        ("{name: q, window: 1m}", "limit: is required"),
        ("{name: q, limit: 1}", "window: is required"),
        ("{name: q, limit: 0, window: 1m}", "between 1 and"),
        ("{name: q, limit: 1, window: 0s}", "more than 0"),
        ("{name: q, limit: 1, window: soon}", "duration"),
        ("{name: q, limit: 2000000, window: 1s}", "more than 1,000,000 per second"),
        ("{name: q, limit: 1, window: 1m, burst: 0}", "between 1 and"),
        ("{name: q, limit: 1, window: 300d, burst: 10}", "1157 days"),
        ("{name: q, limit: 1, window: 1m, mode: strict}", "enforce, shadow"),
        ("{name: q, limit: 1, window: 1m, onStoreError: retry}", "deny, allow, local"),
        ("{name: q, limit: 1, window: 1m, cost: -1}", "between 0 and"),
        ("{name: q, limit: 1, window: 1m, cost: \"'x'\"}", "has type string, expected an integer"),
        ("{name: q, limit: 1, window: 1m, cost: \"request.headers['x-batch']\"}", "has type string, expected an integer"),
        ("{name: q, limit: 1, window: 1m, key: request.headers}", "has type map<string, string>, expected a string"),
        ("{name: q, limit: 1, window: 1m, key: \"request.headers[?'x']\"}", "add .orValue("),
        ("{name: q, limit: 1, window: 1m, key: source}", "has type source"),
        ("{name: q, limit: 1, window: 1m, key: \"[source.address]\"}", "has type list<string>"),
        ("{name: q, limit: 1, window: 1m, when: \"request.headers['x']\"}", "has type string, expected bool"),
        ('{name: q, limit: 1, window: 1m, key: "request.nope"}', "unknown field 'nope'"),
        ('{name: q, limit: 1, window: 1m, when: "1"}', "expected bool"),
        ("{name: q, limit: 1, window: 1m, rate: 5}", "unknown field"),
        ('{name: q, limit: 1, window: 1m, key: "destination.client_ip"}', "unknown field 'client_ip'"),
    ],
)
def test_policy_errors_name_the_field(build: Build, quota: str, message: str) -> None:
    with pytest.raises(PolicySetError) as info:
        build(f"- {quota}")
    assert message in str(info.value)


def test_duplicate_names_and_a_bad_store_url_are_load_errors(build: Build) -> None:
    with pytest.raises(PolicySetError, match="duplicate quota name"):
        build("- {name: q, limit: 1, window: 1m}\n- {name: q, limit: 2, window: 1m}")
    with pytest.raises(PolicySetError, match="the quota store cannot be used: unknown redis URL parameter"):
        build("- {name: q, limit: 1, window: 1m}", settings={"redis_url": "redis://127.0.0.1:1/0?bogus=1"})


def test_sub_second_windows_are_advertised_in_whole_seconds(build: Build) -> None:
    authorizer = build("- {name: fast, limit: 10, window: 500ms, headers: true}")
    assert headers(decide(authorizer))["ratelimit-policy"] == '"fast";q=20;w=1'


# --- onStoreError with a real Redis killed and restarted in the middle of a run ----------------------
STORE_MODES = """
- {name: strict, when: "request.path == '/strict'", limit: 1000, window: 1h, onStoreError: deny}
- {name: lenient, when: "request.path == '/lenient'", limit: 3, window: 1h, onStoreError: allow}
- {name: fallback, when: "request.path == '/fallback'", limit: 3, window: 1h, onStoreError: local,
   headers: true}
"""


def test_on_store_error_modes_when_redis_dies_and_comes_back(build: Build, redis_server: Any) -> None:
    url = redis_server.url + "?timeout=200ms&probe_interval=100ms"
    authorizer = build(STORE_MODES, settings={"redis_url": url})
    store = authorizer.policy_set.policies[0].checks[-1].store  # type: ignore[union-attr]

    async def run() -> None:
        await store.start()
        try:
            await scenario(authorizer, store, redis_server)
        finally:
            await store.aclose()

    asyncio.run(run())


async def scenario(authorizer: Authorizer, store: Any, redis_server: Any) -> None:
    async def at(path: str) -> Decision:
        return await authorizer.check(check_request_from_sample(request(path=path)), explain=True)

    assert (await at("/strict")).allowed
    assert (await at("/lenient")).allowed
    assert (await at("/fallback")).allowed  # one unit used in Redis
    assert redis_server.client().dbsize() == 3

    redis_server.kill()
    started = time.perf_counter()
    first = await at("/strict")
    assert time.perf_counter() - started < 0.5  # at most the store timeout, not Envoy's 500 ms
    assert (first.allowed, first.status, first.reason, first.rule) == (False, 503, "quota_store_unavailable",
                                                                       "quota:strict")  # fmt: skip
    started = time.perf_counter()
    for _ in range(20):
        assert (await at("/strict")).reason == "quota_store_unavailable"
    assert time.perf_counter() - started < 0.2  # the circuit is open: no waiting (20 checks)

    # allow: requests go through uncharged while Redis is away.
    assert all([(await at("/lenient")).allowed for _ in range(10)])
    # local: an in-process limiter with the same limit (it starts empty: this process's own count).
    local = [await at("/fallback") for _ in range(5)]
    assert [d.allowed for d in local] == [True, True, True, False, False]
    assert local[3].status == 429 and local[0].attributes["quota_store"] == "local"
    assert dict(local[0].client_headers)["ratelimit"] == '"fallback";r=2;t=1200'

    redis_server.start()  # empty: no persistence
    deadline = time.monotonic() + 5
    while store.circuit_open and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not store.circuit_open
    back = await at("/fallback")
    assert back.allowed and dict(back.client_headers)["ratelimit"] == '"fallback";r=2;t=1200'
    assert (await at("/strict")).allowed
    assert redis_server.client().dbsize() == 2


def test_only_a_redis_backed_check_waits_on_io(build: Build) -> None:
    from extauthz.stores import Store

    memory = build("- {name: q, limit: 1, window: 1m}")
    redis = build("- {name: q, limit: 1, window: 1m}", settings={"redis_url": "redis://127.0.0.1:1/0"})
    memory_check = memory.policy_set.policies[0].checks[-1]  # type: ignore[union-attr]
    redis_check = redis.policy_set.policies[0].checks[-1]  # type: ignore[union-attr]
    assert (memory_check.may_wait, redis_check.may_wait) == (False, True)
    assert memory.policy_set.policies[0].may_wait is False  # type: ignore[union-attr]
    assert isinstance(memory_check.store, Store) and isinstance(redis_check.store, Store)


# --- algorithm: sliding-log -------------------------------------------------------------------------

SLIDING = PER_KEY + "  algorithm: sliding-log\n"


def test_a_sliding_log_quota_admits_the_limit_then_says_when_the_oldest_leaves(build: Build) -> None:
    authorizer = build(SLIDING)
    first = decide(authorizer)
    # No burst to spend down: r is what is left of the limit, t when the window is empty again.
    assert headers(first) == {"ratelimit-policy": '"per-key";q=3;w=60', "ratelimit": '"per-key";r=2;t=60'}
    assert [decide(authorizer).allowed for _ in range(3)] == [True, True, False]
    refused = decide(authorizer)
    assert (refused.status, refused.reason, refused.rule) == (429, "quota_exceeded", "quota:per-key")
    assert headers(refused)["retry-after"] == "60"  # when the first of the three leaves the window
    assert "quota per-key (enforce, memory): counter" in "\n".join(refused.steps or ())
    assert decide(authorizer, request(headers={"x-api-key": "key-bob"})).allowed


def test_a_sliding_log_quota_in_redis_has_its_own_counter_names(build: Build, redis_server: Any) -> None:
    """Switching a quota's algorithm starts a fresh counter: the two are different kinds of Redis value."""
    authorizer = build(SLIDING, settings={"redis_url": redis_server.url})
    store = authorizer.policy_set.policies[0].checks[-1].store  # type: ignore[union-attr]

    async def run() -> list[bool]:
        await store.start()
        try:
            return [(await authorizer.check(check_request_from_sample(request()))).allowed for _ in range(4)]
        finally:
            await store.aclose()

    assert asyncio.run(run()) == [True, True, True, False]
    [key] = redis_server.client().keys("*")
    assert key.decode().startswith("extauthz:q:api:per-key:log:{")
    assert redis_server.client().llen(key) == 3  # one entry per admitted request


@pytest.mark.parametrize(("quota", "message"), [
    ("{name: q, limit: 3, window: 1m, algorithm: sliding-log, burst: 5}", "burst: applies to algorithm gcra only"),
    ("{name: q, limit: 100001, window: 1d, algorithm: sliding-log}", "limit: must be between 1 and 100000"),
    ("{name: q, limit: 3, window: 500us, algorithm: sliding-log}", "window: must be a duration"),
    ("{name: q, limit: 3, window: 0.0001, algorithm: sliding-log}", "window: must be at least 1ms"),
    ("{name: q, limit: 3, window: 1m, algorithm: leaky}", "algorithm: must be one of: gcra, sliding-log"),
])
def test_sliding_log_policy_errors(build: Build, quota: str, message: str) -> None:
    with pytest.raises(PolicySetError) as info:
        build(f"- {quota}")
    assert message in str(info.value)
