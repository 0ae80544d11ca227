"""Request bodies: the declared media types, and the schema for the ones that have a structure.

The body is read once for every check, by the shared payload view (extauthz.payload): its media
type, the parsed JSON document, form fields, multipart parts, parser ceilings and truncation.

- JSON (``application/json``, ``application/*+json``): declared; parsed within the payload view's
  ceilings; duplicate keys refused (a validator sees the last of two values, a backend may read the
  first); validated against the schema.
- ``application/x-www-form-urlencoded``: declared; decoded per ``encoding`` (style/explode), typed by
  the schema, validated.
- ``multipart/form-data``: declared, with a boundary; the parts parsed: required part names present,
  undeclared ones refused as the schema says, text parts typed and validated, each part's content
  type against ``encoding.contentType``; the contents of file parts are not validated.
- Anything else (other multipart types, binary, text): declared (exactly, ``type/*`` or ``*/*``).

A body Envoy cut at its buffer limit (``x-envoy-auth-partial-body: true``) or did not forward at all
can never pass a schema: 413 ``body_truncated``.
"""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Any

import jsonschema_rs
import orjson

from extauthz.openapi.model import Violation
from extauthz.payload import BodyKind, body_view
from extauthz.payload.media import body_kind
from extauthz.request import Request

if TYPE_CHECKING:
    from extauthz.openapi.model import CompiledSpec, MediaType, Operation
    from extauthz.payload import BodyView

__all__ = ["check_body", "form_object", "has_content"]

#: The structures the payload view parses, and so the ones a schema is validated against.
_STRUCTURED = (BodyKind.JSON, BodyKind.FORM, BodyKind.MULTIPART)


def has_content(request: Request) -> bool:
    """Whether the request has a body (bytes forwarded, cut, or announced by its headers)."""
    if request.body or request.partial_body:
        return True
    headers = request.headers
    if "transfer-encoding" in headers:
        return True
    length = headers.get("content-length", "").strip()
    return bool(length) and length != "0"


def _violation(status: int, reason: str, operation: Operation, location: str, constraint: str,
               detail: str) -> Violation:  # fmt: skip
    return Violation(status, reason, f"{operation.label}: {location}: {detail} ({constraint})", location, constraint)


def check_body(spec: CompiledSpec, operation: Operation, request: Request) -> Violation | None:
    body = operation.body
    present = has_content(request)
    if body is None:
        if present and spec.settings.undeclared_body == "deny":
            return _violation(400, "openapi_body_not_allowed", operation, "body", "requestBody",
                              "the operation takes no request body")  # fmt: skip
        return None
    if not present:
        if body.required:
            return _violation(400, "openapi_body_required", operation, "body", "required", "a request body is required")
        return None
    view = body_view(request)
    media_type = view.media_type
    if media_type == "invalid":
        return _violation(400, "body_malformed", operation, "content-type", "content", "the content-type is malformed")
    if not media_type:
        return _violation(415, "openapi_unsupported_media_type", operation, "content-type", "content",
                          "a content-type is required")  # fmt: skip
    media = body.media_for(media_type)
    if media is None:
        declared = ", ".join(m.name for m in body.media)
        return _violation(415, "openapi_unsupported_media_type", operation, "content-type", "content",
                          f"must be one of {declared}")  # fmt: skip
    kind = body_kind(media_type)  # the view's kind is NONE when Envoy forwarded no bytes
    if kind not in _STRUCTURED or (media.validator is None and kind is not BodyKind.MULTIPART):
        if media_type.startswith("multipart/") and "boundary" not in view.parameters:
            return _violation(400, "body_malformed", operation, "content-type", "boundary",
                              "a multipart body needs a boundary parameter")  # fmt: skip
        return None
    if not request.body and not request.partial_body:
        return _violation(413, "body_truncated", operation, "body", "size",
                          "the body did not reach the sidecar (Envoy's with_request_body), so it cannot be "
                          "validated")  # fmt: skip
    problem = view.problem
    if problem is None and kind is BodyKind.JSON and _has_duplicate_keys(view.document):
        # The validator sees the last of two values, a backend may read the first: never validated.
        return _violation(400, "body_duplicate_key", operation, "body", "duplicate_keys",
                          "a JSON object has the same key twice")  # fmt: skip
    if problem is not None:
        location = "body" + (problem.pointer if problem.pointer.startswith("/") else "")
        return _violation(problem.status, problem.reason, operation, location, problem.limit or "parse",
                          problem.message)  # fmt: skip
    if kind is BodyKind.JSON:
        value: Any = view.document.value  # type: ignore[union-attr]  # parsed: no problem
    elif kind is BodyKind.FORM:
        value = form_object(media, list(view.fields))
    else:
        value = _multipart_object(media, view)
    if isinstance(value, _Unparsable):
        return _violation(400, "openapi_invalid_body", operation, "body", value.constraint, value.detail)
    if media.validator is None:
        return None
    return _validate(spec, operation, media, value)


def _validate(spec: CompiledSpec, operation: Operation, media: MediaType, value: Any) -> Violation | None:
    validator = media.validator
    try:
        if validator.is_valid(value):
            return None
        validator.validate(value)
    except jsonschema_rs.ValidationError as error:
        found = spec.schemas.explain(error, media.schema_name)
        return _violation(400, "openapi_invalid_body", operation, "body" + found.pointer, found.constraint,
                          found.detail)  # fmt: skip
    except UnicodeEncodeError:  # a form value with an escape that is not UTF-8 (kept as a surrogate)
        return _violation(400, "body_malformed", operation, "body", "encoding",
                          "a value is not valid UTF-8 once percent-decoded")  # fmt: skip
    return None  # pragma: no cover - is_valid and validate disagree


def _has_duplicate_keys(document: Any) -> bool:
    """Whether a JSON object of the body repeats a key: the payload view's exact check, after a
    cheaper one that settles the common case. orjson keeps one member per key; re-serialised, the
    value holds as many quote characters as the body, minus those of every member it dropped (its key
    at least), unless the body spells quotes as ``\\u0022`` (orjson writes them ``\\"``): without
    ``\\u`` escapes, equal counts prove that nothing was dropped."""
    raw = document.raw
    if b"\\u" not in raw and raw.count(b'"') == orjson.dumps(document.value).count(b'"'):
        return False
    return bool(document.has_duplicate_keys())


class _Unparsable:
    __slots__ = ("constraint", "detail")

    def __init__(self, constraint: str, detail: str) -> None:
        self.constraint = constraint
        self.detail = detail


def form_object(media: MediaType, pairs: list[tuple[str, str]]) -> Any:
    """A form body (decoded name/value pairs, in order) as the object its schema describes: each
    property per its ``encoding`` (``form`` exploded by default: a repeated name is an array; not
    exploded: one comma-separated value; ``deepObject``: ``name[key]=value``), typed by its schema."""
    declared = media.form or {}
    grouped: dict[str, list[str]] = {}
    for name, value in pairs:
        grouped.setdefault(name, []).append(value)
    out: dict[str, Any] = {}
    for name, values in grouped.items():
        prop = declared.get(name)
        if prop is None:
            if "[" in name and name.endswith("]"):
                base, _, key = name[:-1].partition("[")
                deep = declared.get(base)
                if deep is not None and deep.style == "deepObject" and "[" not in key:
                    if len(values) != 1:
                        return _Unparsable("style", f"form field {base}[{key[:64]}] is given more than once")
                    out.setdefault(base, {})[key] = deep.shape.property_coercer(key)(values[0])
                    continue
            other = media.form_other
            if len(values) != 1:
                out[name] = [other.shape.coerce(v) for v in values] if other is not None else values
            else:
                out[name] = other.shape.coerce(values[0]) if other is not None else values[0]
            continue
        shape = prop.shape
        if shape.kind == "array":
            if prop.explode or len(values) > 1:
                out[name] = [shape.items(v) for v in values]
            else:
                out[name] = [shape.items(v) for v in values[0].split(",")] if values[0] else []
        elif shape.kind == "object":
            if len(values) != 1:
                return _Unparsable("style", f"form field {name} is given more than once")
            items = values[0].split(",") if values[0] else []
            if len(items) % 2:
                return _Unparsable("style", f"form field {name} has an odd number of name and value items")
            out[name] = {items[i]: shape.property_coercer(items[i])(items[i + 1]) for i in range(0, len(items), 2)}
        else:
            if len(values) != 1:
                return _Unparsable("style", f"form field {name} is given more than once")
            out[name] = shape.coerce(values[0])
    return out


def _multipart_object(media: MediaType, view: BodyView) -> Any:
    """A multipart/form-data body as the object its schema describes: text parts typed like form
    fields, a file part as an empty string (its presence is checked, its content is not), a name
    sent more than once as an array; each part's content type against ``encoding.contentType``."""
    texts: dict[str, list[str]] = {}
    for name, text in view.fields:
        texts.setdefault(name, []).append(text)
    pairs: list[tuple[str, str]] = []
    used: dict[str, int] = {}
    for part in view.parts:
        allowed = media.part_types.get(part.name) if media.part_types else None
        if allowed and not any(fnmatch.fnmatchcase(part.content_type or "text/plain", t) for t in allowed):
            return _Unparsable("contentType", f"part {part.name[:64]!r} must be {' or '.join(allowed)}")
        index = used.get(part.name, 0)
        used[part.name] = index + 1
        sent = texts.get(part.name, ())
        pairs.append((part.name, sent[index] if part.filename is None and index < len(sent) else ""))
    return form_object(media, pairs)
