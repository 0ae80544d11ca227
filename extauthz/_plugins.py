"""Packages whose modules register themselves (check kinds, identity sources) on import."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable


def import_submodules(package: str, path: Iterable[str]) -> None:
    """Import every public module of ``package``: adding a file is all it takes to add a kind."""
    for module in pkgutil.iter_modules(list(path)):
        if not module.name.startswith("_"):
            importlib.import_module(f"{package}.{module.name}")
