"""Reading a policy folder, and watching it for changes.

The folder may be a Kubernetes ConfigMap volume: the files are symlinks into a hidden
timestamped folder that the kubelet replaces by swapping the ``..data`` symlink atomically. We
read every visible ``*.yaml``/``*.yml`` file (following symlinks, skipping dot-entries) and watch a
scan of the resolved files (real path, size, times, inode), so a swap is seen as one change and
never half-applied.

A :class:`PolicyLoader` loads the same folder again and again doing only what changed: a file whose
scan did not change is not read again, a file whose bytes did not change is not parsed again (its
documents are the same objects as before), and a document that is the same object is not compiled
again (see policy.compiler.CompileCache). The set is still checked and accepted or refused as a
whole at every load.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from extauthz.policy.build import Services
from extauthz.policy.compiler import CompileCache, PolicySet, compile_documents
from extauthz.policy.model import Document, PolicyError, PolicySetError, parse_documents

__all__ = ["FileState", "LoadStats", "PolicyLoader", "PolicyWatcher", "load_folder", "policy_files",
           "read_documents", "scan_folder"]

log = logging.getLogger("extauthz.policy")

_SUFFIXES = (".yaml", ".yml")
#: A policy file larger than this is refused: it is a mistake, not a policy.
MAX_FILE_BYTES = 4 * 1024 * 1024
#: A file modified less than this before it was read is read again at the next load even if its
#: scan looks the same: a second write within one tick of the file system's clock leaves size and
#: mtime as they were (git calls such entries "racy").
RACY_NS = 2_000_000_000


@dataclass(frozen=True, slots=True)
class FileState:
    """One entry of a folder scan: a policy file as the file system describes it."""

    #: The path relative to the folder, as errors name it.
    label: str
    path: str
    #: (real path of a symlink or "", mtime, ctime, size, inode) of a file; ("folder",) for a folder
    #: named like a policy file; ("error", errno) when it cannot be looked at.
    stat: tuple


def scan_folder(folder: Path) -> tuple[FileState, ...]:
    """Every visible YAML file under ``folder`` with its state, in the order ``policy_files`` gives.

    A few microseconds per file (one ``stat`` each, and a ``realpath`` for symlinks): the watcher
    scans the folder at every poll.
    """
    found: list[FileState] = []
    visited: set[str] = set()

    def walk(directory: str, prefix: str) -> None:
        try:
            real = os.path.realpath(directory)
            if real in visited:  # a symlink loop, or two links to one folder
                return
            visited.add(real)
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            return
        subfolders: list[os.DirEntry[str]] = []
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                if name.endswith(_SUFFIXES):
                    found.append(FileState(prefix + name, entry.path, ("folder",)))
                else:
                    subfolders.append(entry)
                continue
            if not name.endswith(_SUFFIXES):
                continue
            try:
                st = entry.stat()
                link = os.path.realpath(entry.path) if entry.is_symlink() else ""
                stat: tuple = (link, st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)
            except OSError as exc:
                stat = ("error", exc.errno)
            found.append(FileState(prefix + name, entry.path, stat))
        for entry in subfolders:
            walk(entry.path, prefix + entry.name + "/")

    walk(str(folder), "")
    # A folder named like a policy file sorts with the files of its folder, as os.walk lists them.
    return tuple(found)


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


def fingerprint(folder: Path) -> tuple:
    """Changes whenever a policy file is added, removed, replaced or rewritten."""
    return scan_folder(folder)


@dataclass(frozen=True, slots=True)
class _ParsedFile:
    """What one file held when it was last read."""

    stat: tuple
    digest: bytes
    documents: tuple[Document, ...]
    errors: tuple[PolicyError, ...]
    #: Modified shortly before it was read: read again next time (see RACY_NS).
    racy: bool


@dataclass(frozen=True, slots=True)
class LoadStats:
    """What a load did, for the reload log line and the benchmarks."""

    files: int
    #: Files read, and parsed, by this load (the others were unchanged since the last one).
    read: int
    parsed: int
    policies: int
    #: Policies taken from the last load unchanged.
    reused: int
    seconds: float


class PolicyLoader:
    """Loads one folder as a policy set, again and again, redoing only what changed since the
    last load (see the module docstring). Loads must not overlap (the watcher's never do)."""

    def __init__(self, folder: Path, services: Services | None = None) -> None:
        self.folder = folder
        self.services = services if services is not None else Services()
        self._files: dict[str, _ParsedFile] = {}
        self._compiled = CompileCache()
        #: The scan the last load read the folder by.
        self.last_scan: tuple[FileState, ...] | None = None
        self.last_stats: LoadStats | None = None

    def scan(self) -> tuple[FileState, ...]:
        return scan_folder(self.folder)

    def load(self, scan: tuple[FileState, ...] | None = None) -> PolicySet:
        """Read, validate and compile the folder as one set; raise PolicySetError with every problem.

        ``scan`` is the folder's state to read by (the watcher's latest); by default it is taken
        now. Documents that parsed are compiled even when others did not, so one run reports
        everything.
        """
        started = time.perf_counter()
        scan = self.scan() if scan is None else scan
        self.last_scan = scan
        documents, errors, read, parsed = self._read(scan)
        policy_set: PolicySet | None = None
        try:
            policy_set = compile_documents(documents, self.folder, self.services, reuse=self._compiled)
        except PolicySetError as exc:
            errors.extend(exc.errors)
        if policy_set is not None:
            self.last_stats = LoadStats(len(scan), read, parsed, len(policy_set.policies), self._compiled.reused,
                                        time.perf_counter() - started)
        if errors:
            raise PolicySetError(errors)
        assert policy_set is not None
        return policy_set

    def _read(self, scan: tuple[FileState, ...]) -> tuple[list[Document], list[PolicyError], int, int]:
        if not self.folder.is_dir():
            self._files = {}
            missing = PolicyError(str(self.folder), 0, "", 0, "policy folder does not exist or is not a folder")
            return [], [missing], 0, 0
        documents: list[Document] = []
        errors: list[PolicyError] = []
        files: dict[str, _ParsedFile] = {}
        read = parsed = 0
        for state in scan:
            if state.stat[0] == "folder":
                errors.append(PolicyError(state.label, 0, "", 0, "is a folder, not a policy file (a volume mount "
                                          "of a missing file makes one); remove it or give it another name"))
                continue
            known = self._files.get(state.label)
            if known is None or known.stat != state.stat or known.racy or state.stat[0] == "error":
                read += 1
                fresh = self._read_file(state, known, errors)
                if fresh is None:
                    continue
                if known is None or fresh.digest != known.digest:
                    parsed += 1
                known = fresh
            files[state.label] = known
            documents.extend(known.documents)
            errors.extend(known.errors)
        self._files = files
        return documents, errors, read, parsed

    @staticmethod
    def _read_file(state: FileState, known: _ParsedFile | None, errors: list[PolicyError]) -> _ParsedFile | None:
        """The file's contents now; None after recording why it cannot be read."""
        label = state.label
        try:
            with open(state.path, "rb") as file:
                data = file.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            errors.append(PolicyError(label, 0, "", 0, f"cannot read: {exc.strerror}"))
            return None
        if is_openapi_spec(data):  # kept beside the policies for an openapi section (read by extauthz.openapi)
            racy = len(state.stat) == 5 and time.time_ns() - state.stat[1] < RACY_NS
            return _ParsedFile(state.stat, b"", (), (), racy)
        if len(data) > MAX_FILE_BYTES:
            errors.append(PolicyError(label, 0, "", 0, f"file is larger than {MAX_FILE_BYTES} bytes"))
            return None
        racy = len(state.stat) == 5 and time.time_ns() - state.stat[1] < RACY_NS
        digest = hashlib.blake2b(data, digest_size=16).digest()
        if known is not None and known.digest == digest:  # touched, or rewritten with the same bytes
            return _ParsedFile(state.stat, digest, known.documents, known.errors, racy)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            problem = PolicyError(label, 0, "", 0, f"not valid UTF-8 (byte {exc.start})")
            return _ParsedFile(state.stat, digest, (), (problem,), racy)
        docs, problems = parse_documents(text, label)
        if not docs and not problems:
            # Half-written (a ConfigMap update caught mid-way) or emptied by mistake: reading it as
            # "no policies" would drop the file's policies. Deleting the file is how they are removed.
            problems.append(PolicyError(label, 0, "", 0, "holds no documents (empty, or only comments and "
                                        "'---'); delete the file to remove its policies"))
        return _ParsedFile(state.stat, digest, tuple(docs), tuple(problems), racy)


def read_documents(folder: Path) -> list[Document]:
    """Parse every document in the folder; raise PolicySetError listing every problem."""
    loader = PolicyLoader(folder)
    documents, errors, _, _ = loader._read(loader.scan())
    if errors:
        raise PolicySetError(errors)
    return documents


def load_folder(folder: Path, services: Services | None = None) -> PolicySet:
    """Read, validate and compile a folder as one set; raise PolicySetError with every problem.

    Documents that parsed are compiled even when others did not, so one run reports everything.
    """
    return PolicyLoader(folder, services).load()


class PolicyWatcher:
    """Polls the folder; on change, validates the whole new set and hands it to ``on_set``.

    An invalid set is reported through ``on_error`` and the last good set keeps serving. Polling
    (default 1 s) is simple and sees every kind of change, including symlink swaps, that
    inotify-based watching can miss on some volume types. A reload reads, parses and compiles only
    the files that changed, in a worker thread: the event loop keeps answering meanwhile.
    """

    def __init__(
        self,
        folder: Path,
        services: Services,
        on_set: Callable[[PolicySet], Awaitable[None] | None],
        on_error: Callable[[PolicySetError], None],
        interval: float = 1.0,
        *,
        loader: PolicyLoader | None = None,
    ) -> None:
        self.folder = folder
        self.services = services
        self.loader = loader if loader is not None else PolicyLoader(folder, services)
        self.on_set = on_set
        self.on_error = on_error
        self.interval = interval
        self._seen: tuple | None = None
        self._task: asyncio.Task[None] | None = None

    def mark_loaded(self) -> None:
        """Record the folder's state as the one already loaded: that of the loader's last load, so a
        change made since is still seen, or else the state now."""
        self._seen = self.loader.last_scan if self.loader.last_scan is not None else self.loader.scan()

    async def poll_once(self) -> bool | None:
        """Reload if the folder changed: True if a new set is live, False if rejected, None if unchanged."""
        current = await asyncio.to_thread(self.loader.scan)
        if current == self._seen:
            return None
        # Let a burst of writes settle, then take the state we are about to load.
        await asyncio.sleep(0.05)
        current = await asyncio.to_thread(self.loader.scan)
        self._seen = current
        try:
            policy_set = await asyncio.to_thread(self.loader.load, current)
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
