"""RFC 9530 ``Content-Digest``: is the body Envoy forwarded the body the client digested?

A signature that covers ``content-digest`` only proves the *header*; this module ties the header to
the bytes. Only ``sha-256`` and ``sha-512`` count (the RFC marks ``md5``, ``sha``, ``unixsum`` and
``unixcksum`` insecure, and unknown algorithms are ignored); every supported digest present must
match, and at least one must be present.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Iterable

from extauthz.signatures.sf import InnerList, Limits, StructuredFieldError, parse_dictionary

__all__ = ["DIGEST_ALGORITHMS", "DigestResult", "content_digest", "verify_content_digest", "want_content_digest"]

#: RFC 9530 algorithm key -> hashlib constructor name.
DIGEST_ALGORITHMS: dict[str, str] = {"sha-256": "sha256", "sha-512": "sha512"}

_LIMITS = Limits(max_length=4096, max_members=16, max_params=8)
_HASHES = {name: getattr(hashlib, constructor) for name, constructor in DIGEST_ALGORITHMS.items()}


class DigestResult(enum.Enum):
    OK = "ok"
    #: The header is not a Dictionary of Byte Sequences.
    MALFORMED = "malformed"
    #: No digest with an algorithm we accept.
    UNSUPPORTED = "unsupported"
    MISMATCH = "mismatch"


def verify_content_digest(header: str, body: bytes, allowed: Iterable[str] = ("sha-256", "sha-512")) -> DigestResult:
    """Check a Content-Digest header value against ``body``, in constant time per digest."""
    try:
        members = parse_dictionary(header, _LIMITS)
    except StructuredFieldError:
        return DigestResult.MALFORMED
    allowed = allowed if isinstance(allowed, (tuple, frozenset)) else tuple(allowed)
    checked = 0
    for name, member in members:
        if isinstance(member, InnerList) or not isinstance(member.value, bytes):
            return DigestResult.MALFORMED
        if name not in allowed or name not in DIGEST_ALGORITHMS:
            continue
        expected = _HASHES[name](body).digest()
        if not hmac.compare_digest(expected, member.value):
            return DigestResult.MISMATCH
        checked += 1
    return DigestResult.OK if checked else DigestResult.UNSUPPORTED


def content_digest(body: bytes, algorithm: str = "sha-256") -> str:
    """The Content-Digest header value for ``body`` (for clients, tests and examples)."""
    import base64

    digest = hashlib.new(DIGEST_ALGORITHMS[algorithm], body).digest()
    return f"{algorithm}=:{base64.b64encode(digest).decode('ascii')}:"


def want_content_digest(allowed: Iterable[str]) -> str:
    """A Want-Content-Digest value (RFC 9530 section 4) preferring the strongest allowed digest."""
    preference = {"sha-512": 10, "sha-256": 5}
    ranked = sorted((a for a in allowed if a in preference), key=lambda a: -preference[a])
    return ", ".join(f"{a}={preference[a]}" for a in ranked)
