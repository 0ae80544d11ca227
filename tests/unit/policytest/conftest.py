"""Fixtures for the PolicyTest tests: a policy folder with an identity provider's keys made here."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

ACCOUNTS = """
match: {hosts: [accounts.test]}
identity:
  - name: users
    jwt:
      issuer: https://idp.test
      audiences: [accounts]
      jwksFile: keys/jwks.json
      token: {header: authorization, scheme: Bearer, forward: false}
rules:
  - {name: readers, when: "'read' in identity.scopes", decision: allow}
response:
  headers:
    x-user: "identity.subject"
"""

@pytest.fixture
def idp_folder(policy_dir: Callable[..., Path], policy_yaml: Callable[[str, str], str]) -> Path:
    """A policy folder with the accounts policy and its identity provider's keys under keys/:
    signing.pem (private, EC P-256, kid k1) and jwks.json (public)."""
    folder = policy_dir(**{"accounts.yaml": policy_yaml("accounts", ACCOUNTS)})
    keys = folder / "keys"
    keys.mkdir()
    key = ec.generate_private_key(ec.SECP256R1())
    (keys / "signing.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="k1", alg="ES256", use="sig")
    (keys / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    return folder


@pytest.fixture
def write_test(idp_folder: Path) -> Callable[..., Path]:
    """``write_test(spec, name=..., file=...)``: a PolicyTest document in the idp folder, ``spec``
    being the YAML under ``spec:`` indented by two spaces.
    Returns the folder."""

    def write(spec: str, *, name: str = "accounts-tests", file: str = "accounts_test.yaml") -> Path:
        text = f"apiVersion: extauthz.dev/v1\nkind: PolicyTest\nmetadata: {{name: {name}}}\nspec:\n{spec.strip(chr(10))}\n"
        (idp_folder / file).write_text(text)
        return idp_folder

    return write
