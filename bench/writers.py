"""CRM writers: pgbench with a custom script (preferred), else Python threads; and a NOTIFY counter.

pgbench is a C client: 8 pgbench clients cost the machine far less than 8 Python writers, so
the database, not the client, is what saturates.  ``-M prepared`` keeps the per-statement parse
cost out, which makes the trigger's share of each write *larger* (the stricter comparison).
"""

from __future__ import annotations

import math
import re
import resource
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql


@dataclass(frozen=True)
class WriteResult:
    transactions: int
    seconds: float

    @property
    def tps(self) -> float:
        return self.transactions / self.seconds if self.seconds > 0 else 0.0


class Pgbench:
    """Runs one SQL script with N clients for a number of seconds, or a number of transactions
    per client."""

    name = "pgbench"

    def __init__(self, exe: Path, dsn: str, workdir: Path) -> None:
        self.exe = exe
        self.dsn = dsn
        self.workdir = workdir

    def run(self, script: str, clients: int, seconds: int = 0, transactions: int = 0) -> WriteResult:
        path = self.workdir / f"script-{abs(hash(script))}.sql"
        path.write_text(script.rstrip().rstrip(";") + ";\n")
        length = f"--transactions={transactions}" if transactions else f"--time={max(1, int(seconds))}"
        cmd = [str(self.exe), "--no-vacuum", "--protocol=prepared", f"--client={clients}",
               f"--jobs={min(clients, 2)}", length, f"--file={path}", self.dsn]
        n, tps = _run_pgbench(cmd, seconds + transactions * clients / 100 + 120)
        # pgbench's own figure excludes connection set-up; derive the window from it.
        return WriteResult(n, n / tps if tps else float(seconds))


def _run_pgbench(cmd: list[str], timeout: float, cwd: Path | None = None) -> tuple[int, float]:
    """Run pgbench; (transactions processed, its tps without connection set-up), or RuntimeError
    with the end of its output."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    out = proc.stdout + proc.stderr
    done = re.search(r"number of transactions actually processed: (\d+)", out)
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
    if proc.returncode != 0 or not done or not tps:
        raise RuntimeError(f"pgbench failed ({proc.returncode}):\n{out[-2000:]}")
    return int(done.group(1)), float(tps.group(1))


@dataclass(frozen=True)
class PacedRun:
    commits: list[tuple[int, int, float]]   # (client, its transaction number from 1, time.time() at COMMIT's return)
    achieved: float                          # transactions per second
    cpu_seconds: float                       # the writer's own CPU (the client process, user + system)


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def paced_pgbench(exe: Path, dsn: str, workdir: Path, statement: str, clients: int, rate: float,
                  seconds: float, tag: str, defines: dict[str, str] | None = None) -> PacedRun:
    """``rate`` transactions per second in all for ``seconds`` (pgbench ``--rate``: Poisson arrivals,
    the schedule kept whatever the latency) on ``clients`` connections, one thread.  ``statement``
    may use ``:client_id``, ``:n``, the client's transaction number from 1, and ``defines``; pgbench's
    per-transaction log gives the time each COMMIT returned (the same moment the Python writer
    takes), matched by (client, n)."""
    script = workdir / f"paced-{tag}.sql"
    script.write_text(f"\\set n :n + 1\n{statement.rstrip().rstrip(';')};\n")
    for old in workdir.glob(f"paced-{tag}.log*"):
        old.unlink()
    per_client = max(1, math.ceil(rate * seconds / clients))
    cmd = [str(exe), "--no-vacuum", "--protocol=prepared", f"--client={clients}", "--jobs=1",
           f"--rate={rate}", f"--transactions={per_client}", "--define=n=0", "--log",
           f"--log-prefix={workdir / f'paced-{tag}.log'}", f"--file={script}",
           *(f"--define={k}={v}" for k, v in (defines or {}).items()), dsn]
    cpu0 = _children_cpu()
    _, tps = _run_pgbench(cmd, seconds * 3 + 120, workdir)
    cpu = _children_cpu() - cpu0
    commits: list[tuple[int, int, float]] = []
    for log in workdir.glob(f"paced-{tag}.log*"):
        for line in log.read_text().splitlines():
            # client_id transaction_no latency_us script_no time_epoch time_us [schedule_lag_us]
            f = line.split()
            commits.append((int(f[0]), int(f[1]), int(f[4]) + int(f[5]) / 1e6))
        log.unlink()
    return PacedRun(commits, tps, cpu)


class PythonWriters:
    """Fallback when pgbench is not installed: one thread and connection per client."""

    name = "Python writers (pgbench not found)"

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def run(self, script: str, clients: int, seconds: int = 0, transactions: int = 0) -> WriteResult:
        conns = [psycopg.connect(self.dsn, autocommit=True) for _ in range(clients)]
        seconds = seconds or 24 * 3600
        counts = [0] * clients
        start = threading.Barrier(clients + 1)
        deadline = 0.0
        errors: list[BaseException] = []

        def work(i: int) -> None:
            cur = conns[i].cursor()
            start.wait()
            try:
                while time.monotonic() < deadline and counts[i] != transactions:
                    cur.execute(script, prepare=True)
                    counts[i] += 1
            except BaseException as exc:  # reported by the caller
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(clients)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + seconds
        t0 = time.monotonic()
        start.wait()
        for t in threads:
            t.join(seconds + 60)
        elapsed = time.monotonic() - t0
        for c in conns:
            c.close()
        if errors:
            raise RuntimeError(f"Python writer failed: {errors[0]}")
        return WriteResult(sum(counts), elapsed)


Writers = Pgbench | PythonWriters


class NotifyCounter:
    """LISTENs on the bridge's channel and counts notifications: one per notifying commit (each
    transaction's payload carries its own xid, so PostgreSQL folds nothing across transactions).
    This is how the bench sees how often writers paid for NOTIFY's global commit lock."""

    def __init__(self, dsn: str, channel: str = "crm_bridge") -> None:
        self.dsn = dsn
        self.channel = channel
        self.count = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection | None = None

    def __enter__(self) -> NotifyCounter:
        self._conn = psycopg.connect(self.dsn, autocommit=True)
        self._conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
        self._thread = threading.Thread(target=self._run, name="notify-counter", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        assert self._conn is not None
        while not self._stop.is_set():
            for _ in self._conn.notifies(timeout=0.1):
                self.count += 1

    def settle(self) -> int:
        """The count after notifications already sent have had time to arrive."""
        time.sleep(0.2)
        return self.count

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._conn is not None:
            self._conn.close()
