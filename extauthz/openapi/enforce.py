"""One request against a compiled spec: which operation it is, and the first thing about it the spec
does not allow.

The order is fixed and deliberate: the operation (404, 405), then whether the identity may call it
(401, 403: a caller who may not use the operation learns nothing about its parameters or schemas),
then path, query, header and cookie parameters, then the body. The first violation is the answer;
it names the operation, the location (``query.limit``, ``body/items/0/qty``) and the constraint,
never the value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jsonschema_rs

from extauthz.openapi.body import check_body
from extauthz.openapi.model import CompiledSpec, Operation, Violation
from extauthz.openapi.params import (
    BadParameter,
    Parameter,
    decode_text,
    parse_cookies,
    parse_query,
)
from extauthz.openapi.security import judge
from extauthz.request import Request

__all__ = ["Outcome", "Violation", "evaluate", "operation_view"]


class Outcome(NamedTuple):
    operation: Operation | None
    violation: Violation | None
    #: Path parameters and declared query parameters, typed (``request.operation``).
    params: Mapping[str, Any] | None = None
    query: Mapping[str, Any] | None = None
    #: True for an allowed CORS preflight (no operation of its own).
    preflight: bool = False


def _param_violation(operation: Operation, param: Parameter, constraint: str, detail: str,
                     pointer: str = "") -> Violation:  # fmt: skip
    location = f"{param.location}.{param.name}{pointer}"
    return Violation(400, "openapi_invalid_parameter", f"{operation.label}: {location}: {detail} ({constraint})",
                     location, constraint)  # fmt: skip


def _validated(operation: Operation, param: Parameter, value: Any, spec: CompiledSpec) -> Violation | None:
    validator = param.validator
    if validator is None or validator.is_valid(value):
        return None
    return _invalid(operation, param, value, spec)


def _invalid(operation: Operation, param: Parameter, value: Any, spec: CompiledSpec) -> Violation:
    """The violation of a value its validator refused (validate again, for the first error)."""
    try:
        param.validator.validate(value)
    except jsonschema_rs.ValidationError as error:
        found = spec.schemas.explain(error, param.schema_name)
        return _param_violation(operation, param, found.constraint, found.detail, found.pointer)
    return _param_violation(operation, param, "schema", "is not valid")  # pragma: no cover


def _missing(operation: Operation, param: Parameter) -> Violation:
    return _param_violation(operation, param, "required", "is required")


def operation_view(operation: Operation, params: Mapping[str, Any] | None,
                   query: Mapping[str, Any] | None) -> dict[str, Any]:  # fmt: skip
    """``request.operation`` as CEL reads it (``params`` and ``query`` are the request's own dicts)."""
    return {
        "id": operation.operation_id, "method": operation.method, "path": operation.template,
        "label": operation.label, "params": params if params is not None else {},
        "query": query if query is not None else {}, "deprecated": operation.deprecated,
        "tags": list(operation.tags),
    }  # fmt: skip


def evaluate(spec: CompiledSpec, request: Request, identity: Mapping[str, Any]) -> Outcome:
    settings = spec.settings
    found = spec.match(request.path)
    if found is None:
        return Outcome(None, Violation(404, "openapi_unknown_path", "no operation of the API has this path", "path",
                                       "paths"))  # fmt: skip
    item, raw_params, _ = found
    method = request.method
    operation = item.operations.get(method)
    if operation is None:
        if method == "HEAD" and settings.head_from_get:
            operation = item.operations.get("GET")
        elif method == "OPTIONS" and settings.cors_preflight:
            wanted = request.headers.get("access-control-request-method", "")
            if "origin" in request.headers and (wanted in item.operations or
                                                (wanted == "HEAD" and settings.head_from_get and
                                                 "GET" in item.operations)):  # fmt: skip
                return Outcome(None, None, preflight=True)
        if operation is None:
            allowed = sorted({*item.operations, *(("HEAD",) if settings.head_from_get and "GET" in item.operations
                                                  else ())})  # fmt: skip
            return Outcome(None, Violation(
                405, "openapi_method_not_allowed", f"{method} is not an operation of {item.template}", "method",
                "methods", headers=(("allow", ", ".join(allowed)),),
            ))  # fmt: skip
    if operation.deprecated and settings.deprecated == "deny":
        return Outcome(operation, Violation(403, "openapi_deprecated_operation",
                                            f"{operation.label}: the operation is deprecated", "operation",
                                            "deprecated"))  # fmt: skip
    if settings.security == "enforce" and operation.security:
        refusal = judge(operation.security, identity)
        if refusal is not None:
            return Outcome(operation, Violation(refusal.status, refusal.reason, f"{operation.label}: {refusal.message}",
                                                "security", "security", challenges=refusal.challenges,
                                                scope=refusal.scope))  # fmt: skip
    params: dict[str, Any] = {}
    for param in operation.path_params:
        try:
            value = param.read(raw_params[param.name])  # type: ignore[misc]  # set by the compiler
        except BadParameter as bad:
            return Outcome(operation, _param_violation(operation, param, bad.constraint, bad.detail), params)
        validator = param.validator
        if validator is not None and not validator.is_valid(value):
            return Outcome(operation, _invalid(operation, param, value, spec), params)
        params[param.name] = value
    query: dict[str, Any] = {}
    raw_query = request.raw_query
    violation = _query(spec, operation, raw_query, query) if raw_query or operation.required_query else None
    if violation is None and operation.headers:
        violation = _headers(spec, operation, request.headers)
    if violation is None and (operation.cookies or settings.unknown_cookies == "deny"):
        violation = _cookies(spec, operation, request.headers.get("cookie"))
    if violation is None:
        violation = check_body(spec, operation, request)
    return Outcome(operation, violation, params, query)


def _query(spec: CompiledSpec, operation: Operation, raw_query: str, out: dict[str, Any]) -> Violation | None:
    try:
        pairs = parse_query(raw_query)
    except BadParameter as bad:
        return Violation(400, "openapi_invalid_parameter", f"{operation.label}: query: {bad.detail}", "query",
                         bad.constraint)  # fmt: skip
    declared = operation.query
    if not pairs and not declared:
        return None
    grouped: dict[str, list[str]] = {}
    for name, raw in pairs:
        grouped.setdefault(name, []).append(raw)
    claimed: set[str] = set()
    for param in operation.query_objects:
        value, names, problem = _query_object(param, grouped)
        claimed |= names
        if problem is not None:
            return _param_violation(operation, param, problem.constraint, problem.detail)
        if value is None:
            if param.required:
                return _missing(operation, param)
            continue
        violation = _validated(operation, param, value, spec)
        if violation is not None:
            return violation
        out[param.name] = value
    for param in declared.values():
        values = grouped.get(param.name)
        if values is not None and param.allow_empty and values == [""]:
            values = None
        if values is None:
            if param.required:
                return _missing(operation, param)
            continue
        try:
            value = param.read(values)  # type: ignore[misc]  # set by the compiler
        except BadParameter as bad:
            return _param_violation(operation, param, bad.constraint, bad.detail)
        violation = _validated(operation, param, value, spec)
        if violation is not None:
            return violation
        out[param.name] = value
    if spec.settings.unknown_query == "deny":
        for name in grouped:
            if name not in declared and name not in claimed:
                return Violation(400, "openapi_unknown_parameter",
                                 f"{operation.label}: query parameter {_safe(name)} is not declared",
                                 "query", "parameters")  # fmt: skip
    return None


def _query_object(param: Parameter, grouped: Mapping[str, list[str]]
                  ) -> tuple[dict[str, Any] | None, set[str], BadParameter | None]:  # fmt: skip
    """An exploded ``form`` object (its properties are query names) or a ``deepObject`` one
    (``name[prop]=value``): its value, the names it took, and what was wrong."""
    shape = param.shape
    value: dict[str, Any] = {}
    names: set[str] = set()
    try:
        if param.style == "deepObject":
            prefix = param.name + "["
            for name, values in grouped.items():
                if name.startswith(prefix) and name.endswith("]") and "[" not in name[len(prefix):-1]:
                    prop = name[len(prefix):-1]
                    names.add(name)
                    if len(values) != 1:
                        return None, names, BadParameter("style", f"property {_safe(prop)} is given more than once")
                    value[prop] = shape.property_coercer(prop)(decode_text(values[0], True))
        else:
            for prop in shape.properties or {}:
                values = grouped.get(prop)  # type: ignore[assignment]
                if values is None:
                    continue
                names.add(prop)
                if len(values) != 1:
                    return None, names, BadParameter("style", f"property {_safe(prop)} is given more than once")
                value[prop] = shape.property_coercer(prop)(decode_text(values[0], True))
    except BadParameter as bad:
        return None, names, bad
    return (value if names else None), names, None


def _headers(spec: CompiledSpec, operation: Operation, headers: Mapping[str, str]) -> Violation | None:
    for param in operation.headers:
        violation = _read_and_validate(spec, operation, param, headers.get(param.name))
        if violation is not None:
            return violation
    return None


def _read_and_validate(spec: CompiledSpec, operation: Operation, param: Parameter, raw: Any) -> Violation | None:
    """One header or cookie parameter: missing (``raw`` None), unreadable in its style, or against
    its schema."""
    if raw is None:
        return _missing(operation, param) if param.required else None
    try:
        value = param.read(raw)  # type: ignore[misc]  # set by the compiler
    except BadParameter as bad:
        return _param_violation(operation, param, bad.constraint, bad.detail)
    return _validated(operation, param, value, spec)


def _cookies(spec: CompiledSpec, operation: Operation, header: str | None) -> Violation | None:
    declared = operation.cookies
    if header is None:
        for param in declared.values():
            if param.required:
                return _missing(operation, param)
        return None
    if not declared and spec.settings.unknown_cookies == "ignore":
        return None
    grouped: dict[str, list[str]] = {}
    for name, value in parse_cookies(header):
        grouped.setdefault(name, []).append(value)
    for param in declared.values():
        violation = _read_and_validate(spec, operation, param, grouped.get(param.name))
        if violation is not None:
            return violation
    if spec.settings.unknown_cookies == "deny":
        for name in grouped:
            if name not in declared:
                return Violation(400, "openapi_unknown_parameter",
                                 f"{operation.label}: cookie {_safe(name)} is not declared", "cookie", "parameters")
    return None


def _safe(name: str) -> str:
    """A parameter name for a message: printable, bounded (names are the client's text too)."""
    cleaned = "".join(c if c.isprintable() else "?" for c in name)[:64]
    return repr(cleaned)
