"""Interoperability with an independent implementation, the ``http-message-signatures`` package.

Its signer (its own signature base, its own structured-field library) signs requests; ours verifies
them. The other direction is checked too: our signer's output verifies with its verifier. Neither side
shares code with the other, so a shared misreading of RFC 9421 would have to be made twice.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from http_message_signatures import HTTPMessageSigner, HTTPMessageVerifier, algorithms
from http_message_signatures.resolvers import MappingKeyResolver

from extauthz.signatures.base import Message
from extauthz.signatures.keys import load_key_set
from extauthz.signatures.signer import sign_message
from extauthz.signatures.verify import Requirements, component_identifier, verify_request_signature

NOW = datetime.datetime(2025, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
BODY = b'{"order": 42, "note": "caf\\u00e9"}'
COMPONENTS = ("@method", "@authority", "@path", "@query", "@target-uri", "@scheme", "@request-target",
              '"@query-param";name="page"', "content-type", "x-tenant")
SECRET = b"s3cr3t-shared-between-client-and-sidecar"

_PEM = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo


def _keys() -> dict[str, tuple[type, object, str]]:
    return {
        "k-ed": (algorithms.ED25519, ed25519.Ed25519PrivateKey.generate(), "ed25519"),
        "k-p256": (algorithms.ECDSA_P256_SHA256, ec.generate_private_key(ec.SECP256R1()), "ecdsa-p256-sha256"),
        "k-p384": (algorithms.ECDSA_P384_SHA384, ec.generate_private_key(ec.SECP384R1()), "ecdsa-p384-sha384"),
        "k-pss": (algorithms.RSA_PSS_SHA512, rsa.generate_private_key(65537, 2048), "rsa-pss-sha512"),
        "k-v15": (algorithms.RSA_V1_5_SHA256, rsa.generate_private_key(65537, 2048), "rsa-v1_5-sha256"),
        "k-hmac": (algorithms.HMAC_SHA256, SECRET, "hmac-sha256"),
    }


KEYS = _keys()


@pytest.fixture(scope="module")
def key_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("interop-keys")
    meta = []
    for key_id, (_, private, name) in KEYS.items():
        if isinstance(private, bytes):
            (folder / f"{key_id}.secret").write_bytes(private)
        else:
            (folder / f"{key_id}.pem").write_bytes(private.public_key().public_bytes(*_PEM))  # type: ignore[attr-defined]
        meta.append(f"{key_id}: {{algorithm: {name}}}")
    (folder / "keys.yaml").write_text("\n".join(meta) + "\n")
    return folder


def _request() -> httpx.Request:
    return httpx.Request("POST", "https://API.example.com/orders/7?page=2&sort=asc%20desc", content=BODY,
                         headers={"Content-Type": "application/json", "X-Tenant": "acme"})


def _as_message(request: httpx.Request) -> Message:
    fields = {k.lower(): v for k, v in request.headers.items()}
    return Message(method=request.method, scheme=request.url.scheme, authority=request.headers["host"],
                   target=request.url.raw_path.decode("ascii"), fields=fields)


@pytest.mark.parametrize("key_id", sorted(KEYS))
def test_their_signature_verifies_with_ours(key_id: str, key_folder: Path) -> None:
    algorithm_cls, private, _ = KEYS[key_id]
    signer = HTTPMessageSigner(signature_algorithm=algorithm_cls,
                               key_resolver=MappingKeyResolver(public_keys={}, private_keys={key_id: private}))
    request = _request()
    signer.sign(request, key_id=key_id, created=NOW, nonce="nonce-1", label="sig1", include_alg=True,
                covered_component_ids=COMPONENTS, body=BODY)  # body: it adds and covers Content-Digest
    requirements = Requirements(components=tuple(component_identifier(c) for c in COMPONENTS),
                                body_components=(component_identifier("content-digest"),))
    keys = load_key_set(key_folder)
    verified = verify_request_signature(_as_message(request), body=BODY, partial_body=False, has_content=True,
                                        keys=keys, requirements=requirements, now=NOW.timestamp() + 5)
    assert verified.key.key_id == key_id and verified.nonce == "nonce-1"
    tampered = _as_message(request)
    tampered = Message(tampered.method, tampered.scheme, tampered.authority, tampered.target.replace("page=2", "page=3"),
                       tampered.fields)
    with pytest.raises(Exception, match="does not verify"):
        verify_request_signature(tampered, body=BODY, partial_body=False, has_content=True, keys=keys,
                                 requirements=requirements, now=NOW.timestamp() + 5)


@pytest.mark.parametrize("key_id", sorted(KEYS))
def test_our_signature_verifies_with_theirs(key_id: str) -> None:
    algorithm_cls, private, name = KEYS[key_id]
    request = _request()
    headers = sign_message(_as_message(request), COMPONENTS, key_id=key_id, algorithm=name, private_key=private,
                           created=int(NOW.timestamp()), nonce="n-2", include_alg=True)
    request.headers["Signature-Input"] = headers.signature_input
    request.headers["Signature"] = headers.signature
    public = private if isinstance(private, bytes) else private.public_key()  # type: ignore[attr-defined]
    verifier = HTTPMessageVerifier(signature_algorithm=algorithm_cls,
                                   key_resolver=MappingKeyResolver(public_keys={key_id: public}, private_keys={}))
    (result,) = verifier.verify(request, max_age=datetime.timedelta(days=36500))
    assert result.label == "sig1"
