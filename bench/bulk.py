"""One very large INSERT with the daemon running (goals 2 and 3): how fast its rows are
delivered, what the daemon's memory does, and whether live changes committed right after it wait.

The daemon runs while one INSERT statement writes ``million_rows`` cases into crm.case (the
bridge's capture on, row payloads off).  Right after its COMMIT returns, a live case is written,
then another every ``live_interval`` seconds while the drain lasts (at most ``live_events``):
each one's commit → arrival is its delay.  The drain rate counts from the big COMMIT to the last
arrival (receiver clock) and is divided by the 1-row backlog rate of goal 1 from the same run.
"""

from __future__ import annotations

import time

from . import variants as V
from .context import Ctx
from .drain import CpuWindow, await_calls, fmt_mb, pct
from .latency import arrival_times
from .report import Table
from .sqlq import BQ, render

LIVE_PREFIX = "live"
LIVE_GRACE = 5.0     # seconds live events written near the end of the drain may still take


def million(ctx: Ctx) -> None:
    s = ctx.sizes
    ctx.log(f"one INSERT of {s.million_rows:,} rows with the daemon running, then live events")
    ctx.set_urls(["/bulk"])
    ctx.reset(V.BRIDGE)
    ctx.rx.reset()
    commits: dict[str, float] = {}

    def live() -> None:
        if len(commits) < s.live_events and time.time() >= t_commit + len(commits) * s.live_interval:
            case_id = f"{LIVE_PREFIX}-{len(commits)}"
            ctx.conn.execute(BQ.insert_named, {"case_id": case_id})
            commits[case_id] = time.time()

    with ctx.daemon() as daemon:
        t0 = time.perf_counter()
        ctx.conn.execute(render("insert_many", rows=s.million_rows))
        t_commit = time.time()
        insert_seconds = time.perf_counter() - t0
        live()
        cpu = CpuWindow(ctx, [daemon])
        got = await_calls(ctx, s.million_rows, t_commit, s.million_limit, live, exclude=f"CaseID={LIVE_PREFIX}-")
        shares = cpu.shares()
        ctx.rx.wait_count(got.received + got.duplicates + len(commits), timeout=LIVE_GRACE)
        rss = daemon.peak_rss_mb()
    arrivals = arrival_times(ctx.rx.records(), LIVE_PREFIX)
    delays = {k: arrivals[k] - c for k, c in commits.items() if k in arrivals}
    first = delays.get(f"{LIVE_PREFIX}-0")
    base = ctx.measured.get("drain_1row")
    ratio = got.rate / base if base else None
    t = Table(f"One INSERT of {s.million_rows:,} rows into crm.case, daemon running (row payloads off)",
              ["what", "figure"])
    t.rows += [
        ["the INSERT (client side, capture on)", f"{insert_seconds:.1f} s"],
        ["drain, COMMIT → last arrival", f"{got.rate:.0f} events/s; {got.status}"],
        ["÷ backlog of 1-row events (goal 1)", "n/a" if ratio is None else f"{ratio:.2f} (÷ {base:.0f}/s)"],
        ["on the wire (first → last arrival)", f"{got.wire_rate:.0f}/s; duplicates {got.duplicates:,}"],
        ["daemon peak RSS", fmt_mb(rss)],
        ["CPU during the drain: daemon / receiver / server", " / ".join(
            pct(x) for x in (shares.daemon_total, shares.receiver, shares.server))],
        [f"live events committed after it (one every {s.live_interval:g} s)",
         f"{len(delays)} of {len(commits)} delivered"
         + (f"; delays {', '.join(f'{d:.2f}' for d in delays.values())} s" if delays else "")],
    ]
    t.notes.append(f"A drain not finished within {s.million_limit:g} s of the COMMIT is cut and reported as "
                   "its rate so far; live events are not counted in it.")
    ctx.report.tables.append(t)
    rss_ok = rss is not None and rss < 150
    ctx.report.set("2", f"{'n/a' if ratio is None else f'{ratio:.2f}'} ({got.rate:.0f}/s); peak RSS {fmt_mb(rss)}",
                   None if ratio is None else ratio >= 0.8 and rss_ok,
                   got.status if base else f"{got.status}; ratio needs the drain phase in the same run")
    ctx.report.set("3", "not delivered" + ("" if got.complete else f" within {got.seconds:.0f} s")
                   if first is None else f"{first:.2f} s", first is not None and first <= 2.0,
                   f"later live events: max {max(delays.values()):.2f} s" if delays else "")
