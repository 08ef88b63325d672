"""The per-call steps of a delivery, timed one by one in this process (``python -m bench.profile_calls
--micro``, or ``python -m bench.micro_calls``): what the daemon's Python spends on each call besides
the HTTP client.  Only public functions that exist since the per-URL plans and before them are
used, so the same file times an older tree too (copy it there and run it from that tree).

The HTTP steps use the daemon's own client (``bridge.http.make_client``): ``attempt()`` on a
transport that answers 200 in-process (our code plus httpx, no socket), and one request at a time
on loopback to the bench receiver through the daemon's transport versus plain aiohttp (CPU time of
this process per request, kernel included).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import anyio.lowlevel
import httpx

from bridge.calls import build_call, call_secrets
from bridge.deliver import RetryPolicy, attempt
from bridge.http import AddressPolicy, BridgeTransport, make_client
from bridge.models import Delivery, Outcome
from bridge.settings import Settings

from .procs import ReceiverProcess

N = 20_000
ROW: dict[str, Any] = dict(
    id=1, event_id=7, object="case", event="create", ids=["acc-1", "c123"], status="in_flight", attempts=0,
    trigger_id=1, url="http://127.0.0.1:9/drain0", timeout_ms=None, max_attempts=None, retry_schedule=None,
    max_in_flight=None, id_params=["AccountID", "CaseID"], ordered=False, method=None, headers=None,
    follow_redirects=None, signing_secret=None, row=None)
SIGNED: dict[str, Any] = dict(
    ROW, trigger_id=2, method="POST", headers='{"X-Api-Key": "abcdefgh12345678", "X-Tenant": "acme"}',
    signing_secret="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")


def _row(base: dict[str, Any], i: int) -> dict[str, Any]:
    # Fresh strings per call, as psycopg makes them for every fetched row.
    return {**base, "id": i, "event_id": i, "ids": [f"acc-{i % 100}", f"c{i}"], "url": "".join(base["url"]),
            "headers": None if base["headers"] is None else "".join(base["headers"]),
            "event_created_at": datetime.now(UTC)}


def timed(label: str, fn: Callable[[], object], n: int = N) -> tuple[str, float]:
    best = min(_loop(fn, n) for _ in range(5))
    return label, best


def _loop(fn: Callable[[], object], n: int) -> float:
    t0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t0) / n * 1e6


class _Answer200(httpx.AsyncBaseTransport):
    """Answers every request 200 in-process: attempt() timed without a socket."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, request=request)


async def _async_steps() -> list[tuple[str, float]]:
    out = []
    settings = Settings()
    policy = RetryPolicy(settings)
    for label, base in (("attempt(), GET, in-process 200 (our code + httpx)", ROW),
                        ("attempt(), POST signed + 2 headers, in-process 200", SIGNED)):
        client = make_client(policy=AddressPolicy(deny=()))
        client._transport = _Answer200()  # the daemon's client (headers, cookies policy), no socket
        ds = [Delivery.from_row(_row(base, i)) for i in range(N)]
        best = float("inf")
        for _ in range(3):
            t0 = time.process_time()
            for d in ds:
                o: Outcome = await attempt(client, policy, d, settings)
            best = min(best, (time.process_time() - t0) / N * 1e6)
            assert o.status == "delivered", o
        out.append((label, best))
        await client.aclose()

    async def nothing() -> None:
        pass

    async def anyio_deadline() -> None:
        with anyio.fail_after(15):
            await nothing()

    async def asyncio_deadline() -> None:
        async with asyncio.timeout(15):
            await nothing()

    for label, fn in (("deadline per call: anyio.fail_after (enter + exit)", anyio_deadline),
                      ("deadline per call: asyncio.timeout (enter + exit)", asyncio_deadline)):
        best = float("inf")
        for _ in range(5):
            t0 = time.process_time()
            for _ in range(N):
                await fn()
            best = min(best, (time.process_time() - t0) / N * 1e6)
        out.append((label, best))

    async def one() -> None:
        await anyio.lowlevel.checkpoint()

    async def tasks() -> None:
        async with anyio.create_task_group() as tg:
            for i in range(N):
                tg.start_soon(one)
                if i % 32 == 31:
                    await anyio.lowlevel.checkpoint()

    async def handoffs() -> None:
        queue: asyncio.Queue[int] = asyncio.Queue()
        done = anyio.Event()
        sent = 0

        async def sender() -> None:
            nonlocal sent
            while True:
                await queue.get()
                await anyio.lowlevel.checkpoint()
                sent += 1
                if sent == N:
                    done.set()

        async with anyio.create_task_group() as tg:
            for _ in range(32):
                tg.start_soon(sender)
            for i in range(N):
                queue.put_nowait(i)
                if i % 32 == 31:
                    await anyio.lowlevel.checkpoint()
            await done.wait()
            tg.cancel_scope.cancel()

    for label, run in (("a task per call: anyio start_soon → done (incl. one yield)", tasks),
                       ("a queue handoff per call to 32 senders (incl. one yield)", handoffs)):
        best = float("inf")
        for _ in range(3):
            t0 = time.process_time()
            await run()
            best = min(best, (time.process_time() - t0) / N * 1e6)
        out.append((label, best))
    return out


async def _loopback(url: str, n: int) -> list[tuple[str, float]]:
    """One request at a time: CPU of this process per request (kernel included), best of 3."""
    target = f"{url}?AccountID=a&CaseID=b"
    client = make_client(policy=AddressPolicy(deny=()))
    assert isinstance(client._transport, BridgeTransport)
    await client.send(client.build_request("GET", target, timeout=15.0))
    best = float("inf")
    for _ in range(3):
        c0 = time.process_time()
        for _ in range(n):
            await client.send(client.build_request("GET", target, timeout=15.0))
        best = min(best, (time.process_time() - c0) / n * 1e6)
    await client.aclose()
    out = [("httpx build_request + send, daemon's client (loopback)", best)]
    best = float("inf")
    async with aiohttp.ClientSession() as session:
        async with session.get(target) as resp:
            await resp.read()
        for _ in range(3):
            c0 = time.process_time()
            for _ in range(n):
                async with session.get(target) as resp:
                    await resp.read()
            best = min(best, (time.process_time() - c0) / n * 1e6)
    out.append(("plain aiohttp session.get (loopback)", best))
    return out


def main() -> int:
    rows: list[tuple[str, float]] = []
    rows.append(timed("Delivery.from_row", lambda: Delivery.from_row(_row(ROW, 1))))
    rows.append(timed("  (making the row dict itself, subtract)", lambda: _row(ROW, 1)))
    d_get = [Delivery.from_row(_row(ROW, i)) for i in range(N)]
    d_post = [Delivery.from_row(_row(SIGNED, i)) for i in range(N)]
    it = iter(d_get * 6)
    rows.append(timed("build_call, GET", lambda: build_call(next(it))))
    it2 = iter(d_post * 6)
    rows.append(timed("build_call, POST signed + 2 headers", lambda: build_call(next(it2))))
    it3 = iter(d_get * 6)
    rows.append(timed("call_secrets (computed per call before plans)", lambda: call_secrets(next(it3))))
    quiet = logging.getLogger("crm_bridge.bench.micro")
    quiet.setLevel(logging.INFO)
    rows.append(timed("log.debug(...) when DEBUG is off", lambda: quiet.debug("delivery %d (%s/%s) in %d ms",
                                                                               1, "case", "create", 3)))
    try:
        from bridge.metrics import Metrics
        metrics = Metrics()
        ok = Outcome("delivered", http_status=200, duration_ms=1)
        d = d_get[0]
        rows.append(timed("metrics: Metrics.observe (on_outcome)", lambda: metrics.observe(d, ok)))
    except Exception as exc:  # prometheus-client not installed
        print(f"(metrics not timed: {exc})", file=sys.stderr)
    rows += anyio.run(_async_steps)
    workdir = Path(tempfile.mkdtemp(prefix="crm-bridge-micro-"))
    try:
        with ReceiverProcess(workdir) as rx:
            rows += anyio.run(_loopback, rx.url("/micro"), 3000)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("µs of CPU per call (this process; best of repeats where repeated):")
    for label, us in rows:
        print(f"  {us:8.2f}  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
