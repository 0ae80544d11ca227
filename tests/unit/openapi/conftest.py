"""Fixtures for the OpenAPI tests: specs written to disk and compiled, requests as Envoy sends them."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from extauthz.openapi import CompiledSpec, Settings, compile_spec

# openapi_material.py (requests, identities, spec skeletons) is importable from these tests.
sys.path.insert(0, str(Path(__file__).resolve().parent))


class NoAliases(yaml.SafeDumper):
    """Writes a value used twice in full (the sidecar refuses YAML anchors and aliases)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


@pytest.fixture
def spec_file(tmp_path: Path) -> Callable[..., Path]:
    """``spec_file(document, name="api.yaml", files={path: content})``: write a spec (a dict, or YAML
    text) and files beside it; return the spec's path."""

    def write(document: dict[str, Any] | str, name: str = "api.yaml",
              files: dict[str, dict[str, Any] | str] | None = None) -> Path:
        for file_name, content in {name: document, **(files or {})}.items():
            path = tmp_path / file_name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, str):
                path.write_text(textwrap.dedent(content))
            elif file_name.endswith(".json"):
                path.write_text(json.dumps(content))
            else:
                path.write_text(yaml.dump(content, Dumper=NoAliases, sort_keys=False))
        return tmp_path / name

    return write


@pytest.fixture
def compiled(spec_file: Callable[..., Path]) -> Callable[..., CompiledSpec]:
    """``compiled(document, **settings)``: the CompiledSpec of a spec document."""

    def build(document: dict[str, Any] | str, **settings: Any) -> CompiledSpec:
        return compile_spec(spec_file(document), Settings(**settings))

    return build
