"""The in-memory store: GCRA semantics on a controlled clock, all-or-nothing charging, bounds."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extauthz.stores import Charge
from extauthz.stores.memory import MemoryStore, gcra_step

SECOND = 1_000_000


class Clock:
    def __init__(self, now: int = 10 * SECOND) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def per(limit: int, window_s: float, burst: int | None = None, key: str = "k", cost: int = 1,
        enforce: bool = True) -> Charge:  # fmt: skip
    interval = -(-int(window_s * SECOND) // limit)  # rounded up, as the quota check does
    return Charge(key, interval, burst or limit, cost, enforce)


def charge(store: MemoryStore, *charges: Charge):  # type: ignore[no-untyped-def]
    return asyncio.run(store.charge(list(charges)))


def test_an_idle_client_gets_its_burst_at_once_then_the_steady_rate() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    quota = per(10, 1.0)  # 10/s, burst 10
    allowed = [charge(store, quota)[0].allowed for _ in range(12)]
    assert allowed == [True] * 10 + [False] * 2
    clock.now += 99_999
    assert not charge(store, quota)[0].allowed
    clock.now += 1  # exactly one interval later: one more unit
    assert charge(store, quota)[0].allowed
    assert not charge(store, quota)[0].allowed


def test_remaining_retry_after_and_reset_are_exact() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    quota = per(4, 2.0)  # one unit every 0.5 s
    first = charge(store, quota)[0]
    assert (first.allowed, first.remaining, first.retry_after, first.reset_after) == (True, 3, 0.0, 0.5)
    for _ in range(3):
        charge(store, quota)
    refused = charge(store, quota)[0]
    assert (refused.allowed, refused.remaining, refused.retry_after, refused.reset_after) == (False, 0, 0.5, 2.0)
    clock.now += 1_250_000
    later = charge(store, quota)[0]
    assert (later.allowed, later.remaining) == (True, 1)


def test_cost_is_charged_in_units_and_zero_cost_only_reads() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    assert charge(store, per(10, 1.0, cost=7))[0].remaining == 3
    peek = charge(store, per(10, 1.0, cost=0))[0]
    assert (peek.allowed, peek.remaining) == (True, 3)
    refused = charge(store, per(10, 1.0, cost=4))[0]
    assert (refused.allowed, refused.remaining) == (False, 3)
    assert refused.retry_after == pytest.approx(0.1)


def test_a_refused_request_charges_none_of_its_quotas() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    user = per(100, 1.0, key="user")
    tight = per(1, 60.0, key="tight")
    assert [r.allowed for r in charge(store, user, tight)] == [True, True]
    results = charge(store, user, tight)
    assert [r.allowed for r in results] == [True, False]
    # The user quota had room but was not charged: still 99 left.
    assert results[0].remaining == 99
    assert charge(store, user)[0].remaining == 98


def test_shadow_quotas_are_charged_when_they_have_room_but_never_refuse() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    enforced = per(100, 1.0, key="enforced")
    shadow = per(2, 60.0, key="shadow", enforce=False)
    outcomes = [charge(store, enforced, shadow) for _ in range(4)]
    assert [r[0].allowed for r in outcomes] == [True] * 4
    assert [r[1].allowed for r in outcomes] == [True, True, False, False]
    assert outcomes[-1][0].remaining == 96  # the enforced quota was charged every time


def test_no_fixed_window_boundary_doubling() -> None:
    """A fixed window lets `limit` through just before a boundary and `limit` just after; GCRA does not."""
    clock = Clock(60 * SECOND - 1000)
    store = MemoryStore(clock=clock)
    quota = per(100, 60.0, burst=100)
    before = sum(charge(store, quota)[0].allowed for _ in range(150))
    clock.now += 2000  # "a new minute"
    after = sum(charge(store, quota)[0].allowed for _ in range(150))
    assert (before, after) == (100, 0)


def test_expired_counters_are_swept_and_the_table_is_bounded() -> None:
    clock = Clock()
    store = MemoryStore(max_keys=50, clock=clock)
    for i in range(40):
        charge(store, per(10, 1.0, key=f"k{i}"))
    assert store.counters() == 40
    clock.now += 5 * SECOND  # every counter is full again
    for i in range(20):
        charge(store, per(10, 1.0, key=f"new{i}"))
    assert store.counters() < 40
    for i in range(200):
        charge(store, per(10, 60.0, key=f"live{i}"))
    assert store.counters() == 50
    assert store.evicted > 0


def test_the_step_function_is_the_documented_arithmetic() -> None:
    step = gcra_step(tat=0, now=1000, interval=100, burst=3, cost=1)
    assert step == (True, 1100, 2, 0, 100)
    step = gcra_step(tat=1300, now=1000, interval=100, burst=3, cost=1)
    assert step == (False, 1300, 0, 100, 300)
    # A burst lowered by a policy change never reports negative room.
    assert gcra_step(tat=5000, now=1000, interval=100, burst=3, cost=1).remaining == 0


@settings(max_examples=150, deadline=None)
@given(
    limit=st.integers(1, 20),
    burst=st.integers(1, 20),
    gaps=st.lists(st.integers(0, 400_000), min_size=1, max_size=250),
    costs=st.lists(st.integers(0, 3), min_size=1, max_size=250),
)
def test_never_more_than_limit_plus_burst_in_any_window(limit: int, burst: int, gaps: list[int],
                                                        costs: list[int]) -> None:  # fmt: skip
    """Whatever the arrival pattern: admitted units in any window-length interval <= limit + burst - 1,
    and over the whole run <= burst + elapsed / interval (the sustained rate)."""
    window = SECOND
    clock = Clock(0)
    store = MemoryStore(clock=clock)
    interval = -(-window // limit)
    admitted: list[tuple[int, int]] = []
    for i, gap in enumerate(gaps):
        clock.now += gap
        cost = costs[i % len(costs)]
        result = store.charge_now([Charge("k", interval, burst, cost)])[0]
        if result.allowed and cost:
            admitted.append((clock.now, cost))
    for start, _ in admitted:
        in_window = sum(c for t, c in admitted if start <= t < start + window)
        assert in_window <= burst + (window - 1) // interval <= limit + burst - 1
    if admitted:
        first = admitted[0][0]
        total = sum(c for _, c in admitted)
        assert total <= burst + (clock.now - first) // interval


def test_a_saturating_client_gets_exactly_burst_plus_the_rate() -> None:
    clock = Clock(0)
    store = MemoryStore(clock=clock)
    quota = per(100, 1.0, burst=20)  # one every 10 ms
    admitted = 0
    for _ in range(3000):  # one attempt per millisecond for 3 s
        admitted += charge(store, quota)[0].allowed
        clock.now += 1000
    assert admitted == 20 + 299  # the burst, then one per 10 ms until t = 2.999 s


def _reference_charge(tats: dict[str, int], now: int, charges: list[Charge]) -> list[tuple]:
    """All-or-nothing charging spelled out with gcra_step: what charge_now must answer."""
    steps = [gcra_step(tats.get(c.key, 0), now, c.interval_us, c.burst, c.cost) for c in charges]
    admitted = all(step.allowed for step, c in zip(steps, charges, strict=True) if c.enforce)
    results = []
    for step, c in zip(steps, charges, strict=True):
        if admitted and step.allowed:
            if c.cost:
                tats[c.key] = step.tat
            results.append((True, step.remaining, 0.0, step.reset_us / 1e6))
        elif not step.allowed:
            results.append((False, step.remaining, step.retry_us / 1e6, step.reset_us / 1e6))
        else:  # had room, refused by another counter: nothing charged, the cost still available
            results.append((True, step.remaining + c.cost, 0.0, (step.tat - c.cost * c.interval_us - now) / 1e6))
    return results


@given(st.lists(st.tuples(
    st.integers(0, 3 * SECOND),  # time since the previous request
    st.lists(st.tuples(st.sampled_from("abc"), st.integers(1, 50_000), st.integers(1, 5), st.integers(0, 4),
                       st.booleans()), min_size=1, max_size=3),
), max_size=40))  # fmt: skip
@settings(max_examples=150, deadline=None)
def test_charge_now_answers_as_the_step_function_says(requests: list) -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    tats: dict[str, int] = {}
    for gap, specs in requests:
        clock.now += gap
        charges = [Charge(key, interval, burst, cost, enforce) for key, interval, burst, cost, enforce in specs]
        assert [tuple(r) for r in store.charge_now(charges)] == _reference_charge(tats, clock.now, charges)


def test_remembered_keys_stay_within_the_bound() -> None:
    # Nonces and webhook replay keys: live ones beyond the bound push out the older half.
    store = MemoryStore(max_keys=20)
    for i in range(100):
        assert asyncio.run(store.remember_once(f"nonce-{i}", 60.0)) is True
    assert len(store._seen) <= 20
    assert asyncio.run(store.remember_once("nonce-99", 60.0)) is False  # the newest are still known
