"""bridge/aio.py: the per-call deadline and the per-URL slots of the daemon's hot path, on a real
event loop (the daemon's own timeouts and limits are covered end to end in test_deliver,
test_daemon and test_url_protection)."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from bridge import aio
from bridge.aio import Slots, deadline

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def test_a_call_past_its_deadline_gets_timeouterror_not_before() -> None:
    async def main() -> float:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            async with deadline(0.05):
                await asyncio.sleep(5)
        return time.monotonic() - started

    elapsed = run(main())
    assert 0.05 <= elapsed < 2


def test_a_call_that_ended_in_time_is_never_cancelled_later() -> None:
    async def main() -> None:
        async with deadline(0.02):
            await asyncio.sleep(0)
        await asyncio.sleep(0.1)   # past the deadline: the ended call must not be touched
        keeper = aio._current
        assert keeper is not None and not keeper.running
        assert len(keeper) == 0    # the sweep dropped the lane entry once the deadline passed

    run(main())


def test_a_shorter_deadline_fires_before_a_longer_one_set_earlier() -> None:
    order: list[str] = []

    async def call(name: str, seconds: float) -> None:
        try:
            async with deadline(seconds):
                await asyncio.sleep(5)
        except TimeoutError:
            order.append(name)

    async def main() -> None:
        long = asyncio.create_task(call("long", 0.3))
        await asyncio.sleep(0.01)
        short = asyncio.create_task(call("short", 0.05))
        await asyncio.gather(long, short)

    run(main())
    assert order == ["short", "long"]


def test_many_calls_of_one_lane_time_out_together_and_leave_nothing_behind() -> None:
    async def call(seconds: float) -> str:
        try:
            async with deadline(seconds):
                await asyncio.sleep(seconds * 20)
        except TimeoutError:
            return "timeout"
        return "ended"

    async def main() -> list[str]:
        results = await asyncio.gather(*(call(0.05) for _ in range(200)), *(call(0.5) for _ in range(5)))
        keeper = aio._current
        assert keeper is not None and not keeper.running and len(keeper) == 0
        return results

    assert run(main()) == ["timeout"] * 205


def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    async def victim() -> None:
        async with deadline(10):
            await asyncio.sleep(5)

    async def main() -> None:
        task = asyncio.create_task(victim())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert aio._current is not None and not aio._current.running

    run(main())


def test_deadline_needs_a_running_loop() -> None:
    with pytest.raises(RuntimeError):
        deadline(1.0)  # no running loop at all


def test_slots_admit_at_most_the_limit_first_come_first_served() -> None:
    async def main() -> tuple[int, list[int]]:
        slots = Slots(3)
        running = peak = 0
        order: list[int] = []

        async def call(i: int) -> None:
            nonlocal running, peak
            async with slots:
                order.append(i)
                running += 1
                peak = max(peak, running)
                await asyncio.sleep(0.01)
                running -= 1

        await asyncio.gather(*(call(i) for i in range(20)))
        assert slots.borrowed_tokens == 0 and slots.waiting == 0
        return peak, order

    peak, order = run(main())
    assert peak == 3
    assert order == list(range(20))


def test_raising_the_limit_admits_waiters_at_once_and_lowering_it_lets_holders_finish() -> None:
    async def main() -> None:
        slots = Slots(1)
        release = asyncio.Event()
        inside: list[int] = []

        async def call(i: int) -> None:
            async with slots:
                inside.append(i)
                await release.wait()

        tasks = [asyncio.create_task(call(i)) for i in range(4)]
        await asyncio.sleep(0.01)
        assert inside == [0] and slots.waiting == 3
        slots.total_tokens = 3
        await asyncio.sleep(0.01)
        assert inside == [0, 1, 2] and slots.waiting == 1
        slots.total_tokens = 1          # three holders keep their slots; the fourth waits
        release.set()
        await asyncio.gather(*tasks)
        assert inside == [0, 1, 2, 3] and slots.borrowed_tokens == 0

    run(main())


def test_a_cancelled_waiter_does_not_keep_or_lose_a_slot() -> None:
    async def main() -> None:
        slots = Slots(1)
        release = asyncio.Event()

        async def hold() -> None:
            async with slots:
                await release.wait()

        holder = asyncio.create_task(hold())
        await asyncio.sleep(0.01)
        waiter = asyncio.create_task(hold())
        await asyncio.sleep(0.01)
        assert slots.waiting == 1
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert slots.waiting == 0
        # A waiter admitted and cancelled before it ran hands its slot on.
        second = asyncio.create_task(hold())
        third = asyncio.create_task(hold())
        await asyncio.sleep(0.01)
        release.set()
        await asyncio.sleep(0)       # holder leaves: `second` is admitted but has not run yet
        second.cancel()
        await asyncio.wait_for(asyncio.gather(holder, third, second, return_exceptions=True), 5)
        assert slots.borrowed_tokens == 0 and slots.waiting == 0

    run(main())


def test_tune_gc_sets_the_daemons_thresholds() -> None:
    before = gc.get_threshold()
    try:
        aio.tune_gc()
        assert gc.get_threshold() == aio.GC_THRESHOLDS
    finally:
        gc.set_threshold(*before)
