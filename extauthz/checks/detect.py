"""Abuse detectors (``spec.detect``): brute force, enumeration and spikes, with log, throttle and block.

Each item of ``spec.detect`` is one detector (see :mod:`extauthz.detection`)::

    detect:
      - name: password-guessing
        failures: {identity: true, upstream: [401, 403]}   # what a failure is
        by: client_ip                                       # client_ip | username | subject, or key: <CEL>
        threshold: 10                                       # 10 failures within the window trip it
        window: 10m
        action: {block: {duration: 15m, status: 429, escalation: 2, maxDuration: 24h}}
      - name: order-walking
        distinct: {pathSegment: 2}                          # or value: <CEL>; statuses: [404] counts responses
        by: subject
        threshold: 50                                       # the 51st distinct id within the window trips it
        window: 5m
        action: {block: {duration: 10m, status: 403}}
      - name: sudden-burst
        spike: {interval: 1m, baseline: 30, warmup: 10, minCount: 60, factor: 5}
        by: subject
        action: {throttle: {limit: 60, window: 1m, duration: 15m}}

The check runs after the rules (Phase.DETECT): every detector whose key the request has looks the
key's block up, and where ``when`` holds the counting ones (distinct values, spikes) count the
request, all in one store call. Failed authentications are counted where they happen: the policy's
identity check is watched (see :class:`~extauthz.checks.ObservedCheck`), so a rejected credential is
counted and, when its key is blocked, refused with the block instead of a 401 (a blocked client
learns nothing from its guesses); a client address known to be blocked is refused before the
identity check runs (``refuse_early``). The upstream's answers come from Envoy's access logs
through :mod:`extauthz.outcomes`.

With Redis, blocks and counters are shared by every replica. When the policy has quotas too, the
check leaves its ops on the context (``ctx.pending``) and the quota check carries them in its own
script call: one command, one round trip for both (a blocked request is refused with the block
even though its quota was charged). ``onStoreError`` says what a Redis failure does: deny (the
default), local (this replica's in-process state) or allow.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from extauthz import clock
from extauthz.cel import BOOL, KEY, CelError, Expression
from extauthz.checks import Phase, register
from extauthz.context import CheckContext, Denial, accessor_for
from extauthz.detection.backend import detections_for
from extauthz.detection.memory import MemoryDetections
from extauthz.detection.model import (
    ACTION_BLOCK,
    ACTION_LOG,
    ACTION_NAMES,
    ACTION_THROTTLE,
    OP_CHECK,
    OP_DISTINCT,
    OP_FAIL,
    OP_RATE,
    Answer,
    Detector,
    Op,
)
from extauthz.outcomes import Outcome, OutcomeJoin, outcomes_for
from extauthz.policy.build import BuildContext, Spec
from extauthz.stores import StoreConfigError, StoreError

__all__ = ["DetectCheck", "Detection"]

log = logging.getLogger("extauthz.detection")

_FIELDS = {"name", "failures", "distinct", "spike", "by", "key", "when", "threshold", "window", "action", "mode",
           "onStoreError"}  # fmt: skip
_KINDS = ("failures", "distinct", "spike")
_BY = ("client_ip", "username", "subject")
_NAME = re.compile(r"[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?")
_MAX_WINDOW = 30 * 86400.0
_MAX_THRESHOLD = 1_000_000
#: Distinct sets in process hold threshold + 1 values at most: the bound keeps memory per key small.
_MAX_DISTINCT_THRESHOLD = 10_000
#: A key or value longer than this is hashed (store and memory never hold long client strings).
_MAX_VALUE = 128
_LABEL = 128
_CLIENT_IP = accessor_for(("source", "client_ip"))
#: With Redis, a block seen in an answer refuses early at this replica for at most this long (then
#: the store is asked again: a lifted block ends here within it), and at most this many are kept.
_SEEN_FOR, _SEEN_MAX = 10.0, 10_000
#: Identity rejections that are failed authentications (a missing credential is not a guess).
_NOT_FAILURES = frozenset({"credentials_missing"})
#: Detection.segment of a distinct detector counting ``of: username`` or ``of: subject``.
_OF_USERNAME, _OF_SUBJECT = -1, -2


@dataclass(frozen=True, slots=True)
class Detection:
    """One compiled detector with what the check evaluates per request."""

    detector: Detector
    #: "client_ip", "username", "subject" or "key" (the CEL ``key``).
    by: str
    key: Expression | None
    when: Expression | None
    #: failures: count our own identity rejections; distinct: count their values (``failures: true``).
    identity: bool
    #: failures and distinct: count responses with these statuses (from the access logs).
    statuses: frozenset[int]
    #: distinct: the value (CEL), or the 1-based path segment (negative: _OF_USERNAME, _OF_SUBJECT).
    value: Expression | None
    segment: int
    on_store_error: str

    @property
    def name(self) -> str:
        return self.detector.name


@register("detect", Phase.DETECT)
class DetectCheck:
    """Runs the policy's detectors against its key's store state; refuses blocked and throttled keys."""

    may_wait: ClassVar[bool] = False

    def __init__(self, detections: tuple[Detection, ...], backend: Any, join: OutcomeJoin, policy: str) -> None:
        self.detections = detections
        self.backend = backend
        self.join = join
        self.policy = policy
        #: Sections whose denials this check sees (ObservedCheck): identity, when a detector counts them.
        self.observes_denials: tuple[str, ...] = ("identity",) if any(d.identity for d in detections) else ()
        self._failure_detectors = tuple(d for d in detections if d.identity)
        #: The request refuse_early last saw, with its client address's (label, digest).
        self._early_key: tuple[CheckContext, tuple[str, str]] | None = None
        #: Failures detectors of identity rejections keyed on the client address: refuse_early asks them.
        self._early = tuple(d for d in detections if d.identity and d.by == "client_ip" and not d.detector.dry_run)
        #: Per detector, what _ops reads: (detection, by, when, detector, op, counts outcomes).
        self._plan = tuple((d, d.by, d.when, d.detector, d.detector.op, bool(d.statuses and join.enabled))
                           for d in detections)  # fmt: skip
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- compile ---------------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: Spec, build: BuildContext) -> DetectCheck | None:
        detections = spec.named_items(lambda item: _detection_from_spec(item, build), "detector")
        if not detections:
            return None
        try:
            backend = detections_for(build.services)
        except StoreConfigError as exc:
            spec.error(f"the detection store cannot be used: {exc}")
            return None
        join = outcomes_for(build.services)
        if not join.enabled and not build.services.settings.get("offline"):
            for detection in detections:
                if detection.statuses:
                    log.warning("policy %s, detector %s counts upstream responses (%s), but no access logs are "
                                "configured: it sees %s", build.policy_name, detection.name,
                                ", ".join(map(str, sorted(detection.statuses))),
                                "our own identity rejections only" if detection.identity else "nothing")  # fmt: skip
        if isinstance(backend, MemoryDetections):
            return DetectCheck(tuple(detections), backend, join, build.policy_name)
        defer = build.spec("quotas").present
        fallback = build.services.shared(("detections", "fallback"), MemoryDetections)
        return _StoreDetectCheck(tuple(detections), backend, join, build.policy_name, defer=defer, fallback=fallback)

    # --- per request -----------------------------------------------------------------------------
    def _ops(self, ctx: CheckContext) -> tuple[list[Op], list[Detection]]:
        """One op per detector whose key this request has: a count where ``when`` holds and the
        detector counts requests, else a lookup of the key's block (a block holds for every request
        of the policy with that key, whatever ``when`` says: it scopes what is counted)."""
        ops: list[Op] = []
        used: list[Detection] = []
        keys: dict[str, tuple[str, str]] = {}  # by -> (label, digest): detectors often share a key
        early = self._early_key
        if early is not None and early[0] is ctx:
            keys["client_ip"] = early[1]
        for detection, by, when, det, op_kind, watch in self._plan:
            known = keys.get(by)
            if known is None:
                label = _key_of(detection, ctx)
                if not label:
                    continue
                known = (label[:_LABEL], _digest(label))
                if by != "key":
                    keys[by] = known
            counts = True
            if when is not None:
                try:
                    counts = when.evaluate(ctx) is True
                except CelError as exc:
                    _note(ctx, detection, f"when failed ({exc}); not counted")
                    counts = False
            kind = OP_CHECK
            value = ""
            if counts and op_kind != OP_FAIL:
                if op_kind == OP_RATE:
                    kind = OP_RATE
                elif not detection.identity:  # a distinct detector of failures counts in observe_denial
                    value = _value_of(detection, ctx)
                    if value and not watch:
                        kind = OP_DISTINCT
            op = _new_op(Op, (kind, det, known[1], known[0], value))
            ops.append(op)
            used.append(detection)
            if watch and counts and (op_kind == OP_FAIL or value):
                request_id = ctx.request.headers.get("x-request-id")  # what Envoy's access log carries
                if request_id:
                    self._expect(request_id, detection, op)
        return ops, used

    async def check(self, ctx: CheckContext) -> Denial | None:
        ops, used = self._ops(ctx)
        if not ops:
            return None
        return self._decide(ctx, used, self.backend.run(ops), ops)

    def _decide(self, ctx: CheckContext, used: Sequence[Detection], answers: Sequence[Answer],
                ops: Sequence[Op]) -> Denial | None:  # fmt: skip
        """Report trips, and refuse with the longest block or throttle of an enforcing detector."""
        for answer in answers:
            if answer.tripped or answer.refused_ms:
                break
        else:
            return None  # the common case: nothing to report
        worst: tuple[Detection, Answer] | None = None
        for detection, answer, op in zip(used, answers, ops, strict=True):
            if answer.tripped:
                self._tripped(ctx, detection, answer)
            if answer.refused_ms > 0:
                self._remember(op, answer)
                if worst is None or answer.refused_ms > worst[1].refused_ms:
                    worst = (detection, answer)
        if worst is None:
            return None
        return _refusal(ctx, *worst)

    def _tripped(self, ctx: CheckContext | None, detection: Detection, answer: Answer) -> None:
        det = detection.detector
        action = ACTION_NAMES[det.action]
        what = f"dry_run_{action}" if det.dry_run and det.action != ACTION_LOG else action
        _metric(self.policy, det.name, what)
        text = f"{det.name}:{what}"
        if answer.duration_ms:
            text += f":{math.ceil(answer.duration_ms / 1000)}s"
        if ctx is not None:
            # A string (comma-separated), so that spans carry it too (extauthz.detections).
            earlier = ctx.attributes.get("detections")
            ctx.attributes["detections"] = f"{earlier},{text}" if earlier else text
            if ctx.steps is not None:
                ctx.note(f"detect {det.name}: tripped ({answer.total} in the window) -> {what}")
        else:
            log.info("policy %s: detector %s tripped on an upstream response -> %s", self.policy, det.name, what)

    # --- failed authentications (ObservedCheck) ----------------------------------------------------
    async def observe_denial(self, ctx: CheckContext, denial: Denial) -> Denial:
        """A watched check (identity) refused the request: count it as a failure of every failures
        detector keyed on something the request shows, and answer with the block when the key is
        blocked (so a blocked client cannot tell a right guess from a wrong one)."""
        if denial.status != 401 or denial.reason in _NOT_FAILURES:
            return denial
        ops: list[Op] = []
        used: list[Detection] = []
        for detection in self._failure_detectors:
            label = _key_of(detection, ctx)
            if not label:
                continue
            counts = True
            if detection.when is not None:
                try:
                    counts = detection.when.evaluate(ctx) is True
                except CelError:
                    counts = False
            kind, value = (OP_FAIL if counts else OP_CHECK), ""
            if counts and detection.detector.op == OP_DISTINCT:
                value = _value_of(detection, ctx)
                kind = OP_DISTINCT if value else OP_CHECK
            ops.append(Op(kind, detection.detector, _digest(label), label[:_LABEL], value))
            used.append(detection)
        if not ops:
            return denial
        answers = await self._run_failures(ctx, ops, used)
        if answers is None:
            return denial
        worst: tuple[Detection, Answer] | None = None
        for detection, answer, op in zip(used, answers, ops, strict=True):
            if answer.refused_ms > 0:
                self._remember(op, answer)
            if answer.tripped:
                self._tripped(ctx, detection, answer)
            # The failure that trips a detector keeps its own answer; the next attempts get the block.
            elif answer.refused_ms > 0 and (worst is None or answer.refused_ms > worst[1].refused_ms):
                worst = (detection, answer)
        return denial if worst is None else _refusal(ctx, *worst)

    async def _run_failures(self, ctx: CheckContext, ops: list[Op], used: list[Detection]) -> Sequence[Answer] | None:
        return self.backend.run(ops)  # type: ignore[no-any-return]

    # --- refusing before the identity check (ObservedCheck) ---------------------------------------
    def refuse_early(self, ctx: CheckContext) -> Denial | None:
        """Before the watched identity check runs: the block of a client address that a failures
        detector keys on, when one is known without I/O, so a blocked client costs no credential
        verification (a password hash, an introspection call). In process the store is asked (it
        is exact); with Redis, the blocks this replica saw in recent answers (:meth:`_remember`)."""
        if not self._early:
            return None
        address = _CLIENT_IP(ctx)
        if type(address) is not str or not address:
            return None
        digest = _digest(address)
        self._early_key = (ctx, (address[:_LABEL], digest))  # _ops reuses it for this request
        for detection in self._early:
            answer = self._known_block(detection.detector, digest)
            if answer is not None:
                ctx.note(f"detect {detection.name}: client address blocked, before the identity check")
                return _refusal(ctx, detection, answer)
        return None

    def _known_block(self, det: Detector, digest: str) -> Answer | None:
        return self.backend.blocked(det, digest)  # type: ignore[no-any-return]

    def _remember(self, op: Op, answer: Answer) -> None:
        """A refusal seen in an answer (the in-process store needs no memory of its own)."""

    # --- upstream outcomes -------------------------------------------------------------------------
    def _expect(self, request_id: str, detection: Detection, op: Op) -> None:
        kind = OP_FAIL if detection.detector.op == OP_FAIL else OP_DISTINCT

        def on_outcome(outcome: Outcome) -> None:
            # Our own denials (Envoy's UAEX: a block, a quota) are not the upstream's answer.
            if outcome.status not in detection.statuses or "UAEX" in outcome.flags.split(","):
                return
            self._count_outcome(detection, op._replace(kind=kind))

        self.join.expect(request_id, on_outcome)

    def _count_outcome(self, detection: Detection, op: Op) -> None:
        answers = self.backend.run([op])
        if answers[0].tripped:
            self._tripped(None, detection, answers[0])


class _StoreDetectCheck(DetectCheck):
    """The same check when detection state lives in Redis: it waits on I/O (the pipeline's timeout
    applies), and, beside a quota, sends its script in the quota's round trip."""

    may_wait: ClassVar[bool] = True

    def __init__(self, detections: tuple[Detection, ...], backend: Any, join: OutcomeJoin, policy: str, *,
                 defer: bool, fallback: MemoryDetections) -> None:  # fmt: skip
        super().__init__(detections, backend, join, policy)
        #: The policy has quotas: queue the store call on the context for the quota check to await.
        self.defer = defer
        #: This replica's in-process state, for ``onStoreError: local`` while Redis cannot answer.
        self.fallback = fallback
        #: Blocks seen in this replica's answers: key -> (until, answer), for refuse_early.
        self._blocks_seen: dict[str, tuple[float, Answer]] = {}

    async def check(self, ctx: CheckContext) -> Denial | None:
        ops, used = self._ops(ctx)
        if not ops:
            return None
        if self.defer:
            # The quota check carries the ops in its own script call (see _PendingDetect).
            ctx.pending = _PendingDetect(self, ctx, used, ops)
            return None
        try:
            sends = self.backend.send(ops)
        except StoreError as exc:
            return self._store_failed(ctx, used, ops, str(exc))
        return await self._settle(ctx, used, ops, sends)

    async def _settle(self, ctx: CheckContext, used: list[Detection], ops: list[Op], sends: Any) -> Denial | None:
        try:
            answers = await self.backend.answers(ops, sends)
        except StoreError as exc:
            return self._store_failed(ctx, used, ops, str(exc))
        return self._decide(ctx, used, answers, ops)

    def _store_failed(self, ctx: CheckContext, used: Sequence[Detection], ops: Sequence[Op],
                      failure: str) -> Denial | None:  # fmt: skip
        """Redis could not answer: each detector does what its ``onStoreError`` says. deny (the
        default): 503; local: this replica's in-process detection state decides meanwhile; allow:
        the request goes on unchecked by it."""
        ctx.attributes["detect_store"] = "unavailable"
        for detection in used:
            if detection.on_store_error == "deny" and not detection.detector.dry_run:
                ctx.attributes["error"] = f"detector {detection.name}: {failure}"
                ctx.note(f"detect {detection.name}: store unavailable ({failure}) -> deny (onStoreError: deny)")
                return Denial(503, "detect_store_unavailable", "abuse detection state is unavailable",
                              rule=f"detect:{detection.name}")  # fmt: skip
        local = [(d, op) for d, op in zip(used, ops, strict=True) if d.on_store_error == "local"]
        if not local:
            ctx.note(f"detect: store unavailable ({failure}) -> not checked (onStoreError: allow)")
            return None
        ctx.attributes["detect_store"] = "local"
        ctx.note(f"detect: store unavailable ({failure}) -> in-process state (onStoreError: local)")
        local_ops = [op for _, op in local]
        return self._decide(ctx, [d for d, _ in local], self.fallback.run(local_ops), local_ops)

    def _known_block(self, det: Detector, digest: str) -> Answer | None:
        known = self._blocks_seen.get(det.prefix + digest)
        if known is None:
            return None
        until, answer = known
        left = int((until - clock.wall()) * 1000)
        if left <= 0:
            del self._blocks_seen[det.prefix + digest]
            return None
        return answer._replace(refused_ms=left)

    def _remember(self, op: Op, answer: Answer) -> None:
        """Keep a block an answer showed, for refuse_early: at most _SEEN_FOR seconds (a block lifted
        by an operator holds at most that long at this replica), bounded in count."""
        if answer.kind != ACTION_BLOCK or not self._early:
            return
        seen = self._blocks_seen
        seen[op.detector.prefix + op.digest] = (clock.wall() + min(answer.refused_ms / 1000, _SEEN_FOR), answer)
        if len(seen) > _SEEN_MAX:
            del seen[next(iter(seen))]

    async def _run_failures(self, ctx: CheckContext, ops: list[Op], used: list[Detection]) -> Sequence[Answer] | None:
        try:
            return await self.backend.submit(ops)  # type: ignore[no-any-return]
        except StoreError as exc:
            # The request is refused anyway (its credential was): count it where onStoreError says.
            ctx.attributes["detect_store"] = "unavailable"
            local = [i for i, d in enumerate(used) if d.on_store_error == "local"]
            if not local:
                ctx.note(f"detect: store unavailable ({exc}); failure not counted")
                return None
            ctx.attributes["detect_store"] = "local"
            answers = [Answer(0, 0, False, 0)] * len(ops)
            for i, answer in zip(local, self.fallback.run([ops[i] for i in local]), strict=True):
                answers[i] = answer
            return answers

    def _count_outcome(self, detection: Detection, op: Op) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return

        async def count() -> None:
            try:
                answers = await self.backend.submit([op])
            except StoreError:
                return  # counted by the store's error metric; an outcome is best effort
            if answers[0].tripped:
                self._tripped(None, detection, answers[0])

        task = loop.create_task(count(), name="detect-outcome")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class _PendingDetect:
    """The detect check's ops, waiting for the quota check of the same policy (``ctx.pending``).

    The quota check passes ``rider`` to the store with its charge: one script call does both and the
    detectors' part of the reply lands in it. ``wait()`` then decides from that part; when the quota
    check charged nothing (no quota applied, or a Cluster), it sends the ops in a call of their own.
    """

    __slots__ = ("check", "ctx", "ops", "rider", "used")

    def __init__(self, check: _StoreDetectCheck, ctx: CheckContext, used: list[Detection], ops: list[Op]) -> None:
        self.check = check
        self.ctx = ctx
        self.used = used
        self.ops = ops
        self.rider = check.backend.rider(ops)

    async def wait(self) -> Denial | None:
        check, ctx, rider = self.check, self.ctx, self.rider
        if rider is not None and rider.reply is not None:
            try:
                answers = check.backend.answers_from(self.ops, rider.reply)
            except StoreError as exc:
                return check._store_failed(ctx, self.used, self.ops, str(exc))
            return check._decide(ctx, self.used, answers, self.ops)
        if rider is not None and rider.error is not None:
            return check._store_failed(ctx, self.used, self.ops, str(rider.error))
        try:
            sends = check.backend.send(self.ops)
        except StoreError as exc:
            return check._store_failed(ctx, self.used, self.ops, str(exc))
        return await check._settle(ctx, self.used, self.ops, sends)


def _refusal(ctx: CheckContext, detection: Detection, answer: Answer) -> Denial:
    retry = max(1, math.ceil(answer.refused_ms / 1000))
    throttled = answer.kind == ACTION_THROTTLE
    ctx.attributes["blocked_by"] = detection.name
    ctx.note(f"detect {detection.name}: key {'throttled' if throttled else 'blocked'}, retry in {retry}s -> deny")
    if throttled:
        return Denial(429, "abuse_throttled", "too many requests: this client is throttled",
                      headers=(("retry-after", str(retry)),), rule=f"detect:{detection.name}")  # fmt: skip
    return Denial(answer.status, "abuse_blocked", "this client is blocked for suspicious activity",
                  headers=(("retry-after", str(retry)),), rule=f"detect:{detection.name}")  # fmt: skip


def _note(ctx: CheckContext, detection: Detection, text: str) -> None:
    ctx.attributes["detect_error"] = f"detector {detection.name}: {text}"
    ctx.note(f"detect {detection.name}: {text}")


def _key_of(detection: Detection, ctx: CheckContext) -> str:
    """The key's value for this request ('' when the request has none: the detector skips it)."""
    by = detection.by
    if by == "client_ip":
        value = _CLIENT_IP(ctx)
        return value if type(value) is str else ""
    if by == "username":
        attempted = ctx.attributes.get("attempted_user")
        if type(attempted) is str and attempted:
            return "u:" + attempted
        subject = ctx.identity.get("subject")
        return "u:" + subject if type(subject) is str and subject else ""
    if by == "subject":
        subject = ctx.identity.get("subject")
        return subject if type(subject) is str else ""
    assert detection.key is not None
    return _text_of(detection.key, ctx)


def _text_of(expression: Expression, ctx: CheckContext) -> str:
    """A key or value expression's result as text: a string, an integer or a boolean ('' otherwise,
    or when it fails)."""
    try:
        value = expression.evaluate(ctx)
    except CelError:
        return ""
    if type(value) is bool or type(value) is int:
        return str(value).lower()
    return value if type(value) is str else ""


def _value_of(detection: Detection, ctx: CheckContext) -> str:
    if detection.segment < 0:  # of: username | subject
        value = ""
        if detection.segment == _OF_USERNAME:
            attempted = ctx.attributes.get("attempted_user")
            if type(attempted) is str:
                value = attempted
        if not value:
            subject = ctx.identity.get("subject")
            value = subject if type(subject) is str else ""
    elif detection.value is not None:
        value = _text_of(detection.value, ctx)
    else:
        parts = [p for p in ctx.request.path.split("?", 1)[0].split("/") if p]
        if detection.segment > len(parts):
            return ""
        value = parts[detection.segment - 1]
    return _hash(value) if len(value) > _MAX_VALUE else value


_DIGESTS: dict[str, str] = {}
#: Op(...) without the NamedTuple constructor's argument handling (the request path builds several).
_new_op = tuple.__new__


def _digest(value: str) -> str:
    digest = _DIGESTS.get(value)
    if digest is None:
        digest = _hash(value)
        if len(_DIGESTS) >= 4096:
            _DIGESTS.clear()
        _DIGESTS[value] = digest
    return digest


def _hash(value: str) -> str:
    """blake2b-128, hex: what stores keep instead of a client's string."""
    return hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def _metric(policy: str, detector: str, action: str) -> None:
    from extauthz.telemetry import metrics

    metrics.detection(policy, detector, action)


# --- compile time ------------------------------------------------------------------------------------
def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _detection_from_spec(item: Spec, build: BuildContext) -> Detection | None:
    if not item.is_mapping(allowed=_FIELDS):
        return None
    before = len(build.errors)
    name = item.str("name", required=True) or ""
    if name and not _NAME.fullmatch(name):
        item.error("must be 1-64 lower-case letters, digits, '.', '_' or '-', starting and ending with a "
                   "letter or digit", "name")  # fmt: skip
    kind = item.one_of(_KINDS, what="detector kind")
    key = item.cel("key", expect=KEY)
    by = item.str("by", None, choices=_BY)
    if key is not None and by is not None:
        item.error("give either by or key, not both", "key")
    by = "key" if key is not None else by or "client_ip"
    when = item.cel("when", expect=BOOL)
    mode = item.str("mode", "enforce", choices=("enforce", "dry-run"))
    on_store_error = item.str("onStoreError", "deny", choices=("deny", "allow", "local"))
    identity, statuses, value, segment = False, frozenset[int](), None, 0
    threshold, window = 0, 0.0
    spike: dict[str, Any] = {}
    op = OP_FAIL
    if kind == "failures":
        section = item.child("failures")
        if section.is_mapping(allowed={"identity", "upstream"}):
            identity = bool(section.bool("identity", True))
            statuses = _statuses(section, "upstream")
            if not identity and not statuses:
                section.error("counts nothing: set identity: true or list upstream statuses")
            if identity and by == "subject":
                item.error("a failed identity check has no subject: use client_ip or username", "by")
    elif kind == "distinct":
        op = OP_DISTINCT
        section = item.child("distinct")
        if section.is_mapping(allowed={"value", "pathSegment", "of", "statuses", "failures"}):
            value = section.cel("value", expect=KEY)
            segment = section.int("pathSegment", min=1, max=64) or 0
            of = section.str("of", None, choices=("username", "subject"))
            if (value is not None) + (segment > 0) + (of is not None) != 1:
                section.error("give exactly one of value (CEL), pathSegment or of (username, subject)")
            if of == "username":
                segment = _OF_USERNAME
            elif of == "subject":
                segment = _OF_SUBJECT
            statuses = _statuses(section, "statuses")
            # Counted on failed authentications (the identity check's rejections) instead of on the
            # requests that reach the detectors: credential stuffing, many user names from one address.
            identity = bool(section.bool("failures", False))
            if identity and statuses:
                section.error("count either failed authentications (failures) or responses (statuses)", "failures")
            if identity and by == "subject":
                item.error("a failed identity check has no subject: use client_ip or username", "by")
    elif kind == "spike":
        op = OP_RATE
        section = item.child("spike")
        if section.is_mapping(allowed={"interval", "baseline", "warmup", "minCount", "factor"}):
            interval = section.duration("interval", 60.0)
            baseline = section.int("baseline", 30, min=2, max=10_000)
            spike = {
                "interval": interval,
                "alpha": 2.0 / ((baseline or 30) + 1),
                "warmup": section.int("warmup", 10, min=0, max=10_000),
                "min": section.int("minCount", 20, min=1, max=_MAX_THRESHOLD),
                "factor": section.number("factor", 5.0),
                "baseline": baseline or 30,
            }
            if not isinstance(interval, float) or not 0.1 <= interval <= 86400:
                section.error("must be at least 100ms and at most 1d", "interval")
            if not isinstance(spike["factor"], float) or not 1.0 < spike["factor"] <= 1000:
                section.error("must be more than 1 and at most 1000", "factor")
    if kind in ("failures", "distinct"):
        high = _MAX_DISTINCT_THRESHOLD if kind == "distinct" else _MAX_THRESHOLD
        threshold = item.int("threshold", required=True, min=1, max=high) or 0
        window = item.duration("window", required=True) or 0.0
        if window and not 0.001 <= window <= _MAX_WINDOW:
            item.error("must be at least 1ms and at most 30d", "window")
    else:
        # Read (for the schema: optional where a spike is described), refused when given.
        if item.int("threshold") is not None:
            item.error("applies to failures and distinct detectors (a spike has its factor)", "threshold")
        if item.duration("window") is not None:
            item.error("applies to failures and distinct detectors (a spike has its interval)", "window")
    action, params = _action(item)
    if len(build.errors) != before or kind is None:
        return None
    dry_run = mode == "dry-run"
    interval_s = float(spike.get("interval") or 0.0)
    detector = Detector(
        policy=build.policy_name, name=name, op=op, threshold=int(threshold), window_ms=_ms(window) if window else 0,
        store_action=ACTION_LOG if dry_run else action, action=action, dry_run=dry_run,
        interval_ms=_ms(interval_s) if interval_s else 0, alpha=round(float(spike.get("alpha", 0.0)) * 1e6) / 1e6,
        warmup=int(spike.get("warmup") or 0), min_count=int(spike.get("min") or 0),
        factor=round(float(spike.get("factor") or 0.0) * 1000) / 1000,
        state_ttl_ms=_ms(interval_s * (int(spike.get("baseline") or 0) + int(spike.get("warmup") or 0)) * 2)
        if interval_s else 0,
        **params,
    )  # fmt: skip
    return Detection(detector, by, key, when, identity, statuses, value, segment, on_store_error or "deny")


def _statuses(section: Spec, field_name: str) -> frozenset[int]:
    node = section.child(field_name)
    statuses = set()
    for i, _ in enumerate(node.items(nonempty="HTTP status")):
        status = node.int(i, required=True, min=100, max=599)
        if isinstance(status, int):
            statuses.add(status)
    return frozenset(statuses)


_BLOCK_FIELDS = {"duration", "status", "escalation", "maxDuration", "remember"}
_THROTTLE_FIELDS = {"limit", "window", "burst", "duration", "escalation", "maxDuration", "remember"}


def _action(item: Spec) -> tuple[int, dict[str, Any]]:
    """``action``: ``log``, or a mapping with one of ``throttle`` / ``block``."""
    node = item.child("action")
    if not node.present:
        item.error("is required: log, {throttle: {...}} or {block: {...}}", "action")
        return ACTION_LOG, {}
    if isinstance(node.value, str):
        item.str("action", choices=("log",))
        return ACTION_LOG, {}
    if not node.is_mapping(allowed={"throttle", "block"}):
        return ACTION_LOG, {}
    which = node.one_of(("throttle", "block"), what="action")
    if which is None:
        return ACTION_LOG, {}
    section = node.child(which)
    if not section.is_mapping(allowed=_BLOCK_FIELDS if which == "block" else _THROTTLE_FIELDS):
        return ACTION_LOG, {}
    duration = section.duration("duration", required=True) or 0.0
    if duration and not 0.001 <= duration <= _MAX_WINDOW:
        section.error("must be at least 1ms and at most 30d", "duration")
    escalation = section.number("escalation", 2.0)
    if escalation is not None and not 1.0 <= escalation <= 100.0:
        section.error("must be between 1 (no escalation) and 100", "escalation")
    longest = section.duration("maxDuration", max(duration, 86400.0)) or 0.0
    if longest < duration or longest > _MAX_WINDOW:
        section.error("must be at least duration and at most 30d", "maxDuration")
    remember = section.duration("remember", 86400.0) or 0.0
    if not 1.0 <= remember <= _MAX_WINDOW:
        section.error("must be at least 1s and at most 30d", "remember")
    params: dict[str, Any] = {
        "duration_ms": _ms(duration) if duration else 1, "escalation": round(float(escalation or 2.0) * 1000) / 1000,
        "max_duration_ms": _ms(longest) if longest else 1, "memory_ms": _ms(remember),
    }  # fmt: skip
    if which == "block":
        params["status"] = section.int("status", 429, min=100, max=599)
        if params["status"] not in (429, 403):
            section.error("must be 429 or 403", "status")
        return ACTION_BLOCK, params
    limit = section.int("limit", required=True, min=1, max=1_000_000) or 1
    window = section.duration("window", required=True) or 1.0
    burst = section.int("burst", min=1, max=1_000_000)
    if not 0.001 <= window <= 86400:
        section.error("must be at least 1ms and at most 1d", "window")
    params["throttle_interval_us"] = max(1, math.ceil(window * 1e6 / limit))
    params["throttle_burst"] = burst or limit
    return ACTION_THROTTLE, params

