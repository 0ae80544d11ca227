"""Form bodies: ``application/x-www-form-urlencoded`` fields and ``multipart/form-data`` parts.

Both are read with byte operations that run at C speed (split, find), after counting separators, so
a body with a million tiny fields is refused before a Python object is made for each.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from urllib.parse import unquote

from extauthz.payload.media import parse_media_type
from extauthz.payload.problems import BodyProblem

__all__ = ["PARSE_MAX_FIELDS", "PARSE_MAX_PARTS", "Part", "parse_multipart", "parse_urlencoded", "split_urlencoded"]

#: Form fields beyond this are not parsed: the body is refused (413).
PARSE_MAX_FIELDS = 1000
#: Multipart parts beyond this are not parsed: the body is refused (413).
PARSE_MAX_PARTS = 256
#: A multipart part without a file name is a text field when it is at most this long and UTF-8.
TEXT_FIELD_MAX_BYTES = 65536
_MAX_PART_HEADER_BYTES = 8192
_SIMPLE_DISPOSITION = re.compile(r'form-data;\s*name="([^"\\]*)"(?:;\s*filename="([^"\\]*)")?\s*', re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Part:
    """What a multipart part says about itself. Its content is not kept (only text fields are, in
    ``BodyView.fields``)."""

    #: The ``name`` of its Content-Disposition ("" when absent).
    name: str
    #: The ``filename`` (or decoded ``filename*``), None when the part is not a file.
    filename: str | None
    #: The part's own Content-Type, lower-case type/subtype ("" when absent).
    content_type: str
    #: Bytes of content (of what Envoy forwarded, for a truncated last part).
    size: int
    #: The last part of a truncated body: its content was cut.
    truncated: bool = False


def split_urlencoded(text: str) -> list[tuple[str, str]]:
    """``parse_qsl(text, keep_blank_values=True)`` at a fraction of its cost (most names and values
    have no escape); invalid UTF-8 in an escape becomes surrogates, as with ``errors="surrogateescape"``."""
    pairs: list[tuple[str, str]] = []
    for item in text.split("&"):
        if not item:
            continue
        name, _, value = item.partition("=")
        if "+" in item:
            name, value = name.replace("+", " "), value.replace("+", " ")
        if "%" in item:
            name, value = unquote(name, errors="surrogateescape"), unquote(value, errors="surrogateescape")
        pairs.append((name, value))
    return pairs


def parse_urlencoded(raw: bytes) -> tuple[tuple[str, str], ...] | BodyProblem:
    if raw.count(b"&") >= PARSE_MAX_FIELDS:
        return BodyProblem("body_limit_exceeded", 413, f"the form has more than {PARSE_MAX_FIELDS} fields", "",
                           "fields")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return BodyProblem("body_malformed", 400, "the form body is not valid UTF-8")
    return tuple(split_urlencoded(text))


def parse_multipart(
    raw: bytes, boundary: str | None, partial: bool
) -> tuple[tuple[Part, ...], tuple[tuple[str, str], ...]] | BodyProblem:
    """Parts (metadata) and text fields of a multipart/form-data body, or why it cannot be read."""
    if not boundary or len(boundary) > 70:
        return BodyProblem("body_malformed", 400, "the multipart body has no usable boundary parameter")
    delimiter = b"--" + boundary.encode("latin-1", "replace")
    if raw.count(delimiter) > PARSE_MAX_PARTS + 1:
        return BodyProblem("body_limit_exceeded", 413, f"the multipart body has more than {PARSE_MAX_PARTS} parts",
                           "", "parts")
    start = raw.find(delimiter)
    if start < 0 or (start > 0 and raw[start - 2 : start] != b"\r\n"):
        return BodyProblem("body_malformed", 400, "the multipart body does not start with its boundary")
    pieces = raw[start + len(delimiter) :].split(b"\r\n" + delimiter)
    parts: list[Part] = []
    fields: list[tuple[str, str]] = []
    closed = False
    for index, piece in enumerate(pieces):
        last = index == len(pieces) - 1
        if piece.startswith(b"--"):
            closed = True
            break
        if not piece.startswith(b"\r\n"):
            if last and partial:
                break
            return BodyProblem("body_malformed", 400, "a multipart boundary is not followed by a line end",
                               f"part {index}")
        head_end = piece.find(b"\r\n\r\n", 2, _MAX_PART_HEADER_BYTES)
        if head_end < 0:
            if last and partial:
                break
            return BodyProblem("body_malformed", 400, "a multipart part has no end of headers", f"part {index}")
        part = _part(piece[2:head_end], len(piece) - head_end - 4, truncated=last and partial)
        if part is None:
            return BodyProblem("body_malformed", 400, "a multipart part has a malformed header", f"part {index}")
        parts.append(part)
        if part.filename is None and not part.truncated and part.size <= TEXT_FIELD_MAX_BYTES:
            with contextlib.suppress(UnicodeDecodeError):
                fields.append((part.name, piece[head_end + 4 :].decode("utf-8")))
    if not closed and not partial:
        return BodyProblem("body_malformed", 400, "the multipart body has no closing boundary")
    return tuple(parts), tuple(fields)


def _part(head: bytes, size: int, *, truncated: bool) -> Part | None:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    disposition = content_type = None
    for line in text.split("\r\n"):
        name, colon, value = line.partition(":")
        if not colon:
            return None
        name = name.strip().lower()
        if name == "content-disposition":
            if disposition is not None:
                return None
            disposition = value.strip()
        elif name == "content-type":
            if content_type is not None:
                return None
            content_type = value.strip()
    if disposition is None:
        return None
    simple = _SIMPLE_DISPOSITION.fullmatch(disposition)
    if simple is not None:  # what browsers and HTTP clients send: no parameter parser needed
        essence = ""
        if content_type:
            media = parse_media_type(content_type)
            essence = media.essence if media is not None else "invalid"
        return Part(simple.group(1), simple.group(2), essence, max(size, 0), truncated)
    kind, _, params = disposition.partition(";")
    if kind.strip().lower() != "form-data":
        return None
    parsed = parse_media_type("x/x;" + params) if params.strip() else parse_media_type("x/x")
    if parsed is None:
        return None
    parameters = parsed.parameters
    filename = parameters.get("filename")
    if "filename*" in parameters:  # RFC 5987: charset'language'percent-encoded
        from urllib.parse import unquote

        _, _, encoded = parameters["filename*"].partition("'")
        _, _, encoded = encoded.partition("'")
        filename = unquote(encoded, errors="replace")
    essence = ""
    if content_type:
        media = parse_media_type(content_type)
        essence = media.essence if media is not None else "invalid"
    return Part(parameters.get("name", ""), filename, essence, max(size, 0), truncated)
