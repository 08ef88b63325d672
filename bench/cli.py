"""``python -m bench``: run every measurement side by side, print the table, optionally write RESULTS.md.

Exit status: 0 when every goal was met (always 0 with --quick, which only proves the harness
runs), 1 when a goal was not met, 2 on a harness error, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import ExitStack
from pathlib import Path
from types import FrameType

from . import batching, bulk, drain, idle, latency, retention, scaleout, writes
from .config import FULL, QUICK
from .context import Ctx
from .env import load_average, machine_facts, open_bench_db
from .procs import ReceiverProcess
from .report import Report
from .writers import Pgbench, PythonWriters

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

# Order matters: drain (goal 1) measures the rates bulk (goal 2) and livemax (goal 7) divide by;
# the CPU-per-transaction comparisons run first, on a machine not yet warmed by long drains.
PHASES = {
    "writes": writes.eight_writers,
    "latency": latency.latency,
    "drain": drain.backlog_and_ceiling,
    "bulk": bulk.million,
    "livemax": latency.highest_steady_rate,
    "retention": retention.retention,
    "scaleout": scaleout.two_daemons,
    "batching": batching.batched_vs_single,
    "idle": idle.idle,
}


def declare_goals(report: Report) -> None:
    """The goal table of issue 11 (delivery engine v2)."""
    report.goal("1", "backlog drain, 1 URL, default concurrency: 100,000 1-row events, and 10 statements of "
                     "10,000 rows: end to end ÷ raw ceiling of the daemon's own client (httpx on its transport)",
                "≥ 0.9 both")
    report.goal("2", "one 1,000,000-row INSERT: drain rate ÷ rate of 1-row events (goal 1); peak daemon RSS",
                "≥ 0.8; < 150 MB")
    report.goal("3", "an event committed right after that INSERT: commit → delivered", "≤ 2 s")
    report.goal("4", "server CPU per tx for the daemon's bookkeeping: 8 writers x 1-row tx, daemon delivering "
                     "minus trigger alone", "≤ 20 µs")
    report.goal("5", "trigger alone ÷ no trigger, server CPU per tx; writer throughput ÷ PgQ pgq.logutriga "
                     "and ÷ Hasura-style log, same workload", "≤ 1.3; ≥ 1.2 and ≥ 1.1")
    report.goal("6", "live: commit → request received at 200 events/s", "p50 < 2 ms, p99 < 10 ms")
    report.goal("7", "live: highest steady rate (p99 < 100 ms over 30 s) ÷ backlog drain rate (goal 1)", "≥ 0.8")
    report.goal("8", "tables stay bounded: 300,000 events delivered with a short retention: size and dead "
                     "tuples of every crm_bridge relation after vs before, round over round",
                "≤ 1.5x, no growth")
    report.goal("9", "two daemons ÷ one daemon, drain rate; cores and what limits it", "reported", reported=True)
    # Issue 13.3 (batched calls): a figure to report, no threshold.
    report.goal("B", "batched calls (issue 13.3): backlog of 1-row events, POST, calls/s with batch_max = 100 "
                     "÷ single calls, same receiver", "reported", reported=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="small sizes (CI): proves the harness runs; never fails on goals")
    p.add_argument("--dsn", help="use this PostgreSQL server (a database crm_bridge_bench_<pid> is created "
                                 "and dropped; needs CREATEDB) instead of a throwaway durable cluster")
    p.add_argument("--write-results", nargs="?", const=str(RESULTS), metavar="PATH",
                   help="write the results as Markdown (default bench/RESULTS.md)")
    p.add_argument("--only", help=f"comma-separated phases to run (default all: {','.join(PHASES)})")
    p.add_argument("--keep-workdir", action="store_true", help="keep logs and scripts (for debugging)")
    return p


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM takes the same path as Ctrl-C so that every process and cluster is cleaned up.
    raise KeyboardInterrupt


def run(args: argparse.Namespace, argv: list[str]) -> Report:
    sizes = QUICK if args.quick else FULL
    phases = list(PHASES) if not args.only else [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        raise SystemExit(f"unknown phase(s) {', '.join(unknown)} (expected: {', '.join(PHASES)})")
    report = Report()
    declare_goals(report)
    started = time.monotonic()
    load_start = load_average()
    measured = code_version()     # the code as it is when the run starts (files edited later are not measured)

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    with ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="crm-bridge-bench-"))
        if args.keep_workdir:
            log(f"work directory (kept): {workdir}")
        else:
            stack.callback(shutil.rmtree, workdir, True)
        db = open_bench_db(stack, args.dsn, log)
        rx = stack.enter_context(ReceiverProcess(workdir))
        writers = Pgbench(db.pgbench, db.dsn, workdir) if db.pgbench else PythonWriters(db.dsn)
        conn = stack.enter_context(db.connect())
        ctx = Ctx(db=db, rx=rx, writers=writers, sizes=sizes, workdir=workdir, report=report, log=log, conn=conn)
        log(f"PostgreSQL {db.pg_version}; writers: {writers.name}; receiver on {rx.url('/')}; "
            f"PgQ: {db.pgq_missing or 'yes'}; emptied by every reset: crm_bridge.{{{','.join(db.work_tables)}}}")
        for phase in phases:
            PHASES[phase](ctx)
    report.facts = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m bench " + shlex.join(argv),
        "commit measured": measured if code_version() == measured else f"{measured} (the code changed during the run)",
        **report.facts,
        "mode": "quick (small sizes; goals reported, not enforced)" if args.quick else "full",
        **machine_facts(),
        "PostgreSQL": f"{db.pg_version} ({db.server})",
        "writers": writers.name,
        "load average (1/5/15 min) at start": load_start,
        "load average (1/5/15 min) at end": load_average(),
        "duration": f"{time.monotonic() - started:.0f} s",
    }
    return report


def code_version(top: Path | None = None) -> str:
    """The commit the measured code is at (``git rev-parse HEAD``), with ``-dirty`` when the work
    tree's bridge/, sql/ or bench/ differ from it (a new, not yet committed migration included): a
    figure is current only for the code it was measured on."""
    top = top or Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(top), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(top), "status", "--porcelain", "--untracked-files=all",
                                "--", "bridge", "sql", "bench"], capture_output=True, text=True, timeout=10,
                               check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"{head}-dirty" if dirty else head


PREFACE = [
    "Written by `python -m bench --write-results` (method and phases: bench/README.md); the goals are those",
    "of issue 11. Everything in one run, side by side; ratios are taken within a run (or a round of",
    "interleaved variants) because the machine is shared and noisy.",
]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        report = run(args, argv)
    except KeyboardInterrupt:
        print("bench: interrupted; everything it started has been stopped", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print("bench: failed; everything it started has been stopped", file=sys.stderr)
        return 2
    print(report.text())
    print("   * " + "\n   * ".join(f"{k}: {v}" for k, v in report.facts.items()))
    if args.write_results:
        path = Path(args.write_results)
        path.write_text(report.markdown("crm-bridge benchmark results", PREFACE))
        print(f"wrote {path}")
    unmet = report.unmet()
    if unmet and not args.quick:
        print(f"goals not met: {', '.join(g.number for g in unmet)}", file=sys.stderr)
        return 1
    return 0
