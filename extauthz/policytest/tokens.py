"""Tokens a PolicyTest signs itself, from a test key file and claims.

A test that pastes a signed JWT hides what it tests (the claims are base64 inside 800 characters)
and stops passing the day the token expires. Here a test names an issuer (a private key file, its
algorithm and ``kid``, the claims every token of it has) and tokens (their own claims, lifetime and
certificate binding); the runner signs each token when its document starts, at the document's
clock, so ``iat`` and ``exp`` are relative to the time the test runs at.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

__all__ = ["HMAC_ALGORITHMS", "Issuer", "TokenError", "TokenSpec", "certificate_thumbprint", "read_signing_key"]

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
_ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
#: Algorithms each kind of private key can sign with; the first is the default.
_BY_KEY: tuple[tuple[type, tuple[str, ...]], ...] = (
    (rsa.RSAPrivateKey, ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")),
    (ed25519.Ed25519PrivateKey, ("EdDSA",)),
    (ed448.Ed448PrivateKey, ("EdDSA",)),
)
_EC_CURVES = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
#: Default lifetime of a test token: long enough for any run, short enough to be a lifetime.
DEFAULT_LIFETIME = 3600.0


class TokenError(ValueError):
    """A key file or a token definition that cannot be used (reported at load with file and line)."""


def read_signing_key(path: Path, algorithm: str | None) -> tuple[Any, str]:
    """The private key (or HMAC secret) in ``path`` and the algorithm to sign with.

    ``algorithm`` None picks the key's usual one (RS256, ES256/384/512 by curve, EdDSA); an HMAC
    algorithm reads the file's bytes as the secret, one trailing line break ignored.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TokenError(f"cannot read {path}: {exc.strerror}") from None
    if algorithm in HMAC_ALGORITHMS:
        secret = data.removesuffix(b"\n").removesuffix(b"\r")
        if len(secret) < 32:
            raise TokenError(f"{path}: an HMAC secret must be at least 32 bytes")
        return secret, algorithm
    if algorithm is not None and algorithm not in _ASYMMETRIC:
        raise TokenError(f"unknown algorithm {algorithm!r} (known: {', '.join(_ASYMMETRIC + HMAC_ALGORITHMS)})")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise TokenError(f"{path} is not an unencrypted PEM private key ({exc})") from None
    allowed: tuple[str, ...] = ()
    if isinstance(key, ec.EllipticCurvePrivateKey):
        curve = _EC_CURVES.get(key.curve.name)
        allowed = (curve,) if curve else ()
    for kind, algorithms in _BY_KEY:
        if isinstance(key, kind):
            allowed = algorithms
    if not allowed:
        raise TokenError(f"{path}: this kind of key cannot sign a JWT")
    if algorithm is None:
        return key, allowed[0]
    if algorithm not in allowed:
        raise TokenError(f"{path} cannot sign {algorithm} (it can: {', '.join(allowed)})")
    return key, algorithm


def certificate_thumbprint(path: Path) -> str:
    """RFC 8705 ``x5t#S256`` of a PEM certificate: what binds a token to it."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise TokenError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError:
        raise TokenError(f"{path} is not a PEM certificate") from None
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@dataclass(frozen=True, slots=True)
class Issuer:
    """Who signs: a key, its algorithm and ``kid``, and the claims every token of it carries."""

    name: str
    key: Any = field(repr=False)
    algorithm: str
    key_id: str | None
    #: The ``typ`` header (e.g. at+jwt for RFC 9068 access tokens).
    type: str | None
    claims: Mapping[str, Any]
    expires_in: float = DEFAULT_LIFETIME


@dataclass(frozen=True, slots=True)
class TokenSpec:
    """One named token of a PolicyTest, signed when its document starts."""

    name: str
    issuer: Issuer
    #: Claims over the issuer's; a claim set to null here is left out.
    claims: Mapping[str, Any]
    #: Seconds from signing to ``exp`` (negative: already expired); ``claims: {exp: null}`` drops it.
    expires_in: float
    #: ``cnf.x5t#S256`` when the token is bound to a client certificate.
    thumbprint: str | None = None

    def sign(self, now: float) -> str:
        """The token as of ``now`` (seconds): ``iat`` is now, ``exp`` now plus its lifetime,
        unless its claims set them."""
        issued = int(now)
        claims: dict[str, Any] = {"iat": issued, "exp": issued + int(self.expires_in)}
        claims.update(self.issuer.claims)
        claims.update(self.claims)
        if self.thumbprint is not None:
            claims["cnf"] = {"x5t#S256": self.thumbprint}
        claims = {name: value for name, value in claims.items() if value is not None}
        headers: dict[str, Any] = {}
        if self.issuer.key_id is not None:
            headers["kid"] = self.issuer.key_id
        if self.issuer.type is not None:
            headers["typ"] = self.issuer.type
        return jwt.encode(claims, self.issuer.key, algorithm=self.issuer.algorithm, headers=headers or None)
