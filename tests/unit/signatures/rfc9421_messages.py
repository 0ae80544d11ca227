"""Helpers over the RFC 9421 vectors: the example messages and the example keys as a key folder."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import rfc9421_vectors as rfc

from extauthz.signatures.base import Message


def rfc_request_message() -> Message:
    method, target, _ = rfc.TEST_REQUEST_LINE.split(" ")
    fields = {name.lower(): value for name, value in rfc.TEST_REQUEST_HEADERS}
    return Message(method=method, scheme="https", authority=fields["host"], target=target, fields=fields)


def rfc_response_message() -> Message:
    fields = {name.lower(): value for name, value in rfc.TEST_RESPONSE_HEADERS}
    # The RFC's test-response shows a Content-Digest that is not the digest of its body; B.2.4's
    # signature base (and signature) use the correct sha-512 of the body, so we do too.
    digest = base64.b64encode(hashlib.sha512(rfc.TEST_RESPONSE_BODY).digest()).decode()
    fields["content-digest"] = f"sha-512=:{digest}:"
    return Message(fields=fields, status=rfc.TEST_RESPONSE_STATUS)


def write_rfc_key_folder(folder: Path) -> Path:
    """The B.1 example keys as a key folder: JWKs (private members are ignored), a PEM, a secret."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "test-key-rsa-pss.json").write_text(json.dumps(rfc.TEST_KEY_RSA_PSS_JWK))
    (folder / "test-key-rsa.pem").write_text(rfc.TEST_KEY_RSA_PUBLIC_PEM)
    (folder / "test-key-ecc-p256.json").write_text(json.dumps(rfc.TEST_KEY_ECC_P256_JWK))
    (folder / "test-key-ed25519.pem").write_text(rfc.TEST_KEY_ED25519_PUBLIC_PEM)
    secret = base64.b64decode(rfc.TEST_SHARED_SECRET_B64)
    (folder / "test-shared-secret.json").write_text(
        json.dumps({"kty": "oct", "kid": "test-shared-secret", "k": base64.urlsafe_b64encode(secret).decode()})
    )
    (folder / "keys.yaml").write_text(
        "test-key-rsa-pss: {algorithm: rsa-pss-sha512, owner: partner-pss}\n"
        "test-key-rsa: {algorithm: rsa-v1_5-sha256}\n"
    )
    return folder
