"""Fixtures for the signature tests: the RFC 9421 example keys as a key folder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rfc9421_messages import write_rfc_key_folder


@pytest.fixture
def rfc_key_folder(tmp_path: Path) -> Path:
    return write_rfc_key_folder(tmp_path / "keys")
