"""The decision pipeline: request view -> policy -> checks in phase order -> one Decision.

This is the single place where allow can happen, and it happens only when a policy was selected
and every one of its checks let the request through. Anything unexpected (an exception, a
timeout, no policy) is a denial.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from extauthz.api.envoy.service.auth.v3 import external_auth_pb2
from extauthz.context import CheckContext, Denial
from extauthz.policy.compiler import CompiledPolicy, PolicySet
from extauthz.request import BadRequest, Request, request_from_check

__all__ = ["Authorizer", "Decision", "DecisionObserver"]

log = logging.getLogger("extauthz.decision")


@dataclass(frozen=True, slots=True)
class Decision:
    """What was decided for one request, and why. Never holds a secret."""

    #: What Envoy is told: True lets the request through (dry-run policies always do).
    allowed: bool
    #: HTTP status: 200 on allow, the denial's status otherwise.
    status: int
    #: Stable reason code: "allowed", "no_policy", "denied_by_rule", "internal_error", ...
    reason: str
    message: str
    decision_id: str
    policy: str = ""
    rule: str = ""
    dry_run: bool = False
    #: In dry-run, True when enforcing would have denied.
    would_deny: bool = False
    request: Request | None = None
    identity: Mapping[str, Any] | None = None
    upstream_headers: tuple[tuple[str, str], ...] = ()
    remove_headers: tuple[str, ...] = ()
    client_headers: tuple[tuple[str, str], ...] = ()
    attributes: Mapping[str, Any] | None = None
    #: Seconds spent deciding.
    duration: float = 0.0
    steps: tuple[str, ...] | None = None


#: Called with every decision (decision log, metrics, tracing). Must not raise or block.
DecisionObserver = Callable[[Decision], None]


class _DecisionIds:
    """Cheap unique ids for requests Envoy did not give an x-request-id."""

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex()
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}-{next(self._counter):x}"


class Authorizer:
    """Holds the live policy set and turns CheckRequests into Decisions."""

    def __init__(self, policy_set: PolicySet | None = None, *, check_timeout: float = 1.0) -> None:
        self.policy_set = policy_set
        self.generation = 1 if policy_set is not None else 0
        self.check_timeout = check_timeout
        self.observers: list[DecisionObserver] = []
        self._ids = _DecisionIds()

    def swap(self, policy_set: PolicySet) -> None:
        """Atomically replace the live set: a Check uses exactly one set from start to end."""
        self.policy_set = policy_set
        self.generation += 1

    async def check(self, message: external_auth_pb2.CheckRequest, *, explain: bool = False) -> Decision:
        started = time.perf_counter()
        steps: list[str] | None = [] if explain else None
        try:
            decision = await self._decide(message, steps, started)
        except Exception:  # the last line of defence: nothing that breaks may allow
            log.exception("unexpected error while deciding")
            decision = Decision(False, 503, "internal_error", "authorization failed", self._ids.next(),
                                duration=time.perf_counter() - started)
        for observer in self.observers:
            try:
                observer(decision)
            except Exception:
                log.exception("decision observer failed")
        return decision

    async def _decide(
        self, message: external_auth_pb2.CheckRequest, steps: list[str] | None, started: float
    ) -> Decision:
        try:
            request = request_from_check(message)
        except BadRequest as exc:
            http = message.attributes.request.http
            if steps is not None:
                steps.append(f"bad request: {exc}")
            return Decision(False, 400, exc.reason, str(exc), http.id or self._ids.next(), steps=_frozen(steps),
                            duration=time.perf_counter() - started)
        decision_id = request.id or self._ids.next()
        policy_set = self.policy_set
        if policy_set is None:
            return Decision(False, 503, "not_ready", "no policy set loaded", decision_id, request=request,
                            duration=time.perf_counter() - started)
        policy = policy_set.select(request.host, request.path, request.method)
        if policy is None:
            if steps is not None:
                steps.append(f"no policy matches host={request.host!r} path={request.path!r} method={request.method}")
            return Decision(False, 403, "no_policy", "no policy applies to this request", decision_id,
                            request=request, steps=_frozen(steps), duration=time.perf_counter() - started)
        if steps is not None:
            steps.append(f"policy {policy.name} ({policy.file}) selected; checks: {', '.join(policy.check_names)}")
        ctx = CheckContext(request=request, policy=policy, steps=steps)
        denial = await self._run_checks(policy, ctx)
        return _decision(policy, ctx, denial, decision_id, started)

    async def _run_checks(self, policy: CompiledPolicy, ctx: CheckContext) -> Denial | None:
        try:
            if policy.may_wait:
                async with asyncio.timeout(self.check_timeout):
                    return await _run_all(policy, ctx)
            return await _run_all(policy, ctx)
        except TimeoutError:
            ctx.attributes["error"] = f"checks did not finish within {self.check_timeout}s"
            ctx.note("timeout -> deny")
            return Denial(503, "internal_error", "authorization timed out")
        except Exception as exc:
            log.exception("check failed in policy %s", policy.name)
            ctx.attributes["error"] = f"{type(exc).__name__}: {exc}"
            ctx.note(f"error: {type(exc).__name__} -> deny")
            return Denial(503, "internal_error", "authorization failed")


async def _run_all(policy: CompiledPolicy, ctx: CheckContext) -> Denial | None:
    for check in policy.checks:
        denial = await check.check(ctx)
        if denial is not None:
            return denial
    return None


def _frozen(steps: list[str] | None) -> tuple[str, ...] | None:
    return None if steps is None else tuple(steps)


def _decision(
    policy: CompiledPolicy, ctx: CheckContext, denial: Denial | None, decision_id: str, started: float
) -> Decision:
    common: dict[str, Any] = {
        "decision_id": decision_id,
        "policy": policy.name,
        "dry_run": policy.dry_run,
        "request": ctx.request,
        "identity": ctx.identity,
        "client_headers": tuple(ctx.client_headers),
        "attributes": ctx.attributes or None,
        "steps": _frozen(ctx.steps),
        "duration": time.perf_counter() - started,
    }
    if denial is None:
        return Decision(True, 200, "allowed", "", rule=ctx.rule,
                        upstream_headers=tuple(ctx.upstream_headers), remove_headers=tuple(ctx.remove_headers),
                        **common)
    if policy.dry_run:
        ctx.note(f"dry-run: would deny ({denial.reason}); allowing")
        common["steps"] = _frozen(ctx.steps)
        return Decision(True, 200, denial.reason, denial.message, rule=denial.rule or ctx.rule, would_deny=True,
                        **common)
    common["client_headers"] = (*common["client_headers"], *denial.headers)
    return Decision(False, denial.status, denial.reason, denial.message, rule=denial.rule or ctx.rule, **common)
