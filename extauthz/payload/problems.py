"""Why a body cannot be read as what it claims to be, in one shape for every consumer."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BodyProblem"]


@dataclass(frozen=True, slots=True)
class BodyProblem:
    """A refusal: a stable ``reason``, the HTTP status that goes with it, and a message that never
    quotes the body (it may hold personal data or the attack itself).

    Reasons: ``body_malformed`` (400), ``body_duplicate_key`` (400), ``body_limit_exceeded`` (413),
    ``body_truncated`` (413: Envoy forwarded only the first bytes).
    """

    reason: str
    status: int
    message: str
    #: JSON pointer of the offending value ("" for the whole body), or "part N" for multipart.
    pointer: str = ""
    #: Which limit, for metrics and logs: "depth", "members", "items", "string_length",
    #: "number_length", "values", "duplicate_keys", "size", "fields", "parts"; "" otherwise.
    limit: str = ""
