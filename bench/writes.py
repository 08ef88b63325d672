"""CRM writer throughput and server CPU per transaction with each capture variant on crm.case,
side by side (goals 4 and 5).

Every round runs every variant once, in an order rotated each round, and each ratio is taken
inside a round (variant ÷ "no trigger" of the same round) before the median over rounds: the
machine is shared, and only what was measured close together in time is compared.  Each run
starts from empty tables right after a CHECKPOINT.  Besides transactions/s, the server's CPU
time per transaction is read from /proc: it is far less sensitive to other load and shows
where the cost is.  With the daemon delivering, the CPU window lasts until the receiver has
every call, so the daemon's whole bookkeeping for those transactions is in it.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from . import procstat
from . import variants as V
from .context import Ctx
from .report import Table
from .sqlq import BQ
from .stats import median, spread
from .variants import Variant
from .writers import NotifyCounter

WRITE_VARIANTS = [V.NONE, V.BRIDGE_STOPPED, V.BRIDGE, V.BRIDGE_BUSY, V.HASURA]      # + V.PGQ where the server has it
WRITERS = 8


@dataclass
class Run:
    tps: float
    transactions: int
    cpu_us: float | None        # server CPU per transaction, microseconds
    notifies: int               # notifying commits seen on the channel
    daemon_cpu: float | None    # seconds of daemon CPU during the writers' run
    delivered: bool | None      # daemon variants: every call arrived within the CPU window
    # daemon variants, where pg_stat_statements is there: {kind: (calls, ms)} of its statements
    statements: dict[str, tuple[int, float]] | None = None
    # daemon variants: CPU of the server processes serving the daemon's connections, per transaction
    daemon_backends_us: float | None = None
    # CPU of the server's long-lived background processes (WAL writer, checkpointer...), per transaction
    background_us: float | None = None
    autovacuums: int = 0        # autovacuum/autoanalyze passes over crm_bridge tables during the run


def processes_cpu(ctx: Ctx, query: str) -> dict[int, float]:
    """CPU seconds so far of each server process ``query`` lists (the daemon's backends, the
    background processes; empty where /proc is not readable)."""
    out = {}
    for (pid,) in ctx.conn.execute(query).fetchall():
        seconds = procstat.cpu_seconds(int(pid))
        if seconds is not None:
            out[int(pid)] = seconds
    return out


# A process of no database work that keeps ``share`` of one core busy, in 10 ms periods, making
# and dropping small objects as a Python daemon does (a bare spin would hardly touch the caches).
BUSY_LOOP = """
import sys, time
share = float(sys.argv[1])
while True:
    end = time.perf_counter() + 0.010 * share
    while time.perf_counter() < end:
        junk = [{"i": i, "s": str(i)} for i in range(200)]
    time.sleep(0.010 * (1 - share))
"""


@contextlib.contextmanager
def busy_process(share: float) -> Iterator[None]:
    if share <= 0:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(share)])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def _delta_us(before: dict[int, float], after: dict[int, float], transactions: int) -> float | None:
    """CPU per transaction of the processes in ``after`` since ``before`` (a process started in
    between counts from its start)."""
    if not after or not transactions:
        return None
    return (sum(after.values()) - sum(before.get(pid, 0.0) for pid in after)) / transactions * 1e6


def _run(ctx: Ctx, variant: Variant, script: str, clients: int, seconds: int,
         counter: NotifyCounter) -> Run:
    ctx.reset(variant)
    delivered = None
    statements = None
    if variant.daemon and ctx.db.statements:
        ctx.conn.execute(BQ.statements_reset)
    with ctx.daemon() if variant.daemon else contextlib.nullcontext() as daemon, busy_process(variant.burn):
        ctx.rx.reset()
        n0 = counter.settle()
        c0 = ctx.db.server_cpu()
        b0 = processes_cpu(ctx, BQ.daemon_backend_pids) if daemon else {}
        g0 = processes_cpu(ctx, BQ.background_pids)
        v0 = int(ctx.conn.execute(BQ.bridge_autovacuums).fetchone()[0])
        d0 = daemon.cpu_seconds() if daemon else None
        result = ctx.writers.run(script, clients, seconds)
        d1 = daemon.cpu_seconds() if daemon else None
        if daemon:
            calls = ctx.cases() * len(ctx.url_paths)
            delivered = ctx.rx.wait_count(calls, timeout=ctx.sizes.write_deliver_limit) >= calls
        time.sleep(0.1)          # let the postmaster reap the writers' backends (their CPU)
        c1 = ctx.db.server_cpu()
        b1 = processes_cpu(ctx, BQ.daemon_backend_pids) if daemon else {}
        g1 = processes_cpu(ctx, BQ.background_pids)
        v1 = int(ctx.conn.execute(BQ.bridge_autovacuums).fetchone()[0])
        n1 = counter.settle()
        if daemon and ctx.db.statements:
            statements = {str(k): (int(n), float(ms)) for k, n, ms in
                          ctx.conn.execute(BQ.daemon_statement_time).fetchall()}
    cpu_us = None
    if c0 is not None and c1 is not None and result.transactions:
        cpu_us = (c1 - c0) / result.transactions * 1e6
    return Run(result.tps, result.transactions, cpu_us, n1 - n0,
               d1 - d0 if d0 is not None and d1 is not None else None, delivered, statements,
               _delta_us(b0, b1, result.transactions), _delta_us(g0, g1, result.transactions), v1 - v0)


def statement_breakdown(runs: list[Run]) -> str | None:
    """The daemon's server time per transaction by kind of statement (median over runs), and
    events per claim; None without pg_stat_statements."""
    per: dict[str, list[float]] = {}
    per_claim: list[float] = []
    for r in runs:
        if not r.statements or not r.transactions:
            continue
        for kind in ("claim", "record", "other"):
            per.setdefault(kind, []).append(r.statements.get(kind, (0, 0.0))[1] * 1000 / r.transactions)
        if r.statements.get("claim", (0, 0.0))[0]:
            per_claim.append(r.transactions / r.statements["claim"][0])
    if not per:
        return None
    parts = [f"{kind} {median(v):.0f} µs" for kind, v in per.items()]
    return (f"server time in the daemon's statements per transaction (pg_stat_statements; wall time inside "
            f"the server, waiting for a CPU included): {', '.join(parts)}; {median(per_claim):.0f} events "
            "per claim")


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
            _fmt(cpu, ".0f"), _fmt(cpu / base_cpu if cpu else None, ".2f"),
            f"{notifies} / {txs}" if v.attach else "—",
            f"{sum(dcpu) / sum(r.transactions / r.tps for r in rs) * 100:.0f} %" if dcpu else "—",
        ])
    return rows


HEADERS = ["variant", "tx/s (median)", "÷ none", "rounds", "server CPU µs/tx", "CPU ÷ none",
           "notifying commits", "daemon CPU"]


def _per_round(runs: dict[str, list[Run]], key: str, base: str, f: Callable[[Run, Run], float | None]) -> float:
    """Median over rounds of ``f(run of key, run of base)`` (rounds where it is None left out)."""
    values = [v for a, b in zip(runs[key], runs[base], strict=True) if (v := f(a, b)) is not None]
    return median(values)


def _minus(field: str) -> Callable[[Run, Run], float | None]:
    """``a.field - b.field`` of two runs (None when either is unknown)."""
    def f(a: Run, b: Run) -> float | None:
        x, y = getattr(a, field), getattr(b, field)
        return x - y if x is not None and y is not None else None
    return f


def _cpu_ratio(a: Run, b: Run) -> float | None:
    return a.cpu_us / b.cpu_us if a.cpu_us and b.cpu_us else None


def eight_writers(ctx: Ctx) -> dict[str, list[Run]]:
    """Goals 4 and 5: 8 concurrent writers of 1-row transactions, every capture variant."""
    s = ctx.sizes
    variants = WRITE_VARIANTS + ([V.PGQ] if ctx.db.pgq_missing is None else []) + V.FLOORS
    ctx.log(f"{WRITERS} writers x 1-row transactions, {len(variants)} variants x {s.write_rounds} rounds "
            f"x {s.write_seconds} s")
    ctx.set_urls(["/writes"])
    runs = compare(ctx, variants, BQ.insert_one, WRITERS, s.write_seconds, s.write_rounds)
    t = Table(f"CRM write throughput: {WRITERS} writers, 1-row INSERT transactions into crm.case", HEADERS,
              _variant_rows(runs, variants))
    t.notes += [
        f"{ctx.writers.name}, {s.write_rounds} rounds x {s.write_seconds} s per variant, order rotated "
        "per round; ratios are per round (same round's 'no trigger'), then the median; 'rounds' is "
        "their min-max.",
        "CPU ÷ none = this variant's server CPU per transaction ÷ that of 'no trigger' (1.00 = free); "
        "it is far less noisy than throughput on a shared machine.",
        "Daemon delivering: the server CPU window runs until the receiver has every call "
        f"(at most {s.write_deliver_limit:g} s after the writers stop); "
        + ("every run delivered everything in it." if all(r.delivered for r in runs["bridge"])
           else "NOT every run delivered everything in it: its bookkeeping is partly missing."),
        "notifying commits: NOTIFYs seen by a bench listener on channel crm_bridge ÷ transactions.",
        f"trigger alone + a busy process: goal 4's control, the trigger alone while a Python process that does "
        f"no database work keeps ~{V.BRIDGE_BUSY.burn:.0%} of a core busy (about the daemon's share): on a "
        "machine with few cores, what the writers' own server processes cost more only because the machine "
        "is busier.",
        "daemon CPU: the daemon process's CPU time ÷ wall time of the writers' runs (100 % = one core).",
        "floors: bench-only PL/pgSQL statement-level triggers with a transition table (bench/variants.sql): "
        "empty; writing one row per statement into a table without an index; and into an outbox with an "
        "identity key, the least a consumer can claim in commit order. They bound from below what any "
        "PL/pgSQL statement capture costs on this machine.",
    ]
    if ctx.db.pgq_missing:
        t.notes.append(f"PgQ: {ctx.db.pgq_missing}.")
    ctx.report.tables.append(t)
    breakdown = statement_breakdown(runs["bridge"])
    if breakdown:
        t.notes.append(f"Daemon delivering: {breakdown}.")
    book = _per_round(runs, "bridge", "bridge_stopped", _minus("cpu_us"))
    own_runs = [r.daemon_backends_us for r in runs["bridge"] if r.daemon_backends_us is not None]
    split = ""
    if own_runs:
        own = median(own_runs)
        bg = _per_round(runs, "bridge", "bridge_stopped", _minus("background_us"))
        vacuums = sum(r.autovacuums for r in runs["bridge"])
        busy = _per_round(runs, "bridge_busy", "bridge_stopped", _minus("cpu_us"))
        split = (f"; of it, the server processes serving the daemon's connections {own:.0f} µs/tx "
                 f"(CPU from /proc), the server's background processes (WAL writer, checkpointer, background "
                 f"writer) {_fmt(bg, '.0f')} more than with the trigger alone, and the rest, "
                 f"{_fmt(book - own - (bg or 0.0), '.0f')} µs, the writers' own server processes costing "
                 "more on a busier machine and autovacuum workers (passes over crm_bridge tables during the "
                 f"{len(runs['bridge'])} delivering runs: {vacuums}); control: a process of no database work "
                 f"keeping {V.BRIDGE_BUSY.burn:.0%} of a core busy raised the trigger alone's server CPU by "
                 f"{busy:.0f} µs/tx")
        t.notes.append(f"Daemon delivering: CPU of the server processes serving the daemon's connections: "
                       f"{own:.0f} µs per transaction (median of rounds).")
    cpu = {k: median([r.cpu_us for r in runs[k] if r.cpu_us]) for k in ("none", "bridge_stopped", "bridge")}
    ctx.report.set("4", f"{book:.0f} µs", book <= 20,
                   f"server CPU µs/tx: trigger alone {cpu['bridge_stopped']:.0f}, daemon delivering "
                   f"{cpu['bridge']:.0f} (no trigger {cpu['none']:.0f}); median of per-round differences"
                   + split + (f"; {breakdown}" if breakdown else ""))
    alone = _per_round(runs, "bridge_stopped", "none", _cpu_ratio)
    hasura = median(ratios(runs, "bridge_stopped", "hasura"))
    parts = [f"CPU {alone:.2f}", f"÷ Hasura-style {hasura:.2f}"]
    met = alone <= 1.3 and hasura >= 1.1
    if ctx.db.pgq_missing is None:
        pgq = median(ratios(runs, "bridge_stopped", "pgq"))
        parts.insert(1, f"÷ PgQ {pgq:.2f}")
        met = met and pgq >= 1.2
    else:
        parts.insert(1, f"÷ PgQ {ctx.db.pgq_missing}")
    floors = ", ".join(f"{v.label.removeprefix('floor: ')} {_per_round(runs, v.key, 'none', _cpu_ratio):.2f}"
                       for v in V.FLOORS)
    ctx.report.set("5", "; ".join(parts), met,
                   "writer throughput: trigger alone vs trigger alone (no consumer runs for any); "
                   f"what limits it: CPU ÷ none of PL/pgSQL statement-trigger floors: {floors}")
    return runs
