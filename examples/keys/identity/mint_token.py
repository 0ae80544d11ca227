"""Mint a token signed with the EXAMPLE keys of this folder (for trying the example policies).

    python examples/keys/identity/mint_token.py --sub alice --scope "profile:read profile:write"
    python examples/keys/identity/mint_token.py --alg ES256 --aud payments-api --bind client-checkout.crt
    curl -H "Authorization: Bearer $(python examples/keys/identity/mint_token.py)" ...

These keys are public (they are in the repository): never trust them outside a demo.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import time
import uuid
from pathlib import Path

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization

HERE = Path(__file__).resolve().parent
KEYS = {"RS256": ("signing-rsa.key", "example-rsa-2025"), "ES256": ("signing-ec.key", "example-ec-2025")}


def thumbprint(certificate: Path) -> str:
    """RFC 8705 x5t#S256 of a PEM certificate."""
    cert = x509.load_pem_x509_certificate(certificate.read_bytes())
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def mint(*, sub: str = "alice", scope: str = "profile:read", aud: str = "accounts-api", ttl: int = 3600,
         alg: str = "RS256", issuer: str = "https://idp.example.com", bind: Path | None = None,
         extra: dict | None = None) -> str:
    key_file, kid = KEYS[alg]
    key = serialization.load_pem_private_key((HERE / key_file).read_bytes(), password=None)
    now = int(time.time())
    claims = {"iss": issuer, "aud": aud, "sub": sub, "scope": scope, "iat": now, "exp": now + ttl,
              "jti": str(uuid.uuid4()), **(extra or {})}
    if bind is not None:
        claims["cnf"] = {"x5t#S256": thumbprint(bind if bind.is_absolute() else HERE / bind)}
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid, "typ": "at+jwt"})  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sub", default="alice")
    parser.add_argument("--scope", default="profile:read")
    parser.add_argument("--aud", default="accounts-api")
    parser.add_argument("--ttl", type=int, default=3600, help="seconds until exp (default 3600)")
    parser.add_argument("--alg", choices=sorted(KEYS), default="RS256")
    parser.add_argument("--tenant", default="acme")
    parser.add_argument("--bind", type=Path, help="client certificate (PEM) to bind the token to (RFC 8705)")
    args = parser.parse_args()
    print(mint(sub=args.sub, scope=args.scope, aud=args.aud, ttl=args.ttl, alg=args.alg, bind=args.bind,
               extra={"tenant": args.tenant}))


if __name__ == "__main__":
    main()
