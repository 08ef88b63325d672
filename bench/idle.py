"""Daemon CPU while idle (no goal of its own: a regression check that nothing busy-polls)."""

from __future__ import annotations

import time

from . import procstat
from . import variants as V
from .context import Ctx
from .report import Table
from .sqlq import BQ

SETTLE = 1.0     # seconds after start-up before measuring (start-up work is not idling)


def idle(ctx: Ctx) -> None:
    s = ctx.sizes
    ctx.log(f"idle daemon CPU over {s.idle_seconds:g} s")
    ctx.set_urls(["/idle"])
    ctx.reset(V.BRIDGE, checkpoint=False)
    with ctx.daemon() as daemon:
        time.sleep(SETTLE)
        backends = [int(r[0]) for r in ctx.conn.execute(BQ.daemon_backends).fetchall()]
        d0 = daemon.cpu_seconds()
        b0 = [procstat.cpu_seconds(p) for p in backends]
        time.sleep(s.idle_seconds)
        d1 = daemon.cpu_seconds()
        b1 = [procstat.cpu_seconds(p) for p in backends]
    daemon_pct = (d1 - d0) / s.idle_seconds * 100 if d0 is not None and d1 is not None else None
    pairs = [(a, b) for a, b in zip(b0, b1, strict=True) if a is not None and b is not None]
    backend_pct = sum(b - a for a, b in pairs) / s.idle_seconds * 100 if pairs else None
    t = Table("Idle daemon (nothing to deliver, default settings)",
              ["process", "CPU over the window", "share of one core"])
    if d0 is not None and d1 is not None and daemon_pct is not None:
        t.rows.append(["daemon (python)", f"{(d1 - d0) * 1000:.0f} ms / {s.idle_seconds:g} s",
                       f"{daemon_pct:.2f} %"])
    if backend_pct is not None:
        t.rows.append([f"its {len(pairs)} server backends", f"{sum(b - a for a, b in pairs) * 1000:.0f} ms",
                       f"{backend_pct:.2f} %"])
    t.notes.append("CPU = utime + stime from /proc/PID/stat (10 ms clock ticks).")
    ctx.report.tables.append(t)
