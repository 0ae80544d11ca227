"""RFC 9421 Appendix B.2.1-B.2.6: the published signature bases are rebuilt byte for byte, the
published signatures verify with the published keys, and changing any covered part breaks them."""

from __future__ import annotations

from pathlib import Path

import pytest
import rfc9421_vectors as rfc
from rfc9421_messages import rfc_request_message, rfc_response_message

from extauthz.signatures.base import Message, signature_base
from extauthz.signatures.keys import load_key_set
from extauthz.signatures.sf import InnerList, parse_dictionary
from extauthz.signatures.verify import Requirements, SignatureFailure, verify_request_signature

REQUEST_VECTORS = ["B21", "B22", "B23", "B25", "B26"]


def _covered(signature_input: str) -> tuple[str, InnerList]:
    ((label, inner),) = parse_dictionary(signature_input)
    assert isinstance(inner, InnerList)
    return label, inner


def _message(name: str) -> Message:
    return rfc_response_message() if name == "B24" else rfc_request_message()


def _signature(value: str) -> bytes:
    ((_, item),) = parse_dictionary(value)
    return item.value  # type: ignore[union-attr, return-value]


@pytest.mark.parametrize("name", sorted(rfc.VECTORS))
def test_signature_base_matches_the_rfc(name: str) -> None:
    base, signature_input, _, _, _ = rfc.VECTORS[name]
    _, inner = _covered(signature_input)
    assert signature_base(_message(name), inner) == base.encode()


@pytest.mark.parametrize("name", sorted(rfc.VECTORS))
def test_published_signature_verifies_with_published_key(name: str, rfc_key_folder: Path) -> None:
    _, signature_input, signature, key_id, algorithm = rfc.VECTORS[name]
    key = load_key_set(rfc_key_folder).get(key_id)
    assert key is not None and key.algorithm_name == algorithm
    _, inner = _covered(signature_input)
    assert key.verify(signature_base(_message(name), inner), _signature(signature))


def _mutations(message: Message, inner: InnerList) -> list[tuple[str, Message]]:
    """One altered message per covered component."""
    out = []
    for item in inner.items:
        name = str(item.value)
        if name == "@method":
            out.append((name, message._replace(method="PUT")))
        elif name == "@authority":
            out.append((name, message._replace(authority="example.org")))
        elif name == "@path":
            out.append((name, message._replace(target=message.target.replace("/foo", "/fop"))))
        elif name == "@query":
            out.append((name, message._replace(target=message.target.replace("dog", "cat"))))
        elif name == "@query-param":
            out.append((name, message._replace(target=message.target.replace("Pet=dog", "Pet=dug"))))
        elif name == "@status":
            out.append((name, message._replace(status=201)))
        else:
            fields = dict(message.fields)
            fields[name] = fields[name][:-1] + ("X" if fields[name][-1] != "X" else "Y")
            out.append((name, message._replace(fields=fields)))
    return out


@pytest.mark.parametrize("name", sorted(rfc.VECTORS))
def test_altering_any_covered_component_breaks_the_signature(name: str, rfc_key_folder: Path) -> None:
    _, signature_input, signature, key_id, _ = rfc.VECTORS[name]
    key = load_key_set(rfc_key_folder).get(key_id)
    assert key is not None
    _, inner = _covered(signature_input)
    mutations = _mutations(_message(name), inner)
    assert len(mutations) == len(inner.items)
    for component, altered in mutations:
        assert not key.verify(signature_base(altered, inner), _signature(signature)), component
    # ...and so does altering a signature parameter (B.2.1 covers no component at all).
    bumped = InnerList(inner.items, tuple((k, v + 1 if k == "created" else v) for k, v in inner.params))
    assert not key.verify(signature_base(_message(name), bumped), _signature(signature))


@pytest.mark.parametrize("name", REQUEST_VECTORS)
def test_full_verification_of_request_vectors(name: str, rfc_key_folder: Path) -> None:
    _, signature_input, signature, key_id, _ = rfc.VECTORS[name]
    message = rfc_request_message()
    fields = {**message.fields, "signature-input": signature_input, "signature": signature}
    message = message._replace(fields=fields)
    requirements = Requirements(require_nonce=False, max_age=300)
    verified = verify_request_signature(
        message, body=rfc.TEST_REQUEST_BODY, partial_body=False, has_content=False,
        keys=load_key_set(rfc_key_folder), requirements=requirements, now=1618884473 + 10,
    )
    assert verified.key.key_id == key_id
    # One byte of the body changed: vectors covering content-digest now fail on the digest.
    covered = {str(i.value) for i in _covered(signature_input)[1].items}
    if "content-digest" in covered:
        with pytest.raises(SignatureFailure) as info:
            verify_request_signature(
                message, body=rfc.TEST_REQUEST_BODY.replace(b"world", b"World"), partial_body=False,
                has_content=True, keys=load_key_set(rfc_key_folder), requirements=requirements, now=1618884483,
            )
        assert info.value.reason == "content_digest_mismatch"


def test_rfc_request_content_digest_is_the_sha512_of_its_body() -> None:
    from extauthz.signatures.digest import DigestResult, verify_content_digest

    digest = dict(rfc.TEST_REQUEST_HEADERS)["Content-Digest"]
    assert verify_content_digest(digest, rfc.TEST_REQUEST_BODY) is DigestResult.OK
