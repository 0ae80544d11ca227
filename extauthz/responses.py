"""Decision -> CheckResponse, as Envoy's ext_authz filter expects it."""

from __future__ import annotations

import json
from typing import Any

from extauthz._wire import varint
from extauthz.api.envoy.config.core.v3 import base_pb2
from extauthz.api.envoy.service.auth.v3 import external_auth_pb2
from extauthz.decision import Decision

__all__ = ["DYNAMIC_METADATA_MODES", "check_response_bytes", "denial_body", "sends_metadata", "to_check_response"]

# google.rpc.Code values
_OK = 0
_PERMISSION_DENIED = 7
_UNAUTHENTICATED = 16
_UNAVAILABLE = 14

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_APPEND = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD
#: Dynamic metadata lands in Envoy under the ext_authz filter's namespace; later filters and
#: access logs read it as %DYNAMIC_METADATA(envoy.filters.http.ext_authz:decision_id)%.
#: Which decisions carry it (``extauthz serve --dynamic-metadata``): ``deny``, the default, sends it
#: with denials and dry-run decisions only, the ones an operator looks into. Envoy spends CPU on every
#: metadata Struct it receives (about 8 us per request through Envoy 1.40 here), and on allowed
#: requests it repeats what the access log already has (the decision id is x-request-id), so ``all``
#: is opt-in, as dynamic metadata is in Authorino and OPA-Envoy. ``off`` never sends it.
DYNAMIC_METADATA_MODES = ("deny", "all", "off")


def sends_metadata(decision: Decision, mode: str) -> bool:
    """Whether ``decision`` carries dynamic metadata under ``mode`` (one of DYNAMIC_METADATA_MODES)."""
    if mode == "deny":
        return not decision.allowed or decision.dry_run
    return mode == "all"


def _add_header(options: Any, name: str, value: str, action: int) -> None:
    option = options.add()
    option.header.key = name
    option.header.value = value
    option.append_action = action


def to_check_response(decision: Decision, metadata: str = "deny") -> external_auth_pb2.CheckResponse:
    """The response as a message (the API and tests); the server sends check_response_bytes().
    ``metadata`` is one of DYNAMIC_METADATA_MODES.

    Built in place: nested constructors cost several times more per request.
    """
    response = external_auth_pb2.CheckResponse()
    if sends_metadata(decision, metadata):
        fields = response.dynamic_metadata.fields
        fields["decision_id"].string_value = decision.decision_id
        fields["policy"].string_value = decision.policy
        fields["rule"].string_value = decision.rule
        fields["reason"].string_value = decision.reason
        if decision.dry_run:
            fields["dry_run"].bool_value = True
            fields["would_deny"].bool_value = decision.would_deny
    if decision.allowed:
        ok = response.ok_response
        ok.SetInParent()
        for name, value in decision.upstream_headers:
            _add_header(ok.headers, name, value, _OVERWRITE)
        if decision.remove_headers:
            ok.headers_to_remove.extend(decision.remove_headers)
        for name, value in decision.client_headers:
            _add_header(ok.response_headers_to_add, name, value, _APPEND)
        return response
    response.status.code = _grpc_code(decision.status)
    response.status.message = decision.reason
    denied = response.denied_response
    denied.status.code = decision.status  # type: ignore[assignment]
    _add_header(denied.headers, "content-type", "application/json", _OVERWRITE)
    for name, value in decision.client_headers:
        _add_header(denied.headers, name, value, _APPEND)
    denied.body = denial_body(decision)
    return response


def _grpc_code(http_status: int) -> int:
    """The gRPC status of a denial (Envoy logs it; the client gets the HTTP status)."""
    if http_status == 401:
        return _UNAUTHENTICATED
    if http_status >= 500:
        return _UNAVAILABLE
    return _PERMISSION_DENIED


def denial_body(decision: Decision) -> str:
    """The JSON body of a denial: the same in gRPC and HTTP mode."""
    return json.dumps({"error": decision.message, "reason": decision.reason, "decision_id": decision.decision_id},
                      separators=(",", ":"))  # fmt: skip


# --- the same response, straight to wire bytes ----------------------------------------------------
#
# Setting a dozen protobuf fields from Python and serializing them is, after parsing the request,
# the largest fixed cost of a Check. A response is a few short strings, most of them the same from
# one Check to the next (policy, rule, reason, header names and values): their encodings are kept
# and joined. ``check_response_bytes(d)`` parses into exactly ``to_check_response(d)``; a test
# checks that over allows, denials, dry runs, headers and non-ASCII text.
# Field numbers: envoy/service/auth/v3/external_auth.proto, google/rpc/status.proto,
# envoy/config/core/v3/base.proto, envoy/type/v3/http_status.proto, google/protobuf/struct.proto.

#: CheckResponse: status 1, denied_response 2, ok_response 3, dynamic_metadata 4.
_STATUS, _DENIED, _OK_RESPONSE, _METADATA = 0x0A, 0x12, 0x1A, 0x22
#: OkHttpResponse: headers 2, headers_to_remove 5, response_headers_to_add 6.
_OK_HEADERS, _OK_REMOVE, _OK_CLIENT_HEADERS = 0x12, 0x2A, 0x32
#: DeniedHttpResponse: status 1 (HttpStatus: code 1), headers 2, body 3.
_DENIED_STATUS, _DENIED_HEADERS, _DENIED_BODY = 0x0A, 0x12, 0x1A
#: Struct.fields 1 (map entry: key 1, value 2); Value: string_value 3, bool_value 4.
#: HeaderValueOption: header 1 (HeaderValue: key 1, value 2), append_action 3.
#: google.rpc.Status: code 1, message 2.
#: Kept encodings: at most this many, each at most this long (decision ids are never kept).
_KEEP_LIMIT, _KEEP_BYTES = 4096, 512


def _delimited(tag: int, payload: bytes) -> bytes:
    return varint(tag) + varint(len(payload)) + payload


def _text(tag: int, value: str) -> bytes:
    """A singular string field: not written when empty."""
    return _delimited(tag, value.encode("utf-8")) if value else b""


def _element(tag: int, value: str) -> bytes:
    """One element of a repeated string field: written even when empty."""
    return _delimited(tag, value.encode("utf-8"))


def _metadata_entry(name: str, value: str | bool) -> bytes:
    # Value.kind is a oneof: an empty string or False is still written (to_check_response sets them).
    if type(value) is bool:
        encoded = b"\x20\x01" if value else b"\x20\x00"
    else:
        encoded = _element(0x1A, value)  # type: ignore[arg-type]
    return _delimited(0x0A, _text(0x0A, name) + _delimited(0x12, encoded))


def _header_option(tag: int, name: str, value: str, action: int) -> bytes:
    option = _delimited(0x0A, _text(0x0A, name) + _text(0x12, value))
    if action:
        option += b"\x18" + varint(action)
    return _delimited(tag, option)


#: Encodings kept by their inputs: (field, ...) -> bytes. Bounded; long values are not kept.
_kept: dict[tuple[Any, ...], bytes] = {}


def _keep(key: tuple[Any, ...], encoded: bytes) -> bytes:
    if len(encoded) <= _KEEP_BYTES:
        if len(_kept) >= _KEEP_LIMIT:
            _kept.clear()
        _kept[key] = encoded
    return encoded


#: decision_id's entry up to its value: the value is new in every Check.
_DECISION_ID_HEAD = _text(0x0A, "decision_id")
_JSON_CONTENT_TYPE = _header_option(_DENIED_HEADERS, "content-type", "application/json", _OVERWRITE)


def check_response_bytes(decision: Decision, metadata: str = "deny") -> bytes:
    """``to_check_response(decision, metadata).SerializeToString()``, parsed alike."""
    kept = _kept
    if sends_metadata(decision, metadata):
        fields = [_delimited(0x0A, _DECISION_ID_HEAD + _delimited(0x12, _element(0x1A, decision.decision_id)))]
        for entry in (("policy", decision.policy), ("rule", decision.rule), ("reason", decision.reason)):
            fields.append(kept.get(entry) or _keep(entry, _metadata_entry(*entry)))
        if decision.dry_run:
            fields.append(_metadata_entry("dry_run", True))
            fields.append(_metadata_entry("would_deny", decision.would_deny))
        dynamic = _delimited(_METADATA, b"".join(fields))
    else:
        dynamic = b""
    if decision.allowed:
        parts = []
        for name, text in decision.upstream_headers:
            key = (_OK_HEADERS, name, text)
            parts.append(kept.get(key) or _keep(key, _header_option(_OK_HEADERS, name, text, _OVERWRITE)))
        removed = decision.remove_headers
        if removed:  # mostly the same names every time (the headers other policies own): kept whole
            names = (_OK_REMOVE, removed)
            parts.append(kept.get(names) or _keep(names, b"".join(_element(_OK_REMOVE, name) for name in removed)))
        for name, text in decision.client_headers:
            key = (_OK_CLIENT_HEADERS, name, text)
            parts.append(kept.get(key) or _keep(key, _header_option(_OK_CLIENT_HEADERS, name, text, _APPEND)))
        return _delimited(_OK_RESPONSE, b"".join(parts)) + dynamic
    status = _delimited(_STATUS, b"\x08" + varint(_grpc_code(decision.status)) + _text(0x12, decision.reason))
    denied = [_delimited(_DENIED_STATUS, b"\x08" + varint(decision.status)), _JSON_CONTENT_TYPE]
    denied += [_header_option(_DENIED_HEADERS, name, text, _APPEND) for name, text in decision.client_headers]
    denied.append(_text(_DENIED_BODY, denial_body(decision)))
    return status + _delimited(_DENIED, b"".join(denied)) + dynamic
