"""The JSON Schema of extauthz documents, read off the loader itself (``extauthz schema``).

There is no second description of the policy language to keep in step with the code. Every check
reads its section through the accessors of :class:`~extauthz.policy.build.Spec`, and each accessor
tells a :class:`~extauthz.policy.build.Probe` what it read: a mapping and its keys, a list, a
string and its choices, an integer and its bounds, a duration, a CEL expression and its type,
whether the field is required, its default. The generator makes up documents, has the real readers
(the policy compiler, every check's ``from_spec``, every identity source, the PolicyTest reader)
read them with a probe attached, and grows them from what it learnt (each key of a mapping, an
element of each list, each choice of a field, each key of a one-of group, a value of each other
type) until a round teaches nothing new. What the accessors said becomes the schema.

So a check kind added tomorrow is described without a line of its own, as long as it reads its
fields through the accessors. A field a check reads by looking at ``node.value`` itself is left
undescribed (any value is valid): :func:`build_schema` lists such fields, and a test fails on
them. Where two reads of one field disagree (a field required only when another has some value),
the schema takes the lenient side, so that it never refuses a document the loader accepts, and
:func:`build_schema` lists those fields too.

The schema is JSON Schema draft-07: the newest draft that yaml-language-server (VS Code's YAML
extension, and the editors that use it through LSP) validates with.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extauthz.policy.build import DURATION_MESSAGE, DURATION_PATTERN, PROBE, BuildContext, FieldPath, Services
from extauthz.policy.model import API_VERSION, Document

__all__ = ["DocumentKind", "SchemaReport", "build_schema", "document_kinds", "generate", "schema_text"]

Pattern = tuple[str, ...]
#: Pattern parts: an element of a list, and a key the policy names itself (a header, a claim value).
ELEMENT = "[]"
NAME = "{}"
#: The key the generator writes where a policy names its own keys: valid as a header, claim or token name.
_SAMPLE_NAME = "x-sample"
#: Values of other types tried in every field, to find the branches a check takes on a value's type.
_OTHER_TYPES: tuple[Any, ...] = ({}, [], "x", 1, True)
#: Documents read per kind at most; a full exploration takes a few hundred.
_MAX_READS = 20_000
_MAX_DEPTH = 24
#: Facts that, when they vary between reads, the schema marks as lenient (a default that varies is
#: simply not shown).
_LENIENT = frozenset({"required", "choices", "min", "max", "allowed", "nonempty"})
_SHAPE_ORDER = ("mapping", "entries", "list", "strings", "string", "cel", "duration", "integer", "number", "boolean")


@dataclass(frozen=True, slots=True)
class DocumentKind:
    """A ``kind`` of document and the function that reads one through ``Spec`` (errors to ``build``)."""

    kind: str
    read: Callable[[BuildContext], object]
    description: str
    #: Passed on as ``BuildContext.layer``.
    layer: bool = False
    #: Its ``spec`` holds the check sections (described from their modules' docstrings).
    checks: bool = False


def document_kinds() -> list[DocumentKind]:
    """The documents a policy folder holds, with the readers the loader uses for them."""
    from extauthz.policy.compiler import LAYER_KIND, POLICY_KIND, compile_policy

    kinds = [
        DocumentKind(POLICY_KIND, compile_policy, "A policy: the checks that decide the requests it matches.",
                     checks=True),
        DocumentKind(LAYER_KIND, compile_policy, "A layer: checks that run before the deciding policy of every "
                     "request it matches, and may refuse but never allow.", layer=True, checks=True),
    ]
    kinds.extend(_test_kinds())
    return kinds


def _test_kinds() -> list[DocumentKind]:
    """PolicyTest, read by extauthz.policytest as ``extauthz validate`` and ``test`` read it."""
    from extauthz.policytest import check_tests

    def read(build: BuildContext) -> object:
        return check_tests([build.document], build.folder)

    return [DocumentKind("PolicyTest", read, "Test cases: requests written by hand and the decisions the "
                         "policies beside them must make (extauthz test).")]


# --- what the accessors said --------------------------------------------------------------------
@dataclass(slots=True)
class _Field:
    """Everything the accessors said about one field (one pattern), merged over every read."""

    #: shape -> facts; a fact that differed between reads is merged to its lenient side.
    shapes: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The ``required`` of every read that had one.
    required: set[bool] = field(default_factory=set)
    #: One-of groups of a mapping's keys: (keys, one is required).
    groups: set[tuple[tuple[str, ...], bool]] = field(default_factory=set)
    #: Facts that differed between reads (the schema took the lenient side).
    varied: set[str] = field(default_factory=set)
    #: Reads already merged, as they came (most reads repeat one seen before).
    _seen: set[tuple[str, tuple[tuple[str, Any], ...]]] = field(default_factory=set)

    @property
    def is_required(self) -> bool:
        return self.required == {True}

    def add(self, shape: str, facts: Mapping[str, Any]) -> bool:
        """Merge one read; True if it taught something new."""
        try:
            key = (shape, tuple(sorted(facts.items())))
            if key in self._seen:
                return False
            self._seen.add(key)
        except TypeError:  # an unhashable default: merge it every time
            pass
        if shape == "required":
            new = True not in self.required
            self.required.add(True)
            return new
        if shape == "one_of":
            group = (tuple(facts["keys"]), bool(facts["required"]))
            new = group not in self.groups
            self.groups.add(group)
            return new
        facts = dict(facts)
        new = False
        if "required" in facts:
            required = bool(facts.pop("required"))
            new = required not in self.required
            self.required.add(required)
            if len(self.required) > 1:
                self.varied.add("required")
        known = self.shapes.get(shape)
        if known is None:
            self.shapes[shape] = facts
            return True
        merged = _merge(shape, known, facts, self.varied)
        if merged != known:
            self.shapes[shape] = merged
            new = True
        return new


def _merge(shape: str, known: dict[str, Any], facts: dict[str, Any], varied: set[str]) -> dict[str, Any]:
    merged = dict(known)
    for name, value in facts.items():
        old = known.get(name)
        if old == value:
            continue
        varied.add(name)
        if name == "allowed":
            merged[name] = None if old is None or value is None else old | value
        elif name == "choices":
            merged[name] = None if old is None or value is None else tuple(dict.fromkeys((*old, *value)))
        elif name == "min":
            merged[name] = None if old is None or value is None else min(old, value)
        elif name == "max":
            merged[name] = None if old is None or value is None else max(old, value)
        elif name == "nonempty":
            merged[name] = False
        elif name == "expect":
            merged[name] = tuple(sorted({*(old or ()), *(value or ())}))
        else:  # a default that differs: none is shown
            merged[name] = None
    return merged


@dataclass(slots=True)
class _Knowledge:
    fields: dict[Pattern, _Field] = field(default_factory=dict)
    _patterns: dict[FieldPath, Pattern] = field(default_factory=dict)

    def pattern_of(self, path: FieldPath) -> Pattern:
        pattern = self._patterns.get(path)
        if pattern is None:
            pattern = self._patterns[path] = self._pattern_of(path)
        return pattern

    def _pattern_of(self, path: FieldPath) -> Pattern:
        out: list[str] = []
        for part in path:
            if isinstance(part, int):
                out.append(ELEMENT)
            else:
                known = self.fields.get(tuple(out))
                out.append(NAME if known is not None and "entries" in known.shapes else part)
        return tuple(out)

    def add(self, pattern: Pattern, shape: str, facts: Mapping[str, Any]) -> bool:
        known = self.fields.get(pattern)
        if known is None:
            known = self.fields[pattern] = _Field()
        new = known.add(shape, facts)
        if new and shape == "entries":
            self._patterns.clear()  # paths below it now have a name part
        return new


class _Recorder:
    """The probe of one read: feeds the knowledge, remembers which paths were read."""

    def __init__(self, knowledge: _Knowledge) -> None:
        self.knowledge = knowledge
        self.read: dict[FieldPath, None] = {}
        self.refusals: set[FieldPath] = set()
        self.learnt = False

    def saw(self, path: FieldPath, shape: str, facts: Mapping[str, Any]) -> None:
        self.read[path] = None
        if self.knowledge.add(self.knowledge.pattern_of(path), shape, facts):
            self.learnt = True

    def refused(self, path: FieldPath) -> None:
        self.refusals.add(path)


# --- making documents up ---------------------------------------------------------------------------
class _Explorer:
    """Reads made-up documents of one kind until they teach nothing new."""

    def __init__(self, kind: DocumentKind, folder: Path) -> None:
        self.kind = kind
        self.folder = folder
        self.knowledge = _Knowledge()
        self.services = Services(settings={"offline": True})
        self.reads = 0
        self.crashes: list[str] = []
        #: Values of another type that a check has read at a field (pattern, value), and how often
        #: one was put in a document (where the check may not get to it: a required key missing).
        self._tried: set[tuple[Pattern, str]] = set()
        self._attempts: dict[tuple[Pattern, str], int] = {}

    def explore(self) -> _Knowledge:
        start = {"apiVersion": API_VERSION, "kind": self.kind.kind, "metadata": {"name": "sample"}, "spec": {}}
        queue: deque[tuple[Any, FieldPath, tuple[Pattern, str] | None]] = deque([(start, (), None)])
        seen = {_canonical(start)}
        while queue and self.reads < _MAX_READS:
            document, changed, trial = queue.popleft()
            recorder = self.read(document)
            if trial is not None and changed in recorder.read:
                self._tried.add(trial)
            if not recorder.learnt:
                continue
            for path in self._to_vary(recorder):
                for value, attempt in self._variants(path):
                    mutant = _replaced(document, path, value)
                    if mutant is None:
                        continue
                    key = _canonical(mutant)
                    if key not in seen:
                        seen.add(key)
                        queue.append((mutant, path, attempt))
        return self.knowledge

    def _to_vary(self, recorder: _Recorder) -> list[FieldPath]:
        """The paths read, and the keys of the mappings read that no accessor has read yet: a
        check may read those only once their value has some type (``discovery: true``)."""
        paths = list(recorder.read)
        for path in recorder.read:
            known = self.knowledge.fields.get(self.knowledge.pattern_of(path))
            mapping = None if known is None else known.shapes.get("mapping")
            if mapping is None or mapping["allowed"] is None:
                continue
            for key in sorted(mapping["allowed"]):
                child = (*path, key)
                if child not in recorder.read and not self._field(self.knowledge.pattern_of(child)).shapes:
                    paths.append(child)
        return paths

    def read(self, body: dict[str, Any]) -> _Recorder:
        recorder = _Recorder(self.knowledge)
        metadata = body.get("metadata")
        name = metadata.get("name") if isinstance(metadata, dict) else None
        document = Document("sample.yaml", 1, self.kind.kind, str(name or ""), body, {})
        self.reads += 1
        token = PROBE.set(recorder)
        try:
            self.kind.read(BuildContext(document, self.folder, self.services, [], self.kind.layer))
        except Exception as exc:  # a reader that crashes on odd input: reported by build_schema
            self.crashes.append(f"{type(exc).__name__}: {exc} reading {_canonical(body)}")
        finally:
            PROBE.reset(token)
        return recorder

    def _variants(self, path: FieldPath) -> Iterator[tuple[Any, tuple[Pattern, str] | None]]:
        """Values to put at ``path``: each with the trial it makes of a value's type, if it does."""
        pattern = self.knowledge.pattern_of(path)
        for value in _OTHER_TYPES:
            key = (pattern, _canonical(value))
            attempts = self._attempts.get(key, 0)
            if key not in self._tried and attempts < 4:
                self._attempts[key] = attempts + 1
                yield value, key
        for value in self._values(pattern):
            yield value, None

    def _values(self, pattern: Pattern) -> Iterator[Any]:
        """Values of the field as known: each key of a mapping, each choice, the bounds..."""
        known = self.knowledge.fields.get(pattern)
        if known is None:
            return
        for shape, facts in list(known.shapes.items()):
            if shape == "mapping" and facts["allowed"] is not None:
                # The keys it needs, then each other key on its own (one of a group in place of
                # the group's first): small documents, cheap to read.
                base = self._needed(pattern, facts["allowed"])
                yield self._mapping(pattern, base)
                for key in sorted(facts["allowed"]):
                    group = next((g for g, _ in self._field(pattern).groups if key in g), ())
                    yield self._mapping(pattern, dict.fromkeys([*(k for k in base if k not in group), key]))
            elif shape == "string" and facts.get("choices"):
                yield from facts["choices"]
            elif shape == "integer":
                yield from {v for v in (facts.get("min"), facts.get("max"), facts.get("default")) if v is not None}
            elif shape == "boolean":
                yield from (True, False)
            else:
                yield self._sample_shape(pattern, shape, facts, 0)

    def _needed(self, pattern: Pattern, allowed: frozenset[str]) -> list[str]:
        """The keys a mapping must have: the required ones, and the first key of each required group."""
        grouped = {k for group, _ in self._field(pattern).groups for k in group}
        keys = [k for k in sorted(allowed) if k not in grouped and self._field((*pattern, k)).is_required]
        for group, one_required in sorted(self._field(pattern).groups):
            if one_required and not any(k in keys for k in group):
                keys.append(group[0])
        return keys

    def _field(self, pattern: Pattern) -> _Field:
        return self.knowledge.fields.get(pattern) or _Field()

    def _mapping(self, pattern: Pattern, keys: Any, depth: int = 0) -> dict[str, Any]:
        return {key: self.sample((*pattern, key), depth + 1) for key in keys}

    def sample(self, pattern: Pattern, depth: int = 0) -> Any:
        """A value of the field as known so far: every key of a mapping (the first of a one-of
        group), one element of a list, the first choice, a number within bounds."""
        known = self.knowledge.fields.get(pattern)
        if known is None or depth > _MAX_DEPTH:
            return {}
        for shape in _SHAPE_ORDER:
            if shape in known.shapes:
                return self._sample_shape(pattern, shape, known.shapes[shape], depth)
        return {}

    def _sample_shape(self, pattern: Pattern, shape: str, facts: Mapping[str, Any], depth: int) -> Any:
        if shape == "mapping":
            if facts["allowed"] is None:
                return {}
            return self._mapping(pattern, self._needed(pattern, facts["allowed"]), depth)
        if shape == "entries":
            return {_SAMPLE_NAME: self.sample((*pattern, NAME), depth + 1)}
        if shape == "list":
            return [self.sample((*pattern, ELEMENT), depth + 1)]
        if shape == "strings":
            return ["x"]
        if shape == "string":
            return (facts.get("choices") or (facts.get("default") or "x",))[0]
        if shape == "cel":
            expect = set(facts.get("expect") or ())
            return "1" if expect and "bool" not in expect and "string" not in expect else (
                "'x'" if "string" in expect and "bool" not in expect else "true")
        if shape == "duration":
            return "60s"
        if shape == "null":
            return None
        if shape == "integer":
            value = facts.get("default")
            if value is None:
                value = facts.get("min") if facts.get("min") is not None else 1
            return value
        if shape == "number":
            return facts.get("default") or 1.0
        return True if facts.get("default") is None else facts["default"]


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _replaced(document: Any, path: FieldPath, value: Any) -> Any:
    """A deep copy of ``document`` with ``value`` at ``path``; None where the path cannot hold it."""
    if not path:
        return json.loads(json.dumps(value)) if isinstance(value, dict) else None
    copy = json.loads(json.dumps(document))
    node = copy
    for part in path[:-1]:
        node = _step(node, part)
        if node is None:
            return None
    last = path[-1] if path else None
    if isinstance(node, dict) and isinstance(last, str):
        node[last] = value
        return copy
    if isinstance(node, list) and isinstance(last, int) and last < len(node):
        node[last] = value
        return copy
    return None


def _step(node: Any, part: str | int) -> Any:
    if isinstance(node, dict) and isinstance(part, str):
        return node.get(part)
    if isinstance(node, list) and isinstance(part, int) and part < len(node):
        return node[part]
    return None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Made-up documents name files that do not exist: what the readers log about them is noise."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(previous)


# --- from knowledge to JSON Schema -------------------------------------------------------------------
@dataclass(slots=True)
class SchemaReport:
    schema: dict[str, Any]
    #: "Kind: field" of fields read without an accessor: the schema takes any value there.
    undescribed: list[str]
    #: "Kind: field: facts" where reads disagreed (the schema took the lenient side).
    varied: list[str]
    #: Readers that raised on a made-up document (each is a loader bug: odd input must be an error).
    crashes: list[str]
    #: Documents read, per kind.
    reads: dict[str, int]


class _Writer:
    def __init__(self, kind: DocumentKind, knowledge: _Knowledge, descriptions: Mapping[Pattern, str]) -> None:
        self.kind = kind
        self.fields = knowledge.fields
        self.descriptions = descriptions
        self.undescribed: list[str] = []

    def document(self) -> dict[str, Any]:
        schema = self.schema_of(())
        schema["description"] = self.kind.description
        return schema

    def schema_of(self, pattern: Pattern) -> dict[str, Any]:
        known = self.fields.get(pattern)
        shapes = {} if known is None else known.shapes
        alternatives: list[dict[str, Any]] = []
        if "mapping" in shapes or "entries" in shapes:
            alternatives.append(self._object(pattern, known))  # type: ignore[arg-type]
        if "list" in shapes:
            alternatives.append(self._array(pattern, shapes["list"]))
        if "strings" in shapes:
            alternatives.append(_strings(shapes["strings"]))
        if "string" in shapes or "cel" in shapes:
            alternatives.append(_string(shapes.get("string"), shapes.get("cel")))
        if "duration" in shapes:
            alternatives.append(_duration(shapes["duration"]))
        if "integer" in shapes:
            alternatives.append(_integer(shapes["integer"]))
        if "number" in shapes:
            alternatives.append(_with_default({"type": "number"}, shapes["number"]))
        if "boolean" in shapes:
            alternatives.append(_with_default({"type": "boolean"}, shapes["boolean"]))
        if "null" in shapes and alternatives:  # a field where no value means something
            alternatives.append({"type": "null"})
        children = sorted({p[len(pattern)] for p in self.fields if len(p) > len(pattern) and p[:len(pattern)] == pattern
                           and p[len(pattern)] not in (ELEMENT, NAME)})
        if not alternatives and children:
            # Read without an accessor, but its keys were: a mapping that may hold other keys too.
            self.undescribed.append(f"{self.kind.kind}: {_dotted(pattern)}")
            alternatives.append({"type": "object",
                                 "properties": {key: self.schema_of((*pattern, key)) for key in children}})
        if not alternatives:
            self.undescribed.append(f"{self.kind.kind}: {_dotted(pattern)}")
            schema: dict[str, Any] = {}
        elif len(alternatives) == 1:
            schema = alternatives[0]
        else:
            schema = {"anyOf": alternatives}
        description = self.descriptions.get(pattern[1:] if pattern[:1] == ("spec",) else ("",))
        if description:
            schema = {"description": description, **schema}
        lenient = sorted(known.varied & _LENIENT) if known is not None else []
        if lenient:
            # Not a JSON Schema keyword: what the schema leaves open because it depends on other
            # fields (an issuer's key is required unless its algorithm is none).
            schema["x-lenient"] = lenient
        return schema

    def _object(self, pattern: Pattern, known: _Field) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "object"}
        mapping = known.shapes.get("mapping")
        allowed = None if mapping is None else mapping["allowed"]
        if allowed is not None:
            keys = sorted(allowed)
            schema["properties"] = {key: self.schema_of((*pattern, key)) for key in keys}
            # A key of a one-of group is required once chosen: the group says that one must be there.
            grouped = {key for group, _ in known.groups for key in group}
            required = [key for key in keys
                        if key not in grouped and self.fields.get((*pattern, key), _Field()).is_required]
            if required:
                schema["required"] = required
        entries = known.shapes.get("entries")
        if entries is not None:
            schema["additionalProperties"] = self.schema_of((*pattern, NAME))
            if entries.get("nonempty"):
                schema["minProperties"] = 1
        elif allowed is not None:
            schema["additionalProperties"] = False
        groups: list[dict[str, Any]] = []
        for group, one_required in sorted(known.groups):
            if one_required:
                groups.append({"oneOf": [{"required": [key]} for key in group]})
            else:
                pairs = itertools.combinations(group, 2)
                groups.append({"not": {"anyOf": [{"required": list(pair)} for pair in pairs]}})
        if len(groups) == 1:
            schema.update(groups[0])
        elif groups:
            schema["allOf"] = groups
        return schema

    def _array(self, pattern: Pattern, facts: Mapping[str, Any]) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "array", "items": self.schema_of((*pattern, ELEMENT))}
        if facts.get("nonempty"):
            schema["minItems"] = 1
        return schema


def _strings(facts: Mapping[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": ["string", "array"], "items": {"type": "string"}}
    if facts.get("nonempty"):
        schema["minItems"] = 1
    schema["description"] = "A string, or a list of strings" + (" (not empty)" if facts.get("nonempty") else "")
    return schema


def _string(facts: Mapping[str, Any] | None, cel: Mapping[str, Any] | None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    if cel is not None:
        expect = cel.get("expect") or ()
        schema["description"] = "A CEL expression" + (f" giving {' or '.join(expect)}" if expect else "")
        if facts is None:
            return schema
    assert facts is not None
    if facts.get("choices") and cel is None:
        schema["enum"] = list(facts["choices"])
    return _with_default(schema, facts)


def _duration(facts: Mapping[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": ["number", "string"], "minimum": 0, "pattern": DURATION_PATTERN,
        # Not a JSON Schema keyword: yaml-language-server shows it instead of the pattern.
        "patternErrorMessage": DURATION_MESSAGE,
        "description": "A duration: seconds, or a number with a unit (ms, s, m, h, d) such as 500ms, 30s, 5m, 1h",
    }
    if facts.get("default") is not None:
        schema["default"] = _duration_text(facts["default"])
    return schema


def _duration_text(seconds: float) -> str | float:
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0), ("ms", 0.001)):
        count = seconds / size
        if seconds and abs(count - round(count)) < 1e-9:
            return f"{round(count)}{unit}"
    return seconds


def _integer(facts: Mapping[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    if facts.get("min") is not None:
        schema["minimum"] = facts["min"]
    if facts.get("max") is not None:
        schema["maximum"] = facts["max"]
    return _with_default(schema, facts)


def _with_default(schema: dict[str, Any], facts: Mapping[str, Any]) -> dict[str, Any]:
    default = facts.get("default")
    if default is not None:
        schema["default"] = default
    return schema


def _dotted(pattern: Pattern) -> str:
    out = ""
    for part in pattern:
        out += part if part in (ELEMENT,) else (f".{part}" if out else part)
    return out or "(document)"


def _descriptions() -> dict[Pattern, str]:
    """The first paragraph of each check's module docstring, for its section; likewise for every
    identity source kind (what an editor shows on hover)."""
    from extauthz.checks import kinds
    from extauthz.identity import source_kinds

    found: dict[Pattern, str] = {}
    for section, kind in kinds().items():
        found[(section,)] = _summary(kind.from_spec)
    for name, factory in source_kinds().items():
        found[("identity", ELEMENT, name)] = _summary(factory)
    return {k: v for k, v in found.items() if v}


def _summary(reader: Callable[..., object]) -> str:
    owner = getattr(reader, "__self__", None)
    module = sys.modules.get(getattr(owner, "__module__", ""), None)
    text = (getattr(module, "__doc__", None) or "").strip().split("\n\n", 1)[0]
    return " ".join(text.replace("``", "`").split())


def build_schema(kinds: list[DocumentKind] | None = None) -> SchemaReport:
    """Explore every document kind and write the schema; see :class:`SchemaReport`."""
    kinds = document_kinds() if kinds is None else kinds
    descriptions = _descriptions()
    definitions: dict[str, Any] = {}
    undescribed: list[str] = []
    varied: list[str] = []
    crashes: list[str] = []
    reads: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="extauthz-schema-") as folder, _quiet():
        for kind in kinds:
            explorer = _Explorer(kind, Path(folder))
            knowledge = explorer.explore()
            writer = _Writer(kind, knowledge, descriptions if kind.checks else {})
            definitions[kind.kind] = writer.document()
            undescribed.extend(writer.undescribed)
            varied.extend(f"{kind.kind}: {_dotted(p)}: {', '.join(sorted(f.varied))}"
                          for p, f in sorted(knowledge.fields.items()) if f.varied)
            crashes.extend(f"{kind.kind}: {crash}" for crash in explorer.crashes)
            reads[kind.kind] = explorer.reads
    names = [kind.kind for kind in kinds]
    definitions = _shared(definitions)
    schema: dict[str, Any] = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "extauthz documents",
        "description": f"{', '.join(names)} documents ({API_VERSION}). Generated by `extauthz schema` from the "
                       "policy loader itself; do not edit.",
        "type": "object",
        "required": ["apiVersion", "kind"],
        "properties": {"apiVersion": {"const": API_VERSION}, "kind": {"enum": names}},
        "allOf": [
            {"if": {"properties": {"kind": {"const": name}}, "required": ["kind"]},
             "then": {"$ref": f"#/definitions/{name}"}}
            for name in names
        ],
        "definitions": definitions,
    }
    return SchemaReport(schema, undescribed, varied, crashes, reads)


def _shared(definitions: dict[str, Any]) -> dict[str, Any]:
    """Definitions with every sub-schema that appears more than once (a section both policy kinds
    have, a credential location) moved to a definition of its own and referenced: a schema half
    the size, and one place an editor resolves."""
    definitions = dict(definitions)
    while True:
        names: dict[str, list[str]] = {}
        for name, schema in definitions.items():
            for where, node in _subschemas(schema, name, top=True):
                if "properties" in node or "anyOf" in node:  # objects, and unions: leaves stay in place
                    names.setdefault(_canonical(node), []).append(where)
        repeated = [text for text, where in names.items() if len(where) > 1 and len(text) > 200]
        if not repeated:
            return definitions
        text = max(repeated, key=lambda t: (len(t), t))
        # Named after where it appears most (a credential location is a "token" twice, an "in" once).
        name = base = min(set(names[text]), key=lambda n: (-names[text].count(n), n))
        number = 1
        while name in definitions:
            number += 1
            name = f"{base}{number}"
        reference = {"$ref": f"#/definitions/{name}"}
        definitions = {key: _replace_all(schema, text, reference) for key, schema in definitions.items()}
        definitions[name] = json.loads(text)


def _subschemas(schema: Any, name: str, *, top: bool = False) -> Iterator[tuple[str, Any]]:
    """(a name for it, sub-schema) of every schema inside ``schema``."""
    if not isinstance(schema, dict):
        return
    if not top:
        yield name, schema
    for key, value in schema.items():
        if key in ("properties", "definitions"):
            for child, sub in value.items():
                yield from _subschemas(sub, child)
        elif key == "additionalProperties" or key == "items":
            yield from _subschemas(value, f"{name}-{'value' if key == 'additionalProperties' else 'item'}")
        elif key in ("anyOf", "oneOf", "allOf") and isinstance(value, list):
            for sub in value:
                yield from _subschemas(sub, name)


def _replace_all(schema: Any, text: str, reference: dict[str, str]) -> Any:
    if isinstance(schema, dict):
        if _canonical(schema) == text:
            return dict(reference)
        return {key: _replace_all(value, text, reference) for key, value in schema.items()}
    if isinstance(schema, list):
        return [_replace_all(value, text, reference) for value in schema]
    return schema


def generate() -> dict[str, Any]:
    """The JSON Schema of every document kind."""
    return build_schema().schema


def schema_text(schema: Mapping[str, Any] | None = None) -> str:
    """The schema as committed (schema/extauthz.schema.json): two-space indented, one final newline."""
    return json.dumps(generate() if schema is None else schema, indent=2, ensure_ascii=False) + "\n"
