"""Decision -> CheckResponse, as Envoy's ext_authz filter expects it."""

from __future__ import annotations

import json

from google.protobuf import struct_pb2

from extauthz.api.envoy.config.core.v3 import base_pb2
from extauthz.api.envoy.service.auth.v3 import external_auth_pb2
from extauthz.decision import Decision

__all__ = ["to_check_response"]

# google.rpc.Code values
_OK = 0
_PERMISSION_DENIED = 7
_UNAUTHENTICATED = 16
_UNAVAILABLE = 14

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_APPEND = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD
_CONTENT_TYPE = base_pb2.HeaderValueOption(
    header=base_pb2.HeaderValue(key="content-type", value="application/json"), append_action=_OVERWRITE
)
#: Dynamic metadata lands in Envoy under the ext_authz filter's namespace; later filters and
#: access logs read it as %DYNAMIC_METADATA(envoy.filters.http.ext_authz:decision_id)%.


def _metadata(decision: Decision) -> struct_pb2.Struct:
    meta = struct_pb2.Struct()
    fields = meta.fields
    fields["decision_id"].string_value = decision.decision_id
    fields["policy"].string_value = decision.policy
    fields["rule"].string_value = decision.rule
    fields["reason"].string_value = decision.reason
    if decision.dry_run:
        fields["dry_run"].bool_value = True
        fields["would_deny"].bool_value = decision.would_deny
    return meta


def _header(name: str, value: str, action: int = _OVERWRITE) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=name, value=value), append_action=action)


def to_check_response(decision: Decision) -> external_auth_pb2.CheckResponse:
    response = external_auth_pb2.CheckResponse(dynamic_metadata=_metadata(decision))
    if decision.allowed:
        response.status.code = _OK
        ok = response.ok_response
        ok.SetInParent()
        for name, value in decision.upstream_headers:
            ok.headers.append(_header(name, value))
        if decision.remove_headers:
            ok.headers_to_remove.extend(decision.remove_headers)
        for name, value in decision.client_headers:
            ok.response_headers_to_add.append(_header(name, value, _APPEND))
        return response
    if decision.status == 401:
        response.status.code = _UNAUTHENTICATED
    elif decision.status >= 500:
        response.status.code = _UNAVAILABLE
    else:
        response.status.code = _PERMISSION_DENIED
    response.status.message = decision.reason
    denied = response.denied_response
    denied.status.code = decision.status  # type: ignore[assignment]
    denied.headers.append(_CONTENT_TYPE)
    for name, value in decision.client_headers:
        denied.headers.append(_header(name, value, _APPEND))
    denied.body = json.dumps(
        {"error": decision.message, "reason": decision.reason, "decision_id": decision.decision_id},
        separators=(",", ":"),
    )
    return response
