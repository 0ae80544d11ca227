"""From validated documents to a PolicySet: routing table plus, per policy, its compiled checks.

Everything that can be prepared ahead of requests is prepared here: CEL programs, routing, keys,
and the parts of responses that never change.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from extauthz.checks import Check, CheckKind, kinds
from extauthz.policy.build import BuildContext, Services
from extauthz.policy.model import Document, PolicyError, PolicySetError
from extauthz.policy.routing import Route, Router, find_ties
from extauthz.request import BadRequest, normalize_path

if TYPE_CHECKING:
    from extauthz.identity.credentials import CredentialLocation

__all__ = ["POLICY_KIND", "CompiledPolicy", "PolicySet", "compile_documents"]

POLICY_KIND = "AuthPolicy"
#: Document kinds that live beside policies and are not served (``extauthz test`` reads them).
IGNORED_KINDS = frozenset({"PolicyTest"})

_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_METHOD_RE = re.compile(r"[A-Z][A-Z0-9_-]*")
_HOST_PATTERN_RE = re.compile(r"(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")
_BASE_FIELDS = {"match", "mode"}


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    name: str
    file: str
    dry_run: bool
    checks: tuple[Check, ...]
    #: Names of the check kinds, in run order (for explain and tracing).
    check_names: tuple[str, ...]
    #: True when any check waits on I/O: the pipeline then applies its timeout.
    may_wait: bool
    #: Headers the policy decides on an allowed request (response headers, credentials it strips):
    #: a dry-run decision that would deny removes them all, since the checks that set or strip
    #: them may not have run, and a client must never supply them itself.
    owned_headers: tuple[str, ...] = ()
    #: Credential headers a check strips once read (``forward: false``): on a dry-run would-deny,
    #: removed where the request presents one (an Authorization header in another scheme is not ours).
    owned_credentials: tuple[CredentialLocation, ...] = ()
    #: (kind, name) of every header, query parameter or cookie a check reads a credential from.
    credential_locations: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class PolicySet:
    policies: tuple[CompiledPolicy, ...]
    router: Router[CompiledPolicy]
    #: Files the set was loaded from, for /readyz and logs.
    files: tuple[str, ...] = ()
    #: PolicyTest documents found beside the policies.
    tests: tuple[Document, ...] = field(default=())

    def credential_names(self, kind: str) -> frozenset[str]:
        """Names of the headers ("header"), query parameters ("query") or cookies ("cookie") that
        some policy reads a credential from: never logged, whatever the log's allow-list says."""
        return frozenset(name for p in self.policies for k, name in p.credential_locations if k == kind)

    def select(self, host: str, path: str, method: str) -> CompiledPolicy | None:
        route = self.router.select(host, path, method)
        return None if route is None else route.target


def _match_routes(build: BuildContext, policy: CompiledPolicy | None) -> list[Route]:
    spec = build.spec("match")
    if not spec.present:
        return [Route("", "", frozenset(), policy)]
    if not spec.is_mapping(allowed={"hosts", "paths", "methods"}):
        return []
    hosts = spec.str_list("hosts")
    paths = spec.str_list("paths")
    methods = spec.str_list("methods")
    host_patterns: list[str] = []
    for i, host in enumerate(hosts):
        pattern = host.strip().lower().rstrip(".") if host.strip() != "*" else ""
        if pattern and _HOST_PATTERN_RE.fullmatch(pattern) is None:
            spec.child("hosts").error("must be a host name or '*.suffix' (no port, no scheme)", i)
            continue
        host_patterns.append(pattern)
    path_patterns: list[str] = []
    for i, path in enumerate(paths):
        if path == "/*" or path == "*":
            path_patterns.append("/*")
            continue
        if not path.startswith("/") or "*" in path[:-1] or (path.endswith("*") and not path.endswith("/*")):
            spec.child("paths").error("must be an exact path or a prefix ending in '/*'", i)
            continue
        try:
            base = path[:-2] if path.endswith("/*") else path
            normalized = normalize_path(base or "/")
        except BadRequest as exc:
            spec.child("paths").error(str(exc), i)
            continue
        if normalized != (base or "/"):
            spec.child("paths").error(f"is not in normalized form (requests are matched as {normalized!r})", i)
            continue
        path_patterns.append(path)
    method_set: set[str] = set()
    for i, method in enumerate(methods):
        if _METHOD_RE.fullmatch(method) is None:
            spec.child("methods").error("must be an upper-case HTTP method such as GET", i)
            continue
        method_set.add(method)
    frozen = frozenset(method_set)
    return [
        Route(host, path, frozen, policy)
        for host in (host_patterns or [""])
        for path in (path_patterns or [""])
    ]


def _compile_policy(
    doc: Document, folder: Path, services: Services, errors: list[PolicyError]
) -> tuple[CompiledPolicy | None, list[Route]]:
    build = BuildContext(doc, folder, services, errors)
    before = len(errors)
    if not _NAME_RE.fullmatch(doc.name):
        build.error(("metadata", "name"), "is required: lower-case letters, digits, '-' and '.'")
    spec = doc.body.get("spec")
    if not isinstance(spec, dict):
        build.error(("spec",), "is required and must be a mapping")
        return None, []
    registered = kinds()
    for key in spec:
        if key not in _BASE_FIELDS and key not in registered:
            allowed = ", ".join(sorted(_BASE_FIELDS | set(registered)))
            build.error(("spec", key), f"unknown field (allowed: {allowed})")
    mode = build.spec("mode").value
    if mode not in (None, "enforce", "dry-run"):
        build.error(("spec", "mode"), "must be 'enforce' or 'dry-run'")
    checks: list[tuple[CheckKind, Check]] = []
    for kind in sorted(registered.values(), key=lambda k: k.phase):
        if kind.section not in spec and not kind.always:
            continue
        check = kind.from_spec(build.spec(kind.section), build)
        if check is not None:
            checks.append((kind, check))
    policy = CompiledPolicy(
        name=doc.name,
        file=doc.file,
        dry_run=mode == "dry-run",
        checks=tuple(c for _, c in checks),
        check_names=tuple(k.section for k, _ in checks),
        may_wait=any(getattr(c, "may_wait", False) for _, c in checks),
        owned_headers=tuple(dict.fromkeys(name for _, c in checks for name in getattr(c, "owned_headers", ()))),
        owned_credentials=tuple(
            dict.fromkeys(location for _, c in checks for location in getattr(c, "owned_credentials", ()))
        ),
        credential_locations=tuple(
            dict.fromkeys(location for _, c in checks for location in getattr(c, "credential_locations", ()))
        ),
    )
    routes = _match_routes(build, policy)
    if len(errors) != before:
        return None, []
    return policy, routes


def compile_documents(documents: Sequence[Document], folder: Path, services: Services | None = None) -> PolicySet:
    """Compile a whole set; raise PolicySetError listing every problem."""
    services = services if services is not None else Services()
    errors: list[PolicyError] = []
    policies: list[CompiledPolicy] = []
    routes: list[Route] = []
    tests: list[Document] = []
    names: dict[str, Document] = {}
    for doc in documents:
        if doc.kind in IGNORED_KINDS:
            tests.append(doc)
            continue
        if doc.kind != POLICY_KIND:
            expected = f"expected {POLICY_KIND} or PolicyTest"
            errors.append(doc.error(("kind",), f"unknown kind {doc.kind!r} ({expected})"))
            continue
        if doc.name in names:
            first = names[doc.name]
            where = f"{first.file}:{first.line_of(())}"
            errors.append(doc.error(("metadata", "name"), f"duplicate policy name (also in {where})"))
            continue
        names[doc.name] = doc
        policy, policy_routes = _compile_policy(doc, folder, services, errors)
        if policy is not None:
            policies.append(policy)
            routes.extend(policy_routes)
    by_policy = {p.name: names[p.name] for p in policies}
    for a, b in find_ties(routes):
        doc = by_policy[b.target.name]
        methods = ",".join(sorted(a.methods & b.methods)) or "*"
        what = f"host {a.host or '*'}, path {a.path or '*'}, methods {methods}"
        message = f"ties with policy {a.target.name!r} ({what}): make one more specific"
        errors.append(doc.error(("spec", "match"), message))
    check_tests = services.settings.get("check_tests")
    if check_tests is not None and tests:
        # The command line checks PolicyTest documents as fully as policies (extauthz.policytest);
        # the sidecar leaves them alone: their key files are test material, not deployed.
        errors.extend(check_tests(tests, folder))
    if errors:
        raise PolicySetError(errors)
    files = tuple(sorted({d.file for d in documents}))
    return PolicySet(tuple(policies), Router(routes), files, tuple(tests))
