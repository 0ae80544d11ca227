"""Requests written by hand (explain, policy tests) turned into the CheckRequest Envoy would send.

The format is documented in docs/policy.md ("Request files"). It mirrors what Envoy fills in, so a
policy behaves the same in ``extauthz test`` as behind a real proxy.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from extauthz.api.envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2

__all__ = ["PEER_FIELDS", "REQUEST_FIELDS", "SampleError", "check_request_from_sample"]

#: The fields of a request file (docs/policy.md, "Request files").
REQUEST_FIELDS = frozenset({
    "method", "host", "path", "headers", "body", "body_base64", "partial_body", "source", "destination",
    "sni", "context", "id", "scheme", "protocol",
})
#: ``source.address`` of a sample request that names no source.
DEFAULT_SOURCE_ADDRESS = "127.0.0.1"
#: The fields of ``source`` and ``destination``.
PEER_FIELDS = frozenset({"address", "port", "principal", "certificate", "service", "labels"})


class SampleError(ValueError):
    """A request file is malformed."""


def _peer(data: Any, target: attribute_context_pb2.AttributeContext.Peer, where: str) -> None:
    if not isinstance(data, Mapping):
        raise SampleError(f"{where} must be a mapping")
    unknown = set(data) - PEER_FIELDS
    if unknown:
        raise SampleError(f"{where}: unknown fields {sorted(unknown)}")
    if "address" in data:
        target.address.socket_address.address = str(data["address"])
        target.address.socket_address.port_value = int(data.get("port", 0))
    target.principal = str(data.get("principal", ""))
    if data.get("certificate"):
        # Envoy URL-encodes the PEM certificate.
        target.certificate = quote(str(data["certificate"]), safe="")
    target.service = str(data.get("service", ""))
    for k, v in dict(data.get("labels", {})).items():
        target.labels[str(k)] = str(v)


def check_request_from_sample(sample: Mapping[str, Any]) -> external_auth_pb2.CheckRequest:
    if not isinstance(sample, Mapping):
        raise SampleError("request must be a mapping")
    unknown = set(sample) - REQUEST_FIELDS
    if unknown:
        raise SampleError(f"unknown request fields {sorted(unknown)} (known: {sorted(REQUEST_FIELDS)})")
    message = external_auth_pb2.CheckRequest()
    attrs = message.attributes
    http = attrs.request.http
    http.method = str(sample.get("method", "GET")).upper()
    http.host = str(sample.get("host", ""))
    http.path = str(sample.get("path", "/"))
    http.scheme = str(sample.get("scheme", "http"))
    http.protocol = str(sample.get("protocol", "HTTP/1.1"))
    http.id = str(sample.get("id", ""))
    headers = sample.get("headers", {}) or {}
    if not isinstance(headers, Mapping):
        raise SampleError("headers must be a mapping of name to value")
    http.headers[":method"] = http.method
    http.headers[":path"] = http.path
    http.headers[":authority"] = http.host
    http.headers[":scheme"] = http.scheme
    for name, value in headers.items():
        http.headers[str(name).lower()] = str(value)
    if "body_base64" in sample:
        http.raw_body = base64.b64decode(str(sample["body_base64"]), validate=True)
    elif "body" in sample:
        http.raw_body = str(sample["body"]).encode("utf-8")
    if http.raw_body:
        http.size = len(http.raw_body)
        http.headers.setdefault("content-length", str(len(http.raw_body)))
    if sample.get("partial_body"):
        http.headers["x-envoy-auth-partial-body"] = "true"
    # Envoy always sends the downstream peer's address; a sample that names none comes from here.
    _peer(sample.get("source", {"address": DEFAULT_SOURCE_ADDRESS}), attrs.source, "source")
    if "destination" in sample:
        _peer(sample["destination"], attrs.destination, "destination")
    if sample.get("sni"):
        attrs.tls_session.sni = str(sample["sni"])
    for k, v in dict(sample.get("context", {}) or {}).items():
        attrs.context_extensions[str(k)] = str(v)
    return message
