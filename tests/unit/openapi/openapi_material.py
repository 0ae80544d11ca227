"""What the OpenAPI tests build requests and specs from (imported by the tests of this folder)."""

from __future__ import annotations

import base64
from typing import Any

from extauthz.request import Request, request_from_check
from extauthz.samples import check_request_from_sample

#: The identity of a caller with a JWT granting ``shop:read``.
READER = {"kind": "jwt", "source": "users", "subject": "alice", "claims": {}, "scopes": ["shop:read"]}
ANONYMOUS = {"kind": "anonymous", "source": "", "subject": "", "claims": {}, "scopes": []}


def minimal(paths: dict[str, Any], version: str = "3.1.0", **top: Any) -> dict[str, Any]:
    """A spec document with these paths (and any other top-level fields)."""
    return {"openapi": version, "info": {"title": "Test API", "version": "1"}, "paths": paths, **top}


def request(method: str = "GET", path: str = "/", *, headers: dict[str, str] | None = None,
            body: str | bytes | None = None, partial: bool = False) -> Request:
    """The request view extauthz builds from what Envoy would send for this request."""
    sample: dict[str, Any] = {"method": method, "path": path, "host": "api.example.com", "headers": headers or {}}
    if isinstance(body, bytes):
        sample["body_base64"] = base64.b64encode(body).decode()
    elif body is not None:
        sample["body"] = body
    if partial:
        sample["partial_body"] = True
    return request_from_check(check_request_from_sample(sample))
