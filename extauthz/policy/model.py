"""Policy documents as read from YAML, with the line of every field for error messages."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.events import (
    AliasEvent,
    DocumentEndEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    StreamEndEvent,
)

from extauthz.safe_yaml import SafeYamlLoader, problem_line, problem_text

__all__ = [
    "API_VERSION",
    "DOCUMENT_FIELDS",
    "METADATA_FIELDS",
    "Document",
    "PolicyError",
    "PolicySetError",
    "parse_documents",
]

API_VERSION = "extauthz.dev/v1"
#: The fields of every document (policies and PolicyTests alike).
DOCUMENT_FIELDS = ("apiVersion", "kind", "metadata", "spec")
#: The fields of ``metadata``.
METADATA_FIELDS = ("name", "labels", "annotations")

FieldPath = tuple[str | int, ...]


def format_field(path: FieldPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


@dataclass(frozen=True, slots=True)
class PolicyError:
    """One problem in a policy set: where it is and what is wrong."""

    file: str
    document: int
    field: str
    line: int
    message: str
    name: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        doc = f"document {self.document}" + (f" ({self.name})" if self.name else "")
        at = f" {self.field}:" if self.field else ""
        return f"{where}: {doc}:{at} {self.message}"


class PolicySetError(Exception):
    """A policy set is invalid; ``errors`` lists every problem found."""

    def __init__(self, errors: list[PolicyError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


@dataclass(frozen=True, slots=True)
class Document:
    """One YAML document (``kind: AuthPolicy``, ``kind: PolicyTest``, ...)."""

    file: str
    index: int
    kind: str
    name: str
    body: Mapping[str, Any]
    lines: Mapping[FieldPath, int] = field(default_factory=dict)

    def line_of(self, path: FieldPath) -> int:
        """The line of ``path`` or of its nearest parent that has one."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), 0)

    def error(self, path: FieldPath, message: str) -> PolicyError:
        return PolicyError(self.file, self.index, format_field(path), self.line_of(path), message, self.name)


class _DuplicateKey(Exception):
    def __init__(self, key: str, line: int) -> None:
        super().__init__(key)
        self.key = key
        self.line = line


def _to_python(node: yaml.Node, path: FieldPath, lines: dict[FieldPath, int], constructor: SafeYamlLoader) -> Any:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        constructor.flatten_mapping(node)
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = constructor.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                key = str(key)
            if key in out:
                raise _DuplicateKey(format_field((*path, key)), key_node.start_mark.line + 1)
            out[key] = _to_python(value_node, (*path, key), lines, constructor)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(item, (*path, i), lines, constructor) for i, item in enumerate(node.value)]
    return constructor.construct_object(node, deep=True)


class _Unusual(Exception):
    """Something the event reader leaves to the composer (an explicit tag, a merge key, a
    collection as a key): the file is read again the slow way, which gives the same result."""


_STR = "tag:yaml.org,2002:str"
_UNUSUAL_KEY_TAGS = frozenset({"tag:yaml.org,2002:merge", "tag:yaml.org,2002:value"})


@dataclass(slots=True)
class _Frame:
    """A mapping or sequence being filled, with the path of its next child."""

    value: Any  # dict or list
    path: FieldPath
    mapping: bool
    #: In a mapping: the key whose value comes next, once ``has_key`` says it was read.
    key: Any = None
    has_key: bool = False


def _read_documents(loader: SafeYamlLoader, file: str, documents: list[Document], errors: list[PolicyError]) -> None:
    """Documents straight from the parser's events, without building YAML nodes first.

    It gives what composing nodes and then walking them (``_to_python``) gives, in a third of the
    time: every node is admitted by the loader's rules (no anchors or aliases, depth and node
    caps), scalars get the tag the composer would resolve and the value the constructor would
    build, the line of every value is recorded, and a duplicate key or a value that cannot be built
    is reported for its document, the first in document order, once the whole document was read
    (a document that cannot be read at all stops the file, as it does for the composer).
    Raises _Unusual for what it leaves to the composer.
    """
    get_event = loader.get_event
    resolve = loader.resolve
    get_event()  # stream start
    nodes, max_nodes, max_depth = loader.nodes, loader.max_nodes, loader.max_depth
    index = 0
    try:
        while True:
            index += 1
            event = get_event()
            if type(event) is StreamEndEvent:
                return
            lines: dict[FieldPath, int] = {}
            problem: PolicyError | None = None
            stack: list[_Frame] = []
            root: Any = None
            while True:
                event = get_event()
                kind = type(event)
                if kind is MappingEndEvent or kind is SequenceEndEvent:
                    stack.pop()
                    continue
                if kind is DocumentEndEvent:
                    break
                # loader.admit's rules, inlined for the common case; it raises the error.
                nodes += 1
                if kind is AliasEvent or event.anchor is not None or nodes > max_nodes or len(stack) >= max_depth:
                    loader.nodes = nodes - 1
                    loader.admit(event, len(stack))
                if event.tag is not None and event.tag != "!":
                    raise _Unusual
                parent = stack[-1] if stack else None
                if parent is not None and parent.mapping and not parent.has_key:
                    # A key: a scalar whose value names the next child.
                    if kind is not ScalarEvent:
                        raise _Unusual
                    tag = _scalar_tag(resolve, event.value, event.implicit)
                    if tag in _UNUSUAL_KEY_TAGS:
                        raise _Unusual
                    parent.has_key = True
                    if problem is not None:
                        continue
                    try:
                        key = event.value if tag == _STR else _construct(loader, tag, event)
                    except yaml.YAMLError as exc:
                        problem = PolicyError(file, index, "", problem_line(exc), problem_text(exc))
                        continue
                    if not isinstance(key, str):
                        key = str(key)
                    if key in parent.value:
                        problem = PolicyError(file, index, format_field((*parent.path, key)),
                                              event.start_mark.line + 1, "duplicate key")
                        continue
                    parent.key = key
                    continue
                if parent is None:
                    path: FieldPath = ()
                elif parent.mapping:
                    parent.has_key = False
                    path = (*parent.path, parent.key)
                else:
                    path = (*parent.path, len(parent.value))
                if kind is ScalarEvent:
                    if problem is not None:
                        continue
                    lines[path] = event.start_mark.line + 1
                    tag = _scalar_tag(resolve, event.value, event.implicit)
                    try:
                        value = event.value if tag == _STR else _construct(loader, tag, event)
                    except yaml.YAMLError as exc:
                        problem = PolicyError(file, index, "", problem_line(exc), problem_text(exc))
                        continue
                else:  # a mapping or a sequence starts
                    mapping = kind is MappingStartEvent
                    value = {} if mapping else []
                    stack.append(_Frame(value, path, mapping))
                    if problem is not None:
                        continue
                    lines[path] = event.start_mark.line + 1
                if parent is None:
                    root = value
                elif problem is None:
                    if parent.mapping:
                        parent.value[parent.key] = value
                    else:
                        parent.value.append(value)
            if problem is not None:
                errors.append(problem)
                continue
            _add_document(root, lines, file, index, documents, errors)
    except yaml.YAMLError as exc:
        errors.append(PolicyError(file, index, "", problem_line(exc), problem_text(exc)))


_TAGS: dict[str, str] = {}
_TAGS_LIMIT = 4096


def _scalar_tag(resolve: Any, value: str, implicit: tuple[bool, bool]) -> str:
    """The tag the composer resolves for a scalar without an explicit one. A quoted scalar is a
    string; a plain one is looked up by its text (policies repeat the same keys and words)."""
    if not implicit[0]:
        return resolve(yaml.ScalarNode, value, implicit)  # type: ignore[no-any-return]
    tag = _TAGS.get(value)
    if tag is None:
        tag = resolve(yaml.ScalarNode, value, (True, False))
        if len(_TAGS) >= _TAGS_LIMIT:
            _TAGS.clear()
        _TAGS[value] = tag
    return tag  # type: ignore[no-any-return]


def _construct(loader: SafeYamlLoader, tag: str, event: ScalarEvent) -> Any:
    """What the constructor builds for a scalar other than a string (a number, bool, null, date)."""
    return loader.construct_object(yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark,
                                                   style=event.style), deep=True)


def _add_document(body: Any, lines: dict[FieldPath, int], file: str, index: int, documents: list[Document],
                  errors: list[PolicyError]) -> None:
    if body is None:
        return
    if not isinstance(body, dict):
        errors.append(PolicyError(file, index, "", lines.get((), 0), "document must be a mapping"))
        return
    kind = body.get("kind")
    metadata = body.get("metadata")
    name = metadata.get("name", "") if isinstance(metadata, dict) else ""
    doc = Document(file, index, str(kind or ""), str(name or ""), body, lines)
    if body.get("apiVersion") != API_VERSION:
        errors.append(doc.error(("apiVersion",), f"apiVersion must be {API_VERSION!r}"))
        return
    if not isinstance(kind, str) or not kind:
        errors.append(doc.error(("kind",), "kind is required"))
        return
    documents.append(doc)


def parse_documents(text: str, file: str) -> tuple[list[Document], list[PolicyError]]:
    """Parse every document of a YAML file; problems are returned, never raised."""
    documents: list[Document] = []
    errors: list[PolicyError] = []
    loader = SafeYamlLoader(text)
    try:
        _read_documents(loader, file, documents, errors)
        return documents, errors
    except _Unusual:
        pass
    finally:
        loader.dispose()
    return _parse_composed(text, file)


def _parse_composed(text: str, file: str) -> tuple[list[Document], list[PolicyError]]:
    """parse_documents through composed nodes: for what the event reader leaves to the composer."""
    documents: list[Document] = []
    errors: list[PolicyError] = []
    loader = SafeYamlLoader(text)
    index = 0
    try:
        while loader.check_node():
            node = loader.get_node()
            index += 1
            if node is None:
                continue
            lines: dict[FieldPath, int] = {}
            try:
                body = _to_python(node, (), lines, loader)
            except _DuplicateKey as dup:
                errors.append(PolicyError(file, index, dup.key, dup.line, "duplicate key"))
                continue
            except yaml.YAMLError as exc:
                errors.append(PolicyError(file, index, "", problem_line(exc), problem_text(exc)))
                continue
            _add_document(body, lines, file, index, documents, errors)
    except yaml.YAMLError as exc:
        errors.append(PolicyError(file, index + 1, "", problem_line(exc), problem_text(exc)))
    finally:
        loader.dispose()
    return documents, errors
