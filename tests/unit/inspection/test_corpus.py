"""Every attack of our own corpus is refused, every benign request of it is allowed (defaults)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from extauthz.inspection.engine import Inspector, Verdict

from .conftest import make_request

CORPUS = Path(__file__).parent / "corpus"
ATTACKS: dict[str, list[str]] = yaml.safe_load((CORPUS / "attacks.yaml").read_text())
BENIGN: dict[str, list[Any]] = yaml.safe_load((CORPUS / "benign.yaml").read_text())

attack_cases = [(detector, value) for detector, values in ATTACKS.items() for value in values]


def _blocked(verdict: Verdict, threshold: int = 5) -> bool:
    return verdict.problem is not None or verdict.score >= threshold


@pytest.mark.parametrize(("detector", "value"), attack_cases, ids=[f"{d}-{i}" for i, (d, _) in enumerate(attack_cases)])
@pytest.mark.parametrize("where", ["query", "json"])
def test_attack_is_refused(inspect_value: Callable[[str, str], Verdict], detector: str, value: str, where: str) -> None:
    verdict = inspect_value(where, value)
    assert _blocked(verdict), (verdict.findings, verdict.score)
    if where == "json":
        assert all(f.location == "body:/data/v" for f in verdict.findings if f.kind == "body"), verdict.findings


@pytest.mark.parametrize("value", ATTACKS["log4shell"])
def test_log4shell_is_refused_in_any_header(inspect_value: Callable[[str, str], Verdict], value: str) -> None:
    verdict = inspect_value("header", value)
    assert _blocked(verdict) and {f.location for f in verdict.findings} == {"header:x-custom"}


@pytest.mark.parametrize("query", BENIGN["queries"])
def test_benign_query_is_allowed(default_inspector: Inspector, query: str) -> None:
    verdict = default_inspector.inspect(make_request(query=query))
    assert not _blocked(verdict), verdict


@pytest.mark.parametrize("body", BENIGN["bodies"], ids=[str(i) for i in range(len(BENIGN["bodies"]))])
def test_benign_body_is_allowed(default_inspector: Inspector, body: Any) -> None:
    verdict = default_inspector.inspect(make_request(body=body))
    assert not _blocked(verdict), verdict


def test_benign_browser_headers_are_allowed(default_inspector: Inspector) -> None:
    headers = {
        "user-agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36",
        "accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
        "referer": "https://app.example.com/orders?id=42&tab=items",
        "authorization": "Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxMjMifQ.c2lnbmF0dXJl",
        "cookie": "session=abc123; theme=dark; consent=yes",
        "x-forwarded-for": "203.0.113.9, 10.0.0.1",
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    }
    assert not _blocked(default_inspector.inspect(make_request(headers=headers)))


@pytest.mark.parametrize("content_type", ["text/plain", "application/octet-stream", None, "application/x-anything"])
def test_a_mislabelled_or_broken_text_body_is_still_inspected(default_inspector: Inspector, content_type: str | None) -> None:
    body = b"\xff\xfe junk " + b"1' or '1'='1" if content_type == "text/plain" else b"{\"q\": \"1' or '1'='1\"}"
    verdict = default_inspector.inspect(make_request(body=body, content_type=content_type))
    assert _blocked(verdict), verdict


def test_opaque_media_types_are_not_inspected(default_inspector: Inspector) -> None:
    verdict = default_inspector.inspect(make_request(body=b"1' or '1'='1", content_type="image/png"))
    assert not verdict.findings


def test_a_match_deep_in_a_large_document_is_still_refused(default_inspector: Inspector) -> None:
    """Locating stops after a bounded number of values; the finding then stands on the body."""
    body = {"items": [f"item number {i}" for i in range(600)] + ["1' or '1'='1"]}
    verdict = default_inspector.inspect(make_request(body=body))
    assert _blocked(verdict) and {f.location for f in verdict.findings} == {"body"}
