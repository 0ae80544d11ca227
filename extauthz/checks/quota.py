"""Quotas: per-identity, per-client or global rate limits, charged after the rules allowed a request.

Each quota of ``spec.quotas`` names a counter (``key``, CEL; none means one counter for everyone),
a sustained rate (``limit`` per ``window``) and a ``burst``. The algorithm is GCRA by default, a
token bucket kept as one timestamp per counter (see :mod:`extauthz.stores`): it admits up to
``burst`` requests at once, then one every ``window / limit``. Unlike a fixed window it has no
boundary where twice the limit gets through at once; unlike a sliding log it needs one number per
counter, so it fits millions of clients in Redis and charges all the quotas of a request in one
atomic script. ``algorithm: sliding-log`` keeps the time of every admitted request instead, for
quotas that must never admit more than ``limit`` within any window (a contract's "3 per minute").

Every quota whose ``when`` holds is charged, all or nothing: the request is admitted only if every
enforced quota has room (then all are charged), otherwise it is refused with 429 and nothing is
charged. Shadow quotas are charged and reported, never refuse. ``onStoreError`` says what a quota
does when the store cannot answer.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from extauthz.cel import BOOL, INTEGER, KEY, CelError, Expression
from extauthz.checks import Phase, register
from extauthz.context import CheckContext, Denial
from extauthz.policy.build import BuildContext, Spec
from extauthz.stores import (
    GCRA,
    SLIDING_LOG,
    Charge,
    ChargeResult,
    Store,
    StoreConfigError,
    StoreError,
    local_store,
    store_for,
)
from extauthz.stores.memory import MemoryStore

__all__ = ["MAX_KEY_BYTES", "Quota", "QuotaCheck"]

log = logging.getLogger("extauthz.quota")

_FIELDS = {"name", "key", "limit", "window", "burst", "when", "cost", "mode", "onStoreError", "headers", "algorithm"}
#: ``algorithm``: GCRA (the default, one number per counter) or an exact sliding window kept as a log.
_ALGORITHMS = ("gcra", "sliding-log")
#: A sliding log holds one entry per admitted request in the window: its limit is bounded so that
#: one key's log stays small (about 25 bytes an entry in Redis, some 80 in process).
MAX_SLIDING_LIMIT = 100_000
_NAME = re.compile(r"[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?")
#: A key value longer than this is a policy mistake (keying on a body?): 503, never a new counter.
MAX_KEY_BYTES = 4096
#: Costs above this are a mistake in the cost expression, not a request.
MAX_COST = 1_000_000_000
_MAX_LIMIT = 1_000_000_000
_MAX_WINDOW = 366 * 86400.0
#: Counters must fit Redis's Lua numbers exactly (2^53 microseconds is 285 years; stay far below).
_MAX_BUCKET_US = 10**14
_MEMO_LIMIT = 4096
#: Seconds between two log lines of one quota's bad input (the decision log has every one).
_LOG_INTERVAL = 10.0


@dataclass(frozen=True, slots=True)
class Quota:
    """One compiled quota of a policy."""

    name: str
    key: Expression | None
    when: Expression | None
    #: None: the constant ``fixed_cost``.
    cost: Expression | None
    fixed_cost: int
    limit: int
    window: float
    burst: int
    interval_us: int
    enforce: bool
    on_store_error: str
    headers: bool
    #: Store key up to the hash tag: "q:<policy>:<quota>:".
    key_prefix: str
    #: This quota's RateLimit-Policy item, e.g. '"per-key";q=100;w=60'.
    policy_item: str
    #: Its q: no RateLimit item says more than this is left.
    advertised: int
    #: The store key of the keyless (global) counter.
    fixed_key: str
    #: GCRA or SLIDING_LOG (extauthz.stores): how the counter is kept.
    kind: int = GCRA


class _Applied(NamedTuple):
    """A quota that applies to this request, with its charge (built per Check: a NamedTuple)."""

    quota: Quota
    charge: Charge
    digest: str


class _Outcome(NamedTuple):
    """The store's answer for one request."""

    #: Per applied quota; None where the quota was not charged (store down, ``onStoreError: allow``).
    results: Sequence[ChargeResult | None]
    #: Where the answer came from: "memory", "redis", "local" or "unavailable".
    source: str
    #: The quota whose ``onStoreError: deny`` refused the request when the store failed.
    refused_by: str | None = None


@register("quotas", Phase.QUOTA)
class QuotaCheck:
    """Charges the quotas of a policy; 429 with Retry-After and RateLimit headers when one is exhausted."""

    may_wait: ClassVar[bool] = False

    def __init__(self, quotas: tuple[Quota, ...], store: Store, fallback: Store, store_name: str) -> None:
        self.quotas = quotas
        self.store = store
        #: The in-process limiter used by ``onStoreError: local`` quotas while the store is down.
        self.fallback = fallback
        self.store_name = store_name
        self._digests: dict[str, str] = {}
        #: Per quota: when its bad-input line was last logged, and how many were held back since.
        #: A client can cause one on every request (by leaving out the header a key reads).
        self._logged: dict[str, tuple[float, int]] = {}

    @classmethod
    def from_spec(cls, spec: Spec, build: BuildContext) -> QuotaCheck | None:
        quotas = spec.named_items(lambda item: _quota_from_spec(item, build), "quota")
        if not quotas:
            return None
        try:
            store = store_for(build.services)
        except StoreConfigError as exc:
            spec.error(f"the quota store cannot be used: {exc}")
            return None
        fallback = local_store(build.services)
        store_name = "memory" if store is fallback else "redis"
        check_class = QuotaCheck if store is fallback else _StoreQuotaCheck
        return check_class(tuple(quotas), store, fallback, store_name)

    # --- per request -----------------------------------------------------------------------------
    async def check(self, ctx: CheckContext) -> Denial | None:
        applied = self._applicable(ctx)
        if type(applied) is not list:
            return applied  # type: ignore[return-value]  # a denial, or None: no quota applies
        # The in-process store answers at once and cannot fail.
        store: MemoryStore = self.store  # type: ignore[assignment]  # from_spec chose this class for it
        return self._decide(ctx, applied, store.charge_now([entry.charge for entry in applied]), self.store_name)

    def _applicable(self, ctx: CheckContext) -> list[_Applied] | Denial | None:
        """The quotas that apply to this request with their charges; or what ends the check before
        anything is charged: None when no quota applies, a denial for bad input or a cost that no
        bucket can hold."""
        applied: list[_Applied] = []
        for quota in self.quotas:
            try:
                entry = self._apply(quota, ctx)
            except _QuotaInputError as exc:
                self._log_bad_input(ctx, quota, str(exc))
                if quota.enforce:
                    return _internal_error(ctx, quota, str(exc))
                _shadow_skipped(ctx, quota, str(exc))  # a shadow quota never refuses, not even here
                continue
            if entry is not None:
                applied.append(entry)
        if not applied:
            return None
        for entry in applied:
            quota = entry.quota
            if quota.enforce and entry.charge.cost > quota.burst:
                ctx.note(f"quota {quota.name}: cost {entry.charge.cost} exceeds the burst of {quota.burst} -> deny")
                ctx.attributes["quota"] = quota.name
                return Denial(429, "quota_cost_exceeds_burst",
                              f"this request costs more than quota {quota.name} can ever allow",
                              rule=f"quota:{quota.name}")  # fmt: skip
        return applied

    def _log_bad_input(self, ctx: CheckContext, quota: Quota, problem: str) -> None:
        """One line per quota per LOG_INTERVAL at most, saying how many it stands for."""
        now = time.monotonic()
        last, held = self._logged.get(quota.name, (-math.inf, 0))
        if now - last < _LOG_INTERVAL:
            self._logged[quota.name] = (last, held + 1)
            return
        self._logged[quota.name] = (now, 0)
        policy = ctx.policy.name if ctx.policy is not None else "-"
        more = f" ({held} more since the last line)" if held else ""
        # It names the quota and the problem, never the key's value (it may be a credential).
        if quota.enforce:
            log.error("policy %s, quota %s: %s; denying with 503%s", policy, quota.name, problem, more)
        else:
            log.warning("policy %s, shadow quota %s: %s; not charged%s", policy, quota.name, problem, more)

    def _apply(self, quota: Quota, ctx: CheckContext) -> _Applied | None:
        if quota.when is not None:
            holds = _evaluate(quota.when, ctx, "when")
            if holds is not True:
                if holds is not False:
                    raise _QuotaInputError(f"when gave {type(holds).__name__}, not bool")
                if ctx.steps is not None:  # explain only: no formatting on the serving path
                    ctx.note(f"quota {quota.name}: when is false")
                return None
        if quota.key is None:
            key, digest = quota.fixed_key, ""
        else:
            digest = self._digest(_evaluate(quota.key, ctx, "key"))
            key = quota.key_prefix + "{" + digest + "}"
        if quota.cost is None:
            cost = quota.fixed_cost
        else:
            cost = _evaluate(quota.cost, ctx, "cost")
            if type(cost) is not int or not 0 <= cost <= MAX_COST:
                raise _QuotaInputError(f"cost must be an integer between 0 and {MAX_COST}, got {_kind(cost)}")
        return _Applied(quota, Charge(key, quota.interval_us, quota.burst, cost, quota.enforce, quota.kind), digest)

    def _digest(self, value: Any) -> str:
        if type(value) is not str:
            if type(value) is int or type(value) is bool:
                value = str(value).lower()
            else:
                raise _QuotaInputError(f"key must be a string or an integer, got {_kind(value)}")
        digest = self._digests.get(value)
        if digest is None:
            data = value.encode("utf-8", "surrogatepass")
            if len(data) > MAX_KEY_BYTES:
                raise _QuotaInputError(f"key is {len(data)} bytes long (at most {MAX_KEY_BYTES})")
            digest = hashlib.blake2b(data, digest_size=16).hexdigest()
            if len(self._digests) >= _MEMO_LIMIT:
                self._digests.clear()
            self._digests[value] = digest
        return digest

    def _decide(
        self, ctx: CheckContext, applied: list[_Applied], results: Sequence[ChargeResult | None], source: str
    ) -> Denial | None:
        exceeded: list[tuple[_Applied, ChargeResult]] = []
        shadow_exceeded: list[str] = []
        header_items: list[tuple[Quota, ChargeResult]] = []
        #: The enforced quota with the least room left: what the decision's quota attributes name.
        tightest: tuple[Quota, ChargeResult] | None = None
        for entry, result in zip(applied, results, strict=True):
            quota = entry.quota
            if result is None:
                continue
            if ctx.steps is not None:
                verdict = "room" if result.allowed else "exhausted"
                ctx.note(f"quota {quota.name} ({'enforce' if quota.enforce else 'shadow'}, {source}): "
                         f"counter {entry.digest[:12] or 'global'}, cost {entry.charge.cost} -> {verdict}, "
                         f"{result.remaining} left")  # fmt: skip
            if quota.enforce:
                if tightest is None or result.remaining < tightest[1].remaining:
                    tightest = (quota, result)
                if not result.allowed:
                    exceeded.append((entry, result))
                if quota.headers:
                    header_items.append((quota, result))
            elif not result.allowed:
                shadow_exceeded.append(quota.name)
        if shadow_exceeded:
            ctx.attributes["quota_shadow_exceeded"] = ",".join(shadow_exceeded)
            log.debug("shadow quotas exceeded: %s", ", ".join(shadow_exceeded))
        if not exceeded:
            if tightest is not None:
                ctx.attributes["quota"] = tightest[0].name
                ctx.attributes["quota_remaining"] = tightest[1].remaining
            if header_items:
                ctx.client_headers.extend(_ratelimit_headers(header_items, None))
            return None
        entry, worst = max(exceeded, key=lambda pair: pair[1].retry_after)
        retry_after = max(1, math.ceil(worst.retry_after))
        ctx.attributes["quota"] = entry.quota.name
        ctx.attributes["quota_remaining"] = 0
        headers = [("retry-after", str(retry_after)), *_ratelimit_headers(header_items, retry_after)]
        names = ", ".join(e.quota.name for e, _ in exceeded)
        return Denial(429, "quota_exceeded", f"quota exceeded: {names}", headers=tuple(headers),
                      rule=f"quota:{entry.quota.name}")  # fmt: skip


class _StoreQuotaCheck(QuotaCheck):
    """The same check when counters live in Redis: it waits on I/O, so the pipeline's timeout applies."""

    may_wait: ClassVar[bool] = True

    async def check(self, ctx: CheckContext) -> Denial | None:
        pending = ctx.pending
        if pending is None:
            return await self._check(ctx)
        # The detect check left its ops: they ride in this charge's script call (one round trip for
        # both), and are settled after it. A block is the answer even where the quota had room.
        ctx.pending = None
        try:
            denial = await self._check(ctx, pending.rider)
        finally:
            earlier = await pending.wait()
        return earlier if earlier is not None else denial

    async def _check(self, ctx: CheckContext, rider: Any = None) -> Denial | None:
        applied = self._applicable(ctx)
        if type(applied) is not list:
            return applied  # type: ignore[return-value]  # a denial, or None: no quota applies
        outcome = await self._charge(ctx, applied, rider)
        if outcome.refused_by is not None:
            return Denial(503, "quota_store_unavailable", "quota state is unavailable",
                          rule=f"quota:{outcome.refused_by}")  # fmt: skip
        return self._decide(ctx, applied, outcome.results, outcome.source)

    async def _charge(self, ctx: CheckContext, applied: list[_Applied], rider: Any = None) -> _Outcome:
        charges = [entry.charge for entry in applied]
        try:
            if rider is not None:
                return _Outcome(list(await self.store.charge_with(charges, rider)),  # type: ignore[attr-defined]
                                self.store_name)  # fmt: skip
            return _Outcome(list(await self.store.charge(charges)), self.store_name)
        except StoreError as exc:
            failure = str(exc)
        for entry in applied:
            if entry.quota.enforce and entry.quota.on_store_error == "deny":
                ctx.attributes["quota_store"] = "unavailable"
                ctx.attributes["error"] = f"quota {entry.quota.name}: {failure}"
                ctx.note(f"quota {entry.quota.name}: store unavailable ({failure}) -> deny (onStoreError: deny)")
                return _Outcome([], "unavailable", refused_by=entry.quota.name)
        results: list[ChargeResult | None] = [None] * len(applied)
        local = [i for i, entry in enumerate(applied) if entry.quota.on_store_error == "local"]
        if local:
            local_results = await self.fallback.charge([charges[i] for i in local])
            for i, result in zip(local, local_results, strict=True):
                results[i] = result
        for i, entry in enumerate(applied):
            how = "in-process limiter" if results[i] is not None else "not charged"
            ctx.note(f"quota {entry.quota.name}: store unavailable ({failure}) -> {how} "
                     f"(onStoreError: {entry.quota.on_store_error})")  # fmt: skip
        ctx.attributes["quota_store"] = "local" if local else "skipped"
        return _Outcome(results, "local")


class _QuotaInputError(Exception):
    """A quota's key, cost or condition could not be computed for this request."""


def _evaluate(expression: Expression, ctx: CheckContext, what: str) -> Any:
    try:
        return expression.evaluate(ctx)
    except CelError as exc:
        raise _QuotaInputError(f"{what} failed: {exc}") from None


def _kind(value: Any) -> str:
    return type(value).__name__


def _internal_error(ctx: CheckContext, quota: Quota, problem: str) -> Denial:
    ctx.attributes["error"] = f"quota {quota.name}: {problem}"
    ctx.note(f"quota {quota.name}: {problem} -> deny")
    return Denial(503, "internal_error", "policy evaluation failed", rule=f"quota:{quota.name}")


def _shadow_skipped(ctx: CheckContext, quota: Quota, problem: str) -> None:
    ctx.attributes["quota_shadow_error"] = f"quota {quota.name}: {problem}"
    ctx.note(f"quota {quota.name} (shadow): {problem} -> not charged")


def _ratelimit_headers(items: list[tuple[Quota, ChargeResult]], retry_after: int | None) -> list[tuple[str, str]]:
    """RateLimit-Policy and RateLimit (draft-ietf-httpapi-ratelimit-headers): one item per quota.

    ``t`` is the seconds until the quota is whole again; on a refusal it is capped at Retry-After,
    which must not point earlier than any effective window.
    """
    if not items:
        return []
    limits = []
    for quota, result in items:
        reset = math.ceil(result.reset_after)
        if retry_after is not None:
            reset = min(reset, retry_after)
        # A burst above the limit holds more than the advertised q: never say more than q is left.
        limits.append(f'"{quota.name}";r={min(max(0, result.remaining), quota.advertised)};t={reset}')
    return [
        ("ratelimit-policy", ", ".join(quota.policy_item for quota, _ in items)),
        ("ratelimit", ", ".join(limits)),
    ]


def _advertised(limit: int, window: float) -> tuple[int, int]:
    """(q, w) of the advertised policy: whole seconds (the draft has no sub-second windows), never
    more generous than the quota."""
    seconds = max(1, round(window))
    return max(1, math.floor(limit * seconds / window + 1e-9)), seconds


# --- compile time ------------------------------------------------------------------------------------
def _quota_from_spec(item: Spec, build: BuildContext) -> Quota | None:
    if not item.is_mapping(allowed=_FIELDS):
        return None
    before = len(build.errors)
    name = item.str("name", required=True) or ""
    if name and not _NAME.fullmatch(name):
        item.error("must be 1-64 lower-case letters, digits, '.', '_' or '-', starting and ending with a "
                   "letter or digit", "name")  # fmt: skip
    key = item.cel("key", expect=KEY)
    when = item.cel("when", expect=BOOL)
    cost_node = item.child("cost")
    cost: Expression | None = None
    fixed_cost = 1
    if isinstance(cost_node.value, int) and not isinstance(cost_node.value, bool):
        fixed_cost = item.int("cost", 1, min=0, max=MAX_COST)
    elif cost_node.present:
        cost = item.cel("cost", expect=INTEGER)
    algorithm = item.str("algorithm", "gcra", choices=_ALGORITHMS)
    sliding = algorithm == "sliding-log"
    limit = item.int("limit", required=True, min=1, max=MAX_SLIDING_LIMIT if sliding else _MAX_LIMIT)
    window = item.duration("window", required=True)
    burst = item.int("burst", min=1, max=_MAX_LIMIT)
    if sliding and burst is not None:
        item.error("applies to algorithm gcra only: a sliding log admits at most limit in any window", "burst")
    mode = item.str("mode", "enforce", choices=("enforce", "shadow"))
    on_store_error = item.str("onStoreError", "deny", choices=("deny", "allow", "local"))
    headers = item.bool("headers", False)
    interval_us = 1
    if sliding and isinstance(limit, int) and isinstance(window, float):
        if not 0.001 <= window <= _MAX_WINDOW:
            item.error("must be at least 1ms and at most 366d", "window")
        interval_us = math.ceil(window * 1e6)  # a sliding log's counter reads the whole window
    elif isinstance(limit, int) and isinstance(window, float):
        if not 0 < window <= _MAX_WINDOW:
            item.error("must be more than 0 and at most 366d", "window")
        else:
            interval_us = math.ceil(window * 1e6 / limit)
            if window * 1e6 / limit < 1:
                item.error("limit / window is more than 1,000,000 per second", "limit")
            if (burst or limit) * interval_us > _MAX_BUCKET_US:
                item.error("burst x window / limit must be at most 1157 days", "burst")
    if len(build.errors) != before:
        return None
    # A sliding log is another kind of counter: switching a quota's algorithm starts it afresh.
    key_prefix = f"q:{build.policy_name}:{name}:" + ("log:" if sliding else "")
    advertised, seconds = _advertised(limit, window)
    return Quota(
        name=name, key=key, when=when, cost=cost, fixed_cost=fixed_cost, limit=limit, window=window,
        burst=burst or limit, interval_us=interval_us, enforce=mode == "enforce", on_store_error=on_store_error,
        headers=bool(headers), key_prefix=key_prefix, policy_item=f'"{name}";q={advertised};w={seconds}',
        advertised=advertised, fixed_key=key_prefix + "{global}", kind=SLIDING_LOG if sliding else GCRA,
    )  # fmt: skip
