"""The demo key list matches examples/keys, and loading demo material is said loudly."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest

from extauthz.demo_keys import DEMO_KEY_DIGESTS
from extauthz.watched import WatchedPath

KEYS = Path(__file__).resolve().parents[2] / "examples" / "keys"


def _shipped(path: Path) -> bool:
    """What the image and the Kubernetes Secrets carry and makes credentials acceptable: no clients'
    folder, private keys, scripts, or revocation lists."""
    rel = path.relative_to(KEYS)
    return not (rel.parts[0] == "clients" or path.suffix in (".key", ".py", ".md") or path.name.startswith((".", "revoked-"))
                or path.name.endswith(".private.pem"))  # fmt: skip


def test_the_list_is_every_demo_file() -> None:
    files = sorted(p for p in KEYS.rglob("*") if p.is_file() and _shipped(p))
    digests = {hashlib.sha256(p.read_bytes()).hexdigest(): p.relative_to(KEYS) for p in files}
    assert set(digests) == DEMO_KEY_DIGESTS, "put these in extauthz/demo_keys.py:\n" + "\n".join(
        f'    "{d}",  # {p}' for d, p in digests.items())


def test_loading_demo_material_is_a_warning_and_own_material_is_not(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="extauthz.watched"):
        assert WatchedPath(KEYS / "webhooks" / "github.secret", Path.read_bytes, what="secret").refresh()
        assert WatchedPath(KEYS / "identity" / "apikeys", lambda p: p, what="API keys").refresh()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("public demo key material" in line for line in lines)
    assert "github.secret" in lines[0] and "partners.yaml" in lines[1]
    own = tmp_path / "github.secret"
    own.write_bytes(b"a secret of our own\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="extauthz.watched"):
        assert WatchedPath(own, Path.read_bytes, what="secret").refresh()
    assert not caplog.records
