"""DeadlineWatch: one sweep timer gives every waiting Check the guarantees of asyncio.timeout."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from extauthz.deadlines import DeadlineWatch


async def _sleep_then(value: str, seconds: float) -> str:
    await asyncio.sleep(seconds)
    return value


def test_finishing_in_time_returns_the_result_and_leaves_nothing_behind() -> None:
    watch = DeadlineWatch()

    async def main() -> list[str]:
        results = await asyncio.gather(*(watch.run(_sleep_then(str(i), 0.01), 1.0) for i in range(20)))
        return list(results)

    assert asyncio.run(main()) == [str(i) for i in range(20)]
    assert not watch._waiting and not watch._expired


def test_too_slow_raises_timeout_error_within_the_slack() -> None:
    watch = DeadlineWatch()

    async def main() -> float:
        began = time.perf_counter()
        with pytest.raises(TimeoutError):
            await watch.run(_sleep_then("late", 5.0), 0.2)
        return time.perf_counter() - began

    took = asyncio.run(main())
    assert 0.19 <= took < 0.2 + 0.05 + 0.2  # the slack, and room for a slow shared machine
    assert not watch._waiting and not watch._expired


def test_slow_and_fast_checks_side_by_side() -> None:
    watch = DeadlineWatch()

    async def one(seconds: float) -> str:
        try:
            return await watch.run(_sleep_then("ok", seconds), 0.1)
        except TimeoutError:
            return "timeout"

    async def main() -> list[str]:
        return list(await asyncio.gather(one(0.01), one(1.0), one(0.02), one(1.0), one(0.0)))

    assert asyncio.run(main()) == ["ok", "timeout", "ok", "timeout", "ok"]


def test_the_task_can_go_on_after_a_timeout() -> None:
    """The cancellation the watch used is taken back: the next await of the task is not cancelled."""
    watch = DeadlineWatch()

    async def main() -> str:
        with pytest.raises(TimeoutError):
            await watch.run(_sleep_then("late", 1.0), 0.05)
        assert asyncio.current_task().cancelling() == 0
        await asyncio.sleep(0.01)
        return await watch.run(_sleep_then("again", 0.01), 0.05)

    assert asyncio.run(main()) == "again"


def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    watch = DeadlineWatch()

    async def main() -> None:
        task = asyncio.create_task(watch.run(_sleep_then("never", 5.0), 10.0))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert not watch._waiting


def test_a_shorter_limit_after_a_longer_one_is_still_honoured() -> None:
    watch = DeadlineWatch()

    async def main() -> float:
        slow = asyncio.create_task(watch.run(_sleep_then("ok", 0.5), 5.0))  # arms the timer for 5 s
        await asyncio.sleep(0)
        began = time.perf_counter()
        with pytest.raises(TimeoutError):
            await watch.run(_sleep_then("late", 5.0), 0.05)
        took = time.perf_counter() - began
        assert await slow == "ok"
        return took

    assert asyncio.run(main()) < 0.4


def test_a_new_event_loop_starts_clean() -> None:
    watch = DeadlineWatch()
    for _ in range(2):
        with pytest.raises(TimeoutError):
            asyncio.run(watch.run(_sleep_then("late", 1.0), 0.05))
        assert asyncio.run(watch.run(_sleep_then("ok", 0.0), 0.05)) == "ok"


def test_started_outside_a_task_it_asks_for_one_and_keeps_its_limit() -> None:
    """The HTTP listener starts each decision inline, in a callback outside any Task: a Check that
    may wait yields once, bare; the listener hands the rest to a Task (extauthz.wire.http_authz._Resume)
    and the limit then holds as in any Task."""
    from extauthz.wire.http_authz import _Resume

    watch = DeadlineWatch()

    async def carried_on(coro: Any, yielded: Any) -> Any:
        return await _Resume(coro, yielded)

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        results = []
        for seconds in (0.0, 5.0):
            started: asyncio.Future[tuple[Any, Any]] = loop.create_future()

            def start(seconds: float = seconds, started: asyncio.Future[tuple[Any, Any]] = started) -> None:
                assert asyncio.current_task() is None  # a plain callback of the loop
                coro = watch.run(_sleep_then("ok", seconds), 0.2)
                started.set_result((coro, coro.send(None)))

            loop.call_soon(start)
            coro, yielded = await started
            assert yielded is None  # the bare yield: "carry me on in a Task"
            try:
                results.append(await loop.create_task(carried_on(coro, yielded)))
            except TimeoutError:
                results.append("timeout")
        return results

    assert asyncio.run(main()) == ["ok", "timeout"]
    assert not watch._waiting and not watch._expired
