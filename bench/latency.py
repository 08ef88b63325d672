"""Commit → HTTP request received, at a steady rate of 1-row transactions (goal 4).

A paced writer starts one transaction every 1/rate seconds (on a few connections, so a slow
commit does not delay the schedule), takes ``time.time()`` as soon as its COMMIT returns and
keys it by the case ID it wrote.  The receiver (another process) records ``time.time()`` when
the request arrives; both clocks are this machine's.  The difference can be slightly negative:
the daemon may see a commit before the writer's client library has returned from it.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from . import variants as V
from .context import Ctx
from .report import Table
from .sqlq import BQ
from .stats import percentile
from .writers import NotifyCounter

WRITER_CONNECTIONS = 8
CASE_ID = re.compile(r"CaseID=([^&]+)")


@dataclass
class LatencyResult:
    rate: int
    sent: int
    received: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    achieved_rate: float
    notifies: int
    daemon_cpu_pct: float | None


async def _paced_writes(dsn: str, prefix: str, rate: int, seconds: float) -> tuple[dict[str, float], float]:
    """Write ``rate`` cases per second for ``seconds``; return {case_id: commit time} and the rate achieved."""
    conns = [await psycopg.AsyncConnection.connect(dsn, autocommit=True) for _ in range(WRITER_CONNECTIONS)]
    free: asyncio.Queue[psycopg.AsyncConnection] = asyncio.Queue()
    for c in conns:
        free.put_nowait(c)
    commits: dict[str, float] = {}
    total = int(rate * seconds)

    async def write(case_id: str) -> None:
        conn = await free.get()
        try:
            await conn.execute(BQ.insert_named, {"case_id": case_id}, prepare=True)
            commits[case_id] = time.time()
        finally:
            free.put_nowait(conn)

    try:
        async with asyncio.TaskGroup() as tg:
            start = time.monotonic()
            for i in range(total):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tg.create_task(write(f"{prefix}-{i}"))
        elapsed = time.monotonic() - start
    finally:
        for c in conns:
            await c.close()
    return commits, total / elapsed if elapsed > 0 else 0.0


def _measure(ctx: Ctx, prefix: str, rate: int, counter: NotifyCounter,
             daemon_cpu: Callable[[], float | None]) -> LatencyResult:
    s = ctx.sizes
    ctx.rx.reset()
    n0 = counter.settle()
    cpu0 = daemon_cpu()
    commits, achieved = asyncio.run(_paced_writes(ctx.db.dsn, prefix, rate, s.latency_warmup + s.latency_seconds))
    cpu1 = daemon_cpu()
    wall = s.latency_warmup + s.latency_seconds
    ctx.rx.wait_count(len(commits), timeout=30)
    n1 = counter.settle()
    arrivals: dict[str, float] = {}
    for at, target in ctx.rx.records():
        m = CASE_ID.search(target)
        if m and m.group(1).startswith(prefix + "-"):
            arrivals.setdefault(m.group(1), at)
    skip = int(rate * s.latency_warmup)   # the warm-up's events are written but not counted
    lat = sorted((arrivals[f"{prefix}-{i}"] - commits[f"{prefix}-{i}"]) * 1000
                 for i in range(skip, len(commits)) if f"{prefix}-{i}" in arrivals and f"{prefix}-{i}" in commits)
    return LatencyResult(rate, len(commits), len(arrivals), percentile(lat, 50), percentile(lat, 90),
                         percentile(lat, 99), lat[-1] if lat else float("nan"), achieved, n1 - n0,
                         (cpu1 - cpu0) / wall * 100 if cpu0 is not None and cpu1 is not None else None)


def latency(ctx: Ctx) -> list[LatencyResult]:
    s = ctx.sizes
    ctx.log(f"latency at {', '.join(map(str, s.latency_rates))} events/s, {s.latency_seconds:g} s each")
    ctx.reset(V.BRIDGE)
    ctx.set_urls(["/latency"])
    runs: list[tuple[str, LatencyResult]] = []
    # The real daemon at every rate, then the prototype daemon at the highest rate only.
    plan = [("as is", s.latency_rates)]
    for label, rates in plan:
        with ctx.daemon() as daemon, NotifyCounter(ctx.db.dsn) as counter:
            for rate in rates:
                res = _measure(ctx, f"lat{len(runs)}r{rate}", rate, counter, daemon.cpu_seconds)
                runs.append((label, res))
                ctx.log(f"    {label:9} {rate:5d}/s: p50 {res.p50_ms:.2f} ms, p99 {res.p99_ms:.2f} ms, "
                        f"{res.received}/{res.sent} received")
                ctx.wait_drained(30)
    t = Table("Latency: commit returned (writer) → request arrived (receiver), 1 URL",
              ["daemon", "events/s", "achieved", "events", "p50 ms", "p90 ms", "p99 ms", "max ms",
               "notifying commits", "daemon CPU"])
    for label, r in runs:
        t.rows.append([label, str(r.rate), f"{r.achieved_rate:.0f}", f"{r.received}/{r.sent}", f"{r.p50_ms:.2f}",
                       f"{r.p90_ms:.2f}", f"{r.p99_ms:.2f}", f"{r.max_ms:.2f}", f"{r.notifies} / {r.sent}",
                       "n/a" if r.daemon_cpu_pct is None else f"{r.daemon_cpu_pct:.0f} %"])
    t.notes.append(f"{WRITER_CONNECTIONS} writer connections, one 1-row INSERT transaction every 1/rate s; "
                   f"the first {s.latency_warmup:g} s of each rate are not counted; daemon with default "
                   f"settings (poll interval 2 s).")
    ctx.report.tables.append(t)
    at200 = next((r for label, r in runs if r.rate == 200 and label == "as is"), None)
    if at200:
        ok = at200.p50_ms < 3 and at200.p99_ms < 15 and at200.received == at200.sent
        ctx.report.set("4", f"p50 {at200.p50_ms:.2f} ms, p99 {at200.p99_ms:.2f} ms", ok)
    return [r for _, r in runs]
