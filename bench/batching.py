"""Batched calls (issue 13.3): the same backlog of 1-row events drained with single POST calls and
with ``batch_max = 100`` (a JSON array of up to 100 calls per request), side by side against the
same receiver, which counts every call a request carries (bench/rxserver.py).  Rounds alternate
the order; the ratio is batched ÷ single of the medians."""

from __future__ import annotations

from . import variants as V
from .context import Ctx
from .drain import Drain, drain, fmt_mb, pct, write_one_row_events
from .report import Table
from .sqlq import BQ
from .stats import median, spread

BATCH_MAX = 100
MODES = {"single POST calls": None, f"batch_max = {BATCH_MAX}": BATCH_MAX}


def batched_vs_single(ctx: Ctx) -> None:
    s = ctx.sizes
    ctx.log(f"batched vs single calls: backlog of {s.batch_events:,} 1-row events, POST, "
            f"{s.batch_rounds} round(s)")
    ctx.set_urls(["/batch"])
    runs: dict[str, list[Drain]] = {mode: [] for mode in MODES}
    order = list(MODES)
    for _ in range(s.batch_rounds):
        for mode in order:
            ctx.reset(V.BRIDGE_STOPPED)
            ctx.conn.execute(BQ.batch_urls, {"batch_max": MODES[mode]})
            write_one_row_events(ctx, s.batch_events)
            d = drain(ctx, s.batch_limit)
            runs[mode].append(d)
            ctx.log(f"    {mode}: {d.got.rate:.0f} calls/s end to end, {d.got.status}")
        order.reverse()
    single = median([d.got.rate for d in runs["single POST calls"]])
    t = Table(f"Batched calls: backlog of {s.batch_events:,} 1-row events, 1 POST URL, default settings",
              ["calls per request", "calls/s", "runs", "÷ single calls", "duplicates", "daemon CPU", "receiver CPU",
               "server CPU", "peak RSS", "status"])
    for mode, ds in runs.items():
        rate = median([d.got.rate for d in ds])
        last = ds[-1]
        t.rows.append([mode, f"{rate:.0f}", " / ".join(f"{d.got.rate:.0f}" for d in ds),
                       f"{rate / single:.2f}" if single else "n/a", f"{sum(d.got.duplicates for d in ds):,}",
                       pct(last.cpu.daemon_total), pct(last.cpu.receiver), pct(last.cpu.server),
                       fmt_mb(last.peak_rss_mb), "; ".join(d.got.status for d in ds)])
    t.notes.append("Calls/s end to end = distinct calls received ÷ (last arrival - the daemon's 'ready' log line); "
                   "the receiver records each call of a batch (an element of the JSON array) as it records a "
                   "single call. CPU: % of one core over the last run of each mode.")
    ctx.report.tables.append(t)
    batched = median([d.got.rate for d in runs[f"batch_max = {BATCH_MAX}"]])
    ratios = [b.got.rate / a.got.rate for a, b in zip(runs["single POST calls"], runs[f"batch_max = {BATCH_MAX}"],
                                                        strict=True) if a.got.rate]
    ctx.report.set("B", f"{batched / single:.2f} ({batched:.0f} vs {single:.0f} calls/s)" if single else "n/a",
                   None, f"per round {spread(ratios)}; "
                         + "; ".join(f"{m}: {', '.join(d.got.status for d in ds)}" for m, ds in runs.items()))
