"""Running PolicyTest cases: each request decided by the same pipeline the sidecar runs.

State the sidecar keeps between requests (quota counters, the nonces and deliveries a signature
check has seen) lives in one in-process store here. The cases of one PolicyTest document share it,
in order, so a case can exhaust a quota that the next one is refused by; it is emptied before each
document, so documents never see each other's counters. The clock is the document's
``spec.clock`` when it gives one (moved on by a case's ``advance``), and the quota store counts on
that clock too: a quota exhausted at a fixed time stays exhausted until a case advances it.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from extauthz import clock
from extauthz.decision import Authorizer, Decision
from extauthz.policy import PolicySet, PolicySetError, Services, load_folder
from extauthz.policytest.model import Expectation, TestCase, TestSuite, check_tests, compile_suites, substitute
from extauthz.samples import SampleError, check_request_from_sample
from extauthz.stores.memory import MemoryStore

__all__ = ["CaseResult", "describe", "load_for_tests", "run_suites"]

#: Chooses the cases to report (``extauthz test -k``): every case of a chosen case's document still
#: runs, since the cases of a document share their state.
Selector = Callable[[TestSuite, TestCase], bool]


@dataclass(frozen=True, slots=True)
class CaseResult:
    suite: TestSuite
    case: TestCase
    #: The decision, as ``explain`` shows it (steps included); None when the request could not be built.
    decision: Decision | None
    #: What differs from the expectation; empty when the case passed.
    problems: tuple[str, ...]
    #: The fixed time the case ran at (None: the real clock).
    at: float | None

    @property
    def passed(self) -> bool:
        return not self.problems


def load_for_tests(folder: Path) -> tuple[PolicySet, list[TestSuite], MemoryStore]:
    """The folder's policies, its PolicyTest suites, and the store their cases share.

    Raises PolicySetError listing every problem of the policies and the tests together.
    """
    store = MemoryStore(clock=clock.wall_us)
    # Offline: no store is asked (a revocation set is skipped: the policy is tested, not Redis).
    services = Services(settings={"offline": True, "check_tests": check_tests})
    services.shared(("store", "memory"), lambda: store)  # the quota store counts on the test clock
    policy_set = load_folder(folder, services)
    suites, errors = compile_suites(policy_set.tests, folder)
    if errors:  # cannot happen: load_folder reported them (check_tests)
        raise PolicySetError(errors)
    return policy_set, suites, store


def run_suites(policy_set: PolicySet, suites: Sequence[TestSuite], store: MemoryStore,
               selected: Selector | None = None) -> list[CaseResult]:  # fmt: skip
    """Run the suites in order; the results of the selected cases (all by default)."""
    try:
        return asyncio.run(_run(policy_set, suites, store, selected))
    finally:
        clock.set_fixed(None)


async def _run(policy_set: PolicySet, suites: Sequence[TestSuite], store: MemoryStore,
               selected: Selector | None) -> list[CaseResult]:  # fmt: skip
    authorizer = Authorizer(policy_set)
    results: list[CaseResult] = []
    for suite in suites:
        if selected is not None and not any(selected(suite, case) for case in suite.cases):
            continue
        store.clear()
        clock.set_fixed(suite.clock)
        tokens = {token.name: token.sign(clock.wall()) for token in suite.tokens}
        for case in suite.cases:
            if case.advance:
                clock.set_fixed(clock.wall() + case.advance)
            result = await _run_case(authorizer, suite, case, tokens)
            if selected is None or selected(suite, case):
                results.append(result)
    return results


async def _run_case(authorizer: Authorizer, suite: TestSuite, case: TestCase, tokens: Mapping[str, str]) -> CaseResult:
    at = clock.wall() if suite.clock is not None else None
    try:
        message = check_request_from_sample(substitute(case.request, tokens))
    except (SampleError, ValueError, TypeError) as exc:
        return CaseResult(suite, case, None, (f"bad request: {exc}",), at)
    decision = await authorizer.check(message, explain=True)
    return CaseResult(suite, case, decision, tuple(problems(case.expect, decision)), at)


def _values(headers: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name, value in headers:
        found.setdefault(name.lower(), []).append(value)
    return found


def outcome(decision: Decision) -> str:
    """allow or deny, as a case's ``decision`` means it (a dry-run would-deny is a deny)."""
    return "allow" if decision.allowed and not decision.would_deny else "deny"


def problems(expect: Expectation, decision: Decision) -> list[str]:
    """Every way ``decision`` differs from ``expect``."""
    compared = (
        ("decision", expect.decision, outcome(decision)),
        ("status", expect.status, decision.status),
        ("reason", expect.reason, decision.reason),
        ("policy", expect.policy, decision.policy),
        ("rule", expect.rule, decision.rule),
        ("message", expect.message, decision.message),
    )
    found = [f"{name}: expected {want!r}, got {got!r}" for name, want, got in compared
             if want is not None and want != got]
    upstream = _values(decision.upstream_headers)
    for header in expect.upstream:
        problem = header.problem(upstream.get(header.name, ()))
        if problem is not None:
            found.append(f"upstream header {header.name}: {problem}")
    for name in expect.removed:
        if name not in decision.remove_headers:
            found.append(f"upstream header {name}: expected to be removed")
    response = _values(decision.client_headers)
    for header in expect.response:
        problem = header.problem(response.get(header.name, ()))
        if problem is not None:
            found.append(f"response header {header.name}: {problem}")
    return found


def _utc(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat(timespec="milliseconds" if seconds % 1 else "seconds").replace("+00:00", "Z")


def describe(result: CaseResult, *, verbose: bool = False) -> list[str]:
    """The lines ``extauthz test`` prints for a case: one when it passed (unless verbose), else
    what differs, then the request, the decision, the steps and the headers."""
    suite, case, decision = result.suite, result.case, result.decision
    lines = [f"{'PASS' if result.passed else 'FAIL'} {suite.file}:{case.line} {suite.name}: {case.name}"]
    if result.passed and not verbose:
        return lines
    pad = "     "
    lines += [pad + problem for problem in result.problems]
    request = case.request
    lines.append(f"{pad}request: {request.get('method', 'GET')} {request.get('host', '')} {request.get('path', '/')}")
    if result.at is not None:
        lines.append(f"{pad}clock:   {_utc(result.at)}")
    if decision is None:
        return lines
    verdict = outcome(decision)
    if decision.would_deny:
        verdict = "deny (dry-run: let through)"
    lines.append(f"{pad}decided: {verdict} {decision.status} {decision.reason}, policy {decision.policy or '-'}, "
                 f"rule {decision.rule or '-'}")  # fmt: skip
    if decision.message:
        lines.append(f"{pad}message: {decision.message}")
    if decision.steps:
        lines.append(f"{pad}steps:")
        lines += [f"{pad}  - {step}" for step in decision.steps]
    lines += [f"{pad}upstream header set: {name}: {value}" for name, value in decision.upstream_headers]
    lines += [f"{pad}upstream header removed: {name}" for name in decision.remove_headers]
    lines += [f"{pad}response header: {name}: {value}" for name, value in decision.client_headers]
    return lines
