"""Which path item of a spec a request path is: base paths, then path templates segment by segment.

Paths are matched on the normalized request path (docs/policy.md, "Paths"), after one of the base
paths the spec's ``servers`` give (or the policy's ``basePaths``). A template segment matches within
one segment only, never across ``/``; a segment may mix text and expressions (``{sid}.json``).
Concrete segments win over templated ones, and a segment with more literal text over one with
less (OpenAPI: "concrete paths are matched before their templated counterparts"); when the more
specific branch leads nowhere, the next one is tried. Values come back as they are in the path
(percent-escapes kept): parameters decode them per their style.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

__all__ = ["PathItem", "Router", "TemplateError", "split_template"]

_EXPRESSION = re.compile(r"\{([^{}/]+)\}")
#: The characters a literal template segment keeps as they are; others are percent-encoded, as the
#: normalized request path has them.
_PCHAR_SAFE = "-._~!$&'()*+,;=:@%"


class TemplateError(ValueError):
    pass


@dataclass(slots=True)
class PathItem:
    """One templated path with its operations by method (upper-case)."""

    template: str
    operations: dict[str, Any] = field(default_factory=dict)
    #: The template's expression names, in order.
    names: tuple[str, ...] = ()


@dataclass(slots=True)
class _Pattern:
    regex: re.Pattern[str]
    names: tuple[str, ...]
    literal_length: int
    node: _Node


@dataclass(slots=True)
class _Node:
    literal: dict[str, _Node] = field(default_factory=dict)
    patterns: list[_Pattern] = field(default_factory=list)
    item: PathItem | None = None


def split_template(template: str) -> list[str]:
    if not template.startswith("/"):
        raise TemplateError("a path must start with '/'")
    segments = template[1:].split("/")
    if template == "/":
        return []
    return segments


def _literal(segment: str) -> str:
    return quote(segment, safe=_PCHAR_SAFE)


def _segment_pattern(segment: str) -> tuple[re.Pattern[str], tuple[str, ...], int]:
    names: list[str] = []
    regex = ""
    position = 0
    literal = 0
    for match in _EXPRESSION.finditer(segment):
        text = segment[position:match.start()]
        regex += re.escape(_literal(text))
        literal += len(text)
        names.append(match.group(1))
        regex += "([^/]+?)" if match.end() < len(segment) else "([^/]+)"
        position = match.end()
    text = segment[position:]
    regex += re.escape(_literal(text))
    literal += len(text)
    if "{" in _EXPRESSION.sub("", segment) or "}" in _EXPRESSION.sub("", segment):
        raise TemplateError(f"segment {segment!r} has an unbalanced '{{' or '}}'")
    return re.compile(regex), tuple(names), literal


def _shape(segments: list[str]) -> tuple[str, ...]:
    """A template with its expression names erased: two templates of one shape are the same path."""
    return tuple(_EXPRESSION.sub("{}", s) for s in segments)


class Router:
    """Path templates of one spec, with the base paths they are served under."""

    def __init__(self, base_paths: tuple[str, ...], *, ignore_trailing_slash: bool = False) -> None:
        # Longest first: "/api/v2" is tried before "/api".
        self.base_paths = tuple(sorted({b.rstrip("/") for b in base_paths}, key=len, reverse=True)) or ("",)
        self.ignore_trailing_slash = ignore_trailing_slash
        self._root = _Node()
        self._shapes: dict[tuple[str, ...], str] = {}
        self.items: list[PathItem] = []

    def add(self, template: str) -> PathItem:
        """Add a template; raise TemplateError when it is malformed or the same as another."""
        segments = split_template(template)
        if self.ignore_trailing_slash and segments and segments[-1] == "":
            segments = segments[:-1]
        shape = _shape(segments)
        if shape in self._shapes:
            raise TemplateError(f"is the same path as {self._shapes[shape]} (only the parameter names differ)")
        self._shapes[shape] = template
        node = self._root
        names: list[str] = []
        for segment in segments:
            if "{" not in segment and "}" not in segment:
                node = node.literal.setdefault(_literal(segment), _Node())
                continue
            regex, segment_names, literal = _segment_pattern(segment)
            names.extend(segment_names)
            for pattern in node.patterns:
                if pattern.regex.pattern == regex.pattern:
                    node = pattern.node
                    break
            else:
                pattern = _Pattern(regex, segment_names, literal, _Node())
                node.patterns.append(pattern)
                node.patterns.sort(key=lambda p: -p.literal_length)
                node = pattern.node
        if len(set(names)) != len(names):
            raise TemplateError("names a path parameter twice")
        item = PathItem(template, names=tuple(names))
        node.item = item
        self.items.append(item)
        return item

    def match(self, path: str) -> tuple[PathItem, dict[str, str], str] | None:
        """The path item, the raw parameter values and the base path, or None."""
        if self.ignore_trailing_slash and len(path) > 1 and path.endswith("/"):
            path = path[:-1]
        for base in self.base_paths:
            if base:
                if path == base:
                    rest = ""
                elif path.startswith(base) and path[len(base)] == "/":
                    rest = path[len(base):]
                else:
                    continue
            else:
                rest = path
            segments = rest[1:].split("/") if rest not in ("", "/") else []
            values: list[str] = []
            item = _walk(self._root, segments, 0, values)
            if item is not None:
                return item, dict(zip(item.names, values, strict=True)), base
        return None


def _walk(node: _Node, segments: list[str], index: int, values: list[str]) -> PathItem | None:
    if index == len(segments):
        return node.item
    segment = segments[index]
    child = node.literal.get(segment)
    if child is not None:
        found = _walk(child, segments, index + 1, values)
        if found is not None:
            return found
    for pattern in node.patterns:
        match = pattern.regex.fullmatch(segment)
        if match is None:
            continue
        mark = len(values)
        values.extend(match.groups())
        found = _walk(pattern.node, segments, index + 1, values)
        if found is not None:
            return found
        del values[mark:]
    return None
