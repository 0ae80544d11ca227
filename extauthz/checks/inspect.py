"""Inspect: attacks in the payload (Log4Shell, SQL injection, XSS, traversal, command injection,
SSRF, your own patterns) and parser or size limits, found in bounded time whatever the input.

The machinery is extauthz/inspection/ (decode pipeline, rules, SSRF, the engine) over the shared
body view (extauthz/payload/). This check turns a verdict into a denial, attributes and metrics. It
never allows: it returns a Denial or None, so it works the same in a deciding policy and in a layer.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import ClassVar

import re2

from extauthz.checks import Phase, register
from extauthz.context import CheckContext, Denial
from extauthz.inspection.engine import Exclusion, InspectConfig, Inspector, RequestLimits, Verdict
from extauthz.inspection.rules import BUILTIN_RULES, DETECTORS, KINDS, SSRF_RULES, Rule
from extauthz.inspection.ssrf import AddressAllowList
from extauthz.payload import NUMBER_LENGTH_FLOOR, PARSE_MAX_VALUES, JsonLimits
from extauthz.policy.build import BuildContext, Spec
from extauthz.telemetry import metrics

_FIELDS = {"mode", "sensitivity", "threshold", "detectors", "report", "disable", "exclude", "ssrf", "rules",
           "limits", "body", "headers"}  # fmt: skip
_EXCLUDE_FIELDS = {"rules", "paths", "locations"}
_RULE_FIELDS = {"id", "pattern", "targets", "score", "mode", "description"}
_LIMIT_FIELDS = {"json", "maxParameters", "maxCookies", "maxHeaderBytes", "partialBody"}
_JSON_FIELDS = {"maxDepth", "maxMembers", "maxItems", "maxStringLength", "maxNumberLength", "maxValues",
                "duplicateKeys"}  # fmt: skip
_RULE_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_LOCATION = re.compile(r"path|(?:query|header|cookie|filename):[^\s]{1,128}|body(?::[^\s]{1,512})?")
#: Rule ids and locations named in one denial message / attribute.
_SHOWN = 6


@register("inspect", Phase.INSPECT)
class InspectCheck:
    may_wait: ClassVar[bool] = False

    def __init__(self, inspector: Inspector, policy: str) -> None:
        self.inspector = inspector
        self.config = inspector.config
        self.policy = policy

    # --- policy load ---------------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: Spec, build: BuildContext) -> InspectCheck | None:
        if not spec.is_mapping(allowed=_FIELDS):
            return None
        mode = spec.str("mode", "enforce", choices=("enforce", "report"))
        sensitivity = spec.int("sensitivity", 1, min=1, max=3)
        threshold = spec.int("threshold", 5, min=1, max=100)
        detectors = spec.str_list("detectors") if spec.child("detectors").present else list(DETECTORS)
        for i, name in enumerate(detectors):
            if name not in DETECTORS:
                spec.child("detectors").error(f"unknown detector (known: {', '.join(DETECTORS)})", i)
        known_ids = {r.id for r in BUILTIN_RULES} | set(SSRF_RULES)
        disable = set(spec.str_list("disable"))
        for i, rule_id in enumerate(spec.str_list("disable")):
            if rule_id not in known_ids and rule_id not in DETECTORS:
                spec.child("disable").error("is not a built-in rule id or detector", i)
        custom = _custom_rules(spec.child("rules"), known_ids)
        custom_ids = {r.id for r in custom}
        report = set(spec.str_list("report"))
        for i, rule_id in enumerate(spec.str_list("report")):
            if rule_id not in known_ids | custom_ids and rule_id not in DETECTORS:
                spec.child("report").error("is not a rule id or detector", i)
        report |= {r.id for r in custom if r.description == "report"}
        rules = [r for r in BUILTIN_RULES
                 if r.detector in detectors and r.level <= sensitivity and r.id not in disable
                 and r.detector not in disable]  # fmt: skip
        rules += [replace(r, description="") for r in custom]
        exclusions = tuple(_exclusion(item) for item in spec.child("exclude").items() if item.is_mapping(
            allowed=_EXCLUDE_FIELDS))
        ssrf_allow: list[str] = []
        ssrf_spec = spec.child("ssrf")
        if ssrf_spec.present and ssrf_spec.is_mapping(allowed={"allow"}):
            ssrf_allow = ssrf_spec.str_list("allow")
            for i, entry in enumerate(ssrf_allow):
                problem = AddressAllowList.check(entry)
                if problem is not None:
                    ssrf_spec.child("allow").error(problem, i)
        config = InspectConfig(
            rules=tuple(rules),
            threshold=threshold or 5,
            report_only=mode == "report",
            report=frozenset(report),
            exclusions=exclusions,
            ssrf="ssrf" in detectors and "ssrf" not in disable,
            ssrf_allow=tuple(ssrf_allow),
            sensitivity=sensitivity or 1,
            limits=_limits(spec.child("limits")),
            inspect_body=spec.bool("body", True),
            inspect_headers=spec.bool("headers", True),
        )
        try:
            inspector = Inspector(config)
        except Exception as exc:  # RE2 out of memory for a set of huge custom patterns
            spec.error(f"the rules cannot be compiled together: {exc}")
            return None
        return cls(inspector, build.policy_name)

    # --- per request ---------------------------------------------------------------------------------
    async def check(self, ctx: CheckContext) -> Denial | None:
        verdict = self.inspector.inspect(ctx.request)
        if verdict.problem is not None:
            return self._limit(ctx, verdict)
        if not verdict.findings:
            return None
        config = self.config
        deny = not config.report_only and verdict.score >= config.threshold
        findings = verdict.findings
        rules = list(dict.fromkeys(f.rule for f in findings))
        locations = list(dict.fromkeys(f.location for f in findings))
        attributes = ctx.attributes
        attributes["inspect_rules"] = ",".join(rules[:_SHOWN])
        attributes["inspect_locations"] = ",".join(locations[:_SHOWN])
        attributes["inspect_score"] = verdict.score
        attributes["inspect_action"] = "deny" if deny else "report"
        if not deny:
            attributes["reported"] = True  # the decision log keeps this allow whatever its sampling
        m = metrics.current()
        if m is not None:
            for finding in findings:
                action = "reported" if finding.reported else ("blocked" if deny else "scored")
                m.inspect_finding(self.policy, finding.rule, finding.kind, action)
        if ctx.steps is not None:
            for finding in findings:
                state = "report only" if finding.reported else f"score {finding.score}"
                ctx.note(f"inspect: {finding.rule} at {finding.location} ({state})")
            ctx.note(f"inspect: total score {verdict.score}, threshold {config.threshold}"
                     f"{' -> deny' if deny else ''}")
        if not deny:
            return None
        enforced = list(dict.fromkeys(f.rule for f in findings if not f.reported))
        where = list(dict.fromkeys(f.location for f in findings if not f.reported))
        message = (f"request blocked by payload inspection: {', '.join(enforced[:_SHOWN])} "
                   f"at {', '.join(where[:_SHOWN])}")
        return Denial(403, "attack_detected", message, rule=",".join(enforced[:_SHOWN]))

    def _limit(self, ctx: CheckContext, verdict: Verdict) -> Denial | None:
        problem = verdict.problem
        assert problem is not None
        attributes = ctx.attributes
        attributes["inspect_limit"] = problem.limit or problem.reason
        if problem.pointer:
            where = problem.pointer if problem.pointer.startswith(("query", "header", "cookie", "part")) \
                else f"body:{problem.pointer}"
            attributes["inspect_locations"] = where
        attributes["inspect_action"] = "report" if verdict.problem_reported else "deny"
        if verdict.problem_reported:
            attributes["reported"] = True
        m = metrics.current()
        if m is not None:
            m.inspect_limit(self.policy, problem.limit or problem.reason,
                            "reported" if verdict.problem_reported else "blocked")
        ctx.note(f"inspect: {problem.reason}: {problem.message}"
                 f"{' (report only)' if verdict.problem_reported else ' -> deny'}")
        if verdict.problem_reported:
            return None
        message = problem.message
        if problem.pointer:
            message = f"{message} (at {attributes.get('inspect_locations', problem.pointer)})"
        return Denial(problem.status, problem.reason, message, rule=f"limit:{problem.limit or problem.reason}")


def _custom_rules(spec: Spec, known: set[str]) -> list[Rule]:
    rules: list[Rule] = []
    seen: set[str] = set()
    for item in spec.items():
        if not item.is_mapping(allowed=_RULE_FIELDS):
            continue
        rule_id = item.str("id", required=True) or ""
        if rule_id and _RULE_ID.fullmatch(rule_id) is None:
            item.error("must be lower-case letters, digits and '-' (at most 63)", "id")
        if rule_id in known or rule_id in seen or rule_id in DETECTORS:
            item.error("is already a rule id", "id")
        seen.add(rule_id)
        pattern = item.str("pattern", required=True) or ""
        targets = item.str_list("targets") if item.child("targets").present else ["query", "body"]
        for i, target in enumerate(targets):
            if target not in KINDS:
                item.child("targets").error(f"unknown target (known: {', '.join(KINDS)})", i)
        score = item.int("score", 5, min=1, max=100)
        mode = item.str("mode", "enforce", choices=("enforce", "report"))
        compiled = "(?mi)" + pattern
        try:
            options = re2.Options()
            options.max_mem = 8 << 20
            re2.compile(compiled, options=options)
        except Exception as exc:
            item.error(f"is not a valid RE2 pattern: {exc}", "pattern")
            continue
        if not pattern:
            continue
        rules.append(Rule(rule_id, "custom", 1, score or 5, compiled, frozenset(targets) & frozenset(KINDS),
                          frozenset(), "report" if mode == "report" else ""))
    return rules


def _exclusion(spec: Spec) -> Exclusion:
    rules = spec.str_list("rules")
    paths = spec.str_list("paths")
    for i, path in enumerate(paths):
        if not path.startswith("/") or "*" in path[:-1]:
            spec.child("paths").error("must be an exact path or a prefix ending in '/*'", i)
    locations = spec.str_list("locations")
    for i, location in enumerate(locations):
        if _LOCATION.fullmatch(location) is None:
            spec.child("locations").error(
                "must be 'path', 'query:NAME', 'header:NAME', 'cookie:NAME', 'filename:NAME', 'body' or "
                "'body:/json/pointer' ('*' for one token, a final '/**' for everything below)", i)
    if not rules and not paths and not locations:
        spec.error("an exclusion needs rules, paths or locations")
    lowered = tuple(loc.lower() if loc.startswith("header:") else loc for loc in locations)
    return Exclusion(frozenset(rules), tuple(paths), lowered)


def _limits(spec: Spec) -> RequestLimits:
    if not spec.present:
        return RequestLimits()
    if not spec.is_mapping(allowed=_LIMIT_FIELDS):
        return RequestLimits()
    json_limits = JsonLimits()
    json_spec = spec.child("json")
    if json_spec.present and json_spec.is_mapping(allowed=_JSON_FIELDS):
        defaults = JsonLimits()
        duplicates = json_spec.str("duplicateKeys", "refuse", choices=("refuse", "allow"))
        json_limits = JsonLimits(
            max_depth=json_spec.int("maxDepth", defaults.max_depth, min=1, max=1000),
            max_members=json_spec.int("maxMembers", defaults.max_members, min=1, max=PARSE_MAX_VALUES),
            max_items=json_spec.int("maxItems", defaults.max_items, min=1, max=PARSE_MAX_VALUES),
            max_string_length=json_spec.int("maxStringLength", defaults.max_string_length, min=1, max=1 << 24),
            max_number_length=json_spec.int("maxNumberLength", defaults.max_number_length, min=NUMBER_LENGTH_FLOOR,
                                            max=1 << 20),
            max_values=json_spec.int("maxValues", defaults.max_values, min=1, max=PARSE_MAX_VALUES),
            allow_duplicate_keys=duplicates == "allow",
        )
    defaults_request = RequestLimits()
    return RequestLimits(
        max_parameters=spec.int("maxParameters", defaults_request.max_parameters, min=1, max=100_000),
        max_cookies=spec.int("maxCookies", defaults_request.max_cookies, min=1, max=10_000),
        max_header_bytes=spec.int("maxHeaderBytes", defaults_request.max_header_bytes, min=64, max=1 << 20),
        json=json_limits,
        partial_body=spec.str("partialBody", "deny", choices=("deny", "inspect")),
    )
