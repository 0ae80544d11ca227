"""One parsed view of the request body, shared by every check that reads it.

Payload inspection, OpenAPI validation and any later body-aware check need the same facts: what the
body claims to be, its parsed structure, whether it stayed within what a parser can afford, and
whether Envoy cut it. Parsing it once per request, here, keeps them consistent (no check can see a
different document than another: duplicate keys, for one, are found here and refused by default) and
keeps the cost paid once.

    from extauthz.payload import BodyKind, JsonLimits, body_view

    view = body_view(ctx.request)          # built on first use, remembered in request.derived
    if view.problem is not None:           # malformed, over a parser ceiling, or truncated by Envoy
        return Denial(view.problem.status, view.problem.reason, view.problem.message)
    if view.kind is BodyKind.JSON:
        problem = view.document.problem(JsonLimits(max_depth=16))   # this consumer's own limits
        value = view.json                  # dicts, lists, str, int, float, bool, None

What the view holds (:class:`BodyView`): ``kind`` (:class:`BodyKind`: none, json, form, multipart,
text, binary, from Content-Type), ``media_type`` and ``parameters``, ``size``, ``partial``,
``problem`` (:class:`BodyProblem`), ``document`` (:class:`JsonDocument`: the value; its
:class:`JsonShape`, exact, computed on first use; ``has_duplicate_keys()``; ``text``, every key and
string on a line of its own, for inspectors; ``find()``, the JSON pointers of matching strings),
``fields`` (urlencoded fields, or multipart text fields) and ``parts`` (:class:`Part` metadata of
multipart parts). The view is an immutable NamedTuple; a document computes what is asked of it once.

Parser ceilings hold for every consumer, whatever its own limits: a JSON body over
``PARSE_MAX_BYTES`` or with more than ``PARSE_MAX_VALUES`` values (counted from the raw bytes,
before parsing) is not parsed; nor is a form with more than ``PARSE_MAX_FIELDS`` fields or a
multipart body with more than ``PARSE_MAX_PARTS`` parts. Stricter limits are each consumer's:
``JsonDocument.problem(JsonLimits(...))`` compares the measured shape with them and names the JSON
pointer of the offending value. Time and memory are bounded by the ceilings whatever the input (see
``bench/payload_bench.py``).

A truncated body (Envoy's ``allow_partial_message``) of kind JSON, form or multipart has the problem
``body_truncated`` (413): a structure cut in the middle can never be validated. Text and binary
bodies are left to the consumer (``partial`` says it).
"""

from extauthz.payload.forms import PARSE_MAX_FIELDS, PARSE_MAX_PARTS, Part
from extauthz.payload.json_body import (
    NUMBER_LENGTH_FLOOR,
    PARSE_MAX_BYTES,
    PARSE_MAX_VALUES,
    JsonDocument,
    JsonLimits,
    JsonShape,
    escape_pointer_token,
)
from extauthz.payload.media import BodyKind, parse_media_type
from extauthz.payload.problems import BodyProblem
from extauthz.payload.view import BodyView, body_view

__all__ = [
    "NUMBER_LENGTH_FLOOR",
    "PARSE_MAX_BYTES",
    "PARSE_MAX_FIELDS",
    "PARSE_MAX_PARTS",
    "PARSE_MAX_VALUES",
    "BodyKind",
    "BodyProblem",
    "BodyView",
    "JsonDocument",
    "JsonLimits",
    "JsonShape",
    "Part",
    "body_view",
    "escape_pointer_token",
    "parse_media_type",
]
