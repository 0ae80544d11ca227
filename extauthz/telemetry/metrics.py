"""Prometheus metrics. Labels are bounded: decision, reason and policy names, never subjects or paths."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from extauthz.decision import Decision

__all__ = ["Metrics"]

#: From 50 us to 100 ms: fast decisions are the norm, slow ones are what we must see.
DURATION_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.checks = Counter("extauthz_checks", "Check calls by outcome", ["decision", "reason", "policy"], registry=r)
        self.check_duration = Histogram(
            "extauthz_check_duration_seconds", "Time to decide one Check", buckets=DURATION_BUCKETS, registry=r
        )
        self.reloads = Counter("extauthz_policy_reloads", "Policy set loads by result", ["result"], registry=r)
        self.policies = Gauge("extauthz_policies", "Policies in the live set", registry=r)
        self.generation = Gauge("extauthz_policy_generation", "Generation of the live policy set", registry=r)
        self.policy_errors = Gauge(
            "extauthz_policy_errors", "Errors in the last rejected policy set (0 when the last load succeeded)", registry=r
        )

    def observe(self, decision: Decision) -> None:
        if decision.allowed:
            outcome = "dry_run_deny" if decision.would_deny else "allow"
        else:
            outcome = "deny"
        self.checks.labels(outcome, decision.reason, decision.policy or "-").inc()
        self.check_duration.observe(decision.duration)
