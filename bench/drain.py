"""Delivery throughput: raw-client ceilings, the backlog drain and fan-out (goals 5 and 6).

Raw clients and the daemon are measured against the same receiver, interleaved (raw, raw,
drain, raw, raw).  Rates on the wire are taken from the receiver's own arrival times (first to
last request), so client start-up is not counted for anyone.  The daemon's end-to-end rate is
stricter: deliveries recorded as delivered ÷ (last outcome written - first claim), from the
database's own timestamps.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass

from . import variants as V
from .context import Ctx
from .procs import REPO
from .report import Table
from .sqlq import BQ, render
from .stats import median

RAW_LIBS = ("aiohttp", "httpx-aiohttp")
PER_URL_CONCURRENCY = 32     # the daemon's default max_in_flight per URL
TOTAL_CONCURRENCY = 512      # the daemon's default concurrency (all URLs together)
WRITE_CHUNK = 10_000         # backlog rows per INSERT statement


@dataclass
class Drain:
    events: int
    deliveries: int              # recorded as delivered
    other: int                   # deliveries in any other state when measured
    complete: bool               # everything drained within the time limit
    db_rate: float               # delivered ÷ database window (first claim → last outcome)
    wire_rate: float             # receiver: first → last arrival
    seconds: float
    peak_rss_mb: float | None
    daemon_cpu_pct: float | None
    receiver_cpu_pct: float | None

    @property
    def status(self) -> str:
        return "drained" if self.complete else f"NOT drained in {self.seconds:.0f} s"


def _wire_rate(ctx: Ctx) -> tuple[int, float]:
    times = sorted(at for at, _ in ctx.rx.records())
    if len(times) < 2 or times[-1] <= times[0]:
        return len(times), 0.0
    return len(times), (len(times) - 1) / (times[-1] - times[0])


def raw(ctx: Ctx, lib: str, concurrency: int, count: int) -> float:
    """Requests/s of a raw client process at ``concurrency`` (receiver-side)."""
    ctx.rx.reset()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.rawclient", "--lib", lib, "--url", ctx.rx.url("/raw"),
         "--count", str(count), "--concurrency", str(concurrency)],
        cwd=REPO, capture_output=True, text=True, timeout=max(60, count / 100))
    if proc.returncode != 0:
        raise RuntimeError(f"raw client {lib} failed:\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["errors"]:
        raise RuntimeError(f"raw client {lib}: {result['errors']} non-200 answers")
    n, rate = _wire_rate(ctx)
    ctx.log(f"    raw {lib:14} x{concurrency:<4} {rate:7.0f} req/s ({n} requests)")
    return rate


def write_backlog(ctx: Ctx, events: int) -> None:
    """``events`` new cases while no daemon runs (their outbox rows wait)."""
    left = events
    while left > 0:
        n = min(WRITE_CHUNK, left)
        ctx.conn.execute(render("insert_many", rows=n))
        left -= n


def drain(ctx: Ctx, events: int, urls: int, limit: float) -> Drain:
    """Write a backlog of ``events`` for ``urls`` URLs with the daemon down, then time the drain
    (at most ``limit`` seconds: a daemon that is too slow is measured, not waited for)."""
    ctx.reset(V.BRIDGE_STOPPED)
    ctx.set_urls([f"/drain{i}" for i in range(urls)])
    write_backlog(ctx, events)
    ctx.conn.execute(BQ.checkpoint)
    ctx.rx.reset()
    rx0 = ctx.rx.cpu_seconds()
    with ctx.daemon() as daemon:
        t0 = time.monotonic()
        cpu0 = daemon.cpu_seconds()
        complete = ctx.wait_drained(timeout=limit)
        seconds = time.monotonic() - t0
        cpu1 = daemon.cpu_seconds()
        rss = daemon.peak_rss_mb()
        row = ctx.conn.execute(BQ.delivery_window).fetchone()
    rx1 = ctx.rx.cpu_seconds()
    assert row is not None
    delivered, other, window = int(row[0]), int(row[1]), float(row[2] or 0.0)
    if not complete:
        # Not finished: the rate so far, over the whole time the daemon had.
        window = seconds
        other = events * urls - delivered
    _, wire = _wire_rate(ctx)
    return Drain(events, delivered, other, complete, delivered / window if window else 0.0, wire, seconds, rss,
                 (cpu1 - cpu0) / seconds * 100 if cpu0 is not None and cpu1 is not None else None,
                 (rx1 - rx0) / seconds * 100 if rx0 is not None and rx1 is not None else None)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f} %"


def backlog_and_ceiling(ctx: Ctx) -> Drain:
    """Goals 5 and 6: raw ceilings at the daemon's per-URL concurrency around a backlog drain."""
    s = ctx.sizes
    ctx.log(f"raw clients x{PER_URL_CONCURRENCY} around a drain of {s.backlog_events:,} events (1 URL)")
    rates: dict[str, list[float]] = {lib: [] for lib in RAW_LIBS}
    for lib in RAW_LIBS:
        rates[lib].append(raw(ctx, lib, PER_URL_CONCURRENCY, s.raw_requests))
    d = drain(ctx, s.backlog_events, 1, s.drain_limit)
    ctx.log(f"    drain: {d.db_rate:.0f} deliveries/s end to end, {d.wire_rate:.0f}/s on the wire, "
            f"peak RSS {_fmt_mb(d.peak_rss_mb)}, {d.status}")
    for lib in reversed(RAW_LIBS):
        rates[lib].append(raw(ctx, lib, PER_URL_CONCURRENCY, s.raw_requests))
    ceiling_lib = max(RAW_LIBS, key=lambda lib: median(rates[lib]))
    ceiling = median(rates[ceiling_lib])
    t = Table(f"Backlog drain and raw-client ceiling: 1 URL, concurrency {PER_URL_CONCURRENCY} "
              "(the daemon's default per-URL limit)",
              ["client", "requests/s", "runs", "÷ fastest raw", "peak RSS", "daemon CPU", "note"])
    for lib in RAW_LIBS:
        t.rows.append([f"raw {lib}", f"{median(rates[lib]):.0f}", " / ".join(f"{r:.0f}" for r in rates[lib]),
                       f"{median(rates[lib]) / ceiling:.2f}", "", "", ""])
    for label, x in (("crm-bridge daemon", d),):
        t.rows.append([f"{label}, end to end", f"{x.db_rate:.0f}", "1", f"{x.db_rate / ceiling:.2f}",
                       _fmt_mb(x.peak_rss_mb), _pct(x.daemon_cpu_pct),
                       f"{x.status}; {x.wire_rate:.0f}/s on the wire"])
    t.notes += [
        f"{s.raw_requests:,} requests per raw run, order: raw, raw, drain, raw, raw; each raw "
        "client is its own process, as the daemon is.",
        f"Drains: {s.backlog_events:,} events written while no daemon ran; end to end = deliveries recorded as "
        "delivered ÷ (last outcome - first claim), database clock; a drain not finished within "
        f"{s.drain_limit:g} s is reported as its rate so far. Receiver CPU during the drain: "
        f"{_pct(d.receiver_cpu_pct)} (100 % = one core).",
    ]
    ctx.report.tables.append(t)
    ratio = d.db_rate / ceiling
    httpx_rate = median(rates["httpx-aiohttp"]) if "httpx-aiohttp" in rates else None
    ctx.report.set("5", f"{ratio:.2f} ({d.db_rate:.0f}/s vs raw {ceiling_lib} {ceiling:.0f}/s)", ratio >= 0.8,
                   "" if not httpx_rate else
                   f"÷ raw httpx on aiohttp (the daemon's client): {d.db_rate / httpx_rate:.2f}")
    rss_ok = d.peak_rss_mb is not None and d.peak_rss_mb < 150
    ctx.report.set("6", f"{d.db_rate:.0f}/s ({d.status}), peak RSS {_fmt_mb(d.peak_rss_mb)}",
                   d.complete and d.db_rate >= 2000 and rss_ok, f"{s.backlog_events:,} events")
    return d


def _fmt_mb(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f} MB"


def fanout(ctx: Ctx) -> list[Drain]:
    """Drain rate with 1, 4, 16 URLs per event (the real daemon)."""
    s = ctx.sizes
    t = Table(f"Drain rate by URLs per event ({s.fanout_events:,}-event backlog, real daemon)",
              ["URLs/event", "concurrency", "deliveries", "deliveries/s", "events/s", "on the wire/s",
               f"raw {RAW_LIBS[0]} at same concurrency", "÷ raw", "peak RSS", "daemon CPU", "status"])
    out = []
    for urls in s.fanout_urls:
        conc = min(urls * PER_URL_CONCURRENCY, TOTAL_CONCURRENCY)
        ctx.log(f"drain of {s.fanout_events:,} events x {urls} URLs")
        d = drain(ctx, s.fanout_events, urls, s.fanout_limit)
        ceiling = raw(ctx, RAW_LIBS[0], conc, s.raw_requests)
        out.append(d)
        t.rows.append([str(urls), str(conc), f"{d.deliveries:,}", f"{d.db_rate:.0f}",
                       f"{d.db_rate / urls:.0f}", f"{d.wire_rate:.0f}", f"{ceiling:.0f}",
                       f"{d.db_rate / ceiling:.2f}" if ceiling else "n/a", _fmt_mb(d.peak_rss_mb),
                       _pct(d.daemon_cpu_pct), d.status])
    ctx.report.tables.append(t)
    return out
