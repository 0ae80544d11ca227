"""The body view: kinds by content type, forms, multipart, truncation, and once per request."""

from __future__ import annotations

import pytest

from extauthz.payload import BodyKind, body_view, parse_media_type
from extauthz.payload.forms import PARSE_MAX_FIELDS
from extauthz.request import Request


def request(body: bytes, content_type: str | None = "application/json", *, partial: bool = False,
            derived: dict | None = None) -> Request:
    headers = {} if content_type is None else {"content-type": content_type}
    return Request("POST", "api.example.com", "/x", "/x", "", headers, body, partial,
                   derived=derived if derived is not None else {})


def test_the_view_is_built_once_per_request() -> None:
    req = request(b'{"a": 1}')
    assert body_view(req) is body_view(req)
    assert body_view(req).json == {"a": 1}


@pytest.mark.parametrize(
    ("content_type", "kind"),
    [
        ("application/json", BodyKind.JSON),
        ("Application/JSON; charset=utf-8", BodyKind.JSON),
        ("application/problem+json", BodyKind.JSON),
        ("application/x-www-form-urlencoded", BodyKind.FORM),
        ("multipart/form-data; boundary=b", BodyKind.MULTIPART),
        ("text/plain", BodyKind.TEXT),
        ("application/xml", BodyKind.TEXT),
        (None, BodyKind.TEXT),
        ("image/png", BodyKind.BINARY),
        ("application/octet-stream", BodyKind.BINARY),
    ],
)
def test_kind_follows_the_content_type(content_type: str | None, kind: BodyKind) -> None:
    assert body_view(request(b"{}" if kind is not BodyKind.MULTIPART else b"--b--", content_type)).kind is kind


def test_no_body_is_kind_none_whatever_the_type() -> None:
    view = body_view(request(b""))
    assert view.kind is BodyKind.NONE and view.problem is None
    with pytest.raises(LookupError):
        _ = view.json


@pytest.mark.parametrize("header", ["application", "a/b;x", "a/b; c=1; c=2", "a b/c", "a/b; x=\"open"])
def test_malformed_content_types_are_refused(header: str) -> None:
    assert parse_media_type(header) is None
    view = body_view(request(b"{}", header))
    assert view.problem is not None and view.problem.reason == "body_malformed"


def test_quoted_parameters() -> None:
    media = parse_media_type('multipart/form-data; boundary="a;b\\"c"; charset=utf-8')
    assert media is not None and media.parameters == {"boundary": 'a;b"c', "charset": "utf-8"}


def test_truncated_structured_bodies_are_a_problem_but_text_is_left_to_the_consumer() -> None:
    view = body_view(request(b'{"a": ', partial=True))
    assert view.partial and view.problem is not None and view.problem.reason == "body_truncated"
    assert view.problem.status == 413
    text = body_view(request(b"hello", "text/plain", partial=True))
    assert text.partial and text.problem is None


def test_form_fields() -> None:
    view = body_view(request(b"a=1&b=%3Cx%3E&a=&c", "application/x-www-form-urlencoded"))
    assert view.fields == (("a", "1"), ("b", "<x>"), ("a", ""), ("c", ""))
    many = b"&".join(b"f=1" for _ in range(PARSE_MAX_FIELDS + 1))
    over = body_view(request(many, "application/x-www-form-urlencoded"))
    assert over.problem is not None and over.problem.limit == "fields"


MULTIPART = (
    b"--XyZ\r\n"
    b'Content-Disposition: form-data; name="title"\r\n\r\n'
    b"hello\r\n"
    b"--XyZ\r\n"
    b'Content-Disposition: form-data; name="file"; filename="../../etc/passwd"\r\n'
    b"Content-Type: image/png\r\n\r\n"
    b"\x89PNG\r\n\x1a\n\r\n"
    b"--XyZ--\r\n"
)


def test_multipart_parts_metadata_and_text_fields() -> None:
    view = body_view(request(MULTIPART, "multipart/form-data; boundary=XyZ"))
    assert view.problem is None
    assert view.fields == (("title", "hello"),)
    assert [(p.name, p.filename, p.content_type, p.size) for p in view.parts] == [
        ("title", None, "", 5), ("file", "../../etc/passwd", "image/png", 8)]


def test_multipart_problems() -> None:
    no_boundary = body_view(request(MULTIPART, "multipart/form-data"))
    assert no_boundary.problem is not None and no_boundary.problem.reason == "body_malformed"
    unclosed = body_view(request(MULTIPART[: -len(b"--XyZ--\r\n") - 2], "multipart/form-data; boundary=XyZ"))
    assert unclosed.problem is not None and unclosed.problem.reason == "body_malformed"
    cut = body_view(request(MULTIPART[:60], "multipart/form-data; boundary=XyZ", partial=True))
    assert cut.problem is not None and cut.problem.reason == "body_truncated"
    no_disposition = b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n--b--"
    bad = body_view(request(no_disposition, "multipart/form-data; boundary=b"))
    assert bad.problem is not None and bad.problem.pointer == "part 0"
