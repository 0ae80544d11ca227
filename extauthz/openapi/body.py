"""Request bodies: the declared media types, and the schema for the ones that have a structure.

| media type | checked |
| --- | --- |
| JSON (``application/json``, ``*/*+json``) | content type; parsed; validated against the schema |
| ``application/x-www-form-urlencoded`` | content type; decoded per ``encoding`` (style/explode), typed and |
| | validated by the schema |
| ``multipart/*`` | content type and its ``boundary`` parameter; the parts are not parsed |
| anything else (binary, text, ranges such as ``image/*``) | content type only |

A body Envoy cut at its buffer limit (``x-envoy-auth-partial-body: true``) or did not forward at all
can never pass a schema: 413 ``body_truncated``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jsonschema_rs

from extauthz.openapi.model import Violation, media_kind
from extauthz.request import Request

if TYPE_CHECKING:
    from extauthz.openapi.model import CompiledSpec, MediaType, Operation

__all__ = ["check_body", "content_type_of", "has_content"]


def has_content(request: Request) -> bool:
    """Whether the request has a body (bytes forwarded, cut, or announced by its headers)."""
    if request.body or request.partial_body:
        return True
    headers = request.headers
    if "transfer-encoding" in headers:
        return True
    length = headers.get("content-length", "").strip()
    return bool(length) and length != "0"


def content_type_of(request: Request) -> tuple[str, str]:
    """The request's media type (lower-case, no parameters) and its parameters' text."""
    raw = request.headers.get("content-type", "")
    media, _, parameters = raw.partition(";")
    return media.strip().lower(), parameters


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
    media_type, parameters = content_type_of(request)
    if not media_type:
        return _violation(415, "openapi_unsupported_media_type", operation, "content-type", "content",
                          "a content-type is required")  # fmt: skip
    media = body.media_for(media_type)
    if media is None:
        declared = ", ".join(m.name for m in body.media)
        return _violation(415, "openapi_unsupported_media_type", operation, "content-type", "content",
                          f"must be one of {declared}")  # fmt: skip
    kind = media_kind(media_type)
    if kind == "multipart":
        if "boundary=" not in parameters.lower():
            return _violation(400, "openapi_invalid_body", operation, "content-type", "boundary",
                              "a multipart body needs a boundary parameter")  # fmt: skip
        return None
    if media.validator is None or kind not in ("json", "form"):
        return None
    if request.partial_body or not request.body:
        return _violation(413, "body_truncated", operation, "body", "size",
                          "the body did not reach the sidecar whole (Envoy's max_request_bytes), so it cannot be "
                          "validated")  # fmt: skip
    return _validate(spec, operation, media, kind, request)


def _validate(spec: CompiledSpec, operation: Operation, media: MediaType, kind: str,
              request: Request) -> Violation | None:  # fmt: skip
    parsed = _parse(kind, media, request)
    if isinstance(parsed, _Unparsable):
        return _violation(400, "openapi_invalid_body", operation, "body", parsed.constraint, parsed.detail)
    validator = media.validator
    if validator.is_valid(parsed):
        return None
    try:
        validator.validate(parsed)
    except jsonschema_rs.ValidationError as error:
        found = spec.schemas.explain(error, media.schema_name)
        return _violation(400, "openapi_invalid_body", operation, "body" + found.pointer, found.constraint,
                          found.detail)  # fmt: skip
    return None  # pragma: no cover - is_valid and validate disagree


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


def _parse(kind: str, media: MediaType, request: Request) -> Any:
    raise NotImplementedError("body parsing comes from extauthz.payload")
