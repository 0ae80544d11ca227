"""OpenAPI documents as read from disk: files, JSON pointers and ``$ref`` resolution.

A spec is read from the file a policy names and from the files its ``$ref``s name beside it, and
from nowhere else: a reference to a URL, an absolute path or a file outside the spec's folder is a
load error (a spec is configuration, and configuration must not reach out to the network or read
whatever a path happens to name). Every error names the file and the JSON pointer where it is.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import yaml

from extauthz.safe_yaml import SafeYamlLoader, problem_line, problem_text

__all__ = ["MAX_SPEC_BYTES", "Location", "SpecError", "SpecFiles", "escape_pointer", "pointer_of"]

#: The largest spec file read (one of the biggest public specs, Twilio's v2010, is about 1.9 MB).
MAX_SPEC_BYTES = 16 * 1024 * 1024
#: YAML nodes (keys, values, items) in one spec file: Twilio's v2010 spec, one of the largest
#: public ones, has about 66,000 (a node costs about 500 bytes while the file is read).
MAX_SPEC_NODES = 400_000
#: References followed one to the next before giving up (a loop, or a chain nobody means).
MAX_REF_CHAIN = 32


class SpecError(ValueError):
    """A spec cannot be used; ``file`` and ``pointer`` say where (a JSON pointer, "" for the root)."""

    def __init__(self, file: str, pointer: str, message: str) -> None:
        super().__init__(f"{file}#{pointer}: {message}")
        self.file = file
        self.pointer = pointer
        self.message = message


def escape_pointer(token: str | int) -> str:
    return str(token).replace("~", "~0").replace("/", "~1")


def pointer_of(*tokens: str | int) -> str:
    return "".join("/" + escape_pointer(t) for t in tokens)


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


@dataclass(frozen=True, slots=True)
class Location:
    """Where a node of a spec is: its file (relative to the spec's folder) and JSON pointer."""

    file: str
    pointer: str

    def child(self, *tokens: str | int) -> Location:
        return Location(self.file, self.pointer + pointer_of(*tokens))

    def error(self, message: str) -> SpecError:
        return SpecError(self.file, self.pointer, message)


class _SpecLoader(SafeYamlLoader):
    """The sidecar's YAML loader (no anchors or aliases, bounded depth and size), read closer to
    YAML 1.2, which OpenAPI recommends: only ``true``/``false`` are booleans (YAML 1.1 also reads
    ``yes``, ``no``, ``on``, ``off``: an ``enum`` of country codes with ``NO`` would hold
    ``false``), dates stay strings (an ``enum`` of dates must compare with the strings a request
    carries), and mapping keys are strings (``200:`` under ``responses``)."""


_BOOL_12 = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_SpecLoader.yaml_implicit_resolvers = {
    first: [
        (tag, _BOOL_12 if tag == "tag:yaml.org,2002:bool" else regexp)
        for tag, regexp in resolvers
        if tag != "tag:yaml.org,2002:timestamp"
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _string_keys(value: Any) -> Any:
    if isinstance(value, dict):
        if all(type(k) is str for k in value):
            for k, v in value.items():
                value[k] = _string_keys(v)
            return value
        return {(k if type(k) is str else _yaml_key(k)): _string_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        for i, item in enumerate(value):
            value[i] = _string_keys(item)
    return value


def _yaml_key(key: Any) -> str:
    if key is True or key is False:
        return "true" if key else "false"
    return "null" if key is None else str(key)


def _parse(data: bytes, name: str) -> Any:
    text_start = data.lstrip()[:1]
    if name.endswith(".json") or text_start in (b"{", b"["):
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise SpecError(name, "", f"not valid JSON: {exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(name, "", f"not valid UTF-8 (byte {exc.start})") from None
    loader = _SpecLoader(text, max_nodes=MAX_SPEC_NODES)
    try:
        return _string_keys(loader.get_single_data())
    except yaml.YAMLError as exc:
        line = problem_line(exc)
        where = f" (line {line})" if line else ""
        raise SpecError(name, "", f"not valid YAML{where}: {problem_text(exc)}") from None
    except RecursionError:
        raise SpecError(name, "", "not valid YAML: nested too deeply") from None
    finally:
        loader.dispose()


@dataclass(slots=True)
class SpecFiles:
    """The files of one spec: the root and what its references name beside it, each read once.

    ``files`` lists every file read, so the watcher can re-read the spec when any of them changes.
    """

    root: Path
    documents: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return self.root.parent

    @property
    def root_name(self) -> str:
        return self.root.name

    def document(self, name: str) -> Any:
        """The parsed file ``name`` (relative to the spec's folder), read on first use."""
        if name in self.documents:
            return self.documents[name]
        path = self.folder / name
        try:
            size = path.stat().st_size
            if size > MAX_SPEC_BYTES:
                raise SpecError(name, "", f"larger than {MAX_SPEC_BYTES} bytes")
            data = path.read_bytes()
        except OSError as exc:
            raise SpecError(name, "", f"cannot be read: {exc.strerror or exc}") from None
        parsed = _parse(data, name)
        self.documents[name] = parsed
        self.files.append(path)
        return parsed

    def load_root(self) -> Any:
        return self.document(self.root_name)

    def target(self, ref: Any, at: Location) -> Location:
        """Where the reference ``ref`` (the value of ``$ref`` at ``at``) points."""
        if not isinstance(ref, str):
            raise at.error("$ref must be a string")
        file_part, hash_sign, fragment = ref.partition("#")
        if not hash_sign and not file_part:
            raise at.error("$ref is empty")
        if "://" in file_part or file_part.startswith("//"):
            raise at.error(f"$ref {ref!r} names a URL: only references within the spec's folder are followed")
        if file_part:
            if file_part.startswith("/") or "\\" in file_part:
                raise at.error(f"$ref {ref!r}: only relative paths within the spec's folder are followed")
            base = (self.folder / at.file).parent
            resolved = (base / unquote(file_part)).resolve()
            try:
                name = resolved.relative_to(self.folder.resolve()).as_posix()
            except ValueError:
                raise at.error(f"$ref {ref!r} leaves the spec's folder") from None
        else:
            name = at.file
        fragment = unquote(fragment)
        if fragment and not fragment.startswith("/"):
            raise at.error(f"$ref {ref!r}: anchors are not supported, only JSON pointers (#/...)")
        return Location(name, fragment)

    def node(self, where: Location) -> Any:
        """The node at a location (raising a SpecError naming it when the pointer leads nowhere)."""
        value = self.document(where.file)
        if not where.pointer:
            return value
        walked = ""
        for raw in where.pointer[1:].split("/"):
            token = _unescape(raw)
            walked += "/" + raw
            if isinstance(value, dict) and token in value:
                value = value[token]
            elif isinstance(value, list) and token.isdigit() and int(token) < len(value):
                value = value[int(token)]
            else:
                raise SpecError(where.file, where.pointer, f"reference target does not exist (no {walked})")
        return value

    def deref(self, value: Any, at: Location) -> tuple[Any, Location]:
        """Follow ``$ref`` (a Reference Object) until a node that is not one; return it and where it is."""
        seen: list[Location] = []
        while isinstance(value, dict) and "$ref" in value:
            target = self.target(value["$ref"], at)
            if target in seen or len(seen) >= MAX_REF_CHAIN:
                raise at.error("$ref chain loops or is too long")
            seen.append(target)
            value, at = self.node(target), target
        return value, at
