"""The API inventory: which documented operations are used, and which undocumented (shadow) endpoints
are called, per policy with an ``openapi:`` section.

Fed by every decision (the sidecar's decision observer) or by decision-log lines (``extauthz
inventory --decision-log``). A decision the openapi check saw carries its verdict in the attributes
(``openapi_operation``, ``openapi_undocumented``); one that was refused before it (no credentials)
is routed here against the same spec, so probing without credentials shows up too.

Undocumented requests are grouped by an inferred path template: numeric, UUID, long hexadecimal,
date, e-mail and id-like segments (letters mixed with digits, long tokens) become parameters named
after the segment before them (``/orders/8812`` -> ``/orders/{orderId}``). Memory is bounded: at
most ``max_shadow`` templates per process (further ones are counted, not kept), at most 16 methods,
statuses and identity kinds per template, segments of at most 64 characters and 16 segments per
template. Metric labels are bounded too: operation labels come from the spec, never from requests.
"""

from __future__ import annotations

import datetime
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from extauthz.openapi.model import CompiledSpec

__all__ = ["DEFAULT_MAX_SHADOW", "Inventory", "infer_template", "merge_snapshots", "shadow_skeleton"]

DEFAULT_MAX_SHADOW = 1000
_MAX_KEYS = 16
_MAX_SEGMENTS = 16
_MAX_SEGMENT = 64

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_HEX = re.compile(r"[0-9a-fA-F]{16,}")
_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}(?:T[0-9:.]+Z?)?")
_TOKEN = re.compile(r"[A-Za-z0-9_~.%+=-]+")
_IDENT = re.compile(r"[^A-Za-z0-9]+")


def _is_id(segment: str) -> bool:
    if _NUMBER.fullmatch(segment) or _UUID.fullmatch(segment) or _HEX.fullmatch(segment) or _DATE.fullmatch(segment):
        return True
    if "@" in segment or "%40" in segment:
        return True
    if _TOKEN.fullmatch(segment) is None:
        return True  # percent-escapes of odd characters, spaces: data, not a route name
    digits = sum(c.isdigit() for c in segment)
    letters = sum(c.isalpha() for c in segment)
    if len(segment) >= 24:
        return True  # a long token (a key, a slug with an id)
    return digits >= 2 and letters >= 1 and len(segment) >= 6  # "usr_8f3k2x", "AC12ab..."


def _name_after(previous: str, used: set[str]) -> str:
    base = _IDENT.sub("", previous.title()) if previous else ""
    base = base[:1].lower() + base[1:]
    if base.endswith("ies") and len(base) > 4:
        base = base[:-3] + "y"
    elif base.endswith("s") and not base.endswith("ss") and len(base) > 3:
        base = base[:-1]
    name = (base + "Id") if base else "id"
    candidate, n = name, 2
    while candidate in used:
        candidate, n = f"{name}{n}", n + 1
    used.add(candidate)
    return candidate


def infer_template(path: str) -> str:
    """A path template for an undocumented request path (the normalized path, without query)."""
    if path in ("", "/", "*"):
        return path or "/"
    segments = path[1:].split("/")
    out: list[str] = []
    used: set[str] = set()
    for index, segment in enumerate(segments[:_MAX_SEGMENTS]):
        if segment and _is_id(segment):
            previous = out[-1] if out and not out[-1].startswith("{") else ""
            out.append("{" + _name_after(previous, used) + "}")
        else:
            out.append(segment[:_MAX_SEGMENT])
        if index == _MAX_SEGMENTS - 1 and len(segments) > _MAX_SEGMENTS:
            out.append("{rest}")
    return "/" + "/".join(out)


def _count(table: dict[Any, int], key: Any, amount: int = 1) -> None:
    if key in table or len(table) < _MAX_KEYS:
        table[key] = table.get(key, 0) + amount


def _utc(when: float) -> str:
    return datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if when else ""


@dataclass(slots=True)
class _Usage:
    requests: int = 0
    first_seen: float = 0.0
    last_seen: float = 0.0
    decisions: dict[str, int] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)
    identity_kinds: dict[str, int] = field(default_factory=dict)
    methods: dict[str, int] = field(default_factory=dict)
    violations: dict[str, int] = field(default_factory=dict)

    def add(self, first: float, last: float, count: int, decision: str, status: int, kind: str, method: str,
            violation: str) -> None:  # fmt: skip
        self.requests += count
        self.first_seen = min(self.first_seen, first) if self.first_seen else first
        self.last_seen = max(self.last_seen, last)
        _count(self.decisions, decision, count)
        _count(self.statuses, status, count)
        _count(self.identity_kinds, kind or "anonymous", count)
        _count(self.methods, method, count)
        if violation:
            _count(self.violations, violation, count)

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests, "first_seen": _utc(self.first_seen), "last_seen": _utc(self.last_seen),
            "decisions": dict(self.decisions), "statuses": {str(k): v for k, v in self.statuses.items()},
            "identity_kinds": dict(self.identity_kinds), "methods": dict(self.methods),
            "violations": dict(self.violations),
        }  # fmt: skip


#: The openapi checks of the live policy set by policy name (anything with a ``compiled`` attribute,
#: the CompiledSpec serving now): cheap to call, it runs for every decision.
SpecsOf = Callable[[], Mapping[str, Any]]


#: Requests counted but not yet folded into the tables: at most this many distinct kinds.
_PENDING_LIMIT = 4096


class Inventory:
    """Per-process usage of documented operations and undocumented endpoints.

    The request path (``observe``, ``record``) only counts, in one dict keyed by what the request
    was; ``fold`` moves those counts into the tables (inferring shadow templates) and into the
    counts the metrics publish, once a second (the metrics flush) and before every report.
    """

    def __init__(self, specs: SpecsOf, *, max_shadow: int = DEFAULT_MAX_SHADOW, clock: Callable[[], float] = time.time
                 ) -> None:  # fmt: skip
        self._specs = specs
        self.max_shadow = max_shadow
        self._clock = clock
        self.started = clock()
        self._operations: dict[tuple[str, str], _Usage] = {}
        self._shadow: dict[tuple[str, str], _Usage] = {}
        #: Undocumented requests not kept because the table was full, by policy.
        self.dropped: dict[str, int] = {}
        #: (policy, operation, decision) -> count, and (policy, operation, reason, mode) -> count,
        #: and policy -> shadow requests: what the metrics publish next.
        self.pending_requests: dict[tuple[str, str, str], int] = {}
        self.pending_violations: dict[tuple[str, str, str, str], int] = {}
        self.pending_shadow: dict[str, int] = {}
        #: (policy, label or None, path of an undocumented request or "", method, outcome, status,
        #: identity kind, violation, mode) -> [count, first seen, last seen].
        self._recent: dict[tuple[Any, ...], list[Any]] = {}

    # --- counting (the request path) -------------------------------------------------------------
    def observe(self, decision: Any) -> None:
        """Decision observer (extauthz.decision.Decision)."""
        attributes = decision.attributes
        policy = decision.policy
        if attributes is not None and "openapi_policy" in attributes:  # the spec of a layer judged it
            policy = attributes["openapi_policy"]
        if not policy:
            return
        seen_by_check = attributes is not None and (
            "openapi_operation" in attributes or "openapi_undocumented" in attributes)
        if not seen_by_check and policy not in self._specs():
            return  # the common case: a policy without an openapi section
        request = decision.request
        if request is None:
            return
        if decision.allowed:
            outcome = "dry_run_deny" if decision.would_deny else "allow"
        else:
            outcome = "deny"
        identity = decision.identity
        kind = str(identity.get("kind", "")) if identity is not None else ""
        self.record(str(policy), request.method, request.path, outcome, decision.status, kind, attributes or {})

    def record(self, policy: str, method: str, path: str, outcome: str, status: int, identity_kind: str,
               attributes: Mapping[str, Any], when: float | None = None) -> None:  # fmt: skip
        if attributes.get("openapi_preflight"):
            return  # a CORS preflight the spec allows: neither an operation nor a shadow endpoint
        when = self._clock() if when is None else when
        violation = str(attributes.get("openapi_violation", ""))
        label = attributes.get("openapi_operation")
        undocumented = bool(attributes.get("openapi_undocumented"))
        if label is None and not undocumented:
            spec = self._spec(policy)
            if spec is None:
                return
            label = _route(spec, method, path)
            undocumented = label is None
        mode = str(attributes.get("openapi_mode", "enforce")) if violation else ""
        shadow = undocumented or label is None
        key = (policy, None if shadow else str(label), path if shadow else "", method, outcome, status, identity_kind,
               violation, mode)
        recent = self._recent
        entry = recent.get(key)
        if entry is None:
            if len(recent) >= _PENDING_LIMIT:
                self.fold()
            recent[key] = [1, when, when]
        else:
            entry[0] += 1
            entry[2] = when

    def fold(self) -> None:
        """Move the counts the request path kept into the tables and the metrics' pending counts."""
        recent, self._recent = self._recent, {}
        for (policy, label, path, method, outcome, status, kind, violation, mode), (count, first, last) in \
                recent.items():  # fmt: skip
            if violation:
                key4 = (policy, label if label is not None else "-", violation, mode)
                self.pending_violations[key4] = self.pending_violations.get(key4, 0) + count
            if label is None:
                self.pending_shadow[policy] = self.pending_shadow.get(policy, 0) + count
                table_key = (policy, infer_template(path))
                usage = self._shadow.get(table_key)
                if usage is None:
                    if len(self._shadow) >= self.max_shadow:
                        self.dropped[policy] = self.dropped.get(policy, 0) + count
                        continue
                    usage = self._shadow[table_key] = _Usage()
            else:
                key3 = (policy, label, outcome)
                self.pending_requests[key3] = self.pending_requests.get(key3, 0) + count
                usage = self._operations.get((policy, label))
                if usage is None:
                    usage = self._operations[(policy, label)] = _Usage()
            usage.add(first, last, count, outcome, status, kind, method, violation)

    def _spec(self, policy: str) -> CompiledSpec | None:
        check = self._specs().get(policy)
        return None if check is None else check.compiled

    def shadow_endpoints(self) -> dict[str, int]:
        self.fold()
        counts: dict[str, int] = {}
        for policy, _ in self._shadow:
            counts[policy] = counts.get(policy, 0) + 1
        return counts

    # --- the report -----------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Everything known, JSON-ready: per policy its spec's operations with their use, and the
        undocumented endpoints seen."""
        self.fold()
        specs = {name: check.compiled for name, check in self._specs().items() if check.compiled is not None}
        policies: dict[str, dict[str, Any]] = {}
        for name, spec in specs.items():
            policies[name] = {
                "policy": name,
                "spec": {"title": spec.title, "version": spec.version, "openapi": spec.openapi,
                         "base_paths": _base_paths(spec)},
                "operations": [
                    {"operation": op.label, "method": op.method, "path": op.template, "deprecated": op.deprecated,
                     "mode": op.mode, **(self._operations.get((name, op.label)) or _Usage()).as_dict()}
                    for op in spec.operations
                ],
                "shadow": [],
                "shadow_dropped": self.dropped.get(name, 0),
            }
        for (name, label), usage in self._operations.items():
            entry = policies.setdefault(name, _empty_policy(name))
            if name not in specs or spec_lacks(specs[name], label):
                entry["operations"].append({"operation": label, "method": "", "path": "", "deprecated": False,
                                            "mode": "", "removed": True, **usage.as_dict()})
        for (name, template), usage in self._shadow.items():
            entry = policies.setdefault(name, _empty_policy(name))
            entry["shadow"].append({"path": template, **usage.as_dict()})
            entry["shadow_dropped"] = self.dropped.get(name, 0)
        for entry in policies.values():
            entry["shadow"].sort(key=lambda s: -s["requests"])
        return {"since": _utc(self.started), "generated": _utc(self._clock()), "max_shadow": self.max_shadow,
                "policies": sorted(policies.values(), key=lambda p: p["policy"])}  # fmt: skip


def spec_lacks(spec: CompiledSpec, label: str) -> bool:
    return spec.operation(label) is None


def _empty_policy(name: str) -> dict[str, Any]:
    return {"policy": name, "spec": None, "operations": [], "shadow": [], "shadow_dropped": 0}


def _base_paths(spec: CompiledSpec) -> list[str]:
    return sorted({base for router in spec.routers for base in router.base_paths})


def _route(spec: CompiledSpec, method: str, path: str) -> str | None:
    """The label of the operation a request is, or None when it is undocumented."""
    found = spec.match(path)
    if found is None:
        return None
    operations = found[0].operations
    operation = operations.get(method)
    if operation is None and method == "HEAD" and spec.settings.head_from_get:
        operation = operations.get("GET")
    return None if operation is None else operation.label


def merge_snapshots(snapshots: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One report from several processes' (``--workers``): counts added, times widened."""
    merged: dict[str, dict[str, Any]] = {}
    since, generated, max_shadow = "", "", 0
    for snapshot in snapshots:
        since = min(filter(None, (since, snapshot.get("since", ""))), default="")
        generated = max(generated, snapshot.get("generated", ""))
        max_shadow = max(max_shadow, int(snapshot.get("max_shadow", 0)))
        for policy in snapshot.get("policies", ()):
            target = merged.get(policy["policy"])
            if target is None:
                merged[policy["policy"]] = _copy(policy)
                continue
            if target.get("spec") is None:
                target["spec"] = policy.get("spec")
            target["shadow_dropped"] += policy.get("shadow_dropped", 0)
            for key, kind in (("operations", "operation"), ("shadow", "path")):
                index = {item[kind]: item for item in target[key]}
                for item in policy.get(key, ()):
                    if item[kind] in index:
                        _add_usage(index[item[kind]], item)
                    else:
                        target[key].append(dict(item))
    for entry in merged.values():
        entry["shadow"].sort(key=lambda s: -s["requests"])
    return {"since": since, "generated": generated, "max_shadow": max_shadow,
            "policies": sorted(merged.values(), key=lambda p: p["policy"])}  # fmt: skip


def _copy(policy: Mapping[str, Any]) -> dict[str, Any]:
    return {**policy, "operations": [dict(o) for o in policy.get("operations", ())],
            "shadow": [dict(s) for s in policy.get("shadow", ())]}  # fmt: skip


def _add_usage(into: dict[str, Any], other: Mapping[str, Any]) -> None:
    into["requests"] = into.get("requests", 0) + other.get("requests", 0)
    firsts = [t for t in (into.get("first_seen"), other.get("first_seen")) if t]
    into["first_seen"] = min(firsts) if firsts else ""
    into["last_seen"] = max(into.get("last_seen", ""), other.get("last_seen", ""))
    for key in ("decisions", "statuses", "identity_kinds", "methods", "violations"):
        table = dict(into.get(key, {}))
        for name, count in (other.get(key) or {}).items():
            table[name] = table.get(name, 0) + count
        into[key] = table


def shadow_skeleton(snapshot: Mapping[str, Any], policy: str | None = None) -> dict[str, Any]:
    """An OpenAPI 3.1 document of the undocumented endpoints seen, for a team to review and merge:
    one operation per template and method, path parameters as strings, the traffic as ``x-extauthz``."""
    paths: dict[str, Any] = {}
    servers: list[str] = []
    titles: list[str] = []
    for entry in snapshot.get("policies", ()):
        if policy is not None and entry["policy"] != policy:
            continue
        spec = entry.get("spec") or {}
        bases = sorted((b for b in spec.get("base_paths", ()) if b), key=len, reverse=True)
        servers.extend(b for b in bases if b not in servers)
        titles.append(spec.get("title") or entry["policy"])
        for shadow in entry.get("shadow", ()):
            template = shadow["path"]
            for base in bases:
                if template == base or template.startswith(base + "/"):
                    template = template[len(base):] or "/"
                    break
            item = paths.setdefault(template, {})
            names = re.findall(r"\{([^{}]+)\}", template)
            for method, count in sorted(shadow.get("methods", {}).items()):
                if method.lower() not in ("get", "put", "post", "delete", "options", "head", "patch", "trace"):
                    continue
                item[method.lower()] = {
                    "summary": "Undocumented endpoint seen by extauthz: review before adding it to the spec",
                    "parameters": [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                                   for n in names],
                    "responses": {"default": {"description": "not documented yet"}},
                    "x-extauthz": {"policy": entry["policy"], "requests": count,
                                   "first_seen": shadow.get("first_seen", ""), "last_seen": shadow.get("last_seen", ""),
                                   "statuses": shadow.get("statuses", {}),
                                   "identity_kinds": shadow.get("identity_kinds", {})},
                }
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "Undocumented endpoints of " + (", ".join(dict.fromkeys(titles)) or "the API"),
                 "version": snapshot.get("generated", "") or "0"},
        "paths": dict(sorted(paths.items())),
    }
    if servers:
        document["servers"] = [{"url": base} for base in servers]
    return document
