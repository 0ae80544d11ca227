"""Rules: an ordered list; the first rule whose ``when`` holds decides.

In a deciding policy a rule allows or denies, and when none holds the request is denied. In a
``LayerPolicy`` a rule denies or passes (hands the request on to the next layer and, last, to its
deciding policy), and when none holds the request passes: a layer can refuse, never allow.
"""

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
    #: "allow" or "deny" in a deciding policy; "pass" or "deny" in a layer.
    decision: str
    #: The denial this rule answers with (None for allow and pass rules).
    denial: Denial | None


@register("rules", Phase.RULES, always=True)
class RulesCheck:
    may_wait: ClassVar[bool] = False

    def __init__(self, rules: tuple[Rule, ...], policy: str, *, layer: bool = False) -> None:
        self.rules = rules
        #: A layer's rules hand the request on when none holds; a policy's deny it.
        self.no_match = None if layer else Denial(403, "no_rule_matched",
                                                  f"no rule of policy {policy} allows this request")

    @classmethod
    def from_spec(cls, spec: Spec, build: BuildContext) -> RulesCheck | None:
        if build.layer and not spec.present:
            return None  # a layer without rules hands every request on
        choices = ("pass", "deny") if build.layer else ("allow", "deny")
        rules: list[Rule] = []
        names: set[str] = set()
        for item in spec.items():
            if not item.is_mapping(allowed=_RULE_FIELDS):
                continue
            name = item.str("name", required=True) or ""
            if name in names:
                item.error("duplicate rule name", "name")
            names.add(name)
            decision = item.child("decision").value
            if build.layer and decision == "allow":
                item.error("a layer never allows a request: use 'pass' to hand it on to the next layer and "
                           "its deciding policy", "decision")
                decision = None
            elif not build.layer and decision == "pass":
                item.error("'pass' is for LayerPolicy rules: a deciding policy's rules allow or deny", "decision")
                decision = None
            else:
                decision = item.str("decision", required=True, choices=choices)
            when = item.cel("when", expect="bool")
            status = item.int("status", 403, min=400, max=599)
            message = item.str("message", f"denied by rule {name}")
            if decision != "deny" and (item.child("status").present or item.child("message").present):
                item.error("status and message apply to deny rules only")
            denial = Denial(status, "denied_by_rule", message, rule=name) if decision == "deny" else None
            rules.append(Rule(name, when, decision or "deny", denial))
        return cls(tuple(rules), build.policy_name, layer=build.layer)

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
                ctx.note(f"rule {rule.name}: {why} -> {rule.decision}")
            return rule.denial
        if ctx.steps is not None:
            ctx.note("no rule matched -> " + ("deny" if self.no_match is not None else "pass"))
        return self.no_match
