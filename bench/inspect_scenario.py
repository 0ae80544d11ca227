"""The ``inspect`` sidecar scenario of bench/run.py: a POST with a 1 KB JSON body that Envoy forwards,
decided by the orders-api example policy with payload inspection on (``inspect: {}``, every default).

Its baseline row (b:inspect) is the allow-all server receiving exactly the same request (the same
body forwarded in the CheckRequest), so the ratio is what inspecting the payload costs on top of the
cheapest authorization server; comparing with the plain ``extauthz`` row gives the inspector's share.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from inspect_bench import typical_body  # noqa: E402  (the same 1 KB body as the in-process figure)


def policy_with_inspection() -> str:
    """policies/orders.yaml's orders-api document with ``inspect: {}`` added to its spec."""
    text = (ROOT / "policies" / "orders.yaml").read_text()
    first = text.split("\n---", 1)[0].rstrip("\n")
    return first + "\n  inspect: {}\n"


@contextlib.contextmanager
def inspect_setup(workdir: Path) -> Iterator[dict]:
    (workdir / "policies").mkdir(parents=True, exist_ok=True)
    (workdir / "policies" / "orders-inspect.yaml").write_text(policy_with_inspection())
    yield {
        "extra_args": ["--policies", str(workdir / "policies")],
        "method": "POST",
        "path": "/api/orders",
        "headers": {"Content-Type": "application/json"},
        "body": typical_body(),
    }
