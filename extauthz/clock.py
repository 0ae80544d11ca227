"""The wall clock that checks read, and the one place a policy test can stop it.

Token lifetimes, certificate validity, API-key expiry and signature freshness are judged against
``clock.wall()``. It is ``time.time()`` in the sidecar. ``extauthz test`` fixes it for a PolicyTest
with ``spec.clock`` (see :mod:`extauthz.policytest`), so a case that signs a token valid for an hour
or checks a five-minute signature window gives the same answer on every run, and a quota that a
case exhausts stays exhausted until a case moves the clock on.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["fixed", "set_fixed", "wall", "wall_us"]

#: The fixed time in seconds, or None for the real clock.
_fixed: float | None = None


def wall() -> float:
    """Seconds since the epoch: the real time, unless a policy test fixed it."""
    return time.time() if _fixed is None else _fixed


def wall_us() -> int:
    """:func:`wall` in whole microseconds (the in-process quota store's clock under a policy test)."""
    return time.time_ns() // 1000 if _fixed is None else int(_fixed * 1_000_000)


def set_fixed(at: float | None) -> None:
    """Fix the clock at ``at`` seconds (None: the real clock again)."""
    global _fixed
    _fixed = at


@contextmanager
def fixed(at: float | None) -> Iterator[None]:
    """Run a block with the clock fixed at ``at`` (None: the real clock), then restore it."""
    before = _fixed
    set_fixed(at)
    try:
        yield
    finally:
        set_fixed(before)
