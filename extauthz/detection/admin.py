"""Operators' view of blocks: list, show and lift, on the probes port and from the command line.

The endpoint (``--admin-token-file FILE``; without it there is none) lives on the probes port:

    GET    /admin/blocks                          every live block and throttle (JSON)
    GET    /admin/blocks/<policy>/<detector>/<id> one of them
    DELETE /admin/blocks/<policy>/<detector>/<id> lift it now (its offences are kept)

Every call needs ``Authorization: Bearer <token>``, the token being the file's content (a mounted
Secret, re-read when it changes), compared in constant time. The probes port is not the Check port:
keep it off the mesh (the Kubernetes manifests expose it to the kubelet and Prometheus only).
``extauthz blocks list|show|lift`` does the same against Redis directly, or against this endpoint
(``--url``) for a sidecar that keeps its state in process.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from pathlib import Path
from typing import Any

from extauthz.detection.memory import MemoryDetections
from extauthz.detection.model import BlockRecord, parse_block_id
from extauthz.stores import StoreError

__all__ = ["AdminToken", "handle", "lift_block", "list_blocks", "show_block"]

log = logging.getLogger("extauthz.admin")

PREFIX = "/admin/blocks"


class AdminToken:
    """The bearer token in a mounted file, re-read when the file changes."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._token = b""
        self.read()

    def read(self) -> None:
        """Read the file if it changed; raises OSError or ValueError (an empty or short token)."""
        stat = self.path.stat()
        stamp = (stat.st_mtime_ns, stat.st_ino)
        if stamp == self._stamp:
            return
        token = self.path.read_bytes().strip()
        if len(token) < 16:
            raise ValueError(f"the admin token in {self.path} is shorter than 16 characters")
        self._token, self._stamp = token, stamp

    def accepts(self, authorization: str | None) -> bool:
        try:
            self.read()
        except (OSError, ValueError) as exc:
            log.warning("admin token unreadable, refusing admin calls: %s", exc)
            return False
        if not authorization:
            return False
        scheme, _, presented = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(presented.strip().encode("utf-8", "surrogateescape"), self._token)


async def _answer(backend: Any, reply: Any) -> Any:
    """The in-process store answers at once, Redis's with an awaitable."""
    return reply if isinstance(backend, MemoryDetections) else await reply


async def list_blocks(backend: Any) -> list[BlockRecord]:
    return await _answer(backend, backend.blocks())  # type: ignore[no-any-return]


async def show_block(backend: Any, block_id: str) -> BlockRecord | None:
    return await _answer(backend, backend.block(*parse_block_id(block_id)))  # type: ignore[no-any-return]


async def lift_block(backend: Any, block_id: str) -> bool:
    return await _answer(backend, backend.lift(*parse_block_id(block_id)))  # type: ignore[no-any-return]


def _json(status: int, value: Any) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(value).encode() + b"\n"


async def handle(method: str, path: str, authorization: str | None, token: AdminToken | None,
                 backend: Any) -> tuple[int, str, bytes]:  # fmt: skip
    """One admin call: (status, content type, body)."""
    if token is None:
        return 404, "text/plain", b"not found\n"
    if not token.accepts(authorization):
        return 401, "application/json", b'{"error": "a valid bearer token is required"}\n'
    if backend is None:
        return _json(404, {"error": "no policy has abuse detectors"})
    now_ms = int(time.time() * 1000)
    path = path.split("?", 1)[0].rstrip("/")
    try:
        if path == PREFIX:
            if method != "GET":
                return _json(405, {"error": "GET lists blocks"})
            return _json(200, {"blocks": [r.as_dict(now_ms) for r in await list_blocks(backend)]})
        if not path.startswith(PREFIX + "/"):
            return _json(404, {"error": "not found"})
        block_id = path[len(PREFIX) + 1:]
        if method == "GET":
            record = await show_block(backend, block_id)
            if record is None:
                return _json(404, {"error": "no live block with this id"})
            return _json(200, record.as_dict(now_ms))
        if method in ("DELETE", "POST"):
            lifted = await lift_block(backend, block_id)
            log.warning("admin: block %s lifted%s", block_id, "" if lifted else " (there was none)")
            return _json(200 if lifted else 404, {"id": block_id, "lifted": lifted})
        return _json(405, {"error": "GET shows a block, DELETE lifts it"})
    except ValueError as exc:
        return _json(400, {"error": str(exc)})
    except StoreError as exc:
        return _json(503, {"error": str(exc)})
