"""Fixtures for the identity tests: key material, a CA, real HTTP servers, policy helpers."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import material


@pytest.fixture(scope="session")
def signing_key():
    """The RSA key tokens are signed with (kid "k1" in the key sets the tests write)."""
    return material.rsa_key()


@pytest.fixture(scope="session")
def pki() -> material.Pki:
    return material.Pki()


@pytest.fixture
def json_server() -> Iterator[material.JsonServer]:
    server = material.JsonServer()
    yield server
    server.stop()


@pytest.fixture
def write_jwks(tmp_path: Path) -> Callable[..., Path]:
    """``write_jwks([jwk, ...], name="jwks.json")`` into the test's folder; returns the path."""

    def write(keys: list[dict], name: str = "jwks.json") -> Path:
        import json

        path = tmp_path / "policies" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"keys": keys}))
        return path

    return write
