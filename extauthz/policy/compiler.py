"""From validated documents to a PolicySet: routing table plus, per policy, its compiled checks.

Everything that can be prepared ahead of requests is prepared here: CEL programs, routing, keys,
and the parts of responses that never change.

A reload compiles only what changed: a :class:`CompileCache` keeps each compiled policy with the
document it came from and the fingerprints of the files its compile read, and the next load reuses
it while both are unchanged. What depends on the whole set (names, ties, routing, the headers other
policies own) is computed again at every load, in time proportional to the set's size.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from extauthz.checks import Check, CheckKind, ObservedCheck, kinds
from extauthz.policy.build import BuildContext, Services, Spec
from extauthz.policy.model import API_VERSION, DOCUMENT_FIELDS, METADATA_FIELDS, Document, PolicyError, PolicySetError
from extauthz.policy.routing import LayerRouter, Route, Router, Shadow, find_shadows, find_ties
from extauthz.request import BadRequest, normalize_path
from extauthz.watched import path_fingerprint

if TYPE_CHECKING:
    from extauthz.identity.credentials import CredentialLocation

__all__ = ["LAYER_KIND", "POLICY_KIND", "CompileCache", "CompiledPolicy", "ForeignHeaders", "PolicySet",
           "compile_documents", "compile_policy", "read_metadata", "read_policy_document"]

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


#: Selections a PolicySet remembers, and the longest path it remembers one for.
_SELECTED_LIMIT, _SELECTED_PATH_LIMIT = 4096, 512


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
    foreign_headers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: The deciding policies' routes in document order (the router holds them in the order tried).
    routes: tuple[Route[CompiledPolicy], ...] = ()
    _shadows: list[tuple[Shadow[CompiledPolicy], ...]] = field(default_factory=list, repr=False, compare=False)
    #: (host, path, method) -> selection's answer; see selection.
    _selected: dict[tuple[str, str, str], tuple[CompiledPolicy | None, tuple[CompiledPolicy, ...]]] = field(
        default_factory=dict, repr=False, compare=False)

    @property
    def shadows(self) -> tuple[Shadow[CompiledPolicy], ...]:
        """Selection oddities worth a warning (``extauthz validate``); never errors. Found on first
        use: the sidecar never asks."""
        if not self._shadows:
            self._shadows.append(tuple(find_shadows(self.routes)))
        return self._shadows[0]

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

    def selection(self, host: str, path: str, method: str) -> tuple[CompiledPolicy | None, tuple[CompiledPolicy, ...]]:
        """``(select(...), select_layers(...))``, remembered: the same few routes arrive with nearly
        every request, and walking the routes was a tenth of a Check's CPU. Both answers depend on
        nothing but these three and the set itself (never changed once built). Bounded: cleared when
        full, and long paths (client-chosen) are not kept."""
        key = (host, path, method)
        found = self._selected.get(key)
        if found is None:
            found = (self.select(host, path, method), self.select_layers(host, path, method))
            if len(path) <= _SELECTED_PATH_LIMIT:
                if len(self._selected) >= _SELECTED_LIMIT:
                    self._selected.clear()
                self._selected[key] = found
        return found


def _match_routes(build: BuildContext, policy: CompiledPolicy | None) -> list[Route]:
    spec = build.spec("match")
    if not spec.present:
        return [Route("", "", frozenset(), policy)]
    if not spec.is_mapping(allowed=_MATCH_FIELDS):
        return []
    # An empty list would match everything: a template that rendered no hosts must not turn a
    # narrow policy into one for every request. Omit the field to mean "any".
    empty = "must not be empty (omit the field to match any)"
    hosts = spec.str_list("hosts", nonempty=True, empty_message=empty)
    paths = spec.str_list("paths", nonempty=True, empty_message=empty)
    methods = spec.str_list("methods", nonempty=True, empty_message=empty)
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


@dataclass(frozen=True, slots=True)
class _Compiled:
    """One document's compiled policy and routes, with what its compile read."""

    document: Document
    policy: CompiledPolicy
    routes: tuple[Route[CompiledPolicy], ...]
    #: (path, fingerprint when the compile read it) of every file and folder it read.
    dependencies: tuple[tuple[str, tuple], ...]


class CompileCache:
    """Compiled policies of the last load, for the next load to reuse.

    An entry is found by its document object: the loader hands out the same Document for a file
    whose bytes did not change, so the same object means the same text from the same file. It is
    reused only while every file and folder its compile read still has the fingerprint it had
    then (a rotated key file, a key folder that lost the key a policy names): otherwise the policy
    is compiled again and the new result, errors included, is what the set gets. Nothing else goes
    into a policy's compile (the policy folder and the services are those of the loader; checks
    that read more say so with ``BuildContext.not_reusable``), and everything that depends on the
    whole set is computed at every load by ``compile_documents``.

    Not thread-safe: one load at a time (the watcher's loads are sequential).
    """

    __slots__ = ("_entries", "reused")

    def __init__(self) -> None:
        self._entries: dict[int, _Compiled] = {}
        #: How many policies the last load reused (for logs and tests).
        self.reused = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _lookup(self, doc: Document, fingerprint: Callable[[Path], tuple]) -> _Compiled | None:
        entry = self._entries.get(id(doc))
        if entry is None or entry.document is not doc:
            return None
        for path, seen in entry.dependencies:
            if fingerprint(Path(path)) != seen:
                return None
        return entry

    def _replace(self, entries: dict[int, _Compiled], reused: int) -> None:
        """Keep exactly the entries of this load: documents gone from the folder go too."""
        self._entries = entries
        self.reused = reused


def _memo(function: Callable[[Path], tuple]) -> Callable[[Path], tuple]:
    """``function`` remembered per path for one load: a thousand policies naming one key file stat it once."""
    seen: dict[str, tuple] = {}

    def remembered(path: Path) -> tuple:
        key = str(path)
        found = seen.get(key)
        if found is None:
            found = seen[key] = function(path)
        return found

    return remembered


def read_policy_document(build: BuildContext) -> tuple[Spec, bool, int] | None:
    """Check what an AuthPolicy or LayerPolicy says outside its check sections (the document's
    fields, its name, ``spec``'s keys, ``mode`` and ``order``): its ``spec``, whether it is a
    dry run and its order, or None when there is no spec to compile. Checks read their own sections."""
    layer = build.layer
    root = Spec(build, (), build.document.body)
    root.is_mapping(allowed=DOCUMENT_FIELDS)
    # parse_documents refused other values already; read here so that the schema says so too.
    root.str("apiVersion", required=True, choices=(API_VERSION,))
    root.str("kind", required=True, choices=(LAYER_KIND if layer else POLICY_KIND,))
    read_metadata(root)
    spec = root.child("spec")
    if not isinstance(spec.value, dict):
        root.error("is required and must be a mapping", "spec")
        return None
    base = _BASE_FIELDS | _LAYER_FIELDS if layer else _BASE_FIELDS
    hints = {} if layer else dict.fromkeys(_LAYER_FIELDS, "order is for LayerPolicy documents")
    spec.is_mapping(allowed=base | set(kinds()), hints=hints)
    dry_run = spec.str("mode", "enforce", choices=("enforce", "dry-run")) == "dry-run"
    order = spec.int("order", 0, min=LAYER_ORDER_RANGE[0], max=LAYER_ORDER_RANGE[1]) if layer else 0
    return spec, dry_run, order if isinstance(order, int) else 0


def read_metadata(root: Spec) -> None:
    """``metadata``: the document's ``name`` (unique among its kind), and free-form ``labels`` and
    ``annotations`` (strings) for the tools that manage policies; the sidecar ignores them."""
    metadata = root.child("metadata")
    if not metadata.present:
        root.error("is required: a mapping with the document's name", "metadata")
        return
    if not metadata.is_mapping(allowed=METADATA_FIELDS):
        return
    name = metadata.str("name", required=True)
    if isinstance(name, str) and not _NAME_RE.fullmatch(name):
        metadata.error("must be lower-case letters, digits, '-' and '.' (at most 253)", "name")
    for field_name in ("labels", "annotations"):
        notes = metadata.child(field_name)
        for key, _ in notes.entries():
            notes.str(key, required=True)


def compile_policy(build: BuildContext) -> tuple[CompiledPolicy | None, list[Route]]:
    """One AuthPolicy or LayerPolicy (``build.layer``): the policy and its routes, or (None, [])
    after reporting its errors through ``build``."""
    doc, errors, layer = build.document, build.errors, build.layer
    before = len(errors)
    header = read_policy_document(build)
    if header is None:
        return None, []
    spec, dry_run, order = header
    checks: list[tuple[CheckKind, Check]] = []
    for kind in sorted(kinds().values(), key=lambda k: k.phase):
        if kind.section not in spec.value and not kind.always:
            continue
        check = kind.from_spec(build.spec(kind.section), build)
        if check is not None:
            checks.append((kind, check))
    run = _observed([c for _, c in checks], [k.section for k, _ in checks])
    policy = CompiledPolicy(
        name=doc.name,
        file=doc.file,
        dry_run=dry_run,
        checks=run,
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
        order=order,
    )
    routes = _match_routes(build, policy)
    if len(errors) != before:
        return None, []
    return policy, routes


def _observed(checks: list[Check], sections: list[str]) -> tuple[Check, ...]:
    """The checks to run: those whose denials another check observes wrapped (see checks.ObservedCheck)."""
    for observer in checks:
        observed = getattr(observer, "observes_denials", ())
        if observed:
            checks = [ObservedCheck(c, observer) if s in observed else c  # type: ignore[misc]
                      for c, s in zip(checks, sections, strict=True)]
    return tuple(checks)


def _compile_policy(
    doc: Document, folder: Path, services: Services, errors: list[PolicyError],
    fingerprint: Callable[[Path], tuple] = path_fingerprint,
) -> tuple[_Compiled | None, bool]:
    """The document's compiled policy (None when it has errors, which go to ``errors``), and
    whether it may be reused by a later load."""
    build = BuildContext(doc, folder, services, errors, doc.kind == LAYER_KIND, fingerprint=fingerprint)
    policy, routes = compile_policy(build)
    if policy is None:
        return None, False
    return _Compiled(doc, policy, tuple(routes), tuple(build.dependencies.items())), build.reusable


def compile_documents(
    documents: Sequence[Document], folder: Path, services: Services | None = None, *,
    reuse: CompileCache | None = None,
) -> PolicySet:
    """Compile a whole set; raise PolicySetError listing every problem.

    With ``reuse``, policies whose document and files did not change since the load that filled it
    are taken from it, and it is refilled with this load's policies (also when the set is refused:
    the policies that compiled are still right for their documents).
    """
    services = services if services is not None else Services()
    fingerprint = _memo(path_fingerprint)
    errors: list[PolicyError] = []
    policies: list[CompiledPolicy] = []
    routes: list[Route] = []
    layer_routes: dict[str, tuple[Route, ...]] = {}
    tests: list[Document] = []
    names: dict[str, Document] = {}
    kept: dict[int, _Compiled] = {}
    reused = 0
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
        entry = reuse._lookup(doc, fingerprint) if reuse is not None else None
        if entry is not None:
            reused += 1
            kept[id(doc)] = entry
        else:
            entry, reusable = _compile_policy(doc, folder, services, errors, fingerprint)
            if entry is None:
                continue
            if reusable:
                kept[id(doc)] = entry
        policy = entry.policy
        policies.append(policy)
        if policy.layer:
            layer_routes[policy.name] = entry.routes
        else:
            routes.extend(entry.routes)
    if reuse is not None:
        reuse._replace(kept, reused)
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
        ForeignHeaders(policies), tuple(routes),
    )


class ForeignHeaders(Mapping[str, tuple[str, ...]]):
    """For each deciding policy, the headers that only other policies set (see PolicySet).

    Found per policy on first use and remembered, shared by policies that own the same headers:
    building a thousand policies' lists up front would cost the square of the set's size when each
    policy sets headers of its own.
    """

    __slots__ = ("_by_owned", "_deciding", "_every", "_found")

    def __init__(self, policies: Sequence[CompiledPolicy]) -> None:
        self._every = tuple(dict.fromkeys(name for p in policies for name in p.owned_headers))
        self._deciding = {p.name: p.owned_headers for p in policies if not p.layer}
        self._found: dict[str, tuple[str, ...]] = {}
        self._by_owned: dict[tuple[str, ...], tuple[str, ...]] = {}

    def __getitem__(self, name: str) -> tuple[str, ...]:
        found = self._found.get(name)
        if found is not None:
            return found
        owned = self._deciding[name]  # KeyError for a layer or an unknown name, as a dict would
        found = self._by_owned.get(owned)
        if found is None:
            mine = set(owned)
            found = self._by_owned[owned] = tuple(header for header in self._every if header not in mine)
        self._found[name] = found
        return found

    def get(self, name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:  # type: ignore[override]
        found = self._found.get(name)
        if found is not None:
            return found
        return self[name] if name in self._deciding else default

    def __iter__(self) -> Iterator[str]:
        return iter(self._deciding)

    def __len__(self) -> int:
        return len(self._deciding)

    def __bool__(self) -> bool:
        return bool(self._every)  # nothing is foreign when no policy owns a header
