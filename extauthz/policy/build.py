"""What a check sees while its policy is compiled: typed access to its spec section, and errors.

Checks read their section through :class:`Spec`, which records a precise error (file, line, field)
for anything malformed and returns a safe placeholder, so one pass reports every problem of a
policy set instead of stopping at the first.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from extauthz.cel import CelError, Expression, compile_expression
from extauthz.context import accessor_for
from extauthz.policy.model import Document, FieldPath, PolicyError
from extauthz.watched import WatchedPath, path_fingerprint, watch_interval

__all__ = ["BuildContext", "Services", "Spec"]

T = TypeVar("T")


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
                key: tuple[Any, ...] = ()) -> WatchedPath[T]:
        """A mounted file or folder, read now and re-read when it changes, shared by every policy
        that names it (``key`` tells apart different readings of one path). A read error is reported
        at ``node``; the caller decides what a missing value means."""
        path = self.resolve_path(value)
        services = self.services
        watched = services.shared(
            ("watched", what, str(path), *key),
            lambda: WatchedPath(path, parse, what=what, interval=watch_interval(services.settings)),
        )
        watched.refresh()
        if watched.value is None:
            node.error(watched.error or "cannot be read")
        return watched


_MISSING: Any = object()


class Spec:
    """A node of a policy's spec with typed, error-recording accessors."""

    __slots__ = ("build", "path", "value")

    def __init__(self, build: BuildContext, path: FieldPath, value: Any) -> None:
        self.build = build
        self.path = path
        self.value = value

    def error(self, message: str, key: str | int | None = None) -> None:
        self.build.error(self.path if key is None else (*self.path, key), message)

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

    def is_mapping(self, *, allowed: Iterable[str] | None = None) -> bool:
        """True if this is a mapping; reports unknown keys when ``allowed`` is given."""
        if not isinstance(self.value, Mapping):
            self.error("must be a mapping")
            return False
        if allowed is not None:
            allowed = set(allowed)
            for key in self.value:
                if key not in allowed:
                    self.error(f"unknown field (allowed: {', '.join(sorted(allowed))})", key)
        return True

    def items(self, *, nonempty: builtins.bool | builtins.str = False) -> list[Spec]:
        """The elements of a list (an error and [] if it is not one). ``nonempty`` (True, or what
        an element is, for the message) makes a given but empty list an error: see ``_empty``."""
        if self.value is None:
            return []
        if not isinstance(self.value, list):
            self.error("must be a list")
            return []
        if nonempty and not self.value:
            self._empty(nonempty)
        return [self.child(i) for i in range(len(self.value))]

    def entries(self, *, nonempty: builtins.bool | builtins.str = False) -> list[tuple[str, Spec]]:
        """The entries of a mapping; ``nonempty`` as for ``items``."""
        if self.value is None:
            return []
        if not isinstance(self.value, Mapping):
            self.error("must be a mapping")
            return []
        if nonempty and not self.value:
            self._empty(nonempty)
        return [(str(k), self.child(k)) for k in self.value]

    def _empty(self, what: builtins.bool | builtins.str, *, required: builtins.bool = False) -> None:
        """Report a list or mapping that was given but is empty.

        Where a list restricts something (audiences, trust domains, required scopes, trusted key
        ids), empty would mean "no restriction" and a template that renders an empty list would
        turn a protection off without a word; where it lists what to do (quotas, headers), empty
        means nothing is done. Neither is what was meant, so both are load errors, never "any".
        """
        noun = what if isinstance(what, builtins.str) else "entry"
        self.error(f"is empty: list at least one {noun}" + ("" if required else ", or leave the field out"))

    def _get(self, key: str, kinds: tuple[type, ...], type_name: str, default: Any, required: bool) -> Any:
        node = self.child(key)
        if node.value is None:
            if required:
                self.error("is required", key)
            return default
        if isinstance(node.value, bool) and bool not in kinds:
            node.error(f"must be {type_name}")
            return default
        if not isinstance(node.value, kinds):
            node.error(f"must be {type_name}")
            return default
        return node.value

    def number(self, key: str, default: float | None = None, *, required: bool = False) -> Any:
        value = self._get(key, (int, float), "a number", default, required)
        return float(value) if value is not None else None

    def str_list(self, key: str, *, required: bool = False, nonempty: bool | str = False) -> list[str]:
        """A list of strings (one string is a list of one). ``nonempty`` (True, or what an element
        is, for the message) makes a given but empty list an error (see ``_empty``)."""
        node = self.child(key)
        if node.value is None:
            if required:
                self.error("is required", key)
            return []
        if isinstance(node.value, str):
            return [node.value]
        if not isinstance(node.value, list) or not all(isinstance(v, str) for v in node.value):
            node.error("must be a list of strings")
            return []
        if nonempty and not node.value:
            node._empty(nonempty, required=required)
        return list(node.value)

    def duration(self, key: str, default: float | None = None, *, required: bool = False) -> Any:
        """A duration in seconds: a number, or a string like '500ms', '30s', '5m', '1h'."""
        node = self.child(key)
        if node.value is None:
            if required:
                self.error("is required", key)
            return default
        seconds = parse_duration(node.value)
        if seconds is None or seconds < 0:
            node.error("must be a duration such as 500ms, 30s, 5m or 1h")
            return default
        return seconds

    def cel(self, key: str | None = None, *, expect: str | Iterable[str] | None = None, required: bool = False,
            allowed: Iterable[str] | None = None) -> Expression | None:
        """Compile a CEL expression at ``key`` (or this node when key is None). ``expect`` is the
        static type the site needs (see extauthz.cel: BOOL, STRING, KEY...): every site says it."""
        node = self if key is None else self.child(key)
        if node.value is None:
            if required:
                node.error("is required")
            return None
        if not isinstance(node.value, str):
            node.error("must be a CEL expression (a string)")
            return None
        try:
            return compile_expression(node.value, accessor_for, expect=expect, allowed=allowed)
        except CelError as exc:
            node.error(f"invalid CEL: {exc}")
            return None

    # str/int/bool are last in the class so that the builtins keep their names above.
    def str(
        self, key: builtins.str, default: builtins.str | None = None, *, required: builtins.bool = False,
        choices: Iterable[builtins.str] | None = None,
    ) -> Any:
        value = self._get(key, (str,), "a string", default, required)
        if choices is not None and value is not None and value not in set(choices):
            self.error(f"must be one of: {', '.join(choices)}", key)
            return default
        return value

    def int(
        self, key: builtins.str, default: builtins.int | None = None, *, required: builtins.bool = False,
        min: builtins.int | None = None, max: builtins.int | None = None,
    ) -> Any:
        node = self.child(key)
        value = self._get(key, (int,), "an integer", default, required)
        if node.value is None or not isinstance(value, int):
            return value
        if (min is not None and value < min) or (max is not None and value > max):
            node.error(f"must be between {min} and {max}")
            return default
        return value

    def bool(self, key: builtins.str, default: builtins.bool | None = None, *, required: builtins.bool = False) -> Any:
        return self._get(key, (bool,), "true or false", default, required)


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        return None
    text = value.strip()
    for unit in ("ms", "s", "m", "h", "d"):
        if text.endswith(unit):
            number = text[: -len(unit)]
            try:
                return float(number) * _UNITS[unit]
            except ValueError:
                return None
    try:
        return float(text)
    except ValueError:
        return None
