"""Policy requirements and hostile input: every failure is a specific reason, never a crash."""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from extauthz.signatures.base import Message
from extauthz.signatures.digest import content_digest
from extauthz.signatures.keys import KeySet, load_key_set
from extauthz.signatures.signer import sign_message
from extauthz.signatures.verify import (
    Requirements,
    SignatureFailure,
    accept_signature,
    component_identifier,
    verify_request_signature,
)

NOW = 1_700_000_000
BODY = b'{"amount": 10}'
COMPONENTS = ["@method", "@authority", "@path", "@query", "content-digest", "x-tenant"]


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture
def keys(tmp_path: Path, ed_key: ed25519.Ed25519PrivateKey) -> KeySet:
    from cryptography.hazmat.primitives import serialization

    folder = tmp_path / "keys"
    folder.mkdir()
    (folder / "client-1.pem").write_bytes(ed_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    (folder / "hmac-1.secret").write_bytes(b"0123456789abcdef0123456789abcdef\n")
    return load_key_set(folder)


def _message(**fields: str) -> Message:
    base = {"content-digest": content_digest(BODY), "x-tenant": "acme", "content-length": str(len(BODY)),
            "content-type": "application/json"}
    base.update(fields)
    return Message(method="POST", scheme="http", authority="api.example.com", target="/pay?id=7", fields=base)


def _signed(message: Message, key: object, *, components: list[str] = COMPONENTS, key_id: str = "client-1",
            algorithm: str = "ed25519", created: int = NOW, **kw: object) -> Message:
    headers = sign_message(message, components, key_id=key_id, algorithm=algorithm, private_key=key,
                           created=created, **kw)  # type: ignore[arg-type]
    return message._replace(fields={**message.fields, "signature-input": headers.signature_input,
                                                "signature": headers.signature})


REQ = Requirements(components=tuple(component_identifier(c) for c in ["@method", "@authority", "@path"]),
                   body_components=(component_identifier("content-digest"),), require_nonce=True)


def _verify(message: Message, keys: KeySet, *, body: bytes = BODY, partial: bool = False,
            requirements: Requirements = REQ, now: float = NOW + 1):
    return verify_request_signature(message, body=body, partial_body=partial, has_content=bool(body), keys=keys,
                                    requirements=requirements, now=now)


def _reason(message: Message, keys: KeySet, **kw: object) -> str:
    with pytest.raises(SignatureFailure) as info:
        _verify(message, keys, **kw)  # type: ignore[arg-type]
    return info.value.reason


def test_valid_signature_verifies(keys: KeySet, ed_key: ed25519.Ed25519PrivateKey) -> None:
    verified = _verify(_signed(_message(), ed_key, nonce="n-1"), keys)
    assert (verified.key.key_id, verified.nonce, verified.label) == ("client-1", "n-1", "sig1")


@pytest.mark.parametrize(("change", "reason"), [
    ({"x-tenant": "evil"}, "signature_invalid"),
    ({"content-digest": content_digest(b"other")}, "signature_invalid"),
])
def test_changed_covered_header_is_invalid(keys: KeySet, ed_key, change, reason) -> None:
    signed = _signed(_message(), ed_key, nonce="n")
    altered = signed._replace(fields={**signed.fields, **change})
    assert _reason(altered, keys) == reason


def test_one_body_byte_changed_is_a_digest_mismatch(keys: KeySet, ed_key) -> None:
    assert _reason(_signed(_message(), ed_key, nonce="n"), keys, body=BODY.replace(b"10", b"11")) \
        == "content_digest_mismatch"


def test_partial_body_can_never_satisfy_a_digest(keys: KeySet, ed_key) -> None:
    with pytest.raises(SignatureFailure) as info:
        _verify(_signed(_message(), ed_key, nonce="n"), keys, partial=True)
    assert (info.value.reason, info.value.status) == ("body_truncated", 413)


def test_missing_covered_header(keys: KeySet, ed_key) -> None:
    signed = _signed(_message(), ed_key, nonce="n")
    fields = {k: v for k, v in signed.fields.items() if k != "x-tenant"}
    assert _reason(signed._replace(fields=fields), keys) == "signature_component_missing"


def test_insufficient_coverage(keys: KeySet, ed_key) -> None:
    signed = _signed(_message(), ed_key, components=["@method", "@authority", "@path"], nonce="n")
    assert _reason(signed, keys) == "signature_coverage_insufficient"  # body present, digest not covered
    assert _verify(signed, keys, body=b"").key.key_id == "client-1"  # no content: digest not required


@pytest.mark.parametrize(("kw", "now", "reason"), [
    ({}, NOW + 301 + 30, "signature_expired"),
    ({"created": NOW + 100}, NOW, "signature_not_yet_valid"),
    ({"expires": NOW + 5}, NOW + 36, "signature_expired"),
    ({"expires": NOW - 5}, NOW, "signature_params_invalid"),
])
def test_freshness(keys: KeySet, ed_key, kw, now, reason) -> None:
    assert _reason(_signed(_message(), ed_key, nonce="n", **kw), keys, now=now) == reason


def test_expires_nonce_and_tag_requirements(keys: KeySet, ed_key) -> None:
    plain = _signed(_message(), ed_key)
    assert _reason(plain, keys) == "signature_nonce_missing"
    strict = dataclasses.replace(REQ, require_expires=True)
    assert _reason(_signed(_message(), ed_key, nonce="n"), keys, requirements=strict) == "signature_expires_missing"
    tagged = dataclasses.replace(REQ, tag="payments")
    assert _reason(_signed(_message(), ed_key, nonce="n", tag="other"), keys, requirements=tagged) \
        == "signature_tag_mismatch"
    assert _verify(_signed(_message(), ed_key, nonce="n", tag="payments"), keys, requirements=tagged)


def test_key_and_algorithm_checks(keys: KeySet, ed_key) -> None:
    assert _reason(_signed(_message(), ed_key, nonce="n", key_id="nobody"), keys) == "signature_key_unknown"
    only_hmac = dataclasses.replace(REQ, algorithms=frozenset({"hmac-sha256"}))
    assert _reason(_signed(_message(), ed_key, nonce="n"), keys, requirements=only_hmac) \
        == "signature_algorithm_rejected"
    # The request cannot choose the algorithm: alg must match the key's.
    signed = _signed(_message(), ed_key, nonce="n", include_alg=True)
    forged = signed.fields["signature-input"].replace('alg="ed25519"', 'alg="hmac-sha256"')
    assert _reason(signed._replace(fields={**signed.fields, "signature-input": forged}), keys) \
        == "signature_algorithm_rejected"
    unknown = signed.fields["signature-input"].replace('alg="ed25519"', 'alg="rot13"')
    assert _reason(signed._replace(fields={**signed.fields, "signature-input": unknown}), keys) \
        == "signature_algorithm_rejected"
    # An HMAC secret cannot verify a signature made for another key id.
    hmac_signed = _signed(_message(), b"0123456789abcdef0123456789abcdef", key_id="hmac-1", algorithm="hmac-sha256",
                          nonce="n")
    assert _verify(hmac_signed, keys).key.key_id == "hmac-1"


def _with(message: Message, **fields: str) -> Message:
    return message._replace(fields={**message.fields, **fields})


@pytest.mark.parametrize(("signature_input", "signature"), [
    ('sig1=("@method"', "sig1=:AAAA:"),  # unterminated inner list
    ("sig1=(@method);created=1", "sig1=:AAAA:"),  # token, not string
    ('sig1=("@method");created=1', "sig1=:!!!!:"),  # base64 garbage
    ('sig1=("@method");created=1', "sig1=AAAA"),  # a token, not a byte sequence
    ('sig1=("@method");created=1, sig1=("@path");created=2', "sig1=:AAAA:"),  # duplicated label
    ('sig1=("@method");created=1;created=2', "sig1=:AAAA:"),  # duplicated parameter
    ('sig1=("@method");created=1', "sig1=:AAAA:, sig1=:BBBB:"),  # duplicated label in Signature
    ('sig1=("@method");created=1' + "".join(f";p{i}={i}" for i in range(10_000)), "sig1=:AAAA:"),
    ('sig1=("@method");created=1', ""),
    ("sig1=" + "(" * 5000, "sig1=:AAAA:"),
    ('sig1=("@méthod");created=1', "sig1=:AAAA:"),  # non-ASCII
    ('sig1=("@method");created="yesterday";keyid="client-1"', "sig1=:AAAA:"),
    ('sig1=("@method");created=1700000000;keyid=client-1', "sig1=:AAAA:"),  # keyid as token
    ('sig1=("@method" "@authority" "@path");created=1700000000;keyid="client-1"', 'sig1=("x")'),  # not bytes
])
def test_malformed_input_is_a_clear_denial(keys: KeySet, signature_input: str, signature: str) -> None:
    message = _with(_message(), **{"signature-input": signature_input, "signature": signature})
    with pytest.raises(SignatureFailure) as info:
        _verify(message, keys, requirements=dataclasses.replace(REQ, require_nonce=False), body=b"")
    assert info.value.reason in {"signature_malformed", "signature_params_invalid", "signature_invalid"}
    assert info.value.status == 401


def test_wrong_size_signatures_do_not_crash(keys: KeySet, ed_key) -> None:
    signed = _signed(_message(), ed_key, nonce="n")
    for size in (0, 1, 63, 65, 4096):
        bad = "sig1=:" + base64.b64encode(b"\x01" * size).decode() + ":"
        assert _reason(_with(signed, signature=bad), keys) == "signature_invalid"


def test_unknown_component_parameters_and_derived_names(keys: KeySet, ed_key) -> None:
    signed = _signed(_message(), ed_key, nonce="n")
    for covered in ('("@method" "@authority" "@path" "content-digest" "@nope")',
                    '("@method" "@authority" "@path" "content-digest" "x-tenant";req)',
                    '("@method" "@authority" "@path" "content-digest" "@status")',
                    '("@method" "@authority" "@path" "content-digest" "@method")'):
        signature_input = signed.fields["signature-input"].replace(signed.fields["signature-input"][5:].split(";")[0],
                                                                  covered)
        assert _reason(_with(signed, **{"signature-input": signature_input}), keys) == "signature_component_invalid"


def test_several_signatures_label_and_best_failure(keys: KeySet, ed_key) -> None:
    good = _signed(_message(), ed_key, nonce="n", label="good")
    bad = _signed(_message(), ed_key, nonce="n", label="bad", key_id="nobody")
    both = _with(_message(), **{
        "signature-input": bad.fields["signature-input"] + ", " + good.fields["signature-input"],
        "signature": bad.fields["signature"] + ", " + good.fields["signature"],
    })
    assert _verify(both, keys).label == "good"
    assert _reason(both, keys, requirements=dataclasses.replace(REQ, label="bad")) == "signature_key_unknown"
    assert _reason(both, keys, requirements=dataclasses.replace(REQ, label="other")) == "signature_not_found"


def test_accept_signature_lists_what_is_required() -> None:
    requirements = dataclasses.replace(REQ, require_expires=True, tag="payments", label="sig1",
                                       algorithms=frozenset({"ed25519"}))
    assert accept_signature(requirements, with_body=True) == (
        'sig1=("@method" "@authority" "@path" "content-digest");created;expires;alg="ed25519";tag="payments"'
    )
    assert accept_signature(REQ, with_body=False) == 'sig1=("@method" "@authority" "@path");created'
