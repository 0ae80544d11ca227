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
from extauthz.policy.routing import LayerRouter, Route, Router, Shadow, find_shadows, find_ties
from extauthz.request import BadRequest, normalize_path

if TYPE_CHECKING:
    from extauthz.identity.credentials import CredentialLocation

__all__ = ["LAYER_KIND", "POLICY_KIND", "CompiledPolicy", "PolicySet", "compile_documents"]

POLICY_KIND = "AuthPolicy"
#: Policies that run for every request they match, before the deciding policy; they never allow.
LAYER_KIND = "LayerPolicy"
#: Document kinds that live beside policies and are not served (``extauthz test`` reads them).
IGNORED_KINDS = frozenset({"PolicyTest"})

_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_METHOD_RE = re.compile(r"[A-Z][A-Z0-9_-]*")
_HOST_PATTERN_RE = re.compile(r"(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")
_BASE_FIELDS = {"match", "mode"}
_LAYER_FIELDS = {"order"}
_MATCH_FIELDS = {"hosts", "paths", "methods", "pathCase"}
#: A layer's ``order`` lies in this range: a wider one invites numbering schemes nobody can follow.
LAYER_ORDER_RANGE = (-1000, 1000)


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
    #: A LayerPolicy: runs before the deciding policy for every request it matches, never allows.
    layer: bool = False
    #: Layers run in ascending ``order``, then by name.
    order: int = 0


@dataclass(frozen=True, slots=True)
class PolicySet:
    #: Deciding policies and layers, in document order.
    policies: tuple[CompiledPolicy, ...]
    router: Router[CompiledPolicy]
    #: Files the set was loaded from, for /readyz and logs.
    files: tuple[str, ...] = ()
    #: PolicyTest documents found beside the policies.
    tests: tuple[Document, ...] = field(default=())
    #: Layers in the order they run, and their routes.
    layers: tuple[CompiledPolicy, ...] = ()
    layer_router: LayerRouter[CompiledPolicy] = field(default_factory=lambda: LayerRouter(()))
    #: Per deciding policy (by name): the headers other policies and layers set, which an allowed
    #: request never carries upstream unless a policy that ran set them itself (a client's own
    #: ``x-user: admin`` on a route whose policy sets no x-user).
    foreign_headers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: Selection oddities worth a warning (``extauthz validate``); never errors.
    shadows: tuple[Shadow[CompiledPolicy], ...] = ()

    def credential_names(self, kind: str) -> frozenset[str]:
        """Names of the headers ("header"), query parameters ("query") or cookies ("cookie") that
        some policy reads a credential from: never logged, whatever the log's allow-list says."""
        return frozenset(name for p in self.policies for k, name in p.credential_locations if k == kind)

    def select(self, host: str, path: str, method: str) -> CompiledPolicy | None:
        route = self.router.select(host, path, method)
        return None if route is None else route.target

    def select_layers(self, host: str, path: str, method: str) -> tuple[CompiledPolicy, ...]:
        """Every layer matching the request, in run order; () at once when the set has none."""
        return self.layer_router.select(host, path, method) if self.layers else ()


def _match_routes(build: BuildContext, policy: CompiledPolicy | None) -> list[Route]:
    spec = build.spec("match")
    if not spec.present:
        return [Route("", "", frozenset(), policy)]
    if not spec.is_mapping(allowed=_MATCH_FIELDS):
        return []
    for key in ("hosts", "paths", "methods"):
        # An empty list would match everything: a template that rendered no hosts must not turn a
        # narrow policy into one for every request. Omit the field to mean "any".
        if isinstance(spec.child(key).value, list) and not spec.child(key).value:
            spec.error("must not be empty (omit the field to match any)", key)
    hosts = spec.str_list("hosts")
    paths = spec.str_list("paths")
    methods = spec.str_list("methods")
    fold_case = spec.str("pathCase", "sensitive", choices=("sensitive", "insensitive")) == "insensitive"
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
        path_patterns.append(path.lower() if fold_case else path)
    method_set: set[str] = set()
    for i, method in enumerate(methods):
        if _METHOD_RE.fullmatch(method) is None:
            spec.child("methods").error("must be an upper-case HTTP method such as GET", i)
            continue
        method_set.add(method)
    frozen = frozenset(method_set)
    return [
        Route(host, path, frozen, policy, fold_case and bool(path))
        for host in dict.fromkeys(host_patterns or [""])
        for path in dict.fromkeys(path_patterns or [""])
    ]


def _compile_policy(
    doc: Document, folder: Path, services: Services, errors: list[PolicyError]
) -> tuple[CompiledPolicy | None, list[Route]]:
    layer = doc.kind == LAYER_KIND
    build = BuildContext(doc, folder, services, errors, layer)
    before = len(errors)
    if not _NAME_RE.fullmatch(doc.name):
        build.error(("metadata", "name"), "is required: lower-case letters, digits, '-' and '.'")
    spec = doc.body.get("spec")
    if not isinstance(spec, dict):
        build.error(("spec",), "is required and must be a mapping")
        return None, []
    registered = kinds()
    base = _BASE_FIELDS | _LAYER_FIELDS if layer else _BASE_FIELDS
    for key in spec:
        if key not in base and key not in registered:
            allowed = ", ".join(sorted(base | set(registered)))
            hint = " (order is for LayerPolicy documents)" if key in _LAYER_FIELDS else ""
            build.error(("spec", key), f"unknown field{hint} (allowed: {allowed})")
    mode = build.spec("mode").value
    if mode not in (None, "enforce", "dry-run"):
        build.error(("spec", "mode"), "must be 'enforce' or 'dry-run'")
    low, high = LAYER_ORDER_RANGE
    order = build.spec("order").value
    if layer and order is not None and (isinstance(order, bool) or not isinstance(order, int) or
                                        not low <= order <= high):
        build.error(("spec", "order"), f"must be an integer between {low} and {high}")
        order = 0
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
        layer=layer,
        order=order if layer and isinstance(order, int) else 0,
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
    layer_routes: dict[str, list[Route]] = {}
    tests: list[Document] = []
    names: dict[str, Document] = {}
    for doc in documents:
        if doc.kind in IGNORED_KINDS:
            tests.append(doc)
            continue
        if doc.kind not in (POLICY_KIND, LAYER_KIND):
            expected = f"expected {POLICY_KIND}, {LAYER_KIND} or PolicyTest"
            errors.append(doc.error(("kind",), f"unknown kind {doc.kind!r} ({expected})"))
            continue
        if doc.name in names:
            first = names[doc.name]
            where = f"{first.file}:{first.line_of(())}"
            errors.append(doc.error(("metadata", "name"), f"duplicate policy name (also in {where})"))
            continue
        names[doc.name] = doc
        policy, policy_routes = _compile_policy(doc, folder, services, errors)
        if policy is None:
            continue
        policies.append(policy)
        if policy.layer:
            layer_routes[policy.name] = policy_routes
        else:
            routes.extend(policy_routes)
    by_policy = {p.name: names[p.name] for p in policies}
    for a, b in find_ties(routes):
        doc = by_policy[b.target.name]
        message = f"ties with policy {a.target.name!r} ({a.describe()}): make one more specific"
        errors.append(doc.error(("spec", "match"), message))
    check_tests = services.settings.get("check_tests")
    if check_tests is not None and tests:
        # The command line checks PolicyTest documents as fully as policies (extauthz.policytest);
        # the sidecar leaves them alone: their key files are test material, not deployed.
        errors.extend(check_tests(tests, folder))
    if errors:
        raise PolicySetError(errors)
    layers = tuple(sorted((p for p in policies if p.layer), key=lambda p: (p.order, p.name)))
    files = tuple(sorted({d.file for d in documents}))
    return PolicySet(
        tuple(policies), Router(routes), files, tuple(tests), layers,
        LayerRouter([route for layer in layers for route in layer_routes[layer.name]]),
        _foreign_headers(policies), tuple(find_shadows(routes)),
    )


def _foreign_headers(policies: Sequence[CompiledPolicy]) -> dict[str, tuple[str, ...]]:
    """For each deciding policy, the headers that only other policies set (see PolicySet)."""
    every = dict.fromkeys(name for p in policies for name in p.owned_headers)
    return {
        p.name: tuple(name for name in every if name not in p.owned_headers)
        for p in policies if not p.layer
    }
