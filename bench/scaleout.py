"""Two daemons ÷ one (goal 9): the same backlog of 1-row events drained by one daemon, then by
two side by side (active-active), with the CPU of every process involved, so that the report
says what limits the second daemon's gain on this machine."""

from __future__ import annotations

import os

from . import variants as V
from .context import Ctx
from .drain import Drain, drain, fmt_mb, pct, write_one_row_events
from .report import Table

BUSY = 90.0                  # % of one core: a single-threaded process at this is CPU-bound


def limit_of(d: Drain, cores: int) -> str:
    """What held the drain back, from the CPU shares (% of one core) of its processes and of the
    whole machine (other users of a shared machine included)."""
    c = d.cpu
    parts = {"daemons": c.daemon_total, "PostgreSQL": c.server, "receiver": c.receiver}
    known = {k: v for k, v in parts.items() if v is not None}
    ours = sum(known.values())
    machine = c.machine if c.machine is not None else ours
    if machine >= 0.85 * cores * 100:
        shares = ", ".join(f"{k} {v:.0f} %" for k, v in known.items())
        return (f"all {cores} cores busy ({machine:.0f} % of one core: {shares}, "
                f"others {max(0.0, machine - ours):.0f} %)")
    if c.receiver is not None and c.receiver >= BUSY:
        return "the receiver (one process at a full core)"
    if any(x is not None and x >= BUSY for x in c.daemons):
        return "daemon CPU (a daemon process at a full core)"
    return (f"no process CPU-bound ({machine:.0f} % of {cores * 100} % busy): waiting "
            "(round trips, locks, timers)")


def two_daemons(ctx: Ctx) -> None:
    s = ctx.sizes
    cores = os.cpu_count() or 1
    ctx.log(f"one vs two daemons on a backlog of {s.scaleout_events:,} 1-row events ({cores} cores)")
    ctx.set_urls(["/scaleout"])
    runs: list[tuple[int, Drain]] = []
    for n in (1, 2):
        ctx.reset(V.BRIDGE_STOPPED)
        write_one_row_events(ctx, s.scaleout_events)
        d = drain(ctx, s.scaleout_limit, daemons=n)
        runs.append((n, d))
        ctx.log(f"    {n} daemon(s): {d.got.rate:.0f}/s, {d.got.status}; {limit_of(d, cores)}")
    t = Table(f"One vs two daemons: backlog of {s.scaleout_events:,} 1-row events, 1 URL ({cores} cores)",
              ["daemons", "events/s", "÷ one daemon", "duplicates", "CPU per daemon", "receiver CPU",
               "PostgreSQL CPU", "machine CPU", "peak RSS", "status", "what limits it"])
    one = runs[0][1].got.rate
    for n, d in runs:
        t.rows.append([str(n), f"{d.got.rate:.0f}", f"{d.got.rate / one:.2f}" if one else "n/a",
                       f"{d.got.duplicates:,}", " + ".join(pct(x) for x in d.cpu.daemons), pct(d.cpu.receiver),
                       pct(d.cpu.server), pct(d.cpu.machine), fmt_mb(d.peak_rss_mb), d.got.status,
                       limit_of(d, cores)])
    t.notes.append("CPU in % of one core over the drain, from /proc (PostgreSQL: the postmaster's whole "
                   "process tree; machine: every process, anyone's, from /proc/stat). Both daemons have the "
                   "default settings and distinct worker ids.")
    ctx.report.tables.append(t)
    two = runs[1][1]
    ratio = two.got.rate / one if one else 0.0
    ctx.report.set("9", f"{ratio:.2f} ({two.got.rate:.0f} vs {one:.0f}/s, {cores} cores)", None,
                   f"limited by: {limit_of(two, cores)}")
