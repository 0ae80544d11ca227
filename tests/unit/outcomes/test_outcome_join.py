"""The join of outcomes to decisions: once, bounded in count and age, safe against a bad callback."""

from __future__ import annotations

from extauthz.outcomes import Outcome, OutcomeJoin, outcomes_for
from extauthz.policy.build import Services


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_outcome_is_delivered_once_to_every_waiter() -> None:
    join = OutcomeJoin()
    seen: list[tuple[str, Outcome]] = []
    join.expect("r1", lambda o: seen.append(("a", o)))
    join.expect("r1", lambda o: seen.append(("b", o)))
    assert "r1" in join and len(join) == 1
    outcome = Outcome("r1", 401)
    assert join.deliver(outcome) is True
    assert seen == [("a", outcome), ("b", outcome)]
    assert join.deliver(outcome) is False and "r1" not in join
    assert join.delivered == 1


def test_nobody_waiting_and_empty_ids() -> None:
    join = OutcomeJoin()
    assert join.deliver(Outcome("unknown", 200)) is False
    join.expect("", lambda o: None)
    assert len(join) == 0


def test_disabled_join_keeps_nothing() -> None:
    join = OutcomeJoin(enabled=False)
    join.expect("r1", lambda o: None)
    assert len(join) == 0 and join.deliver(Outcome("r1", 200)) is False


def test_capacity_drops_the_oldest() -> None:
    join = OutcomeJoin(capacity=3)
    for i in range(5):
        join.expect(f"r{i}", lambda o: None)
    assert len(join) == 3 and "r0" not in join and "r1" not in join and "r4" in join
    assert join.dropped == 2


def test_late_outcomes_are_dropped_and_expire_sweeps() -> None:
    clock = Clock()
    join = OutcomeJoin(ttl=10, clock=clock)
    seen: list[Outcome] = []
    join.expect("old", seen.append)
    clock.now += 11
    assert join.deliver(Outcome("old", 401)) is False and seen == []
    assert join.dropped == 1
    join.expect("a", seen.append)
    join.expect("b", seen.append)
    clock.now += 5
    join.expect("c", seen.append)
    clock.now += 6  # a and b are past their deadline, c is not
    join.expire()
    assert "a" not in join and "b" not in join and "c" in join
    assert join.dropped == 3


def test_a_failing_callback_does_not_stop_the_others() -> None:
    join = OutcomeJoin()
    seen: list[Outcome] = []

    def broken(outcome: Outcome) -> None:
        raise RuntimeError("detector bug")

    join.expect("r1", broken)
    join.expect("r1", seen.append)
    assert join.deliver(Outcome("r1", 404)) is True
    assert [o.status for o in seen] == [404]


def test_by_authz_tells_our_denials_from_the_upstreams_answers() -> None:
    assert Outcome("r", 403, "UAEX").by_authz
    assert Outcome("r", 503, "UF,UAEX").by_authz
    assert not Outcome("r", 401).by_authz
    assert not Outcome("r", 503, "UF,URX").by_authz


def test_one_join_per_services_follows_the_access_logs_setting() -> None:
    services = Services(settings={"access_logs": False})
    join = outcomes_for(services)
    assert join is outcomes_for(services) and not join.enabled
    assert outcomes_for(Services(settings={})).enabled


def test_a_reused_request_id_cannot_grow_the_join() -> None:
    """A caller that sends its own x-request-id on every request (a proxy that keeps it) must not
    hold more than a few callbacks under that id, whatever the join's capacity."""
    from extauthz.outcomes._join import CALLBACKS_PER_REQUEST

    join = OutcomeJoin(capacity=10)
    seen: list[int] = []
    for i in range(10_000):
        join.expect("same", lambda o, i=i: seen.append(i))
    assert join.dropped == 10_000 - CALLBACKS_PER_REQUEST
    assert join.deliver(Outcome("same", 401)) is True
    assert seen == list(range(CALLBACKS_PER_REQUEST))
