"""The daemon's Python cost per HTTP call, side by side with the raw client it sends with.

``python -m bench.profile_calls [--events 20000] [--profile] [--durable]``

Writes ``--events`` one-row events while no daemon runs, then, in one run: raw client (httpx on
the daemon's own aiohttp transport, ``bench.rawclient``) at the daemon's per-URL concurrency,
the real daemon draining the backlog, the raw client again.  It prints deliveries/s end to end
(database clock, as ``python -m bench``), daemon ÷ raw, and CPU per call of both processes.

``--profile`` adds a second drain (with metrics on) under py-spy (a sampling profiler, installed on its own:
``pip install py-spy``; not a dependency of crm-bridge) and splits the daemon's CPU per
delivery by function (inclusive: a row contains the rows indented under it).  The profiled drain
is slower (sampling costs the daemon a little); its rate is not the one compared with the raw
client.  PostgreSQL is a throwaway cluster with fsync off unless ``--durable``: the Python side is
what is measured here.  Only 127.0.0.1 is ever a target.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from bridge.devtools.pgserver import TempPostgres

from . import procstat
from . import variants as V
from .env import BenchDB, open_bench_db
from .procs import REPO, DaemonProcess, ReceiverProcess
from .sqlq import BQ, render
from .stats import median

CONCURRENCY = 32          # the daemon's default max_in_flight per URL (one URL here)
WRITE_CHUNK = 5_000       # one-row INSERTs per transaction when writing the backlog
SAMPLE_RATE = 500         # py-spy samples per second


# The per-call budget table: (label, depth, frames).  A sample counts for a row when one of its
# frames is one of ``frames``: "qualified.name@file suffix", nested functions (".<locals>.") of
# it included.  Rows are inclusive (an indented row is part of the row above it); samples of a
# depth-0 row are not counted again in the last row.
BUDGET: list[tuple[str, int, tuple[str, ...]]] = [
    ("claim → spawn (_drain_once: SQL, rows, spawning)", 0, ("Daemon._drain_once@bridge/daemon.py",)),
    ("psycopg execute/fetch (the SQL round trips)", 1, ("AsyncCursor.execute@psycopg/cursor_async.py",
                                                       "AsyncCursor.fetchall@psycopg/cursor_async.py",
                                                       "AsyncConnection.execute@psycopg/connection_async.py")),
    ("rows → dicts (dict_row, n_* filter)", 1, ("dict_row@psycopg/rows.py",
                                                "Daemon._drain_once.<locals>@bridge/daemon.py")),
    ("_spawn", 1, ("Daemon._spawn@bridge/daemon.py",)),
    ("Delivery.from_row", 2, ("Delivery.from_row@bridge/models.py",)),
    ("a task per call (start_soon) / queue handoff (put_nowait)", 2,
     ("TaskGroup.start_soon@anyio/abc/_tasks.py", "TaskGroup.start_soon@_backends/_asyncio.py",
      "Queue.put_nowait@asyncio/queues.py")),
    ("the call (_deliver)", 0, ("Daemon._deliver@bridge/daemon.py",)),
    ("attempt()", 1, ("attempt@bridge/deliver.py",)),
    ("call_secrets (urlsplit + regex)", 2, ("call_secrets@bridge/calls.py",)),
    ("plan_for (per-URL plan look-up)", 2, ("plan_for@bridge/calls.py",)),
    ("build_call / make_call (URL, headers, sign)", 2, ("build_call@bridge/calls.py", "make_call@bridge/calls.py")),
    ("sign (HMAC)", 3, ("sign@bridge/calls.py", "_signature@bridge/calls.py")),
    ("client.build_request (httpx)", 2, ("BaseClient.build_request@httpx/_client.py",)),
    ("deadline (anyio fail_after / asyncio.timeout)", 2,
     ("fail_after@anyio/_core/_tasks.py", "CancelScope.__enter__@_backends/_asyncio.py",
      "CancelScope.__exit__@_backends/_asyncio.py", "timeout@asyncio/timeouts.py",
      "Timeout.__aenter__@asyncio/timeouts.py", "Timeout.__aexit__@asyncio/timeouts.py",
      "deadline@bridge/aio.py", "Deadlines.enter@bridge/aio.py", "_Call.__aexit__@bridge/aio.py")),
    ("client.send (httpx + transport + aiohttp + socket writes)", 2, ("AsyncClient.send@httpx/_client.py",)),
    ("httpx cookie shims (extract_cookies)", 3, ("Cookies.extract_cookies@httpx/_models.py",)),
    ("BridgeTransport.handle_async_request", 3, ("BridgeTransport.handle_async_request@bridge/http.py",)),
    ("aiohttp session.request", 4, ("ClientSession._request@aiohttp/client.py",)),
    ("judge + safe_text + scrub", 2, ("RetryPolicy.judge@bridge/deliver.py", "safe_text@bridge/redact.py",
                                      "scrub@bridge/redact.py")),
    ("on_outcome (metrics)", 1, ("Service.on_outcome@bridge/service.py",)),
    ("logging", 1, ("Logger.debug@logging/__init__.py", "Logger.info@logging/__init__.py",
                    "Logger.warning@logging/__init__.py")),
    ("task done (anyio) / sender waiting (Queue.get)", 0,
     ("TaskGroup._spawn.<locals>.task_done@_backends/_asyncio.py", "Queue.get@asyncio/queues.py")),
    ("outcomes → database (_flusher)", 0, ("Daemon._flusher@bridge/daemon.py",)),
    ("socket reads outside a task (aiohttp protocol)", 0,
     ("_SelectorSocketTransport._read_ready@asyncio/selector_events.py",)),
    ("the rest (event loop, other tasks)", 0, ()),
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Raw:
    rate: float            # requests/s, the client's own clock
    cpu_ms: float          # the client process's CPU per request


@dataclass
class Drained:
    delivered: int
    other: int
    rate: float            # delivered ÷ (last outcome - first claim), database clock
    cpu_ms: float          # daemon CPU per delivery, ready → drained
    seconds: float
    complete: bool
    daemon_pct: float      # of one core, ready → drained
    server_pct: float      # PostgreSQL (every process of the cluster)
    receiver_pct: float


def raw(rx: ReceiverProcess, count: int, source: Path = REPO) -> Raw:
    """The raw-client ceiling: httpx on the daemon's client (``source``'s bridge.http), its own
    process, CPU from rusage."""
    rx.reset()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.rawclient", "--lib", "httpx-aiohttp", "--url", rx.url("/raw"),
         "--count", str(count), "--concurrency", str(CONCURRENCY),
         # with the daemon's GC thresholds (bridge.aio.tune_gc) where the tree has them
         *(["--gc", "daemon"] if "--gc" in (source / "bench" / "rawclient.py").read_text() else [])],
        cwd=source, capture_output=True, text=True, timeout=max(60, count / 100))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"raw client failed:\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["errors"]:
        raise RuntimeError(f"raw client: {result['errors']} non-200 answers")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    out = Raw(count / result["seconds"], cpu / count * 1000)
    which = "" if source == REPO else f" of {source}"
    log(f"raw httpx-aiohttp{which} x{CONCURRENCY}: {out.rate:.0f} req/s, {out.cpu_ms:.3f} ms CPU/request")
    return out


def write_backlog(db: BenchDB, conn: psycopg.Connection, url: str, events: int) -> None:
    tables = [sql.Identifier("crm_bridge", t) for t in db.work_tables] + [sql.Identifier("crm", "case")]
    conn.execute(sql.SQL("TRUNCATE {} CASCADE").format(sql.SQL(", ").join(tables)))
    V.use(conn, V.BRIDGE_STOPPED)
    conn.execute(BQ.clear_urls)
    conn.execute(BQ.add_url, {"url": url})
    left = events
    while left > 0:
        n = min(WRITE_CHUNK, left)
        conn.execute(render("insert_single_rows", rows=n))
        left -= n
    conn.execute(BQ.checkpoint)


class ProfiledDaemon(DaemonProcess):
    """The daemon started by ``py-spy record`` (raw collapsed stacks, non-blocking sampling)."""

    def __init__(self, dsn: str, workdir: Path, out: Path, env: dict[str, str], source: Path) -> None:
        super().__init__(dsn, workdir, env, source=source)
        self.out = out
        spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
        if spy is None:
            raise SystemExit("--profile needs py-spy (pip install py-spy)")
        self.spy = spy

    def command(self) -> list[str]:
        return [self.spy, "record", "--format", "raw", "--function", "-r", str(SAMPLE_RATE),
                "-o", str(self.out), "--", *super().command()]

    @property
    def pid(self) -> int:  # the daemon, not py-spy
        assert self.proc is not None
        for _ in range(100):
            kids = procstat.child_pids(self.proc.pid)
            if kids:
                return kids[0]
            time.sleep(0.05)
        raise RuntimeError("py-spy started no daemon")

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        # SIGTERM to the daemon: it drains and exits, then py-spy writes its file and exits.
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        code, self.proc = self.proc.returncode, None
        return code


def drain(db: BenchDB, conn: psycopg.Connection, rx: ReceiverProcess, workdir: Path, events: int,
          limit: float, *, metrics: bool, profile: Path | None = None,
          extra_env: dict[str, str] | None = None, source: Path = REPO) -> Drained:
    write_backlog(db, conn, rx.url("/drain0"), events)
    rx.reset()
    # Metrics (on_outcome) cost per call too; a random loopback port, nobody scrapes it.
    env = {"CRM_BRIDGE_METRICS_ADDR": "127.0.0.1:0"} if metrics else {}
    env.update(extra_env or {})
    daemon = (ProfiledDaemon(db.dsn, workdir, profile, env, source) if profile
              else DaemonProcess(db.dsn, workdir, env, source=source))
    with daemon:
        pid = daemon.pid
        t0, wall0, cpu0 = time.monotonic(), time.time(), procstat.cpu_seconds(pid) or 0.0
        srv0, rx0 = db.server_cpu() or 0.0, rx.cpu_seconds() or 0.0
        deadline = t0 + limit
        complete = True
        while rx.count() < events:
            if time.monotonic() > deadline:
                complete = False
                break
            time.sleep(0.05)
        seconds, cpu1 = time.monotonic() - t0, procstat.cpu_seconds(pid) or 0.0
        srv1, rx1 = db.server_cpu() or 0.0, rx.cpu_seconds() or 0.0
        arrivals = [at for at, _ in rx.records()]
    # The bench sees the engine from outside: calls as the receiver got them, from the daemon's
    # start (after its 'ready') to the last arrival.
    delivered, other = min(len(arrivals), events), max(0, len(arrivals) - events)
    window = max(arrivals) - wall0 if arrivals else 0.0
    if not complete:
        window = seconds
    out = Drained(delivered, other, delivered / window if window else 0.0,
                  (cpu1 - cpu0) / max(delivered, 1) * 1000, seconds, complete,
                  (cpu1 - cpu0) / seconds * 100, (srv1 - srv0) / seconds * 100, (rx1 - rx0) / seconds * 100)
    which = "" if source == REPO else f" of {source}"
    log(f"daemon{which}{' (profiled)' if profile else ''}: {out.rate:.0f} deliveries/s end to end, "
        f"{out.cpu_ms:.3f} ms CPU/delivery, {delivered} delivered, {other} other; CPU % of a core: daemon "
        f"{out.daemon_pct:.0f}, PostgreSQL {out.server_pct:.0f}, receiver {out.receiver_pct:.0f}"
        f"{'' if complete else ', NOT drained'}")
    return out


# -- the profile ---------------------------------------------------------------------------------
def _frames(stack: str) -> list[tuple[str, str]]:
    """py-spy's ``name (path/file.py:line)`` frames as (name, path)."""
    out = []
    for frame in stack.split(";"):
        name, _, where = frame.rpartition(" (")
        out.append((name, where.rstrip(")").rsplit(":", 1)[0]))
    return out


def _matches(frame: tuple[str, str], pattern: str) -> bool:
    name, path = frame
    want, _, suffix = pattern.partition("@")
    return (name == want or name.startswith(want + ".<locals>")) and path.endswith(suffix)


def analyse(path: Path, cpu_ms: float) -> tuple[list[tuple[str, float]], str]:
    """µs per delivery for every BUDGET row, from the samples taken inside the event loop (start-up
    imports are left out); the loop's samples share the CPU per delivery measured from /proc."""
    loop: list[tuple[list[tuple[str, str]], int]] = []
    other = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        frames = _frames(stack)
        if stack and any(_matches(f, "BaseEventLoop._run_once@asyncio/base_events.py") for f in frames):
            loop.append((frames, int(count)))
        elif stack:
            other += int(count)
    total = sum(n for _, n in loop) or 1
    per_sample_us = cpu_ms * 1000 / total
    rows: list[tuple[str, float]] = []
    claimed: set[int] = set()
    for label, depth, wanted in BUDGET:
        if wanted:
            hit = {i for i, (frames, _) in enumerate(loop) if any(_matches(f, w) for f in frames for w in wanted)}
            if depth == 0:
                claimed |= hit
        else:
            hit = set(range(len(loop))) - claimed
        rows.append(("  " * depth + label, sum(loop[i][1] for i in hit) * per_sample_us))
    selfs: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    for frames, n in loop:
        named = [f"{name} ({path.split('site-packages/')[-1]})" for name, path in frames]
        selfs[named[-1]] += n
        for f in set(named):
            incl[f] += n
    lines = ["top functions by own time (self, inclusive µs per delivery):"]
    lines += [f"  {n * per_sample_us:7.1f} {incl[f] * per_sample_us:7.1f}  {f}" for f, n in selfs.most_common(30)]
    lines.append(f"  ({total} samples in the event loop, {other} outside it (start-up, torn stacks); "
                 f"one = {per_sample_us:.2f} µs per delivery)")
    return rows, "\n".join(lines)


def _drain_line(label: str, d: Drained, raw_rate: float, raw_cpu: float) -> str:
    return (f"{label:34} {d.rate:6.0f}/s{'' if d.complete else ' (NOT drained)'}  ÷ raw {d.rate / raw_rate:.2f}  "
            f"CPU {d.cpu_ms * 1000:4.0f} µs/delivery ({(d.cpu_ms - raw_cpu) * 1000:+4.0f} vs raw)  "
            f"CPU % of a core: daemon {d.daemon_pct:.0f}, PostgreSQL {d.server_pct:.0f}, receiver {d.receiver_pct:.0f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=1, help="raw, drain(s), raw per round; medians are reported")
    p.add_argument("--compare", type=Path, metavar="DIR",
                   help="another source tree (`git archive COMMIT | tar -x -C DIR`): its daemon drains the same "
                        "backlog in every round too (order alternating), against the same receiver")
    p.add_argument("--profile", action="store_true", help="also drain under py-spy and split the CPU per call")
    p.add_argument("--micro", action="store_true",
                   help="time the per-call steps in this process (no database, no network) and exit")
    p.add_argument("--durable", action="store_true", help="fsync on (as python -m bench); default off")
    p.add_argument("--limit", type=float, default=120.0, help="seconds a drain may take")
    p.add_argument("--metrics", action="store_true",
                   help="serve metrics in the compared drains too (the profiled drain always does)")
    p.add_argument("--env", action="append", default=[], metavar="CRM_BRIDGE_X=V",
                   help="a daemon setting for every drain (e.g. CRM_BRIDGE_MAX_IN_FLIGHT_PER_URL=64)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, profile)")
    args = p.parse_args(argv)
    if args.micro:
        from .micro_calls import main as micro
        return micro()
    extra_env = dict(item.split("=", 1) for item in args.env)
    sources = [REPO] + ([args.compare.resolve()] if args.compare else [])
    drains: dict[Path, list[Drained]] = {src: [] for src in sources}
    # Each tree's daemon against the raw client on that tree's own HTTP client (bridge.http).
    raws: dict[Path, list[Raw]] = {src: [] for src in sources}
    with ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="crm-bridge-profile-"))
        if not args.keep:
            stack.callback(shutil.rmtree, workdir, True)
        else:
            log(f"work directory: {workdir}")
        dsn = None
        if not args.durable:
            pg = stack.enter_context(TempPostgres())
            dsn = pg.dsn()
        db = open_bench_db(stack, dsn, log)
        rx = stack.enter_context(ReceiverProcess(workdir))
        conn = stack.enter_context(db.connect())
        for r in range(args.rounds):
            order = sources if r % 2 == 0 else sources[::-1]
            for src in order:
                raws[src].append(raw(rx, args.events, src))
            for src in order:
                drains[src].append(drain(db, conn, rx, workdir, args.events, args.limit, metrics=args.metrics,
                                         extra_env=extra_env, source=src))
            for src in order[::-1]:
                raws[src].append(raw(rx, args.events, src))
        prof = None
        if args.profile:
            out = workdir / "daemon.pyspy.txt"
            dp = drain(db, conn, rx, workdir, args.events, args.limit, metrics=True, profile=out,
                       extra_env=extra_env)
            prof = analyse(out, dp.cpu_ms)
    print(f"\n{args.events:,} one-row events, 1 URL, concurrency {CONCURRENCY}, {args.rounds} round(s); medians")
    for src, runs in drains.items():
        name = "this tree" if src == REPO else src.name
        raw_rate, raw_cpu = median([r.rate for r in raws[src]]), median([r.cpu_ms for r in raws[src]])
        print(f"{f'raw httpx-aiohttp ({name})':34} {raw_rate:6.0f}/s  "
              f"(runs: {' / '.join(f'{r.rate:.0f}' for r in raws[src])})  CPU {raw_cpu * 1000:4.0f} µs/request")
        mid = sorted(runs, key=lambda d: d.rate)[len(runs) // 2]
        print(_drain_line(f"daemon ({name})", mid, raw_rate, raw_cpu)
              + (f"  (runs: {' / '.join(f'{d.rate:.0f}' for d in runs)})" if len(runs) > 1 else ""))
    if prof is not None:
        rows, top = prof
        print(f"\nper-call budget of the profiled drain (µs of daemon CPU per delivery, inclusive; "
              f"total {dp.cpu_ms * 1000:.0f} µs):")
        for label, us in rows:
            print(f"  {us:7.1f}  {label}")
        print(top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
