"""Helpers for the inspection tests: requests built the way the sidecar builds them, and an
inspector with a policy's default settings."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from extauthz.checks.inspect import InspectCheck
from extauthz.inspection.engine import Inspector, Verdict
from extauthz.policy.build import BuildContext, Services
from extauthz.policy.model import Document, PolicyError
from extauthz.request import Request


def make_request(*, path: str = "/api/items", query: str = "", headers: Mapping[str, str] | None = None,
                 body: bytes | str | Any = b"", content_type: str | None = None, partial: bool = False) -> Request:
    if not isinstance(body, bytes | str):
        body = json.dumps(body)
        content_type = content_type or "application/json"
    raw_body = body.encode() if isinstance(body, str) else body
    all_headers = {":path": path + ("?" + query if query else ""), ":method": "POST", **(headers or {})}
    if content_type:
        all_headers["content-type"] = content_type
    return Request("POST", "api.example.com", path, path + ("?" + query if query else ""), query, all_headers,
                   raw_body, partial, derived={})


def build_inspector(spec: Mapping[str, Any] | None = None) -> Inspector:
    return build_check(spec).inspector


def spec_errors(spec: Mapping[str, Any]) -> list[str]:
    """The load errors of an inspect section (empty when it compiles)."""
    errors: list[PolicyError] = []
    _compile(spec, errors)
    return [str(e) for e in errors]


def _compile(spec: Mapping[str, Any] | None, errors: list[PolicyError]) -> InspectCheck | None:
    body = {"apiVersion": "extauthz.dev/v1", "kind": "AuthPolicy", "metadata": {"name": "t"},
            "spec": {"inspect": dict(spec or {})}}
    document = Document(file="t.yaml", index=0, kind="AuthPolicy", name="t", body=body)
    build = BuildContext(document, Path("."), Services(), errors)
    return InspectCheck.from_spec(build.spec("inspect"), build)


def build_check(spec: Mapping[str, Any] | None = None) -> InspectCheck:
    errors: list[PolicyError] = []
    check = _compile(spec, errors)
    assert not errors, [str(e) for e in errors]
    assert check is not None
    return check


@pytest.fixture(scope="session")
def default_inspector() -> Inspector:
    return build_inspector()


@pytest.fixture
def inspect_value(default_inspector: Inspector) -> Callable[[str, str], Verdict]:
    """``inspect_value(where, value)``: the verdict for one value in a query parameter ("query"),
    a JSON field ("json"), a header ("header") or a form field ("form")."""

    def run(where: str, value: str) -> Verdict:
        if where == "query":
            request = make_request(query="v=" + quote(value, safe=""))
        elif where == "json":
            request = make_request(body={"data": {"v": value}})
        elif where == "header":
            request = make_request(headers={"x-custom": value})
        elif where == "form":
            request = make_request(body="v=" + quote(value, safe=""), content_type="application/x-www-form-urlencoded")
        else:
            raise ValueError(where)
        return default_inspector.inspect(request)

    return run
