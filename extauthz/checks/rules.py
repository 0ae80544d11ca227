"""Rules: an ordered list; the first rule whose ``when`` holds decides; none holds means deny."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from extauthz.cel import CelError, Expression
from extauthz.checks import Phase, register
from extauthz.context import CheckContext, Denial
from extauthz.policy.build import BuildContext, Spec

_RULE_FIELDS = {"name", "when", "decision", "status", "message"}


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    when: Expression | None
    allow: bool
    #: The denial this rule answers with (None for allow rules).
    denial: Denial | None


@register("rules", Phase.RULES, always=True)
class RulesCheck:
    may_wait: ClassVar[bool] = False

    def __init__(self, rules: tuple[Rule, ...], policy: str) -> None:
        self.rules = rules
        self.no_match = Denial(403, "no_rule_matched", f"no rule of policy {policy} allows this request")

    @classmethod
    def from_spec(cls, spec: Spec, build: BuildContext) -> RulesCheck:
        rules: list[Rule] = []
        names: set[str] = set()
        for item in spec.items():
            if not item.is_mapping(allowed=_RULE_FIELDS):
                continue
            name = item.str("name", required=True) or ""
            if name in names:
                item.error("duplicate rule name", "name")
            names.add(name)
            decision = item.str("decision", required=True, choices=("allow", "deny"))
            when = item.cel("when", expect="bool")
            status = item.int("status", 403, min=400, max=599)
            message = item.str("message", f"denied by rule {name}")
            if decision == "allow" and (item.child("status").present or item.child("message").present):
                item.error("status and message apply to deny rules only")
            denial = None if decision == "allow" else Denial(status, "denied_by_rule", message, rule=name)
            rules.append(Rule(name, when, decision == "allow", denial))
        return cls(tuple(rules), build.policy_name)

    async def check(self, ctx: CheckContext) -> Denial | None:
        for rule in self.rules:
            if rule.when is not None:
                try:
                    holds = rule.when.evaluate(ctx)
                except CelError as exc:
                    ctx.attributes["error"] = f"rule {rule.name}: {exc}"
                    ctx.note(f"rule {rule.name}: error: {exc.detail}")
                    return Denial(503, "internal_error", "policy evaluation failed", rule=rule.name)
                if holds is not True:
                    if holds is not False:
                        ctx.attributes["error"] = f"rule {rule.name}: when gave {type(holds).__name__}, not bool"
                        return Denial(503, "internal_error", "policy evaluation failed", rule=rule.name)
                    if ctx.steps is not None:  # explain only: no formatting on the serving path
                        ctx.note(f"rule {rule.name}: when is false")
                    continue
            ctx.rule = rule.name
            if ctx.steps is not None:
                why = "when holds" if rule.when else "no condition"
                ctx.note(f"rule {rule.name}: {why} -> {'allow' if rule.allow else 'deny'}")
            return rule.denial
        ctx.note("no rule matched -> deny")
        return self.no_match
