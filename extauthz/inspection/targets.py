"""Targets: every value of a request an inspector reads, with the location a finding names.

Values are read through the Request object and the shared body view only (never Envoy's message),
so the same code serves every way a request reaches the sidecar.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

from extauthz.payload import BodyKind, BodyView
from extauthz.payload.forms import split_urlencoded
from extauthz.request import Request

__all__ = ["Field", "RequestValues", "cookie_pairs", "safe_name"]

#: Headers never inspected: pseudo-headers (the path is its own target), framing, and what Envoy
#: itself sets. ``cookie`` is split into cookies.
SKIPPED_HEADERS = frozenset({
    ":path", ":method", ":scheme", ":authority", ":protocol", "content-length", "cookie",
    "x-envoy-auth-partial-body", "x-envoy-expected-rq-timeout-ms", "x-envoy-internal", "x-request-id",
})  # fmt: skip
#: Binary media types never inspected as text (content that is not text by nature).
_OPAQUE_TYPES = ("image/", "audio/", "video/", "font/", "model/")
_OPAQUE_MEDIA = frozenset({
    "application/zip", "application/gzip", "application/pdf", "application/x-protobuf", "application/protobuf",
    "application/grpc", "application/grpc+proto", "application/vnd.apache.avro+binary", "application/cbor",
    "application/msgpack", "application/x-msgpack", "application/wasm",
})  # fmt: skip
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.\-\[\]$@:]{1,64}")


def safe_name(name: str) -> str:
    """A parameter, cookie, header or JSON key as a location may show it: names that could carry
    the payload itself (long, or with characters names do not have) become ``*``."""
    return name if _SAFE_NAME.fullmatch(name) is not None else "*"


def safe_pointer(pointer: str) -> str:
    return "/".join(safe_name(token) if token else "" for token in pointer.split("/"))


@dataclass(frozen=True, slots=True)
class Field:
    #: path, query, name, header, cookie, body, filename (the targets of rules).
    kind: str
    #: Where it is, as findings name it: "query:q", "header:user-agent", "body:/items/0/note".
    location: str
    value: str


def query_pairs(raw_query: str) -> list[tuple[str, str]]:
    """``parse_qsl(keep_blank_values=True)`` at a fraction of its cost: most values have no escape."""
    return split_urlencoded(raw_query)


def cookie_pairs(header: str) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for item in header.split(";"):
        name, eq, value = item.strip().partition("=")
        if name or eq:
            pairs.append((name.strip(), value.strip().strip('"')))
    return pairs


class RequestValues:
    """The values of one request, grouped as the inspector scans them.

    ``inputs`` (path, query values and names, cookies, the body) and ``headers`` are each one text
    (values joined by newlines) for a single pass of every rule; :meth:`fields` enumerates the
    values one by one, with locations, when a pass found something to locate.
    """

    def __init__(self, request: Request, view: BodyView | None, *, headers: bool = True) -> None:
        self.request = request
        self.view = view
        self.query = query_pairs(request.raw_query) if request.raw_query else []
        cookie = request.headers.get("cookie")
        self.cookies = cookie_pairs(cookie) if cookie else []
        self.inspect_headers = headers
        #: None with body_raw set: the raw body read with replacement characters, made when first
        #: asked for (:attr:`body_text`): a long text body is decoded from its bytes (decode's
        #: ``raw``) and located through :meth:`fields` ``text_body=False``, so an invalid UTF-8 body
        #: is read once, not twice.
        self._body_text: str | None = None
        #: The bytes body_text was read from, when it is the raw body (see decode's ``raw``).
        self.body_raw: bytes | None = None
        view = self.view
        if view is not None and view.kind is not BodyKind.NONE:
            if view.document is not None:
                self._body_text = view.document.text
            elif view.kind in (BodyKind.FORM, BodyKind.MULTIPART):
                self._body_text = "\n".join(f"{name}\n{value}" for name, value in view.fields)
            elif view.kind is BodyKind.TEXT or (view.kind is BodyKind.JSON and view.partial):
                # Invalid UTF-8 must not hide the rest of a text body: a lenient backend reads it.
                self._body_text = "" if not request.body else None
                self.body_raw = request.body
            elif view.kind is BodyKind.BINARY and not view.media_type.startswith(_OPAQUE_TYPES) \
                    and view.media_type not in _OPAQUE_MEDIA:
                # A mislabelled body (JSON sent as application/octet-stream) is still read by backends
                # that parse whatever arrives: inspected as text when it is text.
                with contextlib.suppress(UnicodeDecodeError):
                    self._body_text = request.body.decode("utf-8")
                    self.body_raw = request.body

    @property
    def body_text(self) -> str | None:
        """The body as one text (None: no body read as text)."""
        if self._body_text is None and self.body_raw is not None:
            self._body_text = self.body_raw.decode("utf-8", "replace")
        return self._body_text

    @property
    def path(self) -> str:
        return self.request.raw_path.partition("?")[0]

    def inputs_text(self, *, body: bool = True) -> str:
        parts = [self.path]
        for name, value in self.query:
            parts.append(name)
            parts.append(value)
        for _, value in self.cookies:
            parts.append(value)
        if body and self.body_text:
            parts.append(self.body_text)
        return "\n".join(parts)

    def headers_text(self) -> str:
        headers = self.request.headers
        return "\n".join([value for name, value in headers.items() if name not in SKIPPED_HEADERS])

    def filenames(self) -> list[Field]:
        view = self.view
        if view is None:
            return []
        return [Field("filename", f"filename:{safe_name(p.name)}", p.filename) for p in view.parts
                if p.filename is not None]

    def fields(self, kinds: frozenset[str], *, text_body: bool = True) -> Iterator[Field]:
        """Every value of the given kinds except JSON body strings (see ``json_document``), and
        except a text body (always the last value) when ``text_body`` is false: the caller then
        looks at it through its bytes."""
        if "path" in kinds:
            yield Field("path", "path", self.path)
        if "query" in kinds or "name" in kinds:
            for name, value in self.query:
                location = f"query:{safe_name(name)}"
                if "query" in kinds:
                    yield Field("query", location, value)
                if "name" in kinds:
                    yield Field("name", location, name)
        if "cookie" in kinds:
            for name, value in self.cookies:
                yield Field("cookie", f"cookie:{safe_name(name)}", value)
        if "header" in kinds and self.inspect_headers:
            for name, value in self.request.headers.items():
                if name not in SKIPPED_HEADERS:
                    yield Field("header", f"header:{safe_name(name)}", value)
        if "filename" in kinds:
            yield from self.filenames()
        view = self.view
        if view is None or (self._body_text is None and self.body_raw is None) or view.document is not None:
            return
        if view.kind in (BodyKind.FORM, BodyKind.MULTIPART):
            for name, value in view.fields:
                location = f"body:{safe_name(name)}"
                if "body" in kinds:
                    yield Field("body", location, value)
                if "name" in kinds:
                    yield Field("name", location, name)
        elif "body" in kinds and text_body:
            yield Field("body", "body", self.body_text or "")
