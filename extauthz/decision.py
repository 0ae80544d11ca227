"""The decision pipeline: request view -> policy -> checks in phase order -> one Decision.

This is the single place where allow can happen, and it happens only when a policy was selected
and every one of its checks let the request through. Anything unexpected (an exception, a
timeout, no policy) is a denial.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, NamedTuple, Protocol

from extauthz.api.envoy.service.auth.v3 import external_auth_pb2
from extauthz.context import CheckContext, Denial
from extauthz.deadlines import DeadlineWatch
from extauthz.policy.compiler import CompiledPolicy, PolicySet
from extauthz.request import BadRequest, HttpParts, Request, request_from_check, request_from_http

__all__ = ["Authorizer", "CheckTrace", "CheckTracer", "Decision", "DecisionObserver", "StageObserver"]

log = logging.getLogger("extauthz.decision")


class Decision(NamedTuple):
    """What was decided for one request, and why. Never holds a secret.

    Immutable; a NamedTuple rather than a frozen dataclass because one is built for every Check and
    a frozen dataclass of this size takes three times as long to build.
    """

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
    #: W3C trace and span id (hex) of the Check's span, when tracing is on.
    trace_id: str = ""
    span_id: str = ""


#: Called with every decision (decision log, metrics, tracing). Must not raise or block.
DecisionObserver = Callable[[Decision], None]
#: Called with (stage, seconds) as each stage of a Check ends: "parse", "select", then the phase of
#: every check that ran ("identity", "signature", "rules", "quota", "response"). Must be cheap.
StageObserver = Callable[[str, float], None]


class CheckTrace(Protocol):
    """The trace of one Check (extauthz.telemetry.tracing implements it)."""

    #: W3C trace id and the Check's span id, in hex: every Decision of the Check carries them.
    trace_hex: str
    span_hex: str
    #: Whether spans are recorded: when not, the pipeline skips the stage calls altogether.
    sampled: bool

    def stage(self, stage: str, check: str) -> Any:
        """Start the span of one stage; the result goes back to ``end_stage``."""

    def end_stage(self, handle: Any, denial: Denial | None, error: BaseException | None = None) -> None: ...

    def finish(self, decision: Decision) -> Decision:
        """End the Check's span with the decision's attributes; return it with trace and span id."""

    def abort(self) -> None:
        """End the span when the Check itself was cancelled."""


class CheckTracer(Protocol):
    def begin(self, message: external_auth_pb2.CheckRequest) -> CheckTrace:
        """Start the Check's span as a child of the trace context in the request's headers."""

    def begin_headers(self, headers: Mapping[str, str]) -> CheckTrace:
        """The same from the headers themselves (Envoy's HTTP mode: no CheckRequest)."""


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
        #: Per-stage durations (metrics); None keeps the pipeline free of timing calls.
        self.stage_observer: StageObserver | None = None
        #: Stage durations are recorded for one Check in this many: the distribution keeps its shape
        #: and the other Checks pay nothing for it.
        self.stage_sample_every = 8
        self._stage_countdown = 0
        #: Tracing; None (not configured) means no span work at all.
        self.tracer: CheckTracer | None = None
        self._ids = _DecisionIds()
        self._deadlines = DeadlineWatch()

    def swap(self, policy_set: PolicySet) -> None:
        """Atomically replace the live set: a Check uses exactly one set from start to end."""
        self.policy_set = policy_set
        self.generation += 1

    async def check(self, message: external_auth_pb2.CheckRequest, *, explain: bool = False) -> Decision:
        trace = self.tracer.begin(message) if self.tracer is not None else None
        return await self._checked(message, explain, trace)

    def check_http(self, parts: HttpParts, path_prefix: str = "", *,
                   explain: bool = False) -> Coroutine[Any, Any, Decision]:
        """The same pipeline for a request of Envoy's HTTP ext_authz protocol (extauthz.wire.http_authz):
        await it. A plain function returning the coroutine: one coroutine less per request."""
        trace = self.tracer.begin_headers(parts.headers) if self.tracer is not None else None
        return self._checked((parts, path_prefix), explain, trace)

    async def _checked(self, message: external_auth_pb2.CheckRequest | tuple[HttpParts, str], explain: bool,
                       trace: CheckTrace | None) -> Decision:
        started = time.perf_counter()
        steps: list[str] | None = [] if explain else None
        try:
            decision = await self._decide(message, steps, started, trace)
        except Exception:  # the last line of defence: nothing that breaks may allow
            log.exception("unexpected error while deciding")
            decision = Decision(False, 503, "internal_error", "authorization failed", self._ids.next(),
                                duration=time.perf_counter() - started)
        except BaseException:
            if trace is not None:
                trace.abort()
            raise
        if trace is not None:
            decision = trace.finish(decision)
        self.notify(decision)
        return decision

    def notify(self, decision: Decision) -> None:
        """Hand a decision to the observers (metrics, decision log); one that fails is logged."""
        for observer in self.observers:
            try:
                observer(decision)
            except Exception:
                log.exception("decision observer failed")

    async def _decide(
        self, message: external_auth_pb2.CheckRequest | tuple[HttpParts, str], steps: list[str] | None,
        started: float, trace: CheckTrace | None = None,
    ) -> Decision:
        stages = self._stages_for_this_check()
        try:
            if type(message) is tuple:
                request = request_from_http(*message)
            else:
                request = request_from_check(message)  # type: ignore[arg-type]
        except BadRequest as exc:
            if type(message) is tuple:
                failed_id = message[0].headers.get("x-request-id", "")
            else:
                failed_id = message.attributes.request.http.id  # type: ignore[union-attr]
            if steps is not None:
                steps.append(f"bad request: {exc}")
            return Decision(False, exc.status, exc.reason, str(exc), failed_id or self._ids.next(),
                            steps=_frozen(steps), duration=time.perf_counter() - started)
        if stages is not None:
            parsed = time.perf_counter()
            stages("parse", parsed - started)
        # x-request-id is what Envoy's access logs and the upstream see; http.id is only a stream id.
        decision_id = request.headers.get("x-request-id") or request.id or self._ids.next()
        policy_set = self.policy_set
        if policy_set is None:
            return Decision(False, 503, "not_ready", "no policy set loaded", decision_id, request=request,
                            duration=time.perf_counter() - started)
        spans = trace if trace is not None and trace.sampled else None  # an unsampled trace records no stage
        if spans is None:
            policy, layers = policy_set.selection(request.host, request.path, request.method)
        else:
            span = spans.stage("select", "")
            policy, layers = policy_set.selection(request.host, request.path, request.method)
            spans.end_stage(span, None)
        if stages is not None:
            stages("select", time.perf_counter() - parsed)
        if steps is not None:
            _explain_selection(policy_set, request, policy, layers, steps)
        if layers:
            return await self._decide_layered(policy_set, policy, layers, request, decision_id, steps, started,
                                              trace, spans, stages)
        if policy is None:
            return Decision(False, 403, "no_policy", "no policy applies to this request", decision_id,
                            request=request, steps=_frozen(steps), duration=time.perf_counter() - started)
        ctx = CheckContext(request=request, policy=policy, steps=steps)
        denial = await self._run_checks(policy, ctx, trace=spans, stages=stages)
        return _decision(policy, ctx, denial, decision_id, started, trace, policy_set.foreign_headers)

    async def _decide_layered(
        self, policy_set: PolicySet, policy: CompiledPolicy | None, layers: tuple[CompiledPolicy, ...],
        request: Request, decision_id: str, steps: list[str] | None, started: float,
        trace: CheckTrace | None, spans: CheckTrace | None, stages: StageObserver | None,
    ) -> Decision:
        """Run the request's layers in order, then its deciding policy: one context, one deadline."""
        ctx = CheckContext(request=request, policy=layers[0], steps=steps)
        chain = (*layers, policy) if policy is not None else layers
        may_wait = False
        for member in chain:
            may_wait = may_wait or member.may_wait
        denial = await self._run_checks(_chain_work(chain, ctx, spans, stages), ctx, may_wait=may_wait)
        decided = ctx.policy
        if decided is None or (decided.layer and denial is None):  # every layer handed the request on
            ctx.note("no deciding policy matches -> deny")
            return Decision(False, 403, "no_policy", "no policy applies to this request", decision_id,
                            request=request, identity=ctx.identity, attributes=ctx.attributes or None,
                            steps=_frozen(steps), duration=time.perf_counter() - started)
        if decided.layer and decided.dry_run:  # it timed out, or refused a malformed request: deny
            decided = dataclasses.replace(decided, dry_run=False)
        foreign = policy_set.foreign_headers
        ran = [layer for layer in layers if layer.owned_headers]
        if ran and not decided.layer:  # what a layer that ran set (or removed) is its own, not foreign
            owned = {name for layer in ran for name in layer.owned_headers}
            foreign = {decided.name: tuple(n for n in foreign.get(decided.name, ()) if n not in owned)}
        return _decision(decided, ctx, denial, decision_id, started, trace, foreign)

    def _stages_for_this_check(self) -> StageObserver | None:
        if self.stage_observer is None:
            return None
        self._stage_countdown -= 1
        if self._stage_countdown > 0:
            return None
        self._stage_countdown = self.stage_sample_every
        return self.stage_observer

    async def _run_checks(
        self, work: CompiledPolicy | Coroutine[Any, Any, Denial | None], ctx: CheckContext, *,
        may_wait: bool = False, trace: CheckTrace | None = None, stages: StageObserver | None = None,
    ) -> Denial | None:
        """Run one policy's checks (or a prepared chain of them) under the Check's deadline when any
        may wait; an exception or a timeout is a 503 denial of the policy that was running."""
        if isinstance(work, CompiledPolicy):
            policy = work
            may_wait = policy.may_wait
            work = _run_all(policy, ctx) if trace is None and stages is None else _run_observed(policy, ctx, trace,
                                                                                                stages)
        try:
            if may_wait:
                return await self._deadlines.run(work, self.check_timeout)
            return await work
        except TimeoutError:
            ctx.attributes["error"] = f"checks did not finish within {self.check_timeout}s"
            ctx.note("timeout -> deny")
            return Denial(503, "internal_error", "authorization timed out")
        except Exception as exc:
            log.exception("check failed in policy %s", ctx.policy.name if ctx.policy is not None else "?")
            # The type only: an exception's text may quote request data (the traceback above is
            # the operator's, in the sidecar's own log).
            ctx.attributes["error"] = type(exc).__name__
            ctx.note(f"error: {type(exc).__name__} -> deny")
            return Denial(503, "internal_error", "authorization failed")


async def _chain_work(
    chain: tuple[CompiledPolicy, ...], ctx: CheckContext, trace: CheckTrace | None, stages: StageObserver | None,
) -> Denial | None:
    """Layers then the deciding policy. A layer's denial ends the chain (``ctx.policy`` says whose),
    unless the layer is in dry-run: then what it would have done is recorded, the headers it owns
    are kept from the upstream (its checks may not have set them), and the request goes on."""
    outcomes: list[str] = []
    denial: Denial | None = None
    for policy in chain:
        ctx.policy = policy
        ctx.rule = ""
        try:
            if trace is None and stages is None:
                denial = None
                for check in policy.checks:  # _run_all, inlined: one coroutine less per policy
                    denial = await check.check(ctx)
                    if denial is not None:
                        break
            else:
                denial = await _run_observed(policy, ctx, trace, stages)
        except Exception as exc:
            if not (policy.layer and policy.dry_run):
                raise  # the Check's own handler denies 503 for the policy in ctx.policy
            log.exception("check failed in dry-run layer %s", policy.name)
            ctx.attributes["error"] = type(exc).__name__
            denial = Denial(503, "internal_error", "authorization failed")
        if not policy.layer:
            break
        if denial is None:
            outcomes.append(f"{policy.name}:pass")
            if ctx.steps is not None:  # explain only: no formatting on the serving path
                ctx.note(f"layer {policy.name}: pass")
            continue
        if not policy.dry_run or denial.malformed:
            outcomes.append(f"{policy.name}:deny")
            ctx.note(f"layer {policy.name}: deny ({denial.reason}); final")
            break
        outcomes.append(f"{policy.name}:would_deny")
        ctx.note(f"layer {policy.name}: dry-run, would deny ({denial.reason}); going on without its headers")
        ctx.remove_headers.extend(_kept_from_upstream(policy, ctx.request))
        ctx.attributes.setdefault("layer_would_deny", []).append(f"{policy.name}:{denial.reason}")
        denial = None
    ctx.attributes["layers"] = outcomes
    return denial


async def _run_observed(
    policy: CompiledPolicy, ctx: CheckContext, trace: CheckTrace | None, stages: StageObserver | None
) -> Denial | None:
    """_run_all with a span and/or a duration per check."""
    for check, name in zip(policy.checks, policy.check_names, strict=True):
        stage = _stage_of(name)
        span = trace.stage(stage, name) if trace is not None else None
        if stages is None:
            try:
                denial = await check.check(ctx)
            except BaseException as exc:
                trace.end_stage(span, None, exc)  # type: ignore[union-attr]  # traced when not timed
                raise
        else:
            began = time.perf_counter()
            try:
                denial = await check.check(ctx)
            except BaseException as exc:
                if trace is not None:
                    trace.end_stage(span, None, exc)
                raise
            stages(stage, time.perf_counter() - began)
        if trace is not None:
            trace.end_stage(span, denial)
        if denial is not None:
            return denial
    return None


async def _run_all(policy: CompiledPolicy, ctx: CheckContext) -> Denial | None:
    for check in policy.checks:
        denial = await check.check(ctx)
        if denial is not None:
            return denial
    return None


_STAGES: dict[str, str] = {}


def _stage_of(section: str) -> str:
    """The stage (phase name, lower-case) of a check kind: a bounded label for metrics and spans."""
    stage = _STAGES.get(section)
    if stage is None:
        from extauthz.checks import kinds

        kind = kinds().get(section)
        stage = _STAGES[section] = kind.phase.name.lower() if kind is not None else section
    return stage


def _frozen(steps: list[str] | None) -> tuple[str, ...] | None:
    return None if steps is None else tuple(steps)


def _decision(
    policy: CompiledPolicy, ctx: CheckContext, denial: Denial | None, decision_id: str, started: float,
    trace: CheckTrace | None = None, foreign_headers: Mapping[str, tuple[str, ...]] | None = None,
) -> Decision:
    # Trace ids are set here rather than by the trace afterwards: changing a Decision costs a copy.
    trace_id, span_id = (trace.trace_hex, trace.span_hex) if trace is not None else ("", "")
    # Headers other policies set: never from the client (see PolicySet.foreign_headers).
    foreign = foreign_headers.get(policy.name, ()) if foreign_headers else ()
    if denial is None:  # the common case, positional in field order: keyword binding costs more
        removed = (*ctx.remove_headers, *foreign) if foreign else tuple(ctx.remove_headers)
        return Decision(True, 200, "allowed", "", decision_id, policy.name, ctx.rule, policy.dry_run, False,
                        ctx.request, ctx.identity, tuple(ctx.upstream_headers), removed,
                        tuple(ctx.client_headers), ctx.attributes or None, time.perf_counter() - started,
                        _frozen(ctx.steps), trace_id, span_id)  # fmt: skip
    common: dict[str, Any] = {
        "trace_id": trace_id,
        "span_id": span_id,
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
    if denial.malformed and policy.dry_run:
        ctx.note(f"dry-run, but the request is malformed ({denial.reason}): denied")
        common["steps"] = _frozen(ctx.steps)
        common["dry_run"] = False
    elif policy.dry_run:
        ctx.note(f"dry-run: would deny ({denial.reason}); allowing without the headers the policy owns")
        common["steps"] = _frozen(ctx.steps)
        # The checks that set or strip the policy's headers may not have run: strip its response
        # headers and the credentials it keeps from the upstream, so no client's own x-user gets by.
        removed = tuple(dict.fromkeys((*ctx.remove_headers, *_kept_from_upstream(policy, ctx.request), *foreign)))
        return Decision(True, 200, denial.reason, denial.message, rule=denial.rule or ctx.rule, would_deny=True,
                        remove_headers=removed, **common)
    common["client_headers"] = (*common["client_headers"], *denial.headers)
    return Decision(False, denial.status, denial.reason, denial.message, rule=denial.rule or ctx.rule, **common)


def _kept_from_upstream(policy: CompiledPolicy, request: Request) -> tuple[str, ...]:
    """What a dry-run policy that would deny keeps from the upstream: the headers it owns and the
    credentials of its own the request presented (its checks may not have set or stripped them)."""
    presented = (c.name for c in policy.owned_credentials if c.presented_in(request))
    return (*policy.owned_headers, *presented)


def _explain_selection(
    policy_set: PolicySet, request: Request, policy: CompiledPolicy | None, layers: tuple[CompiledPolicy, ...],
    steps: list[str],
) -> None:
    """explain: the layers that will run, the deciding policy, and who lost on specificity and why."""
    for layer in layers:
        mode = ", dry-run" if layer.dry_run else ""
        steps.append(f"layer {layer.name} ({layer.file}, order {layer.order}{mode}) matches; checks: "
                     f"{', '.join(layer.check_names) or 'none'}")
    if policy is None:
        steps.append(f"no deciding policy matches host={request.host!r} path={request.path!r} "
                     f"method={request.method}")
        return
    steps.append(f"policy {policy.name} ({policy.file}) selected; checks: {', '.join(policy.check_names)}")
    _, losses = policy_set.router.explain(request.host, request.path, request.method)
    for loss in losses:
        steps.append(f"policy {loss.route.target.name} also matches ({loss.route.describe()}) but loses: {loss.why}")
