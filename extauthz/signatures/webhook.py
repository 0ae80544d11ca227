"""Webhook-style HMAC presets: the signed-body schemes many platforms use to sign deliveries.

``sha256-hex``
    One header carrying ``sha256=<hex HMAC-SHA256 of the raw body>`` (the GitHub
    ``X-Hub-Signature-256`` shape). No timestamp, so no freshness: prefer ``timestamp-v1``.
``timestamp-v1``
    One header ``t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">`` (the Stripe shape);
    several ``v1`` entries are allowed (the sender signs with old and new secrets while rotating).
    The timestamp must be within ``tolerance`` of now, and the same signature is accepted once.

Every configured secret is tried against every presented MAC, and all comparisons run to the end
(``hmac.compare_digest``), so timing says nothing about which secret or which byte was wrong.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from extauthz.signatures.algorithms import VerificationKey
from extauthz.signatures.verify import SignatureFailure

__all__ = ["PRESETS", "WebhookMatch", "WebhookScheme", "sign_webhook"]

#: preset -> default header name
PRESETS: dict[str, str] = {"sha256-hex": "x-hub-signature-256", "timestamp-v1": "x-signature"}
_MAX_MACS = 8


@dataclass(frozen=True, slots=True)
class WebhookMatch:
    key: VerificationKey
    #: The timestamp of a timestamp-v1 signature (None for sha256-hex).
    timestamp: int | None
    #: What identifies this delivery for replay detection: a hash of what the MAC covers (timestamp
    #: and body), never of the header's text, which a replayer can re-spell (an extra entry, a
    #: zero-padded timestamp, upper-case hex), nor of which MAC or secret matched, which a replayer
    #: can choose by dropping entries while the sender signs with two secrets.
    replay_key: str


def _hex(value: str) -> bytes | None:
    value = value.strip()
    if len(value) != 64:
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class WebhookScheme:
    preset: str
    header: str
    tolerance: float = 300.0

    def verify(self, headers: Mapping[str, str], body: bytes, partial_body: bool,
               secrets: Sequence[VerificationKey], now: float) -> WebhookMatch:
        value = headers.get(self.header)
        if value is None:
            raise SignatureFailure("signature_missing", f"the {self.header} header is missing", 0)
        if partial_body:
            raise SignatureFailure("body_truncated", "the body was cut at the proxy's buffer limit, so its MAC "
                                   "cannot be checked", 1, status=413)
        if self.preset == "sha256-hex":
            timestamp, macs, signed = None, self._parse_hex(value), body
        else:
            timestamp, macs = self._parse_timestamped(value)
            if abs(now - timestamp) > self.tolerance:
                raise SignatureFailure("signature_expired",
                                       f"the timestamp is more than {self.tolerance:g}s away from now", 2)
            signed = str(timestamp).encode("ascii") + b"." + body
        matched: VerificationKey | None = None
        for key in secrets:
            expected = hmac.new(key.material, signed, hashlib.sha256).digest()
            for mac in macs:
                if hmac.compare_digest(expected, mac) and matched is None:
                    matched = key
        if matched is None:
            raise SignatureFailure("signature_invalid", "the MAC does not match the body", 3)
        return WebhookMatch(matched, timestamp, hashlib.sha256(signed).hexdigest())

    def _parse_hex(self, value: str) -> list[bytes]:
        scheme, sep, digest = value.partition("=")
        mac = _hex(digest) if sep and scheme.strip() == "sha256" else None
        if mac is None:
            raise SignatureFailure("signature_malformed", f"{self.header} must be sha256=<64 hex digits>", 0)
        return [mac]

    def _parse_timestamped(self, value: str) -> tuple[int, list[bytes]]:
        timestamp: int | None = None
        macs: list[bytes] = []
        parts = value.split(",")
        if len(parts) > _MAX_MACS + 4:
            raise SignatureFailure("signature_malformed", f"{self.header} has too many entries", 0)
        for part in parts:
            name, sep, item = part.strip().partition("=")
            if not sep:
                raise SignatureFailure("signature_malformed", f"{self.header} must be t=<unix>,v1=<hex>", 0)
            if name == "t":
                # ASCII digits, no leading zero: one spelling per timestamp (str.isdigit alone
                # takes other scripts' digits, which int() reads too).
                if (timestamp is not None or not (item.isascii() and item.isdigit()) or len(item) > 12
                        or (item[0] == "0" and item != "0")):  # fmt: skip
                    raise SignatureFailure("signature_malformed",
                                           f"{self.header} needs exactly one t=<unix seconds>", 0)
                timestamp = int(item)
            elif name == "v1":
                mac = _hex(item)
                if mac is None:
                    raise SignatureFailure("signature_malformed", "v1 must be 64 hex digits", 0)
                macs.append(mac)
            # other schemes (v0, ...) are ignored, as senders expect
        if timestamp is None or not macs:
            raise SignatureFailure("signature_malformed", f"{self.header} must be t=<unix>,v1=<hex>", 0)
        return timestamp, macs[:_MAX_MACS]


def sign_webhook(preset: str, secret: bytes, body: bytes, timestamp: int | None = None) -> str:
    """The header value a sender would produce; for tests and examples."""
    if preset == "sha256-hex":
        return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    if timestamp is None:
        raise ValueError("timestamp-v1 needs a timestamp")
    mac = hmac.new(secret, str(timestamp).encode("ascii") + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"
