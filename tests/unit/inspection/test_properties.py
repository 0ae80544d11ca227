"""Inspection always terminates and never raises, whatever the request (hypothesis)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extauthz.inspection.engine import Inspector

from .conftest import build_inspector, make_request

_INSPECTOR: Inspector = build_inspector({"sensitivity": 3})
_ATOMS = ["${", "}", "jndi:", "${lower:", "::-", "%", "%25", "%u", "&#", "&#x", ";", "\\u00", "\\x", "'", '"', "/*",
          "*/", "--", "../", "..\\", "<script", "<", ">", "on", "=", "http://", "//", "0x7f", "127.1", "[::", "]",
          "select ", "union ", " or ", "1=1", "$(", "`", "|", "&&", "\n", "\x00", "é", "\uff04", "\ud800", "{", "[", ","]
text = st.lists(st.sampled_from(_ATOMS) | st.text(max_size=6), max_size=40).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(query=text, header=text, body=text | st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
       content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                     "multipart/form-data; boundary=x", None, "image/png", "a/b; c"]),
       partial=st.booleans())
def test_inspection_never_raises(query: str, header: str, body: str, content_type: str | None, partial: bool) -> None:
    from urllib.parse import quote

    raw = query.encode("utf-8", "surrogatepass")
    request = make_request(query="q=" + quote(raw, safe="%&=") + "&" + quote(raw),
                           headers={"x-h": header.replace("\n", " "), "cookie": f"a={query}; b"},
                           body=body.encode("utf-8", "surrogatepass"), content_type=content_type, partial=partial)
    verdict = _INSPECTOR.inspect(request)
    assert verdict.score >= 0
    for finding in verdict.findings:
        assert "\n" not in finding.location and len(finding.location) < 600


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | text,
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(text, c, max_size=4), max_leaves=25))
def test_any_json_document_is_inspected_without_error(value: object) -> None:
    import json

    verdict = _INSPECTOR.inspect(make_request(body=json.dumps(value)))
    assert verdict.score >= 0
