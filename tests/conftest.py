"""Fixtures shared by every test folder."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest


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
