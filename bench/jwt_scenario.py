"""The ``jwt`` sidecar scenario of bench/run.py: every request carries a JWT access token.

The sidecar serves the policies given to bench/run.py (by default the repository's policies/,
where ``accounts-api`` in identity-jwt.yaml verifies RS256 tokens against a JWKS file, checks the
revocation list and sets x-user/x-tenant). The setup mints one token with the example keys, valid
for two hours; the load generator repeats it, so after the first request the sidecar serves it
from its verified-token cache: what is measured is the steady state of a signed-in client.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "keys" / "identity"))

from mint_token import mint

HOST, PATH = "accounts.example.com", "/api/profile"


@contextlib.contextmanager
def jwt_setup(workdir: Path) -> Iterator[dict]:
    token = mint(sub="bench-user", scope="profile:read", ttl=7200, extra={"tenant": "acme"})
    yield {"method": "GET", "host": HOST, "path": PATH, "headers": {"authorization": f"Bearer {token}"}}
