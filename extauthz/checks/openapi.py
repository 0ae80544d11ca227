"""OpenAPI: only the operations a spec documents, with valid parameters and bodies, by callers the
operation's security accepts (``spec.openapi``).

The spec is a watched file (re-read when it or a file it references changes; a new version that does
not load is logged and the last good one keeps serving). The check runs after identity and signature
and before the rules, so it judges security requirements against the identity the policy
established, and rules, response headers and quotas see ``request.operation``. It denies or lets the
request go on; it never allows on its own.

In ``report`` mode (for the section, or per operation) a violation is recorded (decision log
attributes, span, metrics, inventory) and the request goes on to the rules.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from extauthz.checks import Phase, register
from extauthz.checks.identity import challenge
from extauthz.context import CheckContext, Denial
from extauthz.openapi import CompiledSpec, Settings, SpecFiles, compile_spec, evaluate, operation_view
from extauthz.openapi.model import Violation
from extauthz.policy.build import BuildContext, Spec
from extauthz.request import BadRequest, normalize_path
from extauthz.watched import WatchedPath

if TYPE_CHECKING:
    from extauthz.policy.compiler import PolicySet

__all__ = ["OpenApiCheck", "openapi_checks"]

log = logging.getLogger("extauthz.openapi")

_FIELDS = {
    "spec", "mode", "basePaths", "trailingSlash", "headFromGet", "corsPreflight", "deprecated",
    "unknownQueryParameters", "unknownCookies", "formats", "readOnly", "additionalProperties", "undeclaredBody",
    "security", "securitySchemes", "operations",
}  # fmt: skip
_IDENTITY_KINDS = ("jwt", "oauth2Introspection", "apiKey", "mtls", "signature", "basic")


@dataclass(slots=True)
class SpecReader:
    """Compiles one spec with one policy's settings; remembers the files the last reading used
    (the watcher re-reads the spec when any of them changes)."""

    settings: Settings
    files: list[Path] = field(default_factory=list)

    def parse(self, path: Path) -> CompiledSpec:
        reading = SpecFiles(path)
        try:
            return compile_spec(path, self.settings, reading)
        finally:
            self.files = list(reading.files)

    def read_files(self) -> list[Path]:
        return self.files


def _settings(spec: Spec, build: BuildContext) -> Settings:
    mode = spec.str("mode", "enforce", choices=("enforce", "report"))
    base_paths: tuple[str, ...] | None = None
    if spec.child("basePaths").present:
        listed = spec.str_list("basePaths")
        for i, base in enumerate(listed):
            if not base.startswith("/") or "{" in base or "?" in base:
                spec.child("basePaths").error("must be a path starting with '/' (no templates or query)", i)
                continue
            try:
                normalized = normalize_path(base)
            except BadRequest as exc:
                spec.child("basePaths").error(str(exc), i)
                continue
            if normalized != base:
                spec.child("basePaths").error(f"is not in normalized form (requests are matched as {normalized!r})", i)
        base_paths = tuple(b.rstrip("/") for b in listed)
    schemes: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = []
    identity_names = _identity_names(build)
    for name, node in spec.child("securitySchemes").entries():
        if not node.is_mapping(allowed={"sources", "kinds"}):
            continue
        sources = tuple(node.str_list("sources"))
        kinds = tuple(node.str_list("kinds"))
        for i, source in enumerate(sources):
            if source not in identity_names:
                node.child("sources").error(f"names no identity source of this policy (it has: "
                                            f"{', '.join(sorted(identity_names)) or 'none'})", i)  # fmt: skip
        for i, kind in enumerate(kinds):
            if kind not in _IDENTITY_KINDS:
                node.child("kinds").error(f"must be one of {', '.join(_IDENTITY_KINDS)}", i)
        if not sources and not kinds:
            node.error("give sources or kinds")
        schemes.append((name, sources, kinds))
    modes: list[tuple[str, str]] = []
    for name, node in spec.child("operations").entries():
        if node.is_mapping(allowed={"mode"}):
            modes.append((name, node.str("mode", required=True, choices=("enforce", "report")) or "enforce"))
    return Settings(
        mode=mode or "enforce",
        base_paths=base_paths,
        trailing_slash=spec.str("trailingSlash", "strict", choices=("strict", "ignore")) or "strict",
        head_from_get=spec.bool("headFromGet", True),
        cors_preflight=spec.bool("corsPreflight", False),
        deprecated=spec.str("deprecated", "allow", choices=("allow", "deny")) or "allow",
        unknown_query=spec.str("unknownQueryParameters", "deny", choices=("deny", "allow")) or "deny",
        unknown_cookies=spec.str("unknownCookies", "ignore", choices=("ignore", "deny")) or "ignore",
        formats=spec.bool("formats", True),
        read_only=spec.str("readOnly", "deny", choices=("deny", "allow")) or "deny",
        additional_properties=spec.str("additionalProperties", "declared", choices=("declared", "strict"))
        or "declared",
        undeclared_body=spec.str("undeclaredBody", "deny", choices=("deny", "allow")) or "deny",
        security=spec.str("security", "enforce", choices=("enforce", "ignore")) or "enforce",
        scheme_identities=tuple(schemes),
        operation_modes=tuple(modes),
    )


def _identity_names(build: BuildContext) -> set[str]:
    entries = build.document.body.get("spec", {}).get("identity")
    if not isinstance(entries, list):
        return set()
    return {str(e["name"]) for e in entries if isinstance(e, dict) and isinstance(e.get("name"), str)}


@register("openapi", Phase.OPENAPI)
class OpenApiCheck:
    may_wait: ClassVar[bool] = False

    def __init__(self, spec: WatchedPath[CompiledSpec], policy: str, layer: bool = False) -> None:
        self.spec = spec
        self.policy = policy
        #: In a LayerPolicy the decision is named after the deciding policy: the inventory is told
        #: whose spec judged the request.
        self.layer = layer
        self.unavailable = Denial(503, "openapi_spec_unavailable", "the API description is not loaded",
                                  rule="openapi")  # fmt: skip

    @classmethod
    def from_spec(cls, spec: Spec, build: BuildContext) -> OpenApiCheck | None:
        if not spec.is_mapping(allowed=_FIELDS):
            return None
        file = spec.str("spec", required=True)
        settings = _settings(spec, build)
        if not file:
            return None
        path = build.resolve_path(file)
        reader = build.services.shared(("openapi-reader", str(path), settings), lambda: SpecReader(settings))
        watched = build.watched(spec.child("spec"), file, reader.parse, what="OpenAPI spec", key=(settings,),
                                related=reader.read_files)  # fmt: skip
        compiled = watched.value
        if compiled is not None:
            for name in compiled.unknown_overrides:
                spec.child("operations").error(f"names no operation of the spec ({name!r}: use an operationId or "
                                               "'METHOD /path' as the spec writes it)")  # fmt: skip
        return cls(watched, build.policy_name, build.layer)

    @property
    def compiled(self) -> CompiledSpec | None:
        return self.spec.value

    async def check(self, ctx: CheckContext) -> Denial | None:
        spec = self.spec.value
        if spec is None:
            return self.unavailable
        outcome = evaluate(spec, ctx.request, ctx.identity)
        operation = outcome.operation
        attributes = ctx.attributes
        if self.layer:
            attributes["openapi_policy"] = self.policy
        if operation is not None:
            attributes["openapi_operation"] = operation.label
            ctx.operation = partial(operation_view, operation, outcome.params, outcome.query)
        violation = outcome.violation
        if violation is None:
            if outcome.preflight:
                attributes["openapi_preflight"] = True
            if ctx.steps is not None:
                what = "CORS preflight" if outcome.preflight else f"operation {operation.label if operation else '-'}"
                ctx.note(f"openapi: {what}: valid")
            return None
        attributes["openapi_violation"] = violation.reason
        attributes["openapi_location"] = violation.location
        attributes["openapi_constraint"] = violation.constraint
        if operation is None:
            attributes["openapi_undocumented"] = True
        mode = operation.mode if operation is not None else spec.settings.mode
        if mode == "report":
            attributes["openapi_mode"] = "report"
            attributes["reported"] = True  # the decision log keeps it, whatever its sampling
            ctx.note(f"openapi: {violation.message} -> reported only (mode report)")
            return None
        ctx.note(f"openapi: {violation.message} -> deny")
        return _denial(violation, operation.label if operation is not None else "")


def _denial(violation: Violation, label: str) -> Denial:
    headers: list[tuple[str, str]] = list(violation.headers)
    if violation.status == 401:
        headers += [("www-authenticate", scheme) for scheme in violation.challenges]
    elif violation.reason == "insufficient_scope":
        headers.append(("www-authenticate", challenge("Bearer", "insufficient_scope", violation.message,
                                                      violation.scope)))  # fmt: skip
    rule = f"openapi/{label}" if label else "openapi"
    return Denial(violation.status, violation.reason, violation.message, tuple(headers), rule)


def openapi_checks(policy_set: PolicySet | None) -> dict[str, OpenApiCheck]:
    """The openapi check of every policy of a set that has one, by policy name."""
    if policy_set is None:
        return {}
    return {
        policy.name: check
        for policy in (*policy_set.layers, *policy_set.policies)
        for check, name in zip(policy.checks, policy.check_names, strict=True)
        if name == "openapi" and isinstance(check, OpenApiCheck)
    }
