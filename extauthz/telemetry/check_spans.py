"""One Check's spans as a single compact record, and its expansion into span records.

A sampled Check has a span of its own and one per stage. Building five span tuples with attribute
dicts, and marshalling them across to the exporter process, cost the sidecar about as much as deciding
the Check. So the sidecar keeps only what differs from one Check to the next: ids, times, the
decision's facts as a flat tuple, and per stage its name, check, times and outcome. The exporter
process (or, with in-process export, the span processor's caller) expands that into the spans.
Everything in a record is already safe to export: secret-named attributes are dropped and the
subject is hashed before the record is made, so the pipe never carries more than the spans will.
Stage spans get their ids when expanded (random, as the SDK's default id generator makes them;
the Check span's id comes from the sidecar, which logs it).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

__all__ = ["CheckRecord", "Facts", "attributes_from_facts", "expand", "random_span_id"]

#: (trace_id, span_id, parent_span_id or 0, parent_is_remote, trace_state pairs or None, start_ns,
#:  end_ns, status_code, status_description, facts or None (cancelled), sampler attributes or None,
#:  stages: [(stage, check, start_ns, end_ns, denial reason or None, error type or None)])
CheckRecord = tuple[Any, ...]

#: (decision, reason, status, decision_id, dry_run, policy, rule, would_deny, method, host, path,
#:  client address, identity kind or None, identity source, subject (name, value) or None,
#:  decision attributes already filtered and renamed, or None); see tracing.decision_facts. Values
#:  have exactly these types (str, str, int, str, bool, str, str, bool, then str or None): the
#:  encoder keeps encodings by value, and True == 1 in a dict. A plain tuple, not a NamedTuple,
#:  because marshal only takes plain ones; the positions that are read by index are named here.
Facts = tuple[Any, ...]
DECISION_ID = 3
EXTRA = 15

#: The SDK's values of SpanKind and StatusCode (as span records carry them).
INTERNAL, SERVER = 0, 1
UNSET, ERROR = 0, 2

_STAGE_NAMES: dict[str, str] = {}


def random_span_id() -> int:
    span_id = random.getrandbits(64)
    while not span_id:
        span_id = random.getrandbits(64)
    return span_id


def _stage_name(stage: str) -> str:
    name = _STAGE_NAMES.get(stage)
    if name is None:
        name = _STAGE_NAMES[stage] = f"extauthz.{stage}"
    return name


def attributes_from_facts(facts: Facts | None, sampler_attributes: dict[str, Any] | None = None) -> dict[str, Any]:
    """The attributes of a Check's own span."""
    attributes: dict[str, Any] = {
        "rpc.system": "grpc",
        "rpc.service": "envoy.service.auth.v3.Authorization",
        "rpc.method": "Check",
    }
    if facts is None:  # cancelled before a decision
        return attributes
    (outcome, reason, status, decision_id, dry_run, policy, rule, would_deny, method, host, path, address, kind,
     source, subject, extra) = facts  # fmt: skip
    attributes["extauthz.decision"] = outcome
    attributes["extauthz.reason"] = reason
    attributes["extauthz.status"] = status
    attributes["extauthz.decision_id"] = decision_id
    attributes["extauthz.dry_run"] = dry_run
    if sampler_attributes:  # a custom sampler's: never over what the Check itself says
        for name, value in sampler_attributes.items():
            attributes.setdefault(name, value)
    if policy:
        attributes["extauthz.policy"] = policy
    if rule:
        attributes["extauthz.rule"] = rule
    if would_deny:
        attributes["extauthz.would_deny"] = True
    if method is not None:
        attributes["http.request.method"] = method
        if host:
            attributes["server.address"] = host
        attributes["url.path"] = path
        if address:
            attributes["client.address"] = address
    if kind is not None:
        attributes["extauthz.identity.kind"] = kind
        if source:
            attributes["extauthz.identity.source"] = source
        if subject is not None:
            attributes[subject[0]] = subject[1]
    if extra:
        attributes.update(extra)
    return attributes


def expand(record: CheckRecord, span_id: Callable[[], int] = random_span_id) -> list[tuple[Any, ...]]:
    """The span records (span_export.SpanRecord) of one Check: its stages', then its own."""
    (trace_id, check_span_id, parent_id, parent_remote, state, start, end, code, description, facts, sampler,
     stages) = record  # fmt: skip
    spans: list[tuple[Any, ...]] = []
    for stage, check, stage_start, stage_end, denied, error in stages:
        attributes: dict[str, Any] = {"extauthz.check": check} if check else {}
        stage_code, stage_description = UNSET, ""
        if denied is not None:
            attributes["extauthz.denied"] = True
            attributes["extauthz.reason"] = denied
        if error is not None:
            attributes["error.type"] = stage_description = error
            stage_code = ERROR
        spans.append((_stage_name(stage), trace_id, span_id(), check_span_id, False, 1, state, INTERNAL, stage_start,
                      stage_end, attributes, stage_code, stage_description))  # fmt: skip
    spans.append(("extauthz.check", trace_id, check_span_id, parent_id, parent_remote, 1, state, SERVER, start, end,
                  attributes_from_facts(facts, sampler), code, description))  # fmt: skip
    return spans
