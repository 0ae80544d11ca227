"""A compiled spec: what the request path reads, built once per spec version and never changed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extauthz.openapi.params import Parameter
from extauthz.openapi.routing import PathItem, Router
from extauthz.openapi.schema import SchemaSet
from extauthz.openapi.security import Requirement, Scheme

__all__ = ["METHODS", "CompiledSpec", "MediaType", "Operation", "RequestBody", "Settings", "Violation"]

_NOT_ROUTED: Any = object()
_ROUTE_MEMO_ENTRIES, _ROUTE_MEMO_PATH = 4096, 256

#: The operations a Path Item can hold, as request methods.
METHODS = ("GET", "PUT", "POST", "DELETE", "OPTIONS", "HEAD", "PATCH", "TRACE")


@dataclass(frozen=True, slots=True)
class Settings:
    """The policy's ``openapi:`` settings that shape how a spec is compiled (see docs/policy.md)."""

    mode: str = "enforce"
    base_paths: tuple[str, ...] | None = None
    trailing_slash: str = "strict"
    head_from_get: bool = True
    cors_preflight: bool = False
    deprecated: str = "allow"
    unknown_query: str = "deny"
    unknown_cookies: str = "ignore"
    formats: bool = True
    read_only: str = "deny"
    additional_properties: str = "declared"
    undeclared_body: str = "deny"
    security: str = "enforce"
    #: Security scheme name -> (identity source names, identity kinds) that satisfy it.
    scheme_identities: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = ()
    #: operationId (or "METHOD /template") -> "enforce" or "report".
    operation_modes: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Violation:
    status: int
    reason: str
    message: str
    #: Where: "path", "method", "security", "path.id", "query.limit", "header.x-a", "cookie.s",
    #: "content-type", "body", "body/items/0".
    location: str
    #: Which constraint: a JSON Schema keyword, or "paths", "methods", "required", "security", ...
    constraint: str
    headers: tuple[tuple[str, str], ...] = ()
    #: For security refusals: the WWW-Authenticate challenges and the scope a 403 asks for.
    challenges: tuple[str, ...] = ()
    scope: str = ""


@dataclass(frozen=True, slots=True)
class MediaType:
    """One declared request media type: ``name`` as the spec writes it (lower-case, no parameters)."""

    name: str
    #: How a request of this media type is read (extauthz.payload.BodyKind value: "json", "form",
    #: "multipart", "text", "binary"; "" for a range such as ``*/*``).
    kind: str
    #: The body schema's validator, or None (no schema, or a media type validated by type only).
    validator: Any = None
    #: For form bodies: the shape of each property (see params), from the schema.
    form: Mapping[str, Parameter] | None = None
    #: The schema's shape of an undeclared form property (additionalProperties).
    form_other: Parameter | None = None
    #: The def of its schema in the spec's schema document ("" without a schema).
    schema_name: str = ""
    #: multipart/form-data: the content types each part may have (``encoding.<name>.contentType``).
    part_types: Mapping[str, tuple[str, ...]] | None = None


@dataclass(frozen=True, slots=True)
class RequestBody:
    required: bool
    media: tuple[MediaType, ...]
    #: The media types by name (``application/json``, ``image/*``, ``*/*``).
    by_name: Mapping[str, MediaType] = field(default_factory=dict)

    def media_for(self, content_type: str) -> MediaType | None:
        """The declared media type for a request's (lower-case, parameter-free) content type: exact
        first, then ``type/*``, then ``*/*``."""
        by_name = self.by_name
        found = by_name.get(content_type)
        if found is None:
            found = by_name.get(content_type.partition("/")[0] + "/*") or by_name.get("*/*")
        return found


@dataclass(frozen=True, slots=True)
class Operation:
    method: str
    #: The path template as the spec writes it (without base path).
    template: str
    operation_id: str
    #: What names the operation in metrics, logs and denials: the operationId, else "METHOD template".
    label: str
    path_params: tuple[Parameter, ...]
    query: Mapping[str, Parameter]
    #: Query names that belong to an exploded object parameter (``form`` + ``explode``) or a
    #: ``deepObject`` one (by parameter name).
    query_objects: tuple[Parameter, ...]
    headers: tuple[Parameter, ...]
    cookies: Mapping[str, Parameter]
    body: RequestBody | None
    #: None: no security anywhere in the spec (public); () never happens (that is public too).
    security: tuple[Requirement, ...]
    deprecated: bool
    #: "enforce" or "report" for this operation (policy override, x-extauthz-mode, section mode).
    mode: str
    tags: tuple[str, ...] = ()
    #: Where it is declared, for messages.
    pointer: str = ""
    #: Some query parameter is required: a request without a query string can still break the rules.
    required_query: bool = False


@dataclass(frozen=True, slots=True)
class CompiledSpec:
    """One version of a spec, ready for requests."""

    title: str
    version: str
    openapi: str
    settings: Settings
    routers: tuple[Router, ...]
    operations: tuple[Operation, ...]
    schemes: Mapping[str, Scheme]
    #: The compiled validators, and how their failures are explained.
    schemas: SchemaSet
    #: Every file the spec was read from.
    files: tuple[Path, ...] = ()
    #: Labels of operations whose policy overrides named nothing in this version.
    unknown_overrides: tuple[str, ...] = field(default=())

    #: Routing results by path (see match).
    _routes: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def match(self, path: str) -> tuple[PathItem, dict[str, str], str] | None:
        """The path item, raw path parameter values and base path of a normalized path, or None.

        Remembered for short paths (a service sees the same few often): bounded, cleared when full.
        The values are shared between requests and must not be changed."""
        routes = self._routes
        found = routes.get(path, _NOT_ROUTED)
        if found is not _NOT_ROUTED:
            return found  # type: ignore[no-any-return]
        for router in self.routers:
            found = router.match(path)
            if found is not None:
                break
        if len(path) <= _ROUTE_MEMO_PATH:
            if len(routes) >= _ROUTE_MEMO_ENTRIES:
                routes.clear()
            routes[path] = found
        return found

    def operation(self, label: str) -> Operation | None:
        for operation in self.operations:
            if operation.label == label:
                return operation
        return None
