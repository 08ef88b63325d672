"""Backlog drains and the raw-client ceiling (goal 1), and the tools every delivery phase uses.

The engine is watched only from outside: a drain is over when the receiver has seen one request
per event written (distinct request targets: the case IDs), and its rate is counted on the
receiver's clock from the moment the daemon said it was ready (or the moment the work was
committed) to the last arrival.  Raw clients and the daemon are measured against the same
receiver, interleaved in rounds (raw clients, both drains, raw clients, both drains, raw
clients; medians), at the concurrency the daemon holds for one URL with its default settings.
A drain that is too slow is cut at its time limit and reported as its rate so far.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import procstat
from . import variants as V
from .context import Ctx, url_concurrency
from .procs import REPO, DaemonProcess
from .report import Table
from .sqlq import BQ, render
from .stats import median

CEILING_LIB = "httpx-aiohttp"            # the daemon's own client: httpx on its transport
# Raw clients: (label, --lib, --gc).  The daemon sets its garbage collector's thresholds
# (bridge.aio.tune_gc); its own client is measured with Python's defaults and with the daemon's, and
# the ceiling is the faster of the two, so that no share of the ratio comes from that setting.
# Plain aiohttp is there for context.
RAW_CLIENTS = ((CEILING_LIB, CEILING_LIB, "python"), (f"{CEILING_LIB}, daemon's GC", CEILING_LIB, "daemon"),
               ("aiohttp", "aiohttp", "python"))
CEILING_CLIENTS = tuple(label for label, lib, _ in RAW_CLIENTS if lib == CEILING_LIB)
BACKLOG_WRITERS = 8                      # pgbench clients writing 1-row events


# -- what the receiver saw ---------------------------------------------------------------------
@dataclass
class Arrivals:
    expected: int
    received: int                # distinct requests (one per event)
    duplicates: int              # requests beyond the first per event (at-least-once)
    complete: bool
    seconds: float               # start → last arrival (complete), or → the cut
    first: float                 # time.time() of the first and last arrival (0.0: none)
    last: float

    @property
    def rate(self) -> float:
        """Events per second, end to end (from the start given to await_calls)."""
        return self.received / self.seconds if self.seconds > 0 else 0.0

    @property
    def wire_rate(self) -> float:
        """Requests per second on the wire: first → last arrival."""
        return (self.received - 1) / (self.last - self.first) if self.last > self.first else 0.0

    @property
    def status(self) -> str:
        if self.complete:
            return "drained"
        return f"NOT drained in {self.seconds:.0f} s ({self.received:,} of {self.expected:,})"


def _arrivals(ctx: Ctx, expected: int, start: float, complete: bool, now: float, exclude: str | None) -> Arrivals:
    times: dict[str, float] = {}
    total = 0
    for at, target in ctx.rx.records():
        if exclude is None or exclude not in target:
            total += 1
            times.setdefault(target, at)
    first = min(times.values(), default=0.0)
    last = max(times.values(), default=0.0)
    seconds = (last if complete else now) - start
    return Arrivals(expected, len(times), total - len(times), complete, seconds, first, last)


def await_calls(ctx: Ctx, expected: int, start: float, limit: float,
                tick: Callable[[], None] | None = None, exclude: str | None = None) -> Arrivals:
    """Wait until ``expected`` distinct requests arrived, or ``limit`` seconds after ``start``
    (a time.time()); ``tick`` runs on every poll (e.g. to write live events meanwhile); requests
    whose target contains ``exclude`` are not counted."""
    while True:
        now = time.time()
        if ctx.rx.count() >= expected:
            got = _arrivals(ctx, expected, start, True, now, exclude)
            if got.received >= expected:
                return got
        if now > start + limit:
            return _arrivals(ctx, expected, start, False, now, exclude)
        if tick is not None:
            tick()
        time.sleep(0.05)


# -- CPU over a window -------------------------------------------------------------------------
@dataclass
class CpuShares:
    """CPU used over a window, in % of one core (None: not readable)."""
    daemons: list[float | None]
    receiver: float | None
    server: float | None
    machine: float | None        # every process on the machine, the bench's and anyone else's
    seconds: float = 0.0         # the window's length

    @property
    def daemon_total(self) -> float | None:
        known = [d for d in self.daemons if d is not None]
        return sum(known) if known else None

    def daemon_us_per(self, calls: int) -> float | None:
        """The daemons' CPU over the window per call, in µs."""
        total = self.daemon_total
        return total / 100 * self.seconds / calls * 1e6 if total is not None and calls else None


class CpuWindow:
    def __init__(self, ctx: Ctx, daemons: Sequence[DaemonProcess]) -> None:
        self.ctx, self.daemons = ctx, list(daemons)
        self.t0 = time.monotonic()
        self.d0 = [d.cpu_seconds() for d in self.daemons]
        self.rx0 = ctx.rx.cpu_seconds()
        self.srv0 = ctx.db.server_cpu()
        self.m0 = procstat.machine_busy_seconds()

    def shares(self) -> CpuShares:
        wall = time.monotonic() - self.t0

        def pct(a: float | None, b: float | None) -> float | None:
            return (b - a) / wall * 100 if a is not None and b is not None and wall > 0 else None

        return CpuShares([pct(a, d.cpu_seconds()) for a, d in zip(self.d0, self.daemons, strict=True)],
                         pct(self.rx0, self.ctx.rx.cpu_seconds()), pct(self.srv0, self.ctx.db.server_cpu()),
                         pct(self.m0, procstat.machine_busy_seconds()), wall)


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f} %"


def fmt_mb(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f} MB"


# -- drains ------------------------------------------------------------------------------------
@dataclass
class Drain:
    got: Arrivals
    cpu: CpuShares
    peak_rss_mb: float | None


def drain(ctx: Ctx, limit: float, daemons: int = 1, env: dict[str, str] | None = None) -> Drain:
    """Start ``daemons`` daemons on the backlog written since the last reset (one call per case)
    and time them until every call arrived, at most ``limit`` seconds."""
    expected = ctx.cases() * len(ctx.url_paths)
    ctx.conn.execute(BQ.checkpoint)
    ctx.rx.reset()
    with ctx.daemons(daemons, env) as ds:
        cpu = CpuWindow(ctx, ds)
        got = await_calls(ctx, expected, min(d.ready_at for d in ds), limit)
        shares = cpu.shares()
        rss = [r for d in ds if (r := d.peak_rss_mb()) is not None]
    return Drain(got, shares, max(rss) if rss else None)


def write_one_row_events(ctx: Ctx, events: int) -> None:
    """``events`` 1-row INSERT transactions (pgbench, 8 clients)."""
    ctx.writers.run(BQ.insert_one, BACKLOG_WRITERS, transactions=max(1, events // BACKLOG_WRITERS))


def write_statements(ctx: Ctx, statements: int, rows: int) -> None:
    """``statements`` INSERT statements of ``rows`` rows each, one transaction each."""
    query = render("insert_many", rows=rows)
    for _ in range(statements):
        ctx.conn.execute(query)


@dataclass
class RawRun:
    rate: float                  # requests/s, receiver side, first → last arrival
    cpu_us: float                # the client's CPU per request (its requests only, not its start-up)


def raw(ctx: Ctx, lib: str, concurrency: int, count: int, gc: str = "python") -> RawRun:
    """A raw client process at ``concurrency``: its rate (receiver-side, first → last arrival) and CPU."""
    ctx.rx.reset()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.rawclient", "--lib", lib, "--url", ctx.rx.url("/raw"),
         "--count", str(count), "--concurrency", str(concurrency), "--gc", gc],
        cwd=REPO, capture_output=True, text=True, timeout=max(60, count / 100))
    if proc.returncode != 0:
        raise RuntimeError(f"raw client {lib} failed:\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["errors"]:
        raise RuntimeError(f"raw client {lib}: {result['errors']} non-200 answers")
    got = _arrivals(ctx, count, 0.0, True, time.time(), None)
    cpu_us = result["cpu_seconds"] / count * 1e6
    ctx.log(f"    raw {lib:14} (GC {gc}) x{concurrency:<4} {got.wire_rate:7.0f} req/s ({got.received} requests, "
            f"{cpu_us:.0f} µs CPU each)")
    return RawRun(got.wire_rate, cpu_us)


@dataclass
class Shape:
    """The drains of one backlog shape, one per round."""
    label: str
    runs: list[Drain]

    @property
    def rate(self) -> float:
        return median([d.got.rate for d in self.runs])

    @property
    def cpu_us(self) -> float | None:
        per = [p for d in self.runs if (p := d.cpu.daemon_us_per(d.got.received)) is not None]
        return median(per) if per else None

    def share(self, pick: Callable[[CpuShares], float | None]) -> float | None:
        got = [x for d in self.runs if (x := pick(d.cpu)) is not None]
        return median(got) if got else None

    @property
    def complete(self) -> bool:
        return all(d.got.complete for d in self.runs)

    @property
    def status(self) -> str:
        return "drained" if self.complete else "; ".join(d.got.status for d in self.runs)


def backlog_and_ceiling(ctx: Ctx) -> None:
    """Goal 1: two backlogs (1-row events; statements of many rows) drained by the daemon with its
    default settings, each ÷ the raw ceiling of the daemon's own client measured around them; in
    rounds (raw, drains, raw, drains, raw), medians of the rounds."""
    s = ctx.sizes
    conc = url_concurrency()
    writes = [(f"{s.backlog_events:,} 1-row events", lambda: write_one_row_events(ctx, s.backlog_events)),
              (f"{s.bulk_statements} statements of {s.bulk_statement_rows:,} rows",
               lambda: write_statements(ctx, s.bulk_statements, s.bulk_statement_rows))]
    ctx.log(f"raw clients x{conc} around {s.drain_rounds} round(s) of drains of "
            f"{' and '.join(label for label, _ in writes)} (1 URL)")
    runs: dict[str, list[RawRun]] = {label: [] for label, _, _ in RAW_CLIENTS}

    def raw_round(order: Sequence[tuple[str, str, str]]) -> None:
        for label, lib, gc in order:
            runs[label].append(raw(ctx, lib, conc, s.raw_requests, gc))

    raw_round(RAW_CLIENTS)
    ctx.set_urls(["/drain"])
    shapes = [Shape(label, []) for label, _ in writes]
    for rnd in range(s.drain_rounds):
        for shape, (label, write) in zip(shapes, writes, strict=True):
            ctx.reset(V.BRIDGE_STOPPED)
            write()
            d = drain(ctx, s.drain_limit)
            ctx.log(f"    {label}: {d.got.rate:.0f}/s end to end, {d.got.wire_rate:.0f}/s on the wire, "
                    f"peak RSS {fmt_mb(d.peak_rss_mb)}, {d.got.status}")
            shape.runs.append(d)
        raw_round(RAW_CLIENTS[::-1] if rnd % 2 == 0 else RAW_CLIENTS)
    rates = {label: [r.rate for r in rs] for label, rs in runs.items()}
    cpu_us = {label: median([r.cpu_us for r in rs]) for label, rs in runs.items()}
    ceiling_label = max(CEILING_CLIENTS, key=lambda label: median(rates[label]))
    ceiling = median(rates[ceiling_label])
    ctx.measured["ceiling"] = ceiling
    ctx.measured["drain_1row"] = shapes[0].rate
    if (per := shapes[0].cpu_us) is not None:
        ctx.measured["drain_1row_cpu_us"] = per
    ctx.report.facts["raw-client ceiling"] = (f"{ceiling:.0f} requests/s (httpx on the daemon's transport, "
                                              f"{conc} at once, one receiver on 127.0.0.1; the faster of Python's "
                                              "and the daemon's GC thresholds)")
    t = Table(f"Backlog drain and raw-client ceiling: 1 URL, {conc} calls at once (the daemon's default "
              "for one URL)", ["client", "events or requests/s", "runs", "÷ ceiling", "CPU µs per call",
                               "duplicates", "peak RSS", "daemon CPU", "receiver CPU", "server CPU", "note"])
    for label, _, _ in RAW_CLIENTS:
        t.rows.append([f"raw {label}", f"{median(rates[label]):.0f}", " / ".join(f"{r:.0f}" for r in rates[label]),
                       f"{median(rates[label]) / ceiling:.2f}", f"{cpu_us[label]:.0f}", "", "", "", "", "", ""])
    for shape in shapes:
        rss = [r for d in shape.runs if (r := d.peak_rss_mb) is not None]
        t.rows.append([f"daemon, {shape.label}", f"{shape.rate:.0f}",
                       " / ".join(f"{d.got.rate:.0f}" for d in shape.runs),
                       f"{shape.rate / ceiling:.2f}", fmt_us(shape.cpu_us),
                       f"{sum(d.got.duplicates for d in shape.runs):,}", fmt_mb(max(rss) if rss else None),
                       pct(shape.share(lambda c: c.daemon_total)), pct(shape.share(lambda c: c.receiver)),
                       pct(shape.share(lambda c: c.server)),
                       f"{shape.status}; " + " / ".join(f"{d.got.wire_rate:.0f}" for d in shape.runs)
                       + f"/s on the wire; machine CPU {pct(shape.share(lambda c: c.machine))}"])
    t.notes += [
        f"{s.raw_requests:,} requests per raw run; {s.drain_rounds} round(s): raw, drains, raw, ... , raw "
        "(each raw client once per turn, the order reversed every turn); each raw client is its own process, "
        "as the daemon is; raw rate = first → last arrival at the receiver. The ceiling is the faster median "
        f"of raw {CEILING_LIB} with Python's garbage-collector thresholds and with the daemon's "
        "(bridge.aio.tune_gc). Daemon rows: the median of the rounds (runs: each round's rate); duplicates "
        "summed, peak RSS the largest, CPU the medians.",
        "Daemon rate, end to end = distinct calls received ÷ (last arrival - the daemon's 'ready' log line), "
        f"receiver clock; backlogs written while no daemon ran; a drain not finished within {s.drain_limit:g} s "
        "is reported as its rate so far. CPU: % of one core over the drain. CPU µs per call: a raw client's "
        "own CPU over its requests ÷ requests (median of its runs); the daemon's CPU over the drain ÷ calls "
        "received (everything it does per call: claim, send, record).",
    ]
    ctx.report.tables.append(t)
    r1, r2 = (shape.rate / ceiling for shape in shapes)
    ctx.report.set("1", f"{r1:.2f} and {r2:.2f} ({shapes[0].rate:.0f} and {shapes[1].rate:.0f}/s "
                        f"vs raw {ceiling:.0f}/s)",
                   r1 >= 0.9 and r2 >= 0.9 and all(shape.complete for shape in shapes),
                   "; ".join(f"{shape.label}: {shape.status}" for shape in shapes)
                   + _cpu_note(shapes, cpu_us[ceiling_label]))


def fmt_us(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f}"


def _cpu_note(shapes: list[Shape], raw_us: float) -> str:
    """What bounds a drain: the daemon's CPU per call and its share of a core, beside the raw client's."""
    per = [shape.cpu_us for shape in shapes]
    if any(p is None for p in per):
        return ""
    return ("; CPU per call (medians): daemon " + " and ".join(fmt_us(p) for p in per)
            + " µs at " + " and ".join(pct(shape.share(lambda c: c.daemon_total)) for shape in shapes)
            + f" of a core, the ceiling's raw client {raw_us:.0f} µs per request")
