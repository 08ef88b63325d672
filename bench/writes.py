"""CRM writer throughput with each capture variant on crm.case, side by side (goals 1-3).

Every round runs every variant once, in an order rotated each round, and each ratio is taken
inside a round (variant ÷ "no trigger" of the same round) before the median over rounds: the
machine is shared, and only what was measured close together in time is compared.  Each run
starts from empty tables right after a CHECKPOINT.  Besides transactions/s, the server's CPU
time per transaction is read from /proc: it is far less sensitive to other load and shows
where the cost is.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

from . import variants as V
from .context import Ctx
from .report import Table
from .sqlq import BQ, render
from .stats import median, spread
from .variants import Variant
from .writers import NotifyCounter

WRITE_VARIANTS = [V.NONE, V.BRIDGE, V.BRIDGE_STOPPED, V.HASURA, V.NOTIFY_ALWAYS, V.STATEMENT_Q]
SCALE_VARIANTS = [V.NONE, V.BRIDGE_STOPPED]
BULK_VARIANTS = [V.NONE, V.BRIDGE_STOPPED, V.HASURA, V.STATEMENT_Q]


@dataclass
class Run:
    tps: float
    transactions: int
    cpu_us: float | None        # server CPU per transaction, microseconds
    notifies: int               # notifying commits seen on the channel
    daemon_cpu: float | None    # seconds of daemon CPU during the run


def _run(ctx: Ctx, variant: Variant, script: str, clients: int, seconds: int,
         counter: NotifyCounter) -> Run:
    ctx.reset(variant)
    with ctx.daemon() if variant.daemon else contextlib.nullcontext() as daemon:
        n0 = counter.settle()
        c0 = ctx.db.server_cpu()
        d0 = daemon.cpu_seconds() if daemon else None
        result = ctx.writers.run(script, clients, seconds)
        d1 = daemon.cpu_seconds() if daemon else None
        time.sleep(0.1)          # let the postmaster reap the writers' backends (their CPU)
        c1 = ctx.db.server_cpu()
        n1 = counter.settle()
    cpu_us = None
    if c0 is not None and c1 is not None and result.transactions:
        cpu_us = (c1 - c0) / result.transactions * 1e6
    return Run(result.tps, result.transactions, cpu_us, n1 - n0,
               d1 - d0 if d0 is not None and d1 is not None else None)


def compare(ctx: Ctx, variants: list[Variant], script: str, clients: int, seconds: int,
            rounds: int) -> dict[str, list[Run]]:
    """Run every variant once per round (rotated order); return the runs per variant."""
    runs: dict[str, list[Run]] = {v.key: [] for v in variants}
    with NotifyCounter(ctx.db.dsn) as counter:
        for r in range(rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for v in order:
                run = _run(ctx, v, script, clients, seconds, counter)
                runs[v.key].append(run)
                ctx.log(f"    round {r + 1}/{rounds} {v.label:32} {run.tps:9.0f} tx/s"
                        + (f"  {run.cpu_us:6.0f} µs CPU/tx" if run.cpu_us else ""))
    return runs


def ratios(runs: dict[str, list[Run]], key: str, base: str = "none") -> list[float]:
    """Per-round throughput ratios ``key`` ÷ ``base``."""
    return [a.tps / b.tps for a, b in zip(runs[key], runs[base], strict=True) if b.tps]


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _variant_rows(runs: dict[str, list[Run]], variants: list[Variant]) -> list[list[str]]:
    rows = []
    base_cpu = median([r.cpu_us for r in runs["none"] if r.cpu_us])
    for v in variants:
        rs = runs[v.key]
        rat = ratios(runs, v.key)
        cpus = [r.cpu_us for r in rs if r.cpu_us]
        cpu = median(cpus) if cpus else None
        notifies = sum(r.notifies for r in rs)
        txs = sum(r.transactions for r in rs)
        dcpu = [r.daemon_cpu for r in rs if r.daemon_cpu is not None]
        rows.append([
            v.label, f"{median([r.tps for r in rs]):.0f}", f"{median(rat):.2f}", spread(rat),
            _fmt(cpu, ".0f"), _fmt(base_cpu / cpu if cpu else None, ".2f"),
            f"{notifies} / {txs}" if v.attach else "—",
            f"{sum(dcpu) / sum(r.transactions / r.tps for r in rs) * 100:.0f} %" if dcpu else "—",
        ])
    return rows


HEADERS = ["variant", "tx/s (median)", "÷ none", "rounds", "server CPU µs/tx", "CPU ratio",
           "notifying commits", "daemon CPU"]


def eight_writers(ctx: Ctx) -> dict[str, list[Run]]:
    """Goals 1 and 2: 8 concurrent writers of 1-row transactions."""
    s = ctx.sizes
    ctx.log(f"8 writers x 1-row transactions, {len(WRITE_VARIANTS)} variants x {s.write_rounds} rounds "
            f"x {s.write_seconds} s")
    ctx.set_urls(["/writes"])
    runs = compare(ctx, WRITE_VARIANTS, BQ.insert_one, 8, s.write_seconds, s.write_rounds)
    t = Table("CRM write throughput: 8 writers, 1-row INSERT transactions into crm.case", HEADERS,
              _variant_rows(runs, WRITE_VARIANTS))
    t.notes += [
        f"{ctx.writers.name}, {s.write_rounds} rounds x {s.write_seconds} s per variant, order rotated "
        "per round; ratios are per round (same round's 'no trigger'), then the median; 'rounds' is "
        "their min-max.",
        "CPU ratio = server CPU per transaction of 'no trigger' ÷ this variant's (1.00 = free); it is "
        "what throughput would be if the server's CPU were the only limit, and it is far less noisy.",
        "notifying commits: NOTIFYs seen by a bench listener on channel crm_bridge ÷ transactions.",
        "daemon CPU: the daemon process's CPU time ÷ wall time of the runs (100 % = one core).",
    ]
    ctx.report.tables.append(t)
    r_bridge = median(ratios(runs, "bridge"))

    def cpu(key: str) -> str:
        values = [r.cpu_us for r in runs[key] if r.cpu_us]
        return f"{median(values):.0f}" if values else "n/a"

    dcpu = [r.daemon_cpu / (r.transactions / r.tps) * 100 for r in runs["bridge"] if r.daemon_cpu is not None]
    ctx.report.set("1", f"{r_bridge:.2f} (daemon stopped: {median(ratios(runs, 'bridge_stopped')):.2f})",
                   r_bridge >= 0.85,
                   f"server CPU µs/tx: none {cpu('none')}, trigger alone {cpu('bridge_stopped')}, with daemon "
                   f"{cpu('bridge')} (daemon itself {median(dcpu):.0f} % of a core, same 2 cores); prototype "
                   f"statement trigger without SET clause, daemon stopped: {median(ratios(runs, 'statement_q')):.2f}")
    # Trigger against trigger: the Hasura-style variant has no consumer running, so the bridge is
    # compared with its daemon stopped; the daemon-running figure is shown beside it.
    r_trig = median(ratios(runs, "bridge_stopped", "hasura"))
    r_live = median(ratios(runs, "bridge", "hasura"))
    r_proto = median(ratios(runs, "statement_q", "hasura"))
    ctx.report.set("2", f"{r_trig:.2f} (bridge with daemon delivering: {r_live:.2f})", r_trig > 1.0,
                   "verdict on trigger vs trigger (the Hasura-style log has no consumer here); "
                   f"statement-trigger prototype without SET clause ÷ Hasura-style: {r_proto:.2f}")
    return runs


def scaling(ctx: Ctx) -> dict[int, dict[str, list[Run]]]:
    """Goal 3 (1 writer) and the writer overhead for 1, 10, 100, 1,000 rows per transaction."""
    s = ctx.sizes
    out: dict[int, dict[str, list[Run]]] = {}
    t = Table("Writer overhead by rows per transaction: 1 writer, one INSERT statement per transaction",
              ["rows/tx", "variant", "rows/s (median)", "÷ none", "rounds", "server CPU µs/row", "CPU ratio",
               "notifying commits", "daemon CPU"])
    for n in s.rows_per_tx:
        variants = SCALE_VARIANTS + ([V.BRIDGE] if n == 1 else [])
        script = BQ.insert_one if n == 1 else render("insert_many", rows=n)
        ctx.log(f"1 writer x {n}-row transactions, {len(variants)} variants x {s.scale_rounds} rounds")
        runs = compare(ctx, variants, script, 1, s.scale_seconds, s.scale_rounds)
        out[n] = runs
        base_cpu = median([r.cpu_us for r in runs["none"] if r.cpu_us])
        for v in variants:
            rs = runs[v.key]
            rat = ratios(runs, v.key)
            cpus = [r.cpu_us for r in rs if r.cpu_us]
            cpu = median(cpus) / n if cpus else None
            dcpu = [r.daemon_cpu for r in rs if r.daemon_cpu is not None]
            t.rows.append([str(n), v.label, f"{median([r.tps for r in rs]) * n:.0f}", f"{median(rat):.2f}",
                           spread(rat), _fmt(cpu, ".1f"), _fmt(base_cpu / n / cpu if cpu else None, ".2f"),
                           f"{sum(r.notifies for r in rs)} / {sum(r.transactions for r in rs)}" if v.attach else "—",
                           f"{sum(dcpu) / sum(r.transactions / r.tps for r in rs) * 100:.0f} %" if dcpu else "—"])
    t.notes.append(f"{s.scale_rounds} rounds x {s.scale_seconds} s per variant and size; daemon stopped "
                   "except in the 'daemon running' rows.")
    ctx.report.tables.append(t)
    if 1 in out:
        r1 = median(ratios(out[1], "bridge"))
        ctx.report.goals["3"].figure = f"1 writer: {r1:.2f} (daemon stopped: " \
                                       f"{median(ratios(out[1], 'bridge_stopped')):.2f})"
        ctx.report.goals["3"].met = r1 >= 0.7
        ctx.report.goals["3"].note = "1 writer: the daemon runs on the same 2 cores as the writer"
    return out


def bulk(ctx: Ctx) -> None:
    """Goal 3, second part: one INSERT statement of 10,000 rows, timed client-side."""
    s = ctx.sizes
    ctx.log(f"single INSERT of {s.bulk_rows} rows, {len(BULK_VARIANTS)} variants x {s.bulk_reps} reps")
    query = render("insert_many", rows=s.bulk_rows)
    times: dict[str, list[float]] = {v.key: [] for v in BULK_VARIANTS}
    for r in range(s.bulk_reps):
        order = BULK_VARIANTS[r % len(BULK_VARIANTS):] + BULK_VARIANTS[:r % len(BULK_VARIANTS)]
        for v in order:
            ctx.reset(v)
            t0 = time.perf_counter()
            ctx.conn.execute(query)
            times[v.key].append(time.perf_counter() - t0)
    t = Table(f"One INSERT statement of {s.bulk_rows:,} rows (autocommit, daemon stopped)",
              ["variant", "seconds (median)", "rows/s", "÷ none", "reps"])
    base = times["none"]
    for v in BULK_VARIANTS:
        rat = [b / a for a, b in zip(times[v.key], base, strict=True)]
        t.rows.append([v.label, f"{median(times[v.key]):.3f}", f"{s.bulk_rows / median(times[v.key]):.0f}",
                       f"{median(rat):.2f}", spread(rat)])
    ctx.report.tables.append(t)
    r = median([b / a for a, b in zip(times["bridge_stopped"], base, strict=True)])
    r_stmt = median([b / a for a, b in zip(times["statement_q"], base, strict=True)])
    g = ctx.report.goals["3"]
    g.figure = (g.figure + "; " if g.figure != "not measured" else "") + f"{s.bulk_rows:,}-row INSERT: {r:.2f}"
    g.met = (g.met is not False) and r >= 0.7
    g.note = ((g.note + "; " if g.note else "")
              + f"{s.bulk_rows:,}-row INSERT, prototype without SET clause: {r_stmt:.2f}")
