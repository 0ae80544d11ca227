"""Fixtures shared by every test folder."""

from __future__ import annotations

import itertools
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# tests/redisd.py (real redis-server processes) is importable from every test folder as ``redisd``.
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def policy_dir(tmp_path: Path) -> Callable[..., Path]:
    """Write policy files into a fresh folder: ``policy_dir(**{"a.yaml": "..."})``; returns the folder."""
    folder = tmp_path / "policies"
    folder.mkdir()

    def write(**files: str) -> Path:
        for name, text in files.items():
            (folder / name).write_text(textwrap.dedent(text))
        return folder

    return write


def _policy_yaml(name: str, spec: str) -> str:
    body = textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ")
    return f"apiVersion: extauthz.dev/v1\nkind: AuthPolicy\nmetadata:\n  name: {name}\nspec:\n{body}\n"


@pytest.fixture
def policy_yaml() -> Callable[[str, str], str]:
    """``policy_yaml(name, spec)``: one AuthPolicy document; ``spec`` is the YAML under ``spec:``."""
    return _policy_yaml


def _yaml_bomb(levels: int = 10, width: int = 9) -> str:
    """A "billion laughs" YAML: each level an anchored list of ``width`` aliases of the one before,
    so ``levels`` levels stand for width**levels strings (10 levels: about 450 bytes)."""
    names = [chr(ord("a") + i) for i in range(levels)]
    lines = [f"{names[0]}: &{names[0]} [{', '.join(['lol'] * width)}]"]
    lines += [f"{name}: &{name} [{', '.join([f'*{before}'] * width)}]" for before, name in itertools.pairwise(names)]
    return "\n".join(lines) + "\n"


@pytest.fixture
def yaml_bomb() -> Callable[..., str]:
    """``yaml_bomb(levels=10, width=9)``: a billion-laughs YAML document (nested anchors and aliases)."""
    return _yaml_bomb


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """``redis_factory(**options)``: a real redis-server on a free port (tests/redisd.py RedisServer).

    Never the system Redis on 6379. Each server can be killed and restarted mid-test; all are
    stopped by pid at the end. Skips the test when redis-server is not installed.
    """
    from redisd import RedisServer, redis_server_binary

    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
    servers: list[RedisServer] = []

    def start(**options: Any) -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(servers)}", **options)
        servers.append(server)
        return server.start()

    yield start
    for server in reversed(servers):
        server.stop()


@pytest.fixture
def redis_server(redis_factory: Callable[..., Any]) -> Any:
    """One real redis-server for this test (``.url``, ``.port``, ``.kill()``, ``.start()``, ``.client()``)."""
    return redis_factory()


def _children(pid: int) -> set[int]:
    """Pids whose parent is ``pid``, from /proc (Linux)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # after "(command)": the state, then the ppid
                found.add(int(entry.name))
    return found


def _running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def processes() -> Any:
    """``processes.children(pid)`` (the pids of its children) and ``processes.running(pid)``, from /proc;
    skips the test where there is no /proc."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc (Linux)")
    from types import SimpleNamespace

    return SimpleNamespace(children=_children, running=_running)
