"""YAML as the sidecar reads it: the one loader behind every YAML input (policy files and
PolicyTests, API-key files, signature key metadata, ``explain --request`` files).

YAML's anchors and aliases let a few hundred bytes stand for billions of nodes (the "billion
laughs"): expanding them took a sidecar past a gigabyte and wedged its reload watcher. Nothing we
read needs them, so an anchor or an alias is refused the moment the parser meets it, before any
node is built. Nesting depth, node count and input size are capped too, since without aliases a
small file can still be slow or deep enough to exhaust the stack. Values that YAML's resolver
accepts but Python cannot build (an integer of 5000 digits, the 30th of February) are errors with a
line, like any other YAML error, instead of escaping as ValueError.

Errors name the line and say what is wrong, but never quote the input: key files are read here.
Events come from libyaml when PyYAML has it (four to five times faster than PyYAML's pure-Python
SafeLoader, which read policies before); composition stays in Python, where the checks above run.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.error import Mark, MarkedYAMLError
from yaml.events import AliasEvent, Event
from yaml.nodes import Node
from yaml.resolver import Resolver

__all__ = [
    "MAX_DEPTH",
    "MAX_INPUT_BYTES",
    "MAX_NODES",
    "SafeYamlLoader",
    "YamlInputError",
    "load_single",
    "problem_line",
    "problem_text",
]

#: Nesting levels of mappings and sequences; a policy needs about ten.
MAX_DEPTH = 64
#: Nodes (every key, value and item) in one input: about 20,000 API-key records, or a few hundred
#: large policies. A node with its marks costs about 500 bytes, so one input never takes more than
#: about 130 MiB (measured on a file of 250,000 one-letter items; an ordinary policy takes < 1 MiB).
MAX_NODES = 250_000
#: The largest input read.
MAX_INPUT_BYTES = 4 * 1024 * 1024

if yaml.__with_libyaml__:
    from yaml.cyaml import CParser as _EventSource
else:  # pragma: no cover - PyYAML built without libyaml
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _EventSource(Reader, Scanner, Parser):  # type: ignore[no-redef]
        def __init__(self, stream: str | bytes) -> None:
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)


class YamlRefused(MarkedYAMLError):
    """Valid YAML that we do not read (an anchor, an alias, too deep, too many nodes)."""

    def __init__(self, problem: str, mark: Mark | None) -> None:
        super().__init__(problem=problem, problem_mark=mark)


class SafeYamlLoader(Composer, _EventSource, SafeConstructor, Resolver):  # type: ignore[misc]
    """PyYAML's safe loader without anchors and aliases, with depth and node caps.

    Composer comes first so that its Python ``compose_node`` (overridden below) is used rather than
    libyaml's own composition, which would resolve aliases before we could refuse them.
    """

    def __init__(self, stream: str | bytes, *, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES) -> None:
        _EventSource.__init__(self, stream)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self.max_depth = max_depth
        self.max_nodes = max_nodes
        self._depth = 0
        #: Nodes composed so far (across documents).
        self.nodes = 0

    def admit(self, event: Event, depth: int) -> None:
        """Count the node that ``event`` starts, ``depth`` levels down; raise YamlRefused for an
        alias, an anchor, a node past the cap or one nested too deep. Whoever builds values from
        events (this composer, policy.model's reader) calls it for every node before using it."""
        if isinstance(event, AliasEvent):
            raise YamlRefused(f"YAML aliases are not allowed (found *{event.anchor}); write the value out in full",
                              event.start_mark)
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            raise YamlRefused(f"YAML anchors are not allowed (found &{anchor}); write the value out in full",
                              event.start_mark)
        self.nodes += 1
        if self.nodes > self.max_nodes:
            raise YamlRefused(f"more than {self.max_nodes} YAML nodes; split the file", event.start_mark)
        if depth >= self.max_depth:
            raise YamlRefused(f"nested deeper than {self.max_depth} levels", event.start_mark)

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        self.admit(self.peek_event(), self._depth)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:
            # int("1" * 5000) and date(2024, 2, 30) raise these; their text quotes no input.
            why = str(exc).split(";")[0]
            raise ConstructorError(None, None, f"cannot read this {node.tag.rsplit(':', 1)[-1]} value ({why})",
                                   node.start_mark) from None


class YamlInputError(ValueError):
    """A YAML input that cannot be read. ``str()`` is ``"<source>:<line>: <problem>"``."""

    def __init__(self, source: str, line: int, problem: str) -> None:
        self.source = source
        self.line = line
        self.problem = problem
        super().__init__(f"{source}:{line}: {problem}" if line else f"{source}: {problem}")


def problem_line(exc: yaml.YAMLError) -> int:
    """The 1-based line a YAML error points at, 0 when it points nowhere."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return mark.line + 1 if mark is not None else 0


def problem_text(exc: yaml.YAMLError) -> str:
    """What is wrong, without the excerpt of the input that PyYAML's own message quotes."""
    problem = getattr(exc, "problem", None)
    context = getattr(exc, "context", None)
    if isinstance(exc, YamlRefused):
        return str(problem)
    if problem:
        return f"invalid YAML: {context + ', ' if context else ''}{problem}"
    return f"invalid YAML: {type(exc).__name__}"


def decode(data: str | bytes, source: str) -> str:
    """``data`` as text, refused when larger than MAX_INPUT_BYTES or not UTF-8."""
    if len(data) > MAX_INPUT_BYTES:
        raise YamlInputError(source, 0, f"larger than {MAX_INPUT_BYTES} bytes")
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise YamlInputError(source, 0, f"not valid UTF-8 (byte {exc.start})") from None


def load_single(data: str | bytes, source: str) -> Any:
    """The one document of a YAML (or JSON) input, None when it is empty; raise YamlInputError."""
    loader = SafeYamlLoader(decode(data, source))
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise YamlInputError(source, problem_line(exc), problem_text(exc)) from None
    finally:
        loader.dispose()
