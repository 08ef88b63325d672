"""The two asyncio primitives of the daemon's per-call path, made for thousands of calls a second:
``deadline()`` (a per-call time limit) and ``Slots`` (a URL's max_in_flight).

Per-call deadlines without a timer per call.
``asyncio.timeout()`` schedules a timer handle for every call and cancels it when the call ends: at
thousands of calls a second that was ~15 µs of the daemon's ~225 µs of CPU per call (bench/FINDINGS.md).
Here a call only appends itself to the lane of its timeout length; since every call of a lane has
the same length, a lane is ordered by deadline, and ONE loop timer, set for the earliest head of
any lane, expires the calls still running when it fires (it cancels their task, and the call's
``async with`` turns that cancellation into ``TimeoutError``, exactly as ``asyncio.timeout`` does).
Calls that ended stay in their lane as a (deadline, key) pair of plain numbers until their deadline
passes.

Use: ``async with deadline(seconds): ...`` inside a task, on the event loop's thread.

``Slots`` replaces anyio's CapacityLimiter (6.3 µs per ``async with``, it tracks its borrowers by
task) with a counter and a FIFO of waiters (0.5 µs, as asyncio.Semaphore), and its limit may change
while calls hold slots (an admin changes max_in_flight).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
from collections import deque
from types import TracebackType


class _Call:
    __slots__ = ("cancelling", "expired", "keeper", "key", "task")

    def __init__(self, keeper: Deadlines, key: int, task: asyncio.Task[object]) -> None:
        self.keeper = keeper
        self.key = key
        self.task = task
        self.expired = False
        self.cancelling = task.cancelling()

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        if not self.expired:
            self.keeper.running.pop(self.key, None)
        # The same rule as asyncio.Timeout: only our own cancellation becomes TimeoutError.
        elif self.task.uncancel() <= self.cancelling and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc
        return None


class Deadlines:
    """The deadlines of one event loop: lanes by timeout length, one timer for all of them.

    A lane holds (deadline, key) pairs, plain numbers that the garbage collector does not track;
    the calls still running are in ``running`` by key (an ended call leaves it at once)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.running: dict[int, _Call] = {}
        self._lanes: dict[float, deque[tuple[float, int]]] = {}
        self._keys = itertools.count()
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        """Entries held (running calls, and ended ones whose deadline has not passed yet)."""
        return sum(len(lane) for lane in self._lanes.values())

    def enter(self, seconds: float) -> _Call:
        task = asyncio.current_task(self.loop)
        if task is None:
            raise RuntimeError("deadline() must be used inside a task")
        key = next(self._keys)
        when = self.loop.time() + seconds
        call = self.running[key] = _Call(self, key, task)
        lane = self._lanes.get(seconds)
        if lane is None:
            lane = self._lanes[seconds] = deque()
        lane.append((when, key))
        if self._timer is None or when < self._timer.when():
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(when, self._sweep)
        return call

    def _sweep(self) -> None:
        """Expire every running call whose deadline has passed; set the timer for the next one.
        A lane that empties goes (there are as many lanes as timeout lengths in recent use)."""
        self._timer = None
        now = self.loop.time()
        earliest: float | None = None
        running = self.running
        for seconds in list(self._lanes):
            lane = self._lanes[seconds]
            while lane and lane[0][0] <= now:
                call = running.pop(lane.popleft()[1], None)
                if call is not None:
                    call.expired = True
                    call.task.cancel()
            if not lane:
                del self._lanes[seconds]
            elif earliest is None or lane[0][0] < earliest:
                earliest = lane[0][0]
        if earliest is not None:
            self._timer = self.loop.call_at(earliest, self._sweep)


_current: Deadlines | None = None


def deadline(seconds: float) -> _Call:
    """An ``async with`` block that raises TimeoutError once ``seconds`` have passed."""
    global _current
    loop = asyncio.get_running_loop()
    keeper = _current
    if keeper is None or keeper.loop is not loop:
        keeper = _current = Deadlines(loop)
    return keeper.enter(seconds)


class Slots:
    """At most ``total_tokens`` holders at once, first come first served.  Lowering the limit
    lets the holders finish; raising it admits waiters at once."""

    __slots__ = ("_total", "_used", "_waiters")

    def __init__(self, total_tokens: int) -> None:
        self._total = total_tokens
        self._used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def total_tokens(self) -> int:
        return self._total

    @total_tokens.setter
    def total_tokens(self, value: int) -> None:
        self._total = value
        self._admit()

    @property
    def borrowed_tokens(self) -> int:
        return self._used

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def __aenter__(self) -> None:
        if self._used < self._total and not self._waiters:
            self._used += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self._used -= 1     # admitted, then cancelled before it ran: hand the slot on
                self._admit()
            else:
                with contextlib.suppress(ValueError):   # admitted and cancelled: already gone
                    self._waiters.remove(fut)
            raise

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._used -= 1
        self._admit()

    def _admit(self) -> None:
        while self._waiters and self._used < self._total:
            fut = self._waiters.popleft()
            if not fut.done():
                self._used += 1
                fut.set_result(None)


# The daemon's garbage-collector thresholds (gc.set_threshold): a young-generation collection every
# 20,000 allocations instead of 700, and the older ones 20 and 100 times rarer than that.  Each call
# allocates ~100 short-lived objects (httpx and aiohttp requests and responses), so with Python's
# defaults the collector ran every ~7 calls and an older-generation pass, which walks every live
# object, every ~70; measured with bench/profile_calls: 4,530 -> 4,950 deliveries/s (+9 %) at the
# same CPU, peak RSS unchanged (cyclic garbage lives a little longer, reference-counted memory is
# freed at once as before).
GC_THRESHOLDS = (20_000, 20, 100)


def tune_gc() -> None:
    """Set the daemon's garbage-collector thresholds (GC_THRESHOLDS); once, at start-up."""
    gc.set_threshold(*GC_THRESHOLDS)
