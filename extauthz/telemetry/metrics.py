"""Prometheus metrics. Labels are bounded: decision, reason, policy, stage and result names, never
subjects, paths or addresses.

One :class:`Metrics` object per process owns every metric. The server installs it as the process'
metrics (:func:`install`); checks, stores and fetchers report through the module functions below
(:func:`store_error`, :func:`circuit_state`, :func:`jwks_fetch`, :func:`introspection_request`), which
are cheap no-ops until a Metrics object is installed, so library code never needs a reference to it.

Several worker processes (``extauthz serve --workers N``) share one view through prometheus-client's
multiprocess mode: when ``PROMETHEUS_MULTIPROC_DIR`` is set before start, every process writes its
values to files there and ``/metrics`` (served by any worker) aggregates all of them.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
from collections.abc import Callable
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from extauthz.decision import Decision

log = logging.getLogger("extauthz.metrics")

__all__ = [
    "CIRCUIT_STATES",
    "DURATION_BUCKETS",
    "STAGE_BUCKETS",
    "Metrics",
    "circuit_state",
    "count_export_errors",
    "count_log_export_errors",
    "current",
    "install",
    "introspection_request",
    "jwks_fetch",
    "multiprocess_dir",
    "password_verification",
    "store_error",
]

#: From 25 us to 100 ms (and a few beyond): fast decisions are the norm, slow ones are what we must see.
DURATION_BUCKETS = (
    0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip
#: Stages are shorter still: a CEL rule takes microseconds, a Redis round trip a millisecond.
STAGE_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
)  # fmt: skip
#: Remote fetches (JWKS, introspection) take milliseconds to seconds.
FETCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: Decisions counted before the request path publishes them (also published every second and on scrape).
FLUSH_EVERY = 1024

#: Values of ``extauthz_store_circuit_state``.
CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}


def multiprocess_dir() -> str | None:
    """The multiprocess directory when prometheus-client runs in multiprocess mode, else None."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """Every metric of the sidecar. ``observe`` is the decision observer; ``stage`` the stage observer."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.multiprocess = multiprocess_dir() is not None
        r = self.registry

        def gauge(name: str, doc: str, labels: tuple[str, ...] = (),
                  mode: Literal["livemax", "livesum"] = "livemax") -> Gauge:  # fmt: skip
            # multiprocess_mode is ignored outside multiprocess mode.
            return Gauge(name, doc, labels, registry=r, multiprocess_mode=mode)

        self.checks = Counter(
            "extauthz_checks", "Check calls by outcome (allow, deny, dry_run_deny), reason and policy",
            ["decision", "reason", "policy"], registry=r,
        )  # fmt: skip
        self.check_duration = Histogram(
            "extauthz_check_duration_seconds", "Time to decide one Check (parse to decision)",
            buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.stage_duration = Histogram(
            "extauthz_stage_duration_seconds",
            "Time spent in each stage of a Check (recorded for one Check in 8): parse, select, identity, "
            "signature, rules, quota, response",
            ["stage"], buckets=STAGE_BUCKETS, registry=r,
        )  # fmt: skip
        self.grpc_in_flight = gauge("extauthz_grpc_in_flight", "Check calls being decided now", mode="livesum")
        self.layers = Counter(
            "extauthz_layer_decisions", "What each layer that ran did: pass, deny, or would_deny (dry-run)",
            ["layer", "outcome"], registry=r,
        )  # fmt: skip
        self.malformed = Counter("extauthz_malformed_requests", "CheckRequests that could not be parsed", registry=r)
        self.reloads = Counter("extauthz_policy_reloads", "Policy set loads by result", ["result"], registry=r)
        self.policies = gauge("extauthz_policies", "Policies in the live set")
        self.generation = gauge("extauthz_policy_generation", "Generation of the live policy set")
        self.policy_errors = gauge(
            "extauthz_policy_errors", "Errors in the last rejected policy set (0 when the last load succeeded)"
        )
        self.last_reload = gauge(
            "extauthz_policy_last_reload_timestamp_seconds", "Unix time of the last successful policy load"
        )
        self.store_errors = Counter(
            "extauthz_store_errors", "Store operations that failed (each one denied or degraded as configured)",
            ["store", "operation"], registry=r,
        )  # fmt: skip
        self.circuit = gauge(
            "extauthz_store_circuit_state", "Circuit breaker state per store: 0 closed, 1 half-open, 2 open", ("store",)
        )
        self.jwks_fetches = Counter(
            "extauthz_jwks_fetches", "JWKS fetches by result (ok, error)", ["result"], registry=r
        )
        self.introspections = Counter(
            "extauthz_introspection_requests", "Token introspection calls by result (active, inactive, error)",
            ["result"], registry=r,
        )  # fmt: skip
        self.fetch_duration = Histogram(
            "extauthz_fetch_duration_seconds", "Duration of remote fetches by kind (jwks, introspection)",
            ["kind"], buckets=FETCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.password_verifications = Counter(
            "extauthz_password_verifications",
            "HTTP Basic password verifications by result (match, mismatch, overloaded; cache hits not counted)",
            ["result"], registry=r,
        )  # fmt: skip
        self.password_duration = Histogram(
            "extauthz_password_verification_seconds",
            "Duration of HTTP Basic password verifications, the wait for a hashing thread included",
            buckets=FETCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.decision_log_dropped = Counter(
            "extauthz_decision_log_dropped", "Decision log lines dropped: the writer fell behind or could not write",
            registry=r,
        )
        self.trace_export_errors = Counter(
            "extauthz_trace_export_errors",
            "Spans not exported: dropped on the way to the exporter, or refused or unanswered by the collector",
            registry=r,
        )
        self.openapi_requests = Counter(
            "extauthz_openapi_requests",
            "Requests to documented API operations by policy, operation (operationId, else 'METHOD /template' as "
            "the spec writes it) and decision (allow, deny, dry_run_deny)",
            ["policy", "operation", "decision"], registry=r,
        )  # fmt: skip
        self.openapi_violations = Counter(
            "extauthz_openapi_violations",
            "Requests that broke the API description, by policy, operation ('-' when undocumented), reason and "
            "mode (enforce: denied, report: let through)",
            ["policy", "operation", "reason", "mode"], registry=r,
        )  # fmt: skip
        self.openapi_shadow_requests = Counter(
            "extauthz_openapi_shadow_requests", "Requests to undocumented (shadow) endpoints by policy",
            ["policy"], registry=r,
        )  # fmt: skip
        self.openapi_shadow_endpoints = gauge(
            "extauthz_openapi_shadow_endpoints", "Undocumented endpoint templates in the inventory, by policy",
            ("policy",), mode="livesum",
        )  # fmt: skip
        self.openapi_shadow_untracked = Counter(
            "extauthz_openapi_shadow_untracked",
            "Requests to undocumented endpoints counted but not kept: the inventory table was full", ["policy"],
            registry=r,
        )  # fmt: skip
        #: Called by flush() before publishing (e.g. the API inventory's counts).
        self.flush_hooks: list[Callable[[], None]] = []
        self.decision_log_export_errors = Counter(
            "extauthz_decision_log_export_errors",
            "Decision log records not exported over OTLP: dropped on the way to the exporter, or refused or "
            "unanswered by the collector", registry=r,
        )  # fmt: skip
        self.inspect_findings = Counter(
            "extauthz_inspect_findings",
            "Payload inspection findings by policy, rule id, target kind and action (blocked, scored, reported)",
            ["policy", "rule", "target", "action"], registry=r,
        )  # fmt: skip
        self.inspect_limits = Counter(
            "extauthz_inspect_limit_violations",
            "Requests over a payload inspection limit by policy, limit and action (blocked, reported)",
            ["policy", "limit", "action"], registry=r,
        )  # fmt: skip
        self._inspect_children: dict[tuple[str, ...], Any] = {}
        self.detections = Counter(
            "extauthz_detections",
            "Abuse detector trips by policy, detector and action (log, throttle, block, dry_run_throttle, "
            "dry_run_block)", ["policy", "detector", "action"], registry=r,
        )  # fmt: skip
        self.blocks_active = gauge(
            "extauthz_blocks_active", "Live blocks and throttles of abuse detectors (in process: exact; with Redis: "
            "those this replica decided, until they end)", mode="livesum",
        )  # fmt: skip
        self.build_info = gauge("extauthz_build_info", "Version of the running sidecar (always 1)", ("version",))
        self.build_info.labels(_version()).set(1)
        # Label children are cached: .labels() costs a microsecond, a cached child's inc a fraction.
        self._check_children: dict[tuple[str, str, str], Any] = {}
        self._stage_children: dict[str, Any] = {}
        #: Checks being decided now (the request path counts in a plain int; see flush).
        self.in_flight = 0
        # Per-Check counts and durations wait here until flush(): a dict update and a list append
        # instead of prometheus-client's locked increments and bucket search on every Check.
        self._pending_checks: dict[tuple[str, str, str], int] = {}
        self._pending_durations: list[float] = []
        #: stage -> its durations since the last flush.
        self._pending_stages: dict[str, list[float]] = {}
        #: "layer:outcome" -> count since the last flush.
        self._pending_layers: dict[str, int] = {}

    # --- observers (the request path: keep them cheap) -------------------------------------------
    def observe(self, decision: Decision) -> None:
        """Decision observer: count the outcome and record the duration (published by flush)."""
        if decision.allowed:
            outcome = "dry_run_deny" if decision.would_deny else "allow"
        else:
            outcome = "deny"
        key = (outcome, decision.reason, decision.policy or "-")
        pending = self._pending_checks
        pending[key] = pending.get(key, 0) + 1
        attributes = decision.attributes
        if attributes is not None and "layers" in attributes:  # only requests that layers matched
            pending_layers = self._pending_layers
            for entry in attributes["layers"]:
                pending_layers[entry] = pending_layers.get(entry, 0) + 1
        durations = self._pending_durations
        durations.append(decision.duration)
        if len(durations) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        """Publish what the request path counted since the last flush. Called before every scrape
        and, by the server, every second (multiprocess mode reads the values other workers wrote)."""
        for hook in self.flush_hooks:
            try:
                hook()
            except Exception:  # a hook must not stop the process' own metrics
                log.exception("metrics flush hook failed")
        pending, self._pending_checks = self._pending_checks, {}
        durations, self._pending_durations = self._pending_durations, []
        for key, count in pending.items():
            child = self._check_children.get(key)
            if child is None:
                child = self._check_children[key] = self.checks.labels(*key)
            child.inc(count)
        if durations:
            _observe_many(self.check_duration, durations)
        layers, self._pending_layers = self._pending_layers, {}
        for entry, count in layers.items():
            layer, _, outcome = entry.rpartition(":")
            self.layers.labels(layer, outcome).inc(count)
        stages, self._pending_stages = self._pending_stages, {}
        for stage, seconds in stages.items():
            child = self._stage_children.get(stage)
            if child is None:
                child = self._stage_children[stage] = self.stage_duration.labels(stage)
            _observe_many(child, seconds)
        self.grpc_in_flight.set(self.in_flight)

    def stage(self, stage: str, seconds: float) -> None:
        """Stage observer: the time one stage of a Check took (published with the Check counts)."""
        pending = self._pending_stages.get(stage)
        if pending is None:
            pending = self._pending_stages[stage] = []
        pending.append(seconds)
        if len(pending) >= FLUSH_EVERY:
            self.flush()

    def attach_inventory(self, inventory: Any) -> None:
        """Publish an openapi.inventory.Inventory's counts with every flush."""
        published_untracked: dict[str, int] = {}

        def publish() -> None:
            inventory.fold()
            requests, inventory.pending_requests = inventory.pending_requests, {}
            for key, count in requests.items():
                self.openapi_requests.labels(*key).inc(count)
            violations, inventory.pending_violations = inventory.pending_violations, {}
            for key4, count in violations.items():
                self.openapi_violations.labels(*key4).inc(count)
            shadow, inventory.pending_shadow = inventory.pending_shadow, {}
            for policy, count in shadow.items():
                self.openapi_shadow_requests.labels(policy).inc(count)
            for policy, count in inventory.shadow_endpoints().items():
                self.openapi_shadow_endpoints.labels(policy).set(count)
            for policy, count in inventory.dropped.items():
                delta = count - published_untracked.get(policy, 0)
                if delta > 0:
                    self.openapi_shadow_untracked.labels(policy).inc(delta)
                    published_untracked[policy] = count

        self.flush_hooks.append(publish)

    def inspect_finding(self, policy: str, rule: str, target: str, action: str) -> None:
        """A payload inspection finding. Labels are bounded: rule ids come from the loaded policies,
        targets and actions are fixed sets. Only requests with findings pay for it."""
        key = ("f", policy, rule, target, action)
        child = self._inspect_children.get(key)
        if child is None:
            child = self._inspect_children[key] = self.inspect_findings.labels(policy, rule, target, action)
        child.inc()

    def inspect_limit(self, policy: str, limit: str, action: str) -> None:
        """A request over a payload inspection limit (limit: depth, members, parameters, ...)."""
        key = ("l", policy, limit, action)
        child = self._inspect_children.get(key)
        if child is None:
            child = self._inspect_children[key] = self.inspect_limits.labels(policy, limit, action)
        child.inc()

    # --- exposition ------------------------------------------------------------------------------
    def exposition(self) -> bytes:
        """The text served on /metrics: this process' registry, or every process' in multiprocess mode."""
        self.flush()
        if self.multiprocess:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


def _observe_many(histogram: Histogram, values: list[float]) -> None:
    """``histogram.observe(v) for v in values``, with one increment per bucket instead of per value.

    prometheus-client has no batch API; this uses its Histogram's value slots (``_upper_bounds``,
    ``_buckets``, ``_sum``; stable for years, in single and multiprocess mode alike) when they are
    there, and falls back to observe() one by one when a version lays them out differently.
    """
    bounds = getattr(histogram, "_upper_bounds", None)
    slots = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or slots is None or total is None or len(bounds) != len(slots):
        for value in values:
            histogram.observe(value)
        return
    counts = [0] * len(bounds)
    for value in values:
        counts[bisect.bisect_left(bounds, value)] += 1  # the first bucket whose bound is >= value
    for slot, count in zip(slots, counts, strict=True):
        if count:
            slot.inc(count)
    total.inc(math.fsum(values))


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("extauthz")
    except Exception:
        return "unknown"


# --- the process' metrics, for code that has no reference to the server ---------------------------
_current: Metrics | None = None


def install(metrics: Metrics | None) -> None:
    """Make ``metrics`` the process' metrics (the server does this; None uninstalls)."""
    global _current
    _current = metrics


def current() -> Metrics | None:
    return _current


def _guarded(fn: Callable[[Metrics], None]) -> None:
    metrics = _current
    if metrics is not None:
        fn(metrics)


def count_export_errors(spans: int) -> None:
    """``spans`` spans were not exported (dropped on the way, or the collector refused them)."""
    _guarded(lambda m: m.trace_export_errors.inc(spans))


def count_log_export_errors(records: int) -> None:
    """``records`` decision log records were not exported over OTLP (dropped, or the collector refused them)."""
    _guarded(lambda m: m.decision_log_export_errors.inc(records))


def store_error(store: str, operation: str) -> None:
    """A store operation failed. ``store``: "redis", "memory"; ``operation``: "incr", "remember_once", ..."""
    _guarded(lambda m: m.store_errors.labels(store, operation).inc())


def circuit_state(store: str, state: str) -> None:
    """A store's circuit breaker changed state: "closed", "half_open" or "open"."""
    _guarded(lambda m: m.circuit.labels(store).set(CIRCUIT_STATES[state]))


def detection(policy: str, detector: str, action: str) -> None:
    """An abuse detector tripped (labels bounded: names from the loaded policies, a fixed set of actions)."""
    _guarded(lambda m: m.detections.labels(policy, detector, action).inc())


def jwks_fetch(result: str, seconds: float | None = None) -> None:
    """A JWKS fetch (discovery included) finished: result "ok" or "error"; seconds it took when known."""

    def record(m: Metrics) -> None:
        m.jwks_fetches.labels(result).inc()
        if seconds is not None:
            m.fetch_duration.labels("jwks").observe(seconds)

    _guarded(record)


def password_verification(result: str, seconds: float | None = None) -> None:
    """An HTTP Basic password verification ended: "match", "mismatch" or "overloaded" (refused at once)."""

    def record(m: Metrics) -> None:
        m.password_verifications.labels(result).inc()
        if seconds is not None:
            m.password_duration.observe(seconds)

    _guarded(record)


def introspection_request(result: str, seconds: float | None = None) -> None:
    """A token introspection call finished: result "active", "inactive" or "error"."""

    def record(m: Metrics) -> None:
        m.introspections.labels(result).inc()
        if seconds is not None:
            m.fetch_duration.labels("introspection").observe(seconds)

    _guarded(record)
