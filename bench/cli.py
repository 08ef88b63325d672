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

from . import drain, idle, latency, writes
from .config import FULL, QUICK
from .context import Ctx
from .env import load_average, machine_facts, open_bench_db
from .procs import ReceiverProcess
from .report import Report
from .writers import Pgbench, PythonWriters

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

# Order matters only for the shared machine: the long, CPU-heavy write comparisons first.
PHASES = {
    "writes": writes.eight_writers,
    "scale": writes.scaling,
    "bulk": writes.bulk,
    "latency": latency.latency,
    "drain": drain.backlog_and_ceiling,
    "fanout": drain.fanout,
    "idle": idle.idle,
}


def declare_goals(report: Report) -> None:
    report.goal("1", "CRM write throughput, 8 writers x 1-row tx: bridge ÷ no trigger", "≥ 0.85")
    report.goal("2", "same workload: bridge ÷ Hasura-style JSON log trigger", "> 1.0")
    report.goal("3", "1 writer; and one 10,000-row INSERT: bridge ÷ no trigger", "≥ 0.7")
    report.goal("4", "commit → request received at 200 events/s (loopback)", "p50 < 3 ms, p99 < 15 ms")
    report.goal("5", "deliveries/s end to end ÷ fastest raw client, same concurrency", "≥ 0.8")
    report.goal("6", "100,000-event backlog (daemon was down): drain rate, daemon peak RSS",
                "≥ 2,000/s, < 150 MB")
    report.goal("7", "daemon CPU when idle", "~0 (< 1 % of a core)")


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
        log(f"PostgreSQL {db.pg_version}; writers: {writers.name}; receiver on {rx.url('/')}")
        for phase in phases:
            PHASES[phase](ctx)
    report.facts = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m bench " + shlex.join(argv),
        "commit measured": code_version(),
        "mode": "quick (small sizes; goals reported, not enforced)" if args.quick else "full",
        **machine_facts(),
        "PostgreSQL": f"{db.pg_version} ({db.server})",
        "writers": writers.name,
        "load average (1/5/15 min) at start": load_start,
        "load average (1/5/15 min) at end": load_average(),
        "duration": f"{time.monotonic() - started:.0f} s",
    }
    return report


def code_version() -> str:
    """The commit the measured code is at, and whether the work tree differed from it: a figure
    is current only for the code it was measured on."""
    top = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(top), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(top), "status", "--porcelain", "--untracked-files=no",
                                "--", "bridge", "sql", "bench"], capture_output=True, text=True, timeout=10,
                               check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"{head} (with uncommitted changes to bridge/, sql/ or bench/)" if dirty else head


PREFACE = [
    "Written by `python -m bench --write-results` (method: bench/README.md; what limits the unmet goals and",
    "the proposed core changes: bench/FINDINGS.md). Everything in one run, side by side; ratios are taken",
    "within a round (interleaved variants) because the machine is shared and noisy.",
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
