"""OpenAPI Schema Objects turned into one JSON Schema 2020-12 document of request schemas.

Both OpenAPI versions are translated to 2020-12 and validated by ``jsonschema-rs`` (Rust; about
2 us for a 1 KB body where pure-Python validators take 0.3-11 ms), compiled once at load:

- 3.0: ``nullable: true`` adds ``"null"`` to ``type`` (only when ``type`` is given, as 3.0.3
  clarified; an ``enum`` without ``null`` still refuses it); boolean ``exclusiveMinimum`` /
  ``exclusiveMaximum`` become the numeric form; the siblings of a ``$ref`` are ignored, as 3.0 says.
- 3.1: the schema is 2020-12 already (the siblings of a ``$ref`` apply).
- Both: ``discriminator`` beside ``oneOf``/``anyOf`` dispatches on the property value to the one
  mapped schema (explicit ``mapping`` and the implicit component names), so a body that two
  alternatives would both accept is judged by the one it names, and an unknown name is its own
  error; annotations (descriptions, examples, ``x-`` extensions) are dropped.

Request-only rules (options): a property marked ``readOnly`` is refused when present (the
mass-assignment defence) and dropped from ``required``; ``strict`` treats a missing
``additionalProperties`` as false, written as ``unevaluatedProperties: false`` at the schema where a
value starts, so properties declared in ``allOf`` members and ``$ref``s still count (the classic
``allOf`` + ``additionalProperties: false`` trap). ``format`` is asserted when ``formats`` is on:
the JSON Schema formats jsonschema-rs knows, OpenAPI's ``int32``/``int64`` as ranges and ``byte``
as base64; other formats (``float``, ``binary``, ``password``, custom) are annotations.

Every translated node remembers where it came from, so an error in a schema is reported with the
spec file and pointer of the source, and a validation error with the request location only:
messages are built from the failed keyword and the schema's own limits, never from the value.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any

import jsonschema_rs

from extauthz.openapi.document import Location, SpecError, SpecFiles, escape_pointer

__all__ = ["SchemaOptions", "SchemaSet", "SchemaTranslator", "SchemaViolation"]

_DIALECT = "https://json-schema.org/draft/2020-12/schema"
#: Keywords kept as they are (validation keywords; their values are not schemas).
_ASSERTIONS = frozenset({
    "type", "enum", "const", "multipleOf", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum",
    "maxLength", "minLength", "pattern", "maxItems", "minItems", "uniqueItems", "maxContains", "minContains",
    "maxProperties", "minProperties", "required", "dependentRequired",
})  # fmt: skip
#: Keywords whose value is one schema where a new value starts (strict mode closes objects there).
_ENTRY_ONE = ("additionalProperties", "items", "contains", "unevaluatedProperties", "unevaluatedItems",
              "additionalItems")  # fmt: skip
#: Keywords whose value is one schema applied in place to the same value.
_INPLACE_ONE = ("not", "if", "then", "else", "propertyNames")
_UNSUPPORTED = ("$dynamicRef", "$dynamicAnchor", "$recursiveRef", "$recursiveAnchor")
_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
_KNOWN_FORMATS = frozenset({
    "date", "date-time", "time", "duration", "email", "idn-email", "hostname", "idn-hostname", "ipv4", "ipv6",
    "uri", "uri-reference", "iri", "iri-reference", "uri-template", "uuid", "json-pointer",
    "relative-json-pointer", "regex", "byte",
})  # fmt: skip
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_BASE64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")


def _is_base64(value: Any) -> bool:
    if not isinstance(value, str):
        return True
    if _BASE64.fullmatch(value) is None:
        return False
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


@dataclass(frozen=True, slots=True)
class SchemaOptions:
    version: str  # "3.0" or "3.1"
    formats: bool = True
    #: Refuse properties marked readOnly in requests (and drop them from required).
    refuse_read_only: bool = True
    #: A missing additionalProperties means false.
    strict: bool = False


@dataclass(frozen=True, slots=True)
class SchemaViolation:
    """One failed constraint: where in the instance (a JSON pointer) and which keyword. No value."""

    pointer: str
    constraint: str
    detail: str


_MARK_READ_ONLY = "readOnly"
_MARK_DISCRIMINATOR = "discriminator"


class SchemaTranslator:
    """Translates the request schemas of one spec into a single 2020-12 document of ``$defs``.

    ``root()`` adds one schema a request part is validated against (a parameter, a body media type)
    and returns its name; ``compile()`` then builds every validator at once.
    """

    def __init__(self, files: SpecFiles, options: SchemaOptions) -> None:
        self.files = files
        self.options = options
        self.defs: dict[str, Any] = {}
        #: Where each def came from (for errors in the schemas themselves).
        self.origins: dict[str, Location] = {}
        self._ids: dict[Location, str] = {}
        self._pending: list[tuple[str, Location]] = []
        #: Translated paths ("$defs", id, ...) whose failure means something other than their keyword.
        self.marks: dict[tuple[str | int, ...], str] = {}
        self._roots: list[str] = []

    # --- entry points -----------------------------------------------------------------------------
    def root(self, node: Any, at: Location, label: str) -> str:
        """Translate a request part's schema (a value starts here); return its def name, made from
        ``label`` (URI-fragment safe: it is referenced as ``#/$defs/<name>``)."""
        name = f"r{len(self._roots)}-{_UNSAFE.sub('_', label)[:48]}"
        self.origins[name] = at
        self._roots.append(name)
        self.defs[name] = self._schema(node, at, True, ("$defs", name))
        self._drain()
        return name

    def _def_id(self, target: Location) -> str:
        found = self._ids.get(target)
        if found is None:
            tail = target.pointer.rsplit("/", 1)[-1] or "root"
            found = f"{len(self._ids)}-{_UNSAFE.sub('_', tail)[:40]}"
            self._ids[target] = found
            self.origins[found] = target
            self._pending.append((found, target))
        return found

    def _drain(self) -> None:
        while self._pending:
            name, target = self._pending.pop()
            self.defs[name] = {}  # placeholder: a recursive reference finds it
            self.defs[name] = self._schema(self.files.node(target), target, False, ("$defs", name))

    # --- translation ------------------------------------------------------------------------------
    def _schema(self, node: Any, at: Location, entry: bool, path: tuple[str | int, ...]) -> Any:
        v30 = self.options.version == "3.0"
        if isinstance(node, bool):
            if v30:
                raise at.error("a Schema Object must be an object (boolean schemas are OpenAPI 3.1)")
            return node
        if not isinstance(node, dict):
            raise at.error("a Schema Object must be an object")
        for keyword in _UNSUPPORTED:
            if keyword in node:
                raise at.error(f"{keyword} is not supported")
        if "$ref" in node:
            target = self.files.target(node["$ref"], at)
            reference = {"$ref": "#/$defs/" + escape_pointer(self._def_id(target))}
            if v30 or len(node) == 1:
                out: dict[str, Any] = reference
            else:
                if self.options.refuse_read_only and node.get("readOnly") is True:
                    return self._read_only(path)
                out = self._keywords(node, at, path)
                out.update(reference)
            if entry and self._closes(node, at):
                out["unevaluatedProperties"] = False
            return out
        if self.options.refuse_read_only and node.get("readOnly") is True:
            return self._read_only(path)
        out = self._keywords(node, at, path)
        if entry and self._closes(node, at):
            out["unevaluatedProperties"] = False
        return out

    def _read_only(self, path: tuple[str | int, ...]) -> bool:
        self.marks[path] = _MARK_READ_ONLY
        return False

    def _keywords(self, node: dict[str, Any], at: Location, path: tuple[str | int, ...]) -> dict[str, Any]:
        v30 = self.options.version == "3.0"
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in _ASSERTIONS:
                out[key] = value
            elif key == "format":
                if self.options.formats and isinstance(value, str):
                    if value in _INT_RANGES:
                        out.setdefault("x-int-range", _INT_RANGES[value])  # applied once the bounds are known
                    elif value in _KNOWN_FORMATS:
                        out["format"] = value
            elif key in ("properties", "patternProperties", "dependentSchemas"):
                if not isinstance(value, dict):
                    raise at.child(key).error(f"{key} must be an object")
                sub_entry = key != "dependentSchemas"
                out[key] = {
                    name: self._schema(sub, at.child(key, name), sub_entry, (*path, key, name))
                    for name, sub in value.items()
                }
            elif key in _ENTRY_ONE:
                if isinstance(value, bool):
                    out[key] = value
                elif key == "items" and isinstance(value, list):
                    if v30:
                        raise at.child(key).error("items must be a Schema Object in OpenAPI 3.0")
                    raise at.child(key).error("items must be a schema in 2020-12 (use prefixItems for tuples)")
                else:
                    out[key] = self._schema(value, at.child(key), True, (*path, key))
            elif key in _INPLACE_ONE:
                out[key] = self._schema(value, at.child(key), False, (*path, key))
            elif key in ("allOf", "anyOf", "oneOf", "prefixItems"):
                if not isinstance(value, list) or not value:
                    raise at.child(key).error(f"{key} must be a non-empty list of schemas")
                in_place = key != "prefixItems"
                offset = len(out.get(key, ())) if key == "allOf" else 0
                translated = [
                    self._schema(sub, at.child(key, i), not in_place, (*path, key, offset + i))
                    for i, sub in enumerate(value)
                ]
                out[key] = [*out.get(key, ()), *translated] if key == "allOf" else translated
            elif key == "$defs" and not v30:
                continue  # reached through pointers when referenced
        if v30:
            self._v30_keywords(node, out, at)
        if "x-int-range" in out:
            self._integer_range(out)
        self._required_without_read_only(node, out, at)
        discriminator = node.get("discriminator")
        if discriminator is not None:
            self._discriminator(discriminator, node, out, at, path)
        return out

    def _v30_keywords(self, node: dict[str, Any], out: dict[str, Any], at: Location) -> None:
        if node.get("nullable") is True and "type" in out:
            types = out["type"] if isinstance(out["type"], list) else [out["type"]]
            if "null" not in types:
                out["type"] = [*types, "null"]
        for exclusive, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            flag = node.get(exclusive)
            if isinstance(flag, bool):
                del out[exclusive]
                if flag and bound in out:
                    out[exclusive] = out.pop(bound)
            elif exclusive in node:
                raise at.child(exclusive).error(f"{exclusive} must be a boolean in OpenAPI 3.0")

    @staticmethod
    def _integer_range(out: dict[str, Any]) -> None:
        """``int32``/``int64`` as bounds: merged into the schema's own where they are tighter or
        absent (a schema with ``minimum: 1, maximum: 100`` needs nothing more); kept apart
        (``allOf``) only beside exclusive bounds."""
        low, high = out.pop("x-int-range")
        if "exclusiveMinimum" in out or "exclusiveMaximum" in out:
            out.setdefault("allOf", []).append({"minimum": low, "maximum": high})
            return
        for bound, limit, tighter in (("minimum", low, max), ("maximum", high, min)):
            current = out.get(bound)
            out[bound] = limit if not isinstance(current, int | float) or isinstance(current, bool) \
                else tighter(current, limit)

    def _required_without_read_only(self, node: dict[str, Any], out: dict[str, Any], at: Location) -> None:
        """A readOnly property listed in ``required`` is required in responses only (OpenAPI 3.0 says
        so; we apply it to 3.1 too, since such a property is refused in requests)."""
        required = out.get("required")
        if not isinstance(required, list) or not required:
            return
        read_only = self._read_only_names(node, at)
        if read_only:
            kept = [name for name in required if name not in read_only]
            if kept:
                out["required"] = kept
            else:
                del out["required"]

    def _read_only_names(self, node: dict[str, Any], at: Location) -> set[str]:
        names: set[str] = set()
        for member, member_at in self._closure(node, at):
            properties = member.get("properties")
            if not isinstance(properties, dict):
                continue
            for name, sub in properties.items():
                resolved = sub
                own = self.options.version != "3.0" and isinstance(sub, dict) and "readOnly" in sub
                if isinstance(sub, dict) and "$ref" in sub and not own:
                    resolved, _ = self.files.deref(sub, member_at.child("properties", name))
                if isinstance(resolved, dict) and resolved.get("readOnly") is True:
                    names.add(name)
        return names

    def _closure(self, node: Any, at: Location) -> list[tuple[dict[str, Any], Location]]:
        """The schemas applied in place to the same value: ``node``, what its ``$ref`` names and its
        ``allOf``/``anyOf``/``oneOf`` members, transitively."""
        found: list[tuple[dict[str, Any], Location]] = []
        seen: set[int] = set()
        stack = [(node, at)]
        while stack:
            current, where = stack.pop()
            if not isinstance(current, dict) or id(current) in seen:
                continue
            seen.add(id(current))
            found.append((current, where))
            if "$ref" in current:
                target = self.files.target(current["$ref"], where)
                stack.append((self.files.node(target), target))
                if self.options.version == "3.0":
                    continue
            for key in ("allOf", "anyOf", "oneOf"):
                members = current.get(key)
                if isinstance(members, list):
                    stack.extend((m, where.child(key, i)) for i, m in enumerate(members))
        return found

    def _closes(self, node: Any, at: Location) -> bool:
        """Strict mode: does the object schema starting here get ``unevaluatedProperties: false``?
        Only when it declares properties and nothing in it allows others explicitly."""
        if not self.options.strict:
            return False
        declares = False
        for member, _ in self._closure(node, at):
            if member.get("additionalProperties", False) is not False:
                return False
            if member.get("unevaluatedProperties", False) is not False:
                return False
            if "properties" in member or "patternProperties" in member:
                declares = True
        return declares

    def _discriminator(self, discriminator: Any, node: dict[str, Any], out: dict[str, Any], at: Location,
                       path: tuple[str | int, ...]) -> None:  # fmt: skip
        where = at.child("discriminator")
        if not isinstance(discriminator, dict) or not isinstance(discriminator.get("propertyName"), str):
            raise where.error("discriminator must be an object with a propertyName")
        members_key = "oneOf" if "oneOf" in node else "anyOf" if "anyOf" in node else None
        if members_key is None:
            return  # on a base schema (allOf inheritance): an annotation, nothing to dispatch on
        prop = discriminator["propertyName"]
        targets: dict[str, Location] = {}
        mapping = discriminator.get("mapping") or {}
        if not isinstance(mapping, dict):
            raise where.child("mapping").error("mapping must be an object")
        for value, ref in mapping.items():
            if not isinstance(ref, str):
                raise where.child("mapping", value).error("a mapping value must be a string")
            if "#" in ref or "/" in ref or ref.endswith((".json", ".yaml", ".yml")):
                targets[str(value)] = self.files.target(ref, where.child("mapping", value))
            else:
                targets[str(value)] = Location(at.file, "/components/schemas/" + escape_pointer(ref))
        mapped = set(targets.values())
        for i, member in enumerate(node[members_key]):
            if isinstance(member, dict) and "$ref" in member:
                target = self.files.target(member["$ref"], at.child(members_key, i))
                name = target.pointer.rsplit("/", 1)[-1].replace("~1", "/").replace("~0", "~")
                if target not in mapped and name not in targets:
                    targets[name] = target
        if not targets:
            raise where.error("discriminator maps no value to a schema (use $ref members or mapping)")
        for target in targets.values():
            self.files.node(target)  # a mapping to nowhere is an error now, not at the first request
        out.pop(members_key, None)
        required = out.setdefault("required", [])
        if prop not in required:
            required.append(prop)
        dispatch = out.setdefault("allOf", [])
        self.marks[(*path, "allOf", len(dispatch), "properties", prop, "enum")] = _MARK_DISCRIMINATOR
        dispatch.append({"properties": {prop: {"enum": list(targets)}}})
        for value, target in targets.items():
            dispatch.append({
                "if": {"properties": {prop: {"const": value}}, "required": [prop]},
                "then": {"$ref": "#/$defs/" + escape_pointer(self._def_id(target))},
            })  # fmt: skip

    # --- compilation ------------------------------------------------------------------------------
    def compile(self) -> SchemaSet:
        """Build every validator of the document at once (jsonschema-rs shares what they share)."""
        document = {"$schema": _DIALECT, "$defs": self.defs}
        options: dict[str, Any] = {
            "validate_formats": self.options.formats, "ignore_unknown_formats": True, "offline": True,
            "formats": {"byte": _is_base64},
        }  # fmt: skip
        try:
            validators = jsonschema_rs.validator_map_for(document, **options)
            # A subschema that does not compile (a bad pattern) is left out of the map, with what
            # refers to it: compiling one of those alone says what and where.
            for name in self._roots:
                if "#/$defs/" + escape_pointer(name) not in validators:
                    jsonschema_rs.validator_for({**document, "$ref": "#/$defs/" + escape_pointer(name)}, **options)
                    raise self.origins[name].error("this schema cannot be compiled")
        except jsonschema_rs.ValidationError as exc:  # the document is not a valid schema
            raise self._source_error(list(exc.instance_path), _schema_problem(exc)) from None
        except (jsonschema_rs.ReferencingError, ValueError) as exc:
            if isinstance(exc, SpecError):
                raise
            raise SpecError(self.files.root_name, "", f"schemas cannot be compiled: {exc}") from None
        return SchemaSet(validators, self.defs, dict(self.marks))

    def _source_error(self, path: list[str | int], message: str) -> SpecError:
        if len(path) >= 2 and path[0] == "$defs" and str(path[1]) in self.origins:
            origin = self.origins[str(path[1])]
            return origin.child(*path[2:]).error(message)
        return SpecError(self.files.root_name, "", message)


def _schema_problem(exc: jsonschema_rs.ValidationError) -> str:
    keyword = exc.kind.name
    if keyword == "format" and "regex" in exc.message:
        return "not a valid regular expression (ECMA-262)"
    return f"not a valid schema ({keyword})"


class SchemaSet:
    """The compiled validators of one spec, by def name, and how to explain their failures."""

    __slots__ = ("_marks", "_validators", "defs")

    def __init__(self, validators: Any, defs: dict[str, Any], marks: dict[tuple[str | int, ...], str]) -> None:
        self._validators = validators
        self.defs = defs
        self._marks = marks

    def validator(self, name: str) -> Any:
        return self._validators["#/$defs/" + escape_pointer(name)]

    def explain(self, error: jsonschema_rs.ValidationError, root: str) -> SchemaViolation:
        """A failed validation of def ``root`` as location and constraint, built without the value."""
        pointer = "".join("/" + escape_pointer(t) for t in error.instance_path)
        keyword = error.kind.name
        schema_path = tuple(error.schema_path)
        if schema_path[:1] != ("$defs",):  # relative to the validator's own def until a $ref leaves it
            schema_path = ("$defs", root, *schema_path)
        mark = self._marks.get(schema_path)
        if mark == _MARK_READ_ONLY:
            return SchemaViolation(pointer, "readOnly", "is read-only and cannot be sent")
        if mark == _MARK_DISCRIMINATOR:
            return SchemaViolation(pointer, "discriminator", "does not name a known type")
        return SchemaViolation(pointer, keyword, _detail(error.kind, keyword))


def _names(names: Any) -> str:
    shown = [_printable(str(n))[:64] for n in list(names)[:3]]
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(f"'{n}'" for n in shown) + more


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() and c not in "'\\" else "?" for c in text)


def _detail(kind: Any, keyword: str) -> str:
    """What the constraint asks for, from the schema's own values (never the instance's)."""
    limit = getattr(kind, "limit", None)
    simple = {
        "minimum": f"must be >= {limit}", "maximum": f"must be <= {limit}",
        "exclusiveMinimum": f"must be > {limit}", "exclusiveMaximum": f"must be < {limit}",
        "minLength": f"must be at least {limit} characters long",
        "maxLength": f"must be at most {limit} characters long",
        "minItems": f"must have at least {limit} items", "maxItems": f"must have at most {limit} items",
        "minProperties": f"must have at least {limit} properties",
        "maxProperties": f"must have at most {limit} properties",
        "uniqueItems": "items must be unique", "enum": "must be one of the allowed values",
        "const": "must be the allowed constant", "anyOf": "must match at least one of the alternatives",
        "oneOfNotValid": "must match one of the alternatives",
        "oneOfMultipleValid": "matches more than one alternative",
        "not": "must not match the excluded schema", "falseSchema": "is not allowed here",
        "contains": "no item matches the required item schema",
    }  # fmt: skip
    if keyword in simple:
        return simple[keyword]
    if keyword == "type":
        return "must be " + " or ".join(getattr(kind, "types", []) or ["another type"])
    if keyword == "required":
        return f"property '{_printable(str(getattr(kind, 'property', '')))[:64]}' is required"
    if keyword in ("additionalProperties", "unevaluatedProperties"):
        unexpected = getattr(kind, "unexpected", []) or []
        return f"property {_names(unexpected)} is not allowed" if unexpected else "has properties that are not allowed"
    if keyword == "pattern":
        return f"must match the pattern {str(getattr(kind, 'pattern', ''))[:120]}"
    if keyword == "format":
        return f"must be a valid {getattr(kind, 'format', '')}"
    if keyword == "multipleOf":
        return f"must be a multiple of {getattr(kind, 'multiple_of', '')}"
    return f"fails {keyword}"
