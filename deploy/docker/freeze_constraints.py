#!/usr/bin/env python3
"""Write constraints.txt: exact pins of extauthz's runtime dependencies and everything they pull in.

    python deploy/docker/freeze_constraints.py            # from the current environment
    python deploy/docker/freeze_constraints.py --check    # exit 1 if constraints.txt misses a runtime dep

The Dockerfile installs with ``-c constraints.txt``, so an image built today and one built next month
contain the same versions. Run it in the environment the tests passed in, and commit the result.
Test-only packages are not pinned (they never reach the image).
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
TARGET = ROOT / "constraints.txt"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_closure(root: str = "extauthz") -> dict[str, str]:
    """name -> installed version for the runtime requirements of ``root``, recursively (no extras)."""
    seen: dict[str, str] = {}
    todo = [Requirement(r) for r in metadata.requires(root) or []]
    todo = [r for r in todo if not r.marker or r.marker.evaluate({"extra": ""})]
    while todo:
        req = todo.pop()
        name = _canonical(req.name)
        if name in seen:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue
        seen[name] = dist.version
        for extra in req.extras:
            todo += [Requirement(r) for r in dist.requires or [] if Requirement(r).marker
                     and Requirement(r).marker.evaluate({"extra": extra})]  # fmt: skip
        todo += [Requirement(r) for r in dist.requires or []
                 if not Requirement(r).marker or Requirement(r).marker.evaluate({"extra": ""})]  # fmt: skip
    return seen


def render(pins: dict[str, str]) -> str:
    head = ("# Exact versions of extauthz's runtime dependencies, for reproducible images (Dockerfile).\n"
            "# Regenerate with: python deploy/docker/freeze_constraints.py\n")  # fmt: skip
    return head + "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    pins = runtime_closure()
    if args.check:
        have = {_canonical(line.split("==")[0]) for line in TARGET.read_text().splitlines() if "==" in line}
        missing = sorted(set(pins) - have)
        for name in missing:
            print(f"constraints.txt does not pin {name}")
        return 1 if missing else 0
    TARGET.write_text(render(pins))
    print(f"wrote {TARGET.relative_to(ROOT)} ({len(pins)} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
