"""Reading a policy folder, and watching it for changes.

The folder may be a Kubernetes ConfigMap volume: the files are symlinks into a hidden
timestamped folder that the kubelet replaces by swapping the ``..data`` symlink atomically. We
read every visible ``*.yaml``/``*.yml`` file (following symlinks, skipping dot-entries) and watch a
fingerprint of the resolved files, so a swap is seen as one change and never half-applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

from extauthz.policy.build import Services
from extauthz.policy.compiler import PolicySet, compile_documents
from extauthz.policy.model import Document, PolicyError, PolicySetError, parse_documents

__all__ = ["PolicyWatcher", "load_folder", "policy_files", "read_documents"]

log = logging.getLogger("extauthz.policy")

_SUFFIXES = (".yaml", ".yml")
#: A policy file larger than this is refused: it is a mistake, not a policy.
MAX_FILE_BYTES = 4 * 1024 * 1024


#: ``openapi: 3.1.0`` / ``"swagger": "2.0"`` at the start of a line or after ``{``/``,`` (JSON).
_SPEC_KEY = re.compile(rb"""(?:^|[{,])[ \t]*["']?(?:openapi|swagger)["']?[ \t]*:[ \t]*["']?[23]\.""", re.MULTILINE)
_POLICY_KEY = re.compile(rb"""(?:^|[{,])[ \t]*["']?apiVersion["']?[ \t]*:""", re.MULTILINE)


def is_openapi_spec(data: bytes) -> bool:
    """A YAML (or JSON) file that is an OpenAPI or Swagger document, not policies: an ``openapi``
    key with a version and no ``apiVersion``. Told apart from the text, without parsing a spec of
    megabytes on every policy reload."""
    return _SPEC_KEY.search(data) is not None and _POLICY_KEY.search(data) is None


def policy_files(folder: Path) -> list[Path]:
    """Visible YAML files under ``folder``, sorted; dot-entries (``..data``) are never walked.

    A folder named like a policy file (``orders.yaml/``) is listed too, not walked: it is what a
    container runtime leaves where a file was meant to be mounted, and reading it must fail.
    """
    found: list[Path] = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        visible = sorted(d for d in dirs if not d.startswith("."))
        dirs[:] = [d for d in visible if not d.endswith(_SUFFIXES)]
        names = [n for n in files if not n.startswith(".") and n.endswith(_SUFFIXES)]
        names += [d for d in visible if d.endswith(_SUFFIXES)]
        found.extend(Path(root) / name for name in sorted(names))
    return found


def _read(folder: Path) -> tuple[list[Document], list[PolicyError]]:
    if not folder.is_dir():
        return [], [PolicyError(str(folder), 0, "", 0, "policy folder does not exist or is not a folder")]
    documents: list[Document] = []
    errors: list[PolicyError] = []
    for path in policy_files(folder):
        label = str(path.relative_to(folder))
        if path.is_dir():
            errors.append(PolicyError(label, 0, "", 0, "is a folder, not a policy file (a volume mount of a "
                                      "missing file makes one); remove it or give it another name"))
            continue
        try:
            data = path.read_bytes()
        except OSError as exc:
            errors.append(PolicyError(label, 0, "", 0, f"cannot read: {exc.strerror}"))
            continue
        if is_openapi_spec(data):
            continue  # kept beside the policies for an openapi section (read by extauthz.openapi)
        if len(data) > MAX_FILE_BYTES:
            errors.append(PolicyError(label, 0, "", 0, f"file is larger than {MAX_FILE_BYTES} bytes"))
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            errors.append(PolicyError(label, 0, "", 0, f"not valid UTF-8 (byte {exc.start})"))
            continue
        docs, problems = parse_documents(text, label)
        if not docs and not problems:
            # Half-written (a ConfigMap update caught mid-way) or emptied by mistake: reading it as
            # "no policies" would drop the file's policies. Deleting the file is how they are removed.
            errors.append(PolicyError(label, 0, "", 0, "holds no documents (empty, or only comments and "
                                      "'---'); delete the file to remove its policies"))
        documents.extend(docs)
        errors.extend(problems)
    return documents, errors


def read_documents(folder: Path) -> list[Document]:
    """Parse every document in the folder; raise PolicySetError listing every problem."""
    documents, errors = _read(folder)
    if errors:
        raise PolicySetError(errors)
    return documents


def load_folder(folder: Path, services: Services | None = None) -> PolicySet:
    """Read, validate and compile a folder as one set; raise PolicySetError with every problem.

    Documents that parsed are compiled even when others did not, so one run reports everything.
    """
    documents, errors = _read(folder)
    try:
        policy_set = compile_documents(documents, folder, services)
    except PolicySetError as exc:
        errors.extend(exc.errors)
    if errors:
        raise PolicySetError(errors)
    return policy_set


def fingerprint(folder: Path) -> tuple:
    """Changes whenever a policy file is added, removed, replaced or rewritten."""
    items = []
    try:
        for path in policy_files(folder):
            try:
                st = path.stat()
            except OSError:
                continue
            items.append((str(path), os.path.realpath(path), st.st_mtime_ns, st.st_size, st.st_ino))
    except OSError:
        return ("unreadable",)
    return tuple(items)


class PolicyWatcher:
    """Polls the folder; on change, validates the whole new set and hands it to ``on_set``.

    An invalid set is reported through ``on_error`` and the last good set keeps serving. Polling
    (default 1 s) is simple and sees every kind of change, including symlink swaps, that
    inotify-based watching can miss on some volume types.
    """

    def __init__(
        self,
        folder: Path,
        services: Services,
        on_set: Callable[[PolicySet], Awaitable[None] | None],
        on_error: Callable[[PolicySetError], None],
        interval: float = 1.0,
    ) -> None:
        self.folder = folder
        self.services = services
        self.on_set = on_set
        self.on_error = on_error
        self.interval = interval
        self._seen: tuple | None = None
        self._task: asyncio.Task[None] | None = None

    def mark_loaded(self) -> None:
        """Record the folder's current state as the one already loaded."""
        self._seen = fingerprint(self.folder)

    async def poll_once(self) -> bool | None:
        """Reload if the folder changed: True if a new set is live, False if rejected, None if unchanged."""
        current = await asyncio.to_thread(fingerprint, self.folder)
        if current == self._seen:
            return None
        # Let a burst of writes settle, then take the state we are about to load.
        await asyncio.sleep(0.05)
        current = await asyncio.to_thread(fingerprint, self.folder)
        self._seen = current
        try:
            policy_set = await asyncio.to_thread(load_folder, self.folder, self.services)
        except PolicySetError as exc:
            self.on_error(exc)
            return False
        except Exception as exc:  # never let a reload kill the watcher
            log.exception("policy reload failed")
            self.on_error(PolicySetError([PolicyError(str(self.folder), 0, "", 0, f"internal error: {exc}")]))
            return False
        result = self.on_set(policy_set)
        if result is not None:
            await result
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("policy watcher error")

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="policy-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
