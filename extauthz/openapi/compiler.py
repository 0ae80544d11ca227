"""From spec files to a CompiledSpec: checked, resolved and compiled once per version of the spec.

Everything a request needs is prepared here: the routing table, every parameter's deserializer and
validator, every body schema's validator, every operation's security requirements. Anything the
enforcement relies on is checked on the way, and the first problem is raised as a SpecError naming
the file and JSON pointer (a spec that cannot be enforced as written must not be enforced partly).
Parts that enforcement does not read (responses, examples, callbacks, links) are not validated.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from extauthz.openapi.document import Location, SpecFiles
from extauthz.openapi.model import METHODS, CompiledSpec, MediaType, Operation, RequestBody, Settings
from extauthz.openapi.params import (
    ALLOWED_STYLES,
    DEFAULT_STYLES,
    Parameter,
    Shape,
    members_of,
    reader_for,
    schema_shape,
)
from extauthz.openapi.routing import Router, TemplateError
from extauthz.openapi.schema import SchemaOptions, SchemaSet, SchemaTranslator
from extauthz.openapi.security import DEFAULT_KINDS, Requirement, Scheme
from extauthz.payload.media import BodyKind, body_kind

__all__ = ["compile_spec"]

_LOCATIONS = ("path", "query", "header", "cookie")
#: Header parameters OpenAPI says to ignore (they are described elsewhere: content, security).
_IGNORED_HEADERS = frozenset({"accept", "content-type", "authorization"})
_VARIABLE = re.compile(r"\{([^{}]+)\}")
_MEDIA_TYPE = re.compile(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+*-]+|\*/\*")
_MODES = ("enforce", "report")


@dataclass(slots=True)
class _Pending:
    """An operation whose schemas wait for the validators (built all at once at the end)."""

    fields: dict[str, Any]
    params: list[tuple[dict[str, Any], Location, str | None]] = field(default_factory=list)
    media: list[tuple[str, str, str | None, dict[str, Any], Location]] = field(default_factory=list)
    body_required: bool = False
    has_body: bool = False


def compile_spec(path: Path, settings: Settings, files: SpecFiles | None = None) -> CompiledSpec:
    """Read, check and compile the spec at ``path``; raise SpecError naming file and pointer.

    ``files`` (optional) is filled with every file read, even when the spec is refused, so a
    watcher can notice when any of them changes.
    """
    files = files if files is not None else SpecFiles(path)
    return _Compiler(files, settings).run()


class _Compiler:
    def __init__(self, files: SpecFiles, settings: Settings) -> None:
        self.files = files
        self.settings = settings
        self.root_at = Location(files.root_name, "")
        self.version = ""
        self.translator: SchemaTranslator | None = None
        self.schemes: dict[str, Scheme] = {}
        self.operation_ids: dict[str, str] = {}

    def run(self) -> CompiledSpec:
        root = self.files.load_root()
        at = self.root_at
        if not isinstance(root, dict):
            raise at.error("an OpenAPI document must be an object")
        if "swagger" in root:
            raise at.child("swagger").error("Swagger 2.0 is not supported: convert the spec to OpenAPI 3.0 or 3.1")
        version = root.get("openapi")
        if not isinstance(version, str) or not re.fullmatch(r"3\.[01]\.\d+(-[0-9A-Za-z.]+)?", version):
            raise at.child("openapi").error("must be an OpenAPI version 3.0.x or 3.1.x")
        self.version = version[:3]
        info = root.get("info")
        if not isinstance(info, dict) or not isinstance(info.get("title"), str):
            raise at.child("info").error("must be an object with a title")
        dialect = root.get("jsonSchemaDialect")
        if dialect is not None and dialect not in (
            "https://json-schema.org/draft/2020-12/schema", "https://spec.openapis.org/oas/3.1/dialect/base",
        ):  # fmt: skip
            raise at.child("jsonSchemaDialect").error("only the 2020-12 and OpenAPI base dialects are supported")
        options = SchemaOptions(
            version=self.version, formats=self.settings.formats, refuse_read_only=self.settings.read_only == "deny",
            strict=self.settings.additional_properties == "strict",
        )  # fmt: skip
        self.translator = SchemaTranslator(self.files, options)
        self._schemes(root)
        global_security = self._security(root.get("security"), at.child("security"), None)
        root_bases = self._base_paths(root.get("servers"), at.child("servers"), ("",))
        paths = root.get("paths", {})
        if not isinstance(paths, dict):
            raise at.child("paths").error("must be an object")
        pending: list[tuple[tuple[str, ...], _Pending]] = []
        for template, item in paths.items():
            if template.startswith("x-"):
                continue
            item_at = at.child("paths", template)
            item, item_at = self.files.deref(item, item_at)
            if not isinstance(item, dict):
                raise item_at.error("a Path Item must be an object")
            bases = self._base_paths(item.get("servers"), item_at.child("servers"), root_bases)
            shared = self._parameter_list(item.get("parameters"), item_at.child("parameters"))
            for method in METHODS:
                operation = item.get(method.lower())
                if operation is None:
                    continue
                op_at = item_at.child(method.lower())
                if not isinstance(operation, dict):
                    raise op_at.error("an Operation must be an object")
                op_bases = self._base_paths(operation.get("servers"), op_at.child("servers"), bases)
                pending.append((op_bases, self._operation(template, method, operation, op_at, shared,
                                                          global_security)))  # fmt: skip
        schemas = self.translator.compile()
        operations = [self._finish(p, schemas) for _, p in pending]
        routers = self._routers([(bases, op) for (bases, _), op in zip(pending, operations, strict=True)])
        labels = {op.label for op in operations} | {op.operation_id for op in operations if op.operation_id}
        unknown = tuple(name for name, _ in self.settings.operation_modes if name not in labels)
        return CompiledSpec(
            title=info["title"], version=str(info.get("version", "")), openapi=version, settings=self.settings,
            routers=routers, operations=tuple(operations), schemes=self.schemes, schemas=schemas,
            files=tuple(self.files.files), unknown_overrides=unknown,
        )  # fmt: skip

    # --- servers and routing ----------------------------------------------------------------------
    def _base_paths(self, servers: Any, at: Location, inherited: tuple[str, ...]) -> tuple[str, ...]:
        if self.settings.base_paths is not None:
            return self.settings.base_paths
        if servers is None or servers == []:
            return inherited
        if not isinstance(servers, list):
            raise at.error("servers must be a list")
        bases: list[str] = []
        for i, server in enumerate(servers):
            server_at = at.child(i)
            if not isinstance(server, dict) or not isinstance(server.get("url"), str):
                raise server_at.error("a Server must be an object with a url")
            bases.extend(self._server_paths(server, server_at))
        return tuple(dict.fromkeys(bases))

    def _server_paths(self, server: dict[str, Any], at: Location) -> list[str]:
        """The path part of a server URL, once for each value its variables may take (their enum,
        else their default)."""
        url: str = server["url"]
        variables = server.get("variables") or {}
        if not isinstance(variables, dict):
            raise at.child("variables").error("must be an object")
        urls = [url]
        for name in _VARIABLE.findall(url):
            variable = variables.get(name)
            if not isinstance(variable, dict) or "default" not in variable:
                raise at.child("url").error(f"variable {name!r} has no default in variables")
            values = variable.get("enum") or [variable["default"]]
            urls = [u.replace("{" + name + "}", str(value)) for u in urls for value in values]
        paths = []
        for text in urls:
            if "://" in text or text.startswith("//"):
                path = urlsplit(text).path
            else:
                path = text.split("?", 1)[0]
                path = path if path.startswith("/") else "/" + path
            paths.append(path.rstrip("/"))
        return paths

    def _routers(self, entries: list[tuple[tuple[str, ...], Operation]]) -> tuple[Router, ...]:
        by_bases: dict[tuple[str, ...], Router] = {}
        ignore = self.settings.trailing_slash == "ignore"
        items: dict[tuple[tuple[str, ...], str], Any] = {}
        for bases, operation in entries:
            router = by_bases.get(bases)
            if router is None:
                router = by_bases[bases] = Router(bases, ignore_trailing_slash=ignore)
            item = items.get((bases, operation.template))
            if item is None:
                try:
                    item = items[(bases, operation.template)] = router.add(operation.template)
                except TemplateError as exc:
                    raise self.root_at.child("paths", operation.template).error(str(exc)) from None
            item.operations[operation.method] = operation
        # The router with the longest base path first: "/api/v2" before "/api".
        return tuple(sorted(by_bases.values(), key=lambda r: -max(len(b) for b in r.base_paths)))

    # --- security ---------------------------------------------------------------------------------
    def _schemes(self, root: dict[str, Any]) -> None:
        components = root.get("components") or {}
        if not isinstance(components, dict):
            raise self.root_at.child("components").error("must be an object")
        declared = components.get("securitySchemes") or {}
        at = self.root_at.child("components", "securitySchemes")
        if not isinstance(declared, dict):
            raise at.error("must be an object")
        mapped = {
            name: (frozenset(sources), frozenset(kinds)) for name, sources, kinds in self.settings.scheme_identities
        }
        for name, scheme in declared.items():
            scheme, scheme_at = self.files.deref(scheme, at.child(name))
            if not isinstance(scheme, dict) or not isinstance(scheme.get("type"), str):
                raise scheme_at.error("a Security Scheme must be an object with a type")
            kind = scheme["type"]
            allowed = ("apiKey", "http", "oauth2", "openIdConnect") + (("mutualTLS",) if self.version == "3.1" else ())
            if kind not in allowed:
                raise scheme_at.child("type").error(f"must be one of {', '.join(allowed)}")
            http_scheme = str(scheme.get("scheme", "")).lower() if kind == "http" else ""
            if kind == "http" and not http_scheme:
                raise scheme_at.child("scheme").error("an http security scheme needs a scheme (bearer, basic, ...)")
            key = http_scheme if http_scheme in ("bearer", "basic") else kind if kind != "http" else ""
            sources, kinds = mapped.get(name, (frozenset(), DEFAULT_KINDS.get(key, frozenset())))
            if kind in ("oauth2", "openIdConnect") or http_scheme == "bearer":
                challenge = "Bearer"
            elif kind == "http":
                challenge = http_scheme.capitalize()
            else:
                challenge = ""
            self.schemes[name] = Scheme(name, kind if kind != "http" else f"http {http_scheme}", kinds, sources,
                                        challenge)  # fmt: skip
        for name, _, _ in self.settings.scheme_identities:
            if name not in self.schemes:
                raise at.error(f"the policy maps security scheme {name!r}, which the spec does not declare")

    def _security(self, value: Any, at: Location, inherited: tuple[Requirement, ...] | None
                  ) -> tuple[Requirement, ...] | None:  # fmt: skip
        if value is None:
            return inherited
        if not isinstance(value, list):
            raise at.error("security must be a list of requirements")
        requirements: list[Requirement] = []
        for i, requirement in enumerate(value):
            req_at = at.child(i)
            if not isinstance(requirement, dict):
                raise req_at.error("a Security Requirement must be an object")
            schemes = []
            for name, scopes in requirement.items():
                scheme = self.schemes.get(name)
                if scheme is None:
                    raise req_at.child(name).error(f"names security scheme {name!r}, which components does not declare")
                if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
                    raise req_at.child(name).error("scopes must be a list of strings")
                if self.settings.security == "enforce" and not scheme.kinds and not scheme.sources:
                    raise req_at.child(name).error(
                        f"security scheme {name!r} ({scheme.type}) is satisfied by no identity kind: map it to the "
                        f"policy's identity sources (openapi.securitySchemes.{name}.sources)"
                    )
                schemes.append((scheme, tuple(scopes)))
            requirements.append(Requirement(tuple(schemes)))
        return tuple(requirements)

    # --- operations -------------------------------------------------------------------------------
    def _parameter_list(self, value: Any, at: Location) -> dict[tuple[str, str], tuple[dict[str, Any], Location]]:
        if value is None:
            return {}
        if not isinstance(value, list):
            raise at.error("parameters must be a list")
        found: dict[tuple[str, str], tuple[dict[str, Any], Location]] = {}
        for i, param in enumerate(value):
            param, param_at = self.files.deref(param, at.child(i))
            if not isinstance(param, dict):
                raise param_at.error("a Parameter must be an object")
            name, location = param.get("name"), param.get("in")
            if not isinstance(name, str) or not name:
                raise param_at.child("name").error("is required")
            if location not in _LOCATIONS:
                raise param_at.child("in").error(f"must be one of {', '.join(_LOCATIONS)}")
            key = (name.lower() if location == "header" else name, location)
            if key in found:
                raise param_at.error(f"{location} parameter {name!r} is declared twice")
            found[key] = (param, param_at)
        return found

    def _operation(self, template: str, method: str, operation: dict[str, Any], at: Location,
                   shared: dict[tuple[str, str], tuple[dict[str, Any], Location]],
                   global_security: tuple[Requirement, ...] | None) -> _Pending:  # fmt: skip
        assert self.translator is not None
        operation_id = operation.get("operationId", "")
        if not isinstance(operation_id, str):
            raise at.child("operationId").error("must be a string")
        if operation_id:
            if operation_id in self.operation_ids:
                raise at.child("operationId").error(
                    f"operationId {operation_id!r} is also used by {self.operation_ids[operation_id]}")
            self.operation_ids[operation_id] = f"{method} {template}"
        label = operation_id or f"{method} {template}"
        params = {**shared, **self._parameter_list(operation.get("parameters"), at.child("parameters"))}
        template_names = set(_VARIABLE.findall(template))
        declared_path = {name for (name, location) in params if location == "path"}
        for name in sorted(template_names - declared_path):
            raise at.error(f"path parameter {name!r} of {template} is not declared")
        for name in sorted(declared_path - template_names):
            raise params[(name, "path")][1].error(f"path parameter {name!r} is not in the path {template}")
        pending = _Pending({
            "method": method, "template": template, "operation_id": operation_id, "label": label,
            "deprecated": operation.get("deprecated") is True, "pointer": at.pointer,
            "tags": tuple(t for t in operation.get("tags", ()) or () if isinstance(t, str)),
            "security": self._security(operation.get("security"), at.child("security"), global_security) or (),
            "mode": self._mode(operation, at, operation_id, label),
        })  # fmt: skip
        for (name, location), (param, param_at) in params.items():
            if location == "header" and name in _IGNORED_HEADERS:
                continue
            pending.params.append((param, param_at, self._parameter_schema(param, param_at, label, location, name)))
        body = operation.get("requestBody")
        if body is not None:
            self._request_body(body, at.child("requestBody"), label, pending)
        return pending

    def _mode(self, operation: dict[str, Any], at: Location, operation_id: str, label: str) -> str:
        for name, mode in self.settings.operation_modes:
            if name in (operation_id, label) and name:
                return mode
        extension = operation.get("x-extauthz-mode")
        if extension is not None:
            if extension not in _MODES:
                raise at.child("x-extauthz-mode").error("must be enforce or report")
            return str(extension)
        return self.settings.mode

    def _parameter_schema(self, param: dict[str, Any], at: Location, label: str, location: str, name: str
                          ) -> str | None:  # fmt: skip
        assert self.translator is not None
        if location == "path" and param.get("required") is not True:
            raise at.child("required").error("a path parameter must be required: true")
        style = param.get("style", DEFAULT_STYLES[location])
        if location == "path" and style == "matrix":
            raise at.child("style").error(
                "matrix style is not supported: ;parameters are dropped from path segments before policies see them")
        if style not in ALLOWED_STYLES[location]:
            raise at.child("style").error(f"must be one of {', '.join(ALLOWED_STYLES[location])} for {location}")
        if "explode" in param and not isinstance(param["explode"], bool):
            raise at.child("explode").error("must be a boolean")
        if ("schema" in param) == ("content" in param):
            raise at.error("a Parameter needs exactly one of schema and content")
        key = f"{label}|{location}|{name}"
        if "schema" in param:
            return self.translator.root(param["schema"], at.child("schema"), key)
        content = param["content"]
        if not isinstance(content, dict) or len(content) != 1:
            raise at.child("content").error("must hold exactly one media type")
        media_name, media = next(iter(content.items()))
        media_at = at.child("content", media_name)
        if body_kind(media_name.split(";")[0].strip().lower()) is not BodyKind.JSON:
            raise media_at.error("only JSON content is supported for parameters")
        if not isinstance(media, dict):
            raise media_at.error("a Media Type must be an object")
        if "schema" not in media:
            return None
        return self.translator.root(media["schema"], media_at.child("schema"), key)

    def _request_body(self, body: Any, at: Location, label: str, pending: _Pending) -> None:
        assert self.translator is not None
        body, at = self.files.deref(body, at)
        if not isinstance(body, dict) or not isinstance(body.get("content"), dict):
            raise at.error("a Request Body must be an object with content")
        pending.has_body = True
        pending.body_required = body.get("required") is True
        for media_name, media in body["content"].items():
            media_at = at.child("content", media_name)
            name = media_name.split(";")[0].strip().lower()
            if _MEDIA_TYPE.fullmatch(name) is None:
                raise media_at.error("is not a media type (type/subtype)")
            if media is None:
                media = {}
            if not isinstance(media, dict):
                raise media_at.error("a Media Type must be an object")
            kind = "" if "*" in name else body_kind(name).value
            schema = media.get("schema")
            schema_name = None
            if schema is not None and kind in ("", "json", "form", "multipart"):
                schema_name = self.translator.root(schema, media_at.child("schema"), f"{label}|body|{name}")
            encoding = media.get("encoding") or {}
            if not isinstance(encoding, dict):
                raise media_at.child("encoding").error("must be an object")
            pending.media.append((name, kind, schema_name, encoding, media_at))

    # --- the end: validators in place -------------------------------------------------------------
    def _finish(self, pending: _Pending, schemas: SchemaSet) -> Operation:
        path_params: list[Parameter] = []
        query: dict[str, Parameter] = {}
        query_objects: list[Parameter] = []
        headers: list[Parameter] = []
        cookies: dict[str, Parameter] = {}
        for param, _, schema_name in pending.params:
            location = param["in"]
            parameter = _parameter(param, location, schema_name, schemas)
            if location == "path":
                path_params.append(parameter)
            elif location == "query":
                is_object = parameter.shape.kind == "object" and not parameter.json_content
                if is_object and (parameter.style == "deepObject" or (parameter.style == "form" and parameter.explode)):
                    query_objects.append(parameter)
                else:
                    query[parameter.name] = parameter
            elif location == "header":
                headers.append(parameter)
            else:
                cookies[parameter.name] = parameter
        body = None
        if pending.has_body:
            media = tuple(_media(name, kind, schema_name, encoding, schemas)
                          for name, kind, schema_name, encoding, _ in pending.media)  # fmt: skip
            body = RequestBody(pending.body_required, media, {m.name: m for m in media})
        required_query = any(p.required for p in (*query.values(), *query_objects))
        return Operation(
            path_params=tuple(path_params), query=query, query_objects=tuple(query_objects), headers=tuple(headers),
            cookies=cookies, body=body, required_query=required_query, **pending.fields,
        )  # fmt: skip


def _parameter(param: dict[str, Any], location: str, schema_name: str | None, schemas: SchemaSet) -> Parameter:
    style = param.get("style", DEFAULT_STYLES[location])
    explode = param.get("explode", style == "form")
    json_content = "content" in param
    if schema_name is not None and not json_content:
        shape = schema_shape(schemas.defs[schema_name], schemas.defs)
    else:
        shape = Shape("primitive")
    name = param["name"].lower() if location == "header" else param["name"]
    parameter = Parameter(
        name=name, location=location, required=param.get("required") is True, style=style, explode=explode,
        shape=shape, validator=schemas.validator(schema_name) if schema_name is not None else None,
        json_content=json_content, allow_empty=location == "query" and param.get("allowEmptyValue") is True,
        schema_name=schema_name or "",
    )  # fmt: skip
    return replace(parameter, read=reader_for(parameter))


def _media(name: str, kind: str, schema_name: str | None, encoding: Mapping[str, Any],
           schemas: SchemaSet) -> MediaType:  # fmt: skip
    validator = schemas.validator(schema_name) if schema_name is not None else None
    form: dict[str, Parameter] | None = None
    other: Parameter | None = None
    part_types: dict[str, tuple[str, ...]] | None = None
    if kind == "multipart":
        part_types = {}
        for prop, part in encoding.items():
            if isinstance(part, dict) and isinstance(part.get("contentType"), str):
                part_types[prop] = tuple(t.strip().split(";")[0].lower() for t in part["contentType"].split(","))
    if kind in ("", "form", "multipart") and schema_name is not None:
        object_shape = schema_shape(schemas.defs[schema_name], schemas.defs)
        form = {}
        properties = _form_properties(schemas.defs[schema_name], schemas.defs)
        for prop, sub in properties.items():
            found = encoding.get(prop)
            rule: Mapping[str, Any] = found if isinstance(found, dict) else {}
            style = rule.get("style", "form")
            explode = rule.get("explode", style == "form")
            shape = schema_shape(sub, schemas.defs)
            form[prop] = Parameter(prop, "form", False, style, explode, shape, None)
        other = Parameter("*", "form", False, "form", True, Shape("primitive", coerce=object_shape.other), None)
    return MediaType(name, kind, validator, form, other, schema_name or "", part_types or None)


def _form_properties(schema: Any, defs: Mapping[str, Any]) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for member in members_of(schema, defs):
        for name, sub in (member.get("properties") or {}).items():
            properties.setdefault(name, sub)
    return properties
