"""Webhook HMAC presets: sha256=<hex> and t=<unix>,v1=<hex>."""

from __future__ import annotations

import pytest

from extauthz.signatures.algorithms import ALGORITHMS, VerificationKey
from extauthz.signatures.verify import SignatureFailure
from extauthz.signatures.webhook import WebhookScheme, sign_webhook

OLD = VerificationKey("old", ALGORITHMS["hmac-sha256"], b"o" * 32)
NEW = VerificationKey("new", ALGORITHMS["hmac-sha256"], b"n" * 32)
BODY = b'{"event": "paid"}'
HEX = WebhookScheme("sha256-hex", "x-hub-signature-256")
TS = WebhookScheme("timestamp-v1", "x-signature", tolerance=300)


def _fail(scheme: WebhookScheme, value: str | None, *, body: bytes = BODY, now: float = 1000, partial=False) -> str:
    headers = {} if value is None else {scheme.header: value}
    with pytest.raises(SignatureFailure) as info:
        scheme.verify(headers, body, partial, [OLD, NEW], now)
    return info.value.reason


def test_sha256_hex_accepts_any_configured_secret() -> None:
    for key in (OLD, NEW):
        value = sign_webhook("sha256-hex", key.material, BODY)
        assert HEX.verify({HEX.header: value}, BODY, False, [OLD, NEW], 0).key is key
    upper = "sha256=" + sign_webhook("sha256-hex", NEW.material, BODY)[7:].upper()
    assert HEX.verify({HEX.header: upper}, BODY, False, [OLD, NEW], 0).key is NEW


def test_sha256_hex_failures() -> None:
    good = sign_webhook("sha256-hex", NEW.material, BODY)
    assert _fail(HEX, None) == "signature_missing"
    assert _fail(HEX, good, body=BODY + b" ") == "signature_invalid"
    assert _fail(HEX, sign_webhook("sha256-hex", b"x" * 32, BODY)) == "signature_invalid"
    for bad in ("sha1=" + good[7:], "sha256=xyz", "sha256=" + good[7:-2], good[7:], ""):
        assert _fail(HEX, bad) == "signature_malformed", bad
    assert _fail(HEX, good, partial=True) == "body_truncated"


def test_timestamped_variant() -> None:
    value = sign_webhook("timestamp-v1", OLD.material, BODY, timestamp=1000)
    match = TS.verify({TS.header: value}, BODY, False, [OLD, NEW], 1100)
    assert (match.key, match.timestamp) == (OLD, 1000)
    rotated = value + ",v1=" + sign_webhook("timestamp-v1", b"z" * 32, BODY, timestamp=1000).split("v1=")[1]
    assert TS.verify({TS.header: rotated}, BODY, False, [OLD], 1000).key is OLD
    assert _fail(TS, value, now=1000 + 301) == "signature_expired"
    assert _fail(TS, value, now=1000 - 301) == "signature_expired"
    assert _fail(TS, value.replace("t=1000", "t=1001"), now=1000) == "signature_invalid"
    for bad in ("v1=" + "a" * 64, "t=1000", "t=abc,v1=" + "a" * 64, "t=1,t=2,v1=" + "a" * 64, "garbage",
                "t=1000,v1=" + "g" * 64, ",".join(["v0=1"] * 50)):
        assert _fail(TS, bad) == "signature_malformed", bad


def test_replay_key_is_the_delivery_not_the_header_spelling() -> None:
    """A captured delivery re-spelled (an ignored entry, spaces, upper-case hex, the MAC twice) is
    the same delivery: replay detection must see one key, and a padded timestamp is refused."""
    value = sign_webhook("timestamp-v1", OLD.material, BODY, timestamp=1000)
    mac = value.split("v1=")[1]
    first = TS.verify({TS.header: value}, BODY, False, [OLD, NEW], 1000).replay_key
    for spelling in (value + ",v0=x", " " + value, f"v1={mac},t=1000", f"t=1000,v1={mac.upper()}",
                     f"t=1000,v1={mac},v1={mac}", f"t=1000,v1={'a' * 64},v1={mac}"):
        assert TS.verify({TS.header: spelling}, BODY, False, [OLD, NEW], 1000).replay_key == first, spelling
    other = sign_webhook("timestamp-v1", OLD.material, BODY, timestamp=1001)
    assert TS.verify({TS.header: other}, BODY, False, [OLD, NEW], 1000).replay_key != first
    # Rotation: signed with both secrets; keeping only the other MAC is still the same delivery.
    new_mac = sign_webhook("timestamp-v1", NEW.material, BODY, timestamp=1000).split("v1=")[1]
    for spelling in (f"t=1000,v1={mac},v1={new_mac}", f"t=1000,v1={new_mac}"):
        match = TS.verify({TS.header: spelling}, BODY, False, [OLD, NEW], 1000)
        assert match.replay_key == first, spelling
    for padded in (f"t=01000,v1={mac}", f"t=\u0661\u0660\u0660\u0660,v1={mac}"):
        assert _fail(TS, padded) == "signature_malformed", padded
