"""Policy documents as read from YAML, with the line of every field for error messages."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from extauthz.safe_yaml import SafeYamlLoader, problem_line, problem_text

__all__ = [
    "API_VERSION",
    "Document",
    "PolicyError",
    "PolicySetError",
    "parse_documents",
]

API_VERSION = "extauthz.dev/v1"

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


def parse_documents(text: str, file: str) -> tuple[list[Document], list[PolicyError]]:
    """Parse every document of a YAML file; problems are returned, never raised."""
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
            if body is None:
                continue
            if not isinstance(body, dict):
                errors.append(PolicyError(file, index, "", lines.get((), 0), "document must be a mapping"))
                continue
            kind = body.get("kind")
            metadata = body.get("metadata")
            name = metadata.get("name", "") if isinstance(metadata, dict) else ""
            doc = Document(file, index, str(kind or ""), str(name or ""), body, lines)
            if body.get("apiVersion") != API_VERSION:
                errors.append(doc.error(("apiVersion",), f"apiVersion must be {API_VERSION!r}"))
                continue
            if not isinstance(kind, str) or not kind:
                errors.append(doc.error(("kind",), "kind is required"))
                continue
            documents.append(doc)
    except yaml.YAMLError as exc:
        errors.append(PolicyError(file, index + 1, "", problem_line(exc), problem_text(exc)))
    finally:
        loader.dispose()
    return documents, errors
