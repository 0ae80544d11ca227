"""Time limits for Checks that wait on I/O, with one timer for all of them.

``asyncio.timeout`` arms and disarms a timer per Check (a Timeout object, a TimerHandle, its
cancellation), which on the request path of a policy that waits on Redis costs more than the rest
of the bookkeeping together. A Check's limit is a safety net, not a schedule: one sweep timer that
runs while any Check is waiting, cancels those past their deadline and turns the cancellation into
``TimeoutError`` (as ``asyncio.timeout`` does) gives the same guarantee for a dictionary insert and
removal per Check. A deadline is honoured at most a tenth of the limit late (at most 50 ms).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

__all__ = ["DeadlineWatch"]

T = TypeVar("T")

#: The sweep runs at least this often while Checks wait, and at most every limit / 10.
_MAX_SLACK = 0.05


class DeadlineWatch:
    """Runs awaitables under a time limit; one per Authorizer (and so per event loop at a time)."""

    __slots__ = ("_expired", "_loop", "_timer", "_timer_at", "_waiting")

    def __init__(self) -> None:
        #: task -> (deadline, slack), in the order the Checks started.
        self._waiting: dict[asyncio.Task[object], tuple[float, float]] = {}
        self._expired: set[asyncio.Task[object]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self, awaitable: Awaitable[T], limit: float) -> T:
        """Await ``awaitable``; raise TimeoutError if it is not done ``limit`` seconds from now."""
        task = asyncio.current_task()
        if task is None:
            # Started inline, outside any Task (the HTTP listener makes each decision in the
            # callback that parsed its request, see extauthz.wire.http_authz): yield once, bare,
            # so the caller hands the rest to a Task (a Task takes a bare yield as "step me again
            # soon") and the limit has a Task to cancel. The cost is paid only by Checks that may
            # wait; the others never leave the callback.
            await asyncio.sleep(0)
            task = asyncio.current_task()
        if task is None:  # still not in a task: nothing to cancel, fall back to the standard way
            async with asyncio.timeout(limit):
                return await awaitable
        loop = task.get_loop()
        if loop is not self._loop:  # a new event loop (tests): what the old one held is gone
            self._reset(loop)
        slack = min(_MAX_SLACK, limit / 10)
        deadline = loop.time() + limit
        self._waiting[task] = (deadline, slack)
        if self._timer is None or deadline + slack < self._timer_at:
            self._arm(loop, deadline)
        cancelling = task.cancelling()
        try:
            return await awaitable
        except asyncio.CancelledError:
            if task in self._expired:
                self._expired.discard(task)
                if task.uncancel() <= cancelling:  # our cancellation, and nobody else's: a timeout
                    raise TimeoutError from None
            raise
        finally:
            self._waiting.pop(task, None)
            if task in self._expired:  # cancelled, but what it awaited swallowed that and finished
                self._expired.discard(task)
                task.uncancel()

    def _sweep(self) -> None:
        loop = self._loop
        assert loop is not None
        self._timer = None
        now = loop.time()
        expired = [task for task, (deadline, _) in self._waiting.items() if deadline <= now]
        for task in expired:
            del self._waiting[task]
            self._expired.add(task)
            task.cancel()
        if self._waiting:
            deadline, slack = min(self._waiting.values())
            # Never sooner than the slack allows: under steady load the next deadline is always
            # just ahead, and a sweep per Check would cost more than the timers it replaces.
            self._arm(loop, max(deadline, now + slack))

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(when, self._sweep)
        self._timer_at = when

    def _reset(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._waiting.clear()
        self._expired.clear()
        self._loop = loop
