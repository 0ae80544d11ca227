"""Mounted files and folders (Kubernetes Secrets) read at load time and re-read when they change.

Used for every piece of key material a policy names: JWKS files, HMAC and client secrets, API-key
records, revocation lists, request-signature key folders.

A Secret volume is a folder of symlinks into a hidden timestamped folder that the kubelet swaps
atomically through ``..data``; a fingerprint of the resolved files (real path, inode, size, mtime)
sees such a swap as one change. The file is re-read by a background task (``start``), never on the
request path. When a new version does not parse, the last good value keeps serving and the error
is logged: rotating a Secret must never lock everyone out because of a typo.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Generic, TypeVar

__all__ = ["WatchedPath", "path_fingerprint", "visible_files"]

log = logging.getLogger("extauthz.watched")

T = TypeVar("T")

#: Seconds between checks of a watched file; the sidecar settings may override it.
DEFAULT_INTERVAL = 2.0


def visible_files(folder: Path) -> list[Path]:
    """Regular files in ``folder`` (not recursive), skipping dot-entries such as ``..data``."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())


def path_fingerprint(path: Path) -> tuple:
    """Changes whenever the file, or a visible file of the folder, is replaced, rewritten, added or
    removed (real path, inode, size, mtime); an unreadable path gives ("error", errno)."""
    try:
        files = visible_files(path) if path.is_dir() else [path]
        items = []
        for file in files:
            st = file.stat()
            items.append((str(file), os.path.realpath(file), st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(items)
    except OSError as exc:
        return ("error", exc.errno)


def _warn_if_demo(path: Path, what: str) -> None:
    """Say loudly that a file is the repository's public demo key material (examples/keys): the
    examples, the image and the Kubernetes base run on it, and anyone can forge what it accepts."""
    from extauthz.demo_keys import DEMO_KEY_DIGESTS

    try:
        files = visible_files(path) if path.is_dir() else [path]
        demo = [f for f in files if hashlib.sha256(f.read_bytes()).hexdigest() in DEMO_KEY_DIGESTS]
    except OSError:
        return
    for file in demo:
        log.warning("%s %s is the repository's public demo key material: anyone can make credentials it "
                    "accepts. Mount your own keys before serving real traffic", what, file)


class WatchedPath(Generic[T]):
    """A file or folder parsed into a value of type T, kept current by polling.

    ``value`` is the last good parse (None until one succeeds); ``error`` the last failure, if
    the newest version did not parse; ``generation`` increases with every new value.
    """

    def __init__(self, path: Path, parse: Callable[[Path], T], *, what: str,
                 interval: float = DEFAULT_INTERVAL, on_change: Callable[[T], None] | None = None,
                 related: Callable[[], Iterable[Path]] | None = None) -> None:
        self.path = path
        self.parse = parse
        self.what = what
        self.interval = interval
        #: Called with every new value (e.g. to log what a reload found).
        self.on_change = on_change
        #: Other files the last parse read (an OpenAPI spec's referenced files): a change to any of
        #: them is a change of the value too.
        self.related = related
        self.value: T | None = None
        self.error: str | None = None
        self.generation = 0
        self.started = False
        self._seen: tuple | None = None
        self._task: asyncio.Task[None] | None = None

    def refresh(self) -> bool:
        """Re-read if the path changed since the last look; True when a new value was installed."""
        seen = self._fingerprint()
        if seen == self._seen:
            return False
        self._seen = seen
        try:
            value = self.parse(self.path)
        except (OSError, ValueError, ArithmeticError, RecursionError) as exc:
            self._see_related(seen)
            # ArithmeticError, RecursionError: a number too large, nesting too deep for a parser.
            message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
            self.error = f"{self.what} {self.path}: {message}"
            if self.value is not None:
                log.error("%s; keeping the previous version", self.error)
            return False
        self._see_related(seen)
        self.value = value
        self.error = None
        self.generation += 1
        _warn_if_demo(self.path, self.what)
        if self.generation > 1:
            log.info("%s %s reloaded", self.what, self.path)
        if self.on_change is not None:
            self.on_change(value)
        return True

    def _fingerprint(self) -> tuple:
        if self.related is None:
            return path_fingerprint(self.path)
        return (path_fingerprint(self.path), *(path_fingerprint(p) for p in self.related() if p != self.path))

    def _see_related(self, seen: tuple) -> None:
        """After a parse: when it read other files than the fingerprint covered, cover them now
        (else the next look would see a change that is only the new list, and parse again)."""
        if self.related is not None:
            now = self._fingerprint()
            if len(now) != len(seen):
                self._seen = now

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await asyncio.to_thread(self.refresh)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one bad read stop the watching
                log.exception("watching %s %s failed", self.what, self.path)

    async def start(self) -> None:
        self.started = True
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"watch {self.path}")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.started = False


def watch_interval(settings: object) -> float:
    """The polling interval from the sidecar settings (``file_reload_interval``), else the default."""
    value = getattr(settings, "get", lambda *_: None)("file_reload_interval")
    return float(value) if isinstance(value, int | float) and value > 0 else DEFAULT_INTERVAL
