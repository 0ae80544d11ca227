"""What a check sees while its policy is compiled: typed access to its spec section, and errors.

Checks read their section through :class:`Spec`, which records a precise error (file, line, field)
for anything malformed and returns a safe placeholder, so one pass reports every problem of a
policy set instead of stopping at the first.
"""

from __future__ import annotations

import builtins
import math
import re
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from extauthz.cel import CelError, Expression, compile_expression
from extauthz.context import accessor_for
from extauthz.policy.model import Document, FieldPath, PolicyError
from extauthz.watched import WatchedPath, path_fingerprint, watch_interval

__all__ = [
    "DURATION_MESSAGE", "DURATION_PATTERN", "PROBE", "BuildContext", "Probe", "Services", "Spec", "parse_duration",
]

T = TypeVar("T")


class _Named(Protocol):
    @property
    def name(self) -> str: ...


N = TypeVar("N", bound=_Named)


class Probe(Protocol):
    """Told what every accessor of :class:`Spec` was asked, while the schema generator
    (extauthz.policy.schema) reads made-up documents; ``None`` when a policy is really loaded."""

    def saw(self, path: FieldPath, shape: str, facts: Mapping[str, Any]) -> None:
        """``path`` was read as ``shape`` ("mapping", "string", "integer", ...) with ``facts``
        (required, default, choices, bounds, allowed keys...)."""

    def refused(self, path: FieldPath) -> None:
        """An accessor (not a check's own rule) refused the value at ``path``: a structural error,
        one that the schema describes too."""


#: CEL variables Envoy's HTTP ext_authz protocol cannot carry: the route's context extensions and
#: the metadata context. A policy reading them is refused when only that protocol is served.
GRPC_ONLY_VARIABLES = frozenset({"context", "metadata"})

#: The probe of the schema generator while it has a reader read a made-up document: every build
#: context made meanwhile reports to it, even one a reader makes itself.
PROBE: ContextVar[Probe | None] = ContextVar("extauthz_schema_probe", default=None)


@dataclass(slots=True)
class Services:
    """Long-lived things checks share across policies and reloads (stores, key caches, fetchers).

    ``shared(key, factory)`` returns one instance per key for the life of the process, so a policy
    reload keeps JWKS caches, API-key tables and store connections warm. Objects may define
    ``async start()`` and ``async aclose()``; the server calls them.
    """

    settings: Mapping[str, Any] = field(default_factory=dict)
    _shared: dict[Any, Any] = field(default_factory=dict)

    def shared(self, key: Any, factory: Callable[[], T]) -> T:
        if key not in self._shared:
            self._shared[key] = factory()
        return self._shared[key]  # type: ignore[no-any-return]

    def all(self) -> list[Any]:
        return list(self._shared.values())


@dataclass(slots=True)
class BuildContext:
    """Compile-time context of one policy document.

    A compiled policy is reused by the next load of the set while its document is unchanged and so
    is everything else its compile read (see policy.compiler.CompileCache). Files and folders count
    when they are reached through ``resolve_path`` or ``watched``, which record them; a check whose
    result depends on anything else (another document, the clock, the network) calls
    ``not_reusable``.
    """

    document: Document
    folder: Path
    services: Services
    errors: list[PolicyError]
    #: True while compiling a ``LayerPolicy``: checks whose meaning differs there (rules) ask.
    layer: bool = False
    #: Set by the schema generator only (through PROBE): records what the accessors read.
    probe: Probe | None = field(default_factory=PROBE.get)
    #: The files and folders this compile read, with their fingerprints when it read them.
    dependencies: dict[str, tuple] = field(default_factory=dict)
    #: False once a check said its result may change while the files above do not.
    reusable: bool = True
    #: Fingerprints a path (the compiler shares one memo over a whole load).
    fingerprint: Callable[[Path], tuple] = path_fingerprint

    @property
    def policy_name(self) -> str:
        return self.document.name

    def error(self, path: FieldPath, message: str) -> None:
        self.errors.append(self.document.error(path, message))

    def spec(self, section: str) -> Spec:
        return Spec(self, ("spec", section), self.document.body.get("spec", {}).get(section))

    def resolve_path(self, value: str) -> Path:
        """A file path from a policy: relative ones are relative to the policy folder. The policy
        depends on it from now on: a later load recompiles it when the file or folder changed."""
        path = Path(value)
        path = path if path.is_absolute() else self.folder / path
        self.depends_on(path)
        return path

    def depends_on(self, path: Path) -> None:
        """Record that the compiled policy depends on ``path`` as it is now."""
        key = str(path)
        if key not in self.dependencies:
            self.dependencies[key] = self.fingerprint(path)

    def not_reusable(self) -> None:
        """The compiled policy depends on more than its document and the files it named: compile it
        again at every load."""
        self.reusable = False

    def watched(self, node: Spec, value: str, parse: Callable[[Path], T], *, what: str,
                key: tuple[Any, ...] = (), related: Callable[[], Iterable[Path]] | None = None) -> WatchedPath[T]:
        """A mounted file or folder, read now and re-read when it changes, shared by every policy
        that names it (``key`` tells apart different readings of one path; ``related`` lists other
        files the last reading used, watched too). A read error is reported at ``node``; the caller
        decides what a missing value means."""
        path = self.resolve_path(value)
        services = self.services
        watched = services.shared(
            ("watched", what, str(path), *key),
            lambda: WatchedPath(path, parse, what=what, interval=watch_interval(services.settings), related=related),
        )
        watched.refresh()
        if watched.value is None:
            node.error(watched.error or "cannot be read")
        return watched


class Spec:
    """A node of a policy's spec with typed, error-recording accessors.

    A key is a mapping's key or, for the elements of a list read with ``items()``, an index:
    ``for i, _ in enumerate(node.items()): node.int(i, min=100, max=599)``.

    The accessors are also the policy language's definition: with a :class:`Probe` on the build
    context each tells it what it read (shape, required, default, choices, bounds), and
    extauthz.policy.schema turns that into the JSON Schema. So a check that reads its section only
    through these accessors is described by the schema without a line of its own.
    """

    __slots__ = ("build", "path", "value")

    def __init__(self, build: BuildContext, path: FieldPath, value: Any) -> None:
        self.build = build
        self.path = path
        self.value = value

    def error(self, message: str, key: str | int | None = None) -> None:
        path = self.path if key is None else (*self.path, key)
        if self.build.probe is not None and message.startswith("is required"):
            self.build.probe.saw(path, "required", {})
            self.build.probe.refused(path)
        self.build.error(path, message)

    def _refuse(self, message: str, key: str | int | None = None) -> None:
        """An accessor's own error: the value does not have the shape the accessor reads."""
        if self.build.probe is not None:
            self.build.probe.refused(self.path if key is None else (*self.path, key))
        self.build.error(self.path if key is None else (*self.path, key), message)

    def _saw(self, key: str | int | None, shape: str, **facts: Any) -> None:
        probe = self.build.probe
        if probe is not None:
            probe.saw(self.path if key is None else (*self.path, key), shape, facts)

    @property
    def present(self) -> bool:
        return self.value is not None

    def child(self, key: str | int) -> Spec:
        parent = self.value
        value = None
        if type(parent) is dict or isinstance(parent, Mapping):  # YAML gives dicts: skip the ABC check
            if isinstance(key, str):
                value = parent.get(key)
        elif isinstance(parent, list) and isinstance(key, int):
            value = parent[key]
        return Spec(self.build, (*self.path, key), value)

    def is_mapping(self, *, allowed: Iterable[str] | None = None, hints: Mapping[str, str] | None = None) -> bool:
        """True if this is a mapping; reports unknown keys when ``allowed`` is given (``hints``: a
        word to add for a key known to be misplaced)."""
        if allowed is not None:
            allowed = set(allowed)
        self._saw(None, "mapping", allowed=None if allowed is None else frozenset(allowed))
        if not isinstance(self.value, Mapping):
            self._refuse("must be a mapping")
            return False
        if allowed is not None:
            for key in self.value:
                if key not in allowed:
                    hint = f" ({hints[key]})" if hints and key in hints else ""
                    known = f"allowed: {', '.join(sorted(allowed))}" if allowed else "it takes no options"
                    self._refuse(f"unknown field{hint} ({known})", key)
        return True

    def null(self, key: builtins.str) -> builtins.bool:
        """True when ``key`` is given with no value (``key:`` or ``key: null``), for the few fields
        where that says something (a PolicyTest header expected absent); elsewhere no value is the
        same as leaving the field out."""
        self._saw(key, "null")
        return isinstance(self.value, Mapping) and key in self.value and self.value[key] is None

    def one_of(self, keys: Iterable[str], *, what: str = "", required: builtins.bool = True) -> builtins.str | None:
        """The one key of ``keys`` this mapping gives (present, even with no value), or None: after
        an error when it gives several, or none and ``required``. ``what`` names the kind of key in
        the message ("source kind")."""
        keys = tuple(keys)
        self._saw(None, "one_of", keys=keys, required=required)
        given = [k for k in keys if isinstance(self.value, Mapping) and k in self.value]
        if len(given) == 1:
            return given[0]
        if given or required:
            if what:
                self._refuse(f"give exactly one {what} ({', '.join(sorted(keys))})")
            elif required:
                self._refuse(f"give exactly one of {', '.join(keys[:-1])} or {keys[-1]}")
            else:
                self._refuse(f"give at most one of {', '.join(keys[:-1])} and {keys[-1]}")
        return None

    def items(self, *, nonempty: builtins.bool | builtins.str = False) -> list[Spec]:
        """The elements of a list (an error and [] if it is not one). ``nonempty`` (True, or what
        an element is, for the message) makes a given but empty list an error: see ``_empty``."""
        self._saw(None, "list", nonempty=builtins.bool(nonempty))
        if self.value is None:
            return []
        if not isinstance(self.value, list):
            self._refuse("must be a list")
            return []
        if nonempty and not self.value:
            self._empty(nonempty)
        return [self.child(i) for i in range(len(self.value))]

    def named_items(self, parse: Callable[[Spec], N | None], what: builtins.str) -> list[N]:
        """A list of named things (quotas, detectors): each element read by ``parse`` (None when it
        reported its own errors); a name given twice is an error at the second. Empty is an error
        (what the list holds, ``what``, names it)."""
        found: list[N] = []
        names: set[builtins.str] = set()
        for item in self.items(nonempty=what):
            parsed = parse(item)
            if parsed is None:
                continue
            if parsed.name in names:
                item.error(f"duplicate {what} name", "name")
                continue
            names.add(parsed.name)
            found.append(parsed)
        return found

    def entries(self, *, nonempty: builtins.bool | builtins.str = False) -> list[tuple[str, Spec]]:
        """The entries of a mapping whose keys are names the policy chooses; ``nonempty`` as for
        ``items``."""
        self._saw(None, "entries", nonempty=builtins.bool(nonempty))
        if self.value is None:
            return []
        if not isinstance(self.value, Mapping):
            self._refuse("must be a mapping")
            return []
        if nonempty and not self.value:
            self._empty(nonempty)
        return [(str(k), self.child(k)) for k in self.value]

    def _empty(self, what: builtins.bool | builtins.str, *, required: builtins.bool = False,
               message: builtins.str | None = None) -> None:
        """Report a list or mapping that was given but is empty.

        Where a list restricts something (audiences, trust domains, required scopes, trusted key
        ids), empty would mean "no restriction" and a template that renders an empty list would
        turn a protection off without a word; where it lists what to do (quotas, headers), empty
        means nothing is done. Neither is what was meant, so both are load errors, never "any".
        """
        if message is None:
            noun = what if isinstance(what, builtins.str) else "entry"
            message = f"is empty: list at least one {noun}" + ("" if required else ", or leave the field out")
        self._refuse(message)

    def _get(self, key: str | int, kinds: tuple[type, ...], type_name: str, default: Any, required: bool) -> Any:
        node = self.child(key)
        if node.value is None:
            if required:
                self._refuse("is required", key)
            return default
        if isinstance(node.value, bool) and bool not in kinds:
            node._refuse(f"must be {type_name}")
            return default
        if not isinstance(node.value, kinds):
            node._refuse(f"must be {type_name}")
            return default
        return node.value

    def number(self, key: str | int, default: float | None = None, *, required: bool = False) -> Any:
        self._saw(key, "number", default=default, required=required)
        value = self._get(key, (int, float), "a number", default, required)
        return float(value) if value is not None else None

    def str_list(self, key: str | int, *, required: bool = False, nonempty: bool | str = False,
                 empty_message: str | None = None) -> list[str]:
        """A list of strings (one string is a list of one). ``nonempty`` (True, or what an element
        is, for the message) makes a given but empty list an error (see ``_empty``; ``empty_message``
        says it in the field's own words)."""
        self._saw(key, "strings", required=required, nonempty=bool(nonempty))
        node = self.child(key)
        if node.value is None:
            if required:
                self._refuse("is required", key)
            return []
        values = [node.value] if isinstance(node.value, str) else node.value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            node._refuse("must be a list of strings")
            return []
        if nonempty and not values:
            node._empty(nonempty, required=required, message=empty_message)
        if any("\x00" in v for v in values):
            node.error(_NUL_MESSAGE)
            return []
        return list(values)

    def duration(self, key: str | int, default: float | None = None, *, required: bool = False) -> Any:
        """A duration in seconds: a number, or a string like '500ms', '30s', '5m', '1h'."""
        self._saw(key, "duration", default=default, required=required)
        node = self.child(key)
        if node.value is None:
            if required:
                self._refuse("is required", key)
            return default
        seconds = parse_duration(node.value)
        if seconds is None or seconds < 0:
            node._refuse(DURATION_MESSAGE)
            return default
        return seconds

    def cel(self, key: str | int | None = None, *, expect: str | Iterable[str] | None = None, required: bool = False,
            allowed: Iterable[str] | None = None) -> Expression | None:
        """Compile a CEL expression at ``key`` (or this node when key is None). ``expect`` is the
        static type the site needs (see extauthz.cel: BOOL, STRING, KEY...): every site says it."""
        if self.build.probe is not None:
            expected = () if expect is None else (expect,) if isinstance(expect, str) else tuple(sorted(expect))
            self._saw(key, "cel", expect=expected, required=required)
        node = self if key is None else self.child(key)
        if node.value is None:
            if required:
                node._refuse("is required")
            return None
        if not isinstance(node.value, str):
            node._refuse("must be a CEL expression (a string)")
            return None
        try:
            expression = compile_expression(node.value, accessor_for, expect=expect, allowed=allowed)
        except CelError as exc:
            node.error(f"invalid CEL: {exc}")
            return None
        if self.build.services.settings.get("http_only"):
            grpc_only = sorted(expression.variables & GRPC_ONLY_VARIABLES)
            if grpc_only:
                node.error(f"reads {', '.join(grpc_only)}, which Envoy sends only to a gRPC ext_authz service; "
                           "this sidecar serves only Envoy's HTTP protocol (see docs/http-mode.md)")
                return None
        return expression

    # str/int/bool are last in the class so that the builtins keep their names above.
    def str(
        self, key: builtins.str | builtins.int, default: builtins.str | None = None, *, required: builtins.bool = False,
        choices: Iterable[builtins.str] | None = None,
    ) -> Any:
        if choices is not None:
            choices = tuple(choices)
        self._saw(key, "string", default=default, required=required, choices=choices)
        value = self._get(key, (builtins.str,), "a string", default, required)
        if choices is not None and value is not None and value not in choices:
            self._refuse(f"must be one of: {', '.join(choices)}", key)
            return default
        if value is not None and "\x00" in value:
            self.error(_NUL_MESSAGE, key)
            return default
        return value

    def int(
        self, key: builtins.str | builtins.int, default: builtins.int | None = None, *, required: builtins.bool = False,
        min: builtins.int | None = None, max: builtins.int | None = None,
    ) -> Any:
        self._saw(key, "integer", default=default, required=required, min=min, max=max)
        node = self.child(key)
        value = self._get(key, (builtins.int,), "an integer", default, required)
        if node.value is None or not isinstance(value, builtins.int):
            return value
        if (min is not None and value < min) or (max is not None and value > max):
            node._refuse(_range_message(min, max))
            return default
        return value

    def bool(
        self, key: builtins.str | builtins.int, default: builtins.bool | None = None, *,
        required: builtins.bool = False,
    ) -> Any:
        self._saw(key, "boolean", default=default, required=required)
        return self._get(key, (builtins.bool,), "true or false", default, required)


#: No policy string (a file, a URL, a header, a name) can hold a NUL: it would cut a path short or
#: make the file API raise, so it is refused where it is read, whatever the field.
_NUL_MESSAGE = "must not contain a NUL character"


def _range_message(low: int | None, high: int | None) -> str:
    if low is None:
        return f"must be at most {high}"
    if high is None:
        return f"must be at least {low}"
    return f"must be between {low} and {high}"


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
#: What a duration written as text looks like (the JSON Schema says the same): a non-negative
#: decimal number and an optional unit. Exponents, underscores, signs, inf and nan are not durations.
DURATION_PATTERN = r"^\s*([0-9]+(\.[0-9]*)?|\.[0-9]+)\s*(ms|s|m|h|d)?\s*$"
_DURATION_RE = re.compile(DURATION_PATTERN)
DURATION_MESSAGE = "must be a duration such as 500ms, 30s, 5m or 1h"


def parse_duration(value: Any) -> float | None:
    """Seconds from a number or a text such as '500ms', '30s', '5m', '1h', '2d'; None if it is
    not one (a negative number is returned as is, for the caller to refuse)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if not isinstance(value, str):
        return None
    match = _DURATION_RE.fullmatch(value)
    if match is None:
        return None
    return float(match.group(1)) * _UNITS[match.group(3) or "s"]
