"""RFC 9421 section 3.3 signature algorithms on ``cryptography``, and the keys that carry them.

The algorithm of a signature is a property of the *key* (configured beside it), never something the
request chooses: a request's ``alg`` parameter may only confirm it. That closes the classic
downgrade where an attacker asks an RSA public key to be used as an HMAC secret.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

__all__ = [
    "ALGORITHMS",
    "JOSE_ALGORITHMS",
    "MIN_HMAC_SECRET_BYTES",
    "MIN_RSA_BITS",
    "Algorithm",
    "KeyError_",
    "VerificationKey",
    "algorithm_for",
    "sign",
]

MIN_RSA_BITS = 2048
MIN_HMAC_SECRET_BYTES = 16


class KeyError_(ValueError):
    """Key material that cannot be used (wrong type, too weak, algorithm does not fit)."""


@dataclass(frozen=True, slots=True)
class Algorithm:
    """One entry of the HTTP Signature Algorithms registry."""

    name: str
    #: "rsa", "ec-p256", "ec-p384", "ed25519" or "secret".
    key_kind: str
    _verify: Callable[[Any, bytes, bytes], bool]
    _sign: Callable[[Any, bytes], bytes]


def _rsa_pss_verify(key: rsa.RSAPublicKey, data: bytes, signature: bytes) -> bool:
    key.verify(signature, data, padding.PSS(mgf=padding.MGF1(hashes.SHA512()), salt_length=64), hashes.SHA512())
    return True


def _rsa_pss_sign(key: rsa.RSAPrivateKey, data: bytes) -> bytes:
    return key.sign(data, padding.PSS(mgf=padding.MGF1(hashes.SHA512()), salt_length=64), hashes.SHA512())


def _rsa_v15_verify(key: rsa.RSAPublicKey, data: bytes, signature: bytes) -> bool:
    key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    return True


def _rsa_v15_sign(key: rsa.RSAPrivateKey, data: bytes) -> bytes:
    return key.sign(data, padding.PKCS1v15(), hashes.SHA256())


#: Per secret, an HMAC already keyed: copying it costs half of keying a new one. Bounded.
_KEYED: dict[bytes, hmac.HMAC] = {}


def _hmac_verify(secret: bytes, data: bytes, signature: bytes) -> bool:
    # Not hmac.digest(): on CPython 3.11 its one-shot path releases the GIL for any input, and handing
    # the GIL to another thread and back costs far more than hashing a signature base of a few
    # hundred bytes (measured: 13 us instead of 1.5 us inside the sidecar). An HMAC object's update
    # releases the GIL only for inputs of 2 KiB and more, where it pays off.
    keyed = _KEYED.get(secret)
    if keyed is None:
        if len(_KEYED) >= 1024:
            _KEYED.clear()
        keyed = _KEYED[secret] = hmac.new(secret, digestmod=hashlib.sha256)
    mac = keyed.copy()
    mac.update(data)
    return hmac.compare_digest(mac.digest(), signature)


def _hmac_sign(secret: bytes, data: bytes) -> bytes:
    return hmac.new(secret, data, hashlib.sha256).digest()


def _ecdsa(hash_cls: type[hashes.HashAlgorithm], size: int) -> tuple[Callable[..., bool], Callable[..., bytes]]:
    """ECDSA with the fixed-length r||s encoding RFC 9421 uses (not DER)."""

    def verify(key: ec.EllipticCurvePublicKey, data: bytes, signature: bytes) -> bool:
        if len(signature) != 2 * size:
            return False
        r = int.from_bytes(signature[:size], "big")
        s = int.from_bytes(signature[size:], "big")
        key.verify(encode_dss_signature(r, s), data, ec.ECDSA(hash_cls()))
        return True

    def sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hash_cls())))
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")

    return verify, sign


def _ed25519_verify(key: ed25519.Ed25519PublicKey, data: bytes, signature: bytes) -> bool:
    if len(signature) != 64:
        return False
    key.verify(signature, data)
    return True


def _ed25519_sign(key: ed25519.Ed25519PrivateKey, data: bytes) -> bytes:
    return key.sign(data)


_p256 = _ecdsa(hashes.SHA256, 32)
_p384 = _ecdsa(hashes.SHA384, 48)

ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("rsa-pss-sha512", "rsa", _rsa_pss_verify, _rsa_pss_sign),
        Algorithm("rsa-v1_5-sha256", "rsa", _rsa_v15_verify, _rsa_v15_sign),
        Algorithm("hmac-sha256", "secret", _hmac_verify, _hmac_sign),
        Algorithm("ecdsa-p256-sha256", "ec-p256", *_p256),
        Algorithm("ecdsa-p384-sha384", "ec-p384", *_p384),
        Algorithm("ed25519", "ed25519", _ed25519_verify, _ed25519_sign),
    )
}

#: JWK "alg" values (JOSE) accepted as names of the registry algorithms above.
JOSE_ALGORITHMS: dict[str, str] = {
    "PS512": "rsa-pss-sha512",
    "RS256": "rsa-v1_5-sha256",
    "HS256": "hmac-sha256",
    "ES256": "ecdsa-p256-sha256",
    "ES384": "ecdsa-p384-sha384",
    "EdDSA": "ed25519",
    "Ed25519": "ed25519",
}


def _kind_of(material: Any) -> str:
    if isinstance(material, bytes):
        return "secret"
    if isinstance(material, rsa.RSAPublicKey):
        return "rsa"
    if isinstance(material, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(material, ec.EllipticCurvePublicKey):
        if isinstance(material.curve, ec.SECP256R1):
            return "ec-p256"
        if isinstance(material.curve, ec.SECP384R1):
            return "ec-p384"
        raise KeyError_(f"EC curve {material.curve.name} is not supported (P-256 and P-384 are)")
    raise KeyError_(f"unsupported key type {type(material).__name__}")


_DEFAULT_FOR_KIND = {"secret": "hmac-sha256", "ed25519": "ed25519", "ec-p256": "ecdsa-p256-sha256",
                     "ec-p384": "ecdsa-p384-sha384"}


def algorithm_for(material: Any, declared: str | None) -> Algorithm:
    """The algorithm of a key: the declared one (checked against the key), or the only one it fits.

    RSA keys fit two algorithms, so they must declare one.
    """
    kind = _kind_of(material)
    if declared:
        name = JOSE_ALGORITHMS.get(declared, declared)
        algorithm = ALGORITHMS.get(name)
        if algorithm is None:
            raise KeyError_(f"unknown algorithm {declared!r} (known: {', '.join(ALGORITHMS)})")
        if algorithm.key_kind != kind:
            raise KeyError_(f"algorithm {algorithm.name} does not fit a {kind} key")
    elif kind in _DEFAULT_FOR_KIND:
        algorithm = ALGORITHMS[_DEFAULT_FOR_KIND[kind]]
    else:
        raise KeyError_("an RSA key must declare its algorithm (rsa-pss-sha512 or rsa-v1_5-sha256)")
    if kind == "rsa" and material.key_size < MIN_RSA_BITS:
        raise KeyError_(f"RSA key has {material.key_size} bits; at least {MIN_RSA_BITS} are required")
    if kind == "secret" and len(material) < MIN_HMAC_SECRET_BYTES:
        raise KeyError_(f"shared secret has {len(material)} bytes; at least {MIN_HMAC_SECRET_BYTES} are required")
    return algorithm


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A key a signature can be checked with. Its repr never shows the material."""

    key_id: str
    algorithm: Algorithm = field(repr=False)
    material: Any = field(repr=False)
    #: Who the key belongs to (for binding to identity.subject); "" when not declared.
    owner: str = ""
    #: The file it came from, for logs.
    source: str = ""

    @property
    def algorithm_name(self) -> str:
        return self.algorithm.name

    def verify(self, data: bytes, signature: bytes) -> bool:
        """True when ``signature`` is valid for ``data``; never raises for a bad signature."""
        try:
            return self.algorithm._verify(self.material, data, signature)
        except (InvalidSignature, ValueError):
            return False


def sign(algorithm: str, private_key: Any, data: bytes) -> bytes:
    """Sign ``data`` (a signature base) with a private key or shared secret: for clients and tests."""
    return ALGORITHMS[algorithm]._sign(private_key, data)
