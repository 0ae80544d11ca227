"""The body view: built on first use, remembered in the request's ``derived`` dict."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from extauthz.payload.forms import Part, parse_multipart, parse_urlencoded
from extauthz.payload.json_body import JsonDocument, parse_json
from extauthz.payload.media import BodyKind, body_kind, parse_media_type
from extauthz.payload.problems import BodyProblem
from extauthz.request import Request

__all__ = ["BodyView", "body_view"]

_EMPTY: Mapping[str, str] = MappingProxyType({})
#: The key of the view in ``Request.derived`` (an object no other code can spell).
_VIEW_KEY = object()


class BodyView(NamedTuple):
    """One request body as every check reads it. Build it with :func:`body_view`, never directly.

    Immutable; a NamedTuple rather than a frozen dataclass (like Request) because one is built for
    every request with a body, and a frozen dataclass takes several times as long to build.
    """

    kind: BodyKind
    #: Lower-case ``type/subtype`` of Content-Type ("" when absent, "invalid" when malformed).
    media_type: str
    #: Content-Type parameters (lower-case names): ``charset``, ``boundary``, ...
    parameters: Mapping[str, str]
    #: Bytes Envoy forwarded.
    size: int
    #: True when Envoy forwarded only the first bytes (``x-envoy-auth-partial-body: true``).
    partial: bool
    #: Why the body cannot be read as its kind (malformed, over a parser ceiling, truncated);
    #: None when it was read. A consumer that needs the structure denies with its status.
    problem: BodyProblem | None
    #: The parsed document (JSON only, when there is no problem).
    document: JsonDocument | None
    #: Form fields (urlencoded), or the text fields of a multipart body, in order.
    fields: tuple[tuple[str, str], ...]
    #: Multipart parts (metadata only).
    parts: tuple[Part, ...]

    @property
    def json(self) -> Any:
        """The parsed JSON value (dicts, lists, str, int, float, bool, None).

        Raises LookupError when the body is not JSON or could not be parsed: check ``kind`` and
        ``problem`` first (a JSON ``null`` body is a valid None).
        """
        if self.document is None:
            raise LookupError("the body was not parsed as JSON")
        return self.document.value


def body_view(request: Request) -> BodyView:
    """The request's body view, built at most once per request however many checks ask for it."""
    derived = request.derived
    if derived is not None:
        view = derived.get(_VIEW_KEY)
        if view is not None:
            return view  # type: ignore[no-any-return]
    view = _build(request)
    if derived is not None:
        derived[_VIEW_KEY] = view
    return view


#: Parsed content types by header value: a service sees the same few. Bounded: cleared when full.
_MEDIA_TYPES: dict[str | None, Any] = {}


def _media_type(header: str | None) -> Any:
    media = _MEDIA_TYPES.get(header, _MEDIA_TYPES)
    if media is _MEDIA_TYPES:
        media = parse_media_type(header)
        if header is None or len(header) <= 256:
            if len(_MEDIA_TYPES) >= 512:
                _MEDIA_TYPES.clear()
            _MEDIA_TYPES[header] = media
    return media


def _build(request: Request) -> BodyView:
    body = request.body
    partial = request.partial_body
    media = _media_type(request.headers.get("content-type"))
    if media is None:
        malformed = BodyProblem("body_malformed", 400, "the content-type header is malformed")
        return BodyView(BodyKind.TEXT, "invalid", _EMPTY, len(body), partial, malformed, None, (), ())
    essence, parameters = media
    if not body and not partial:
        return BodyView(BodyKind.NONE, essence, parameters, 0, False, None, None, (), ())
    kind = body_kind(essence)
    problem: BodyProblem | None = None
    document: JsonDocument | None = None
    fields: tuple[tuple[str, str], ...] = ()
    parts: tuple[Part, ...] = ()
    if partial and kind in (BodyKind.JSON, BodyKind.FORM):
        problem = _TRUNCATED
    elif kind is BodyKind.JSON:
        parsed = parse_json(body)
        if isinstance(parsed, BodyProblem):
            problem = parsed
        else:
            document = parsed
    elif kind is BodyKind.FORM:
        form = parse_urlencoded(body)
        if isinstance(form, BodyProblem):
            problem = form
        else:
            fields = form
    elif kind is BodyKind.MULTIPART:
        multipart = parse_multipart(body, parameters.get("boundary"), partial)
        if isinstance(multipart, BodyProblem):
            problem = multipart
        else:
            parts, fields = multipart
            if partial:
                problem = _TRUNCATED
    return BodyView(kind, essence, parameters, len(body), partial, problem, document, fields, parts)


_TRUNCATED = BodyProblem("body_truncated", 413, "the body was cut at the proxy's buffer limit and cannot be read whole")
