"""What every phase of the bench needs: the database, the receiver, the writers, the sizes.

The bench sees the delivery engine only from outside: the receiver's requests, the daemon's
process, the server's CPU, the size of whatever tables schema crm_bridge has, and the
configuration interface (crm_bridge.attach, crm_bridge.crm_trigger).  It never reads the
engine's own tables, so the same bench measures any engine behind the same interface.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

from bridge.settings import Settings

from . import procstat
from .config import Sizes
from .env import BenchDB
from .procs import DaemonProcess, ReceiverProcess
from .report import Report
from .sqlq import BQ
from .variants import BENCH_LOGS, Variant, use
from .writers import Writers

# The daemon runs with its production defaults (procs.DaemonProcess drops every CRM_BRIDGE_*
# setting of the caller's); a phase may set a few, e.g. a short retention.
DAEMON_ENV: dict[str, str] = {}


def url_concurrency() -> int:
    """Calls the daemon holds at once for one URL with its default settings: what raw clients
    are measured at."""
    defaults = Settings()
    return min(defaults.max_in_flight_per_url, defaults.concurrency)


@dataclass
class Ctx:
    db: BenchDB
    rx: ReceiverProcess
    writers: Writers
    sizes: Sizes
    workdir: Path
    report: Report
    log: Callable[[str], None]
    conn: psycopg.Connection     # autocommit, to the benchmark database
    url_paths: list[str] = field(default_factory=list)
    # Figures one phase measures and a later one divides by (e.g. the 1-row drain rate).
    measured: dict[str, float] = field(default_factory=dict)

    # -- state of the benchmark database ---------------------------------------------------------
    def reset(self, variant: Variant, *, checkpoint: bool = True) -> None:
        """Empty the CRM table and every work table of crm_bridge, configure the current URLs
        again, put ``variant``'s capture on crm.case, checkpoint."""
        self.conn.execute(BQ.clear_urls)
        tables = [sql.Identifier("crm_bridge", t) for t in self.db.work_tables]
        tables += [sql.Identifier("crm", "case")] + [sql.Identifier("bench", t) for t in BENCH_LOGS]
        self.conn.execute(sql.SQL("TRUNCATE {} CASCADE").format(sql.SQL(", ").join(tables)))
        self._add_urls()
        use(self.conn, variant)
        if checkpoint:
            self.conn.execute(BQ.checkpoint)

    def settle(self, *, busy_below: float = 0.25) -> str:
        """Wait (at most sizes.settle_limit s) until the server runs no autovacuum worker and the whole
        machine was busy less than ``busy_below`` of one core over the last second: what the
        previous phase left running (vacuum of what it deleted, WAL writing, a receiver still
        logging) must not be measured as the next phase's latency.  Returns what it saw."""
        limit = self.sizes.settle_limit
        deadline = time.monotonic() + limit
        while True:
            workers = int(self.conn.execute(BQ.autovacuum_workers).fetchone()[0])
            b0, t0 = procstat.machine_busy_seconds(), time.monotonic()
            time.sleep(1.0)
            b1 = procstat.machine_busy_seconds()
            busy = (b1 - b0) / (time.monotonic() - t0) if b0 is not None and b1 is not None else None
            quiet = workers == 0 and (busy is None or busy < busy_below)
            if quiet or time.monotonic() >= deadline:
                seen = (f"machine busy {busy * 100:.0f} % of a core" if busy is not None else "machine load unknown")
                return (f"{'settled' if quiet else f'not settled after {limit:g} s'}: {seen}, "
                        f"{workers} autovacuum workers")

    def set_urls(self, paths: list[str]) -> list[str]:
        """Configure one receiver URL per path for case/create (kept across resets); return the URLs."""
        self.url_paths = list(paths)
        self.conn.execute(BQ.clear_urls)
        return self._add_urls()

    def _add_urls(self) -> list[str]:
        urls = [self.rx.url(p) for p in self.url_paths]
        for url in urls:
            self.conn.execute(BQ.add_url, {"url": url})
        return urls

    def cases(self) -> int:
        """Cases written since the last reset: the calls to expect per URL."""
        row = self.conn.execute(BQ.cases).fetchone()
        return int(row[0]) if row else 0

    # -- the daemon ---------------------------------------------------------------------------
    @contextmanager
    def daemons(self, n: int, env: dict[str, str] | None = None) -> Iterator[list[DaemonProcess]]:
        """``n`` real daemons, started side by side; on exit they are stopped and any server
        process they left behind is ended (a long claim statement would otherwise run on)."""
        ds = [DaemonProcess(self.db.dsn, self.workdir, {**DAEMON_ENV, **(env or {})}) for _ in range(n)]
        with ExitStack() as stack:
            stack.callback(self._end_daemon_backends)
            for d in ds:
                stack.callback(d.stop)
                d.spawn()
            for d in ds:
                d.wait_ready()
            yield ds

    @contextmanager
    def daemon(self, env: dict[str, str] | None = None) -> Iterator[DaemonProcess]:
        with self.daemons(1, env) as ds:
            yield ds[0]

    def _end_daemon_backends(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.conn.execute(BQ.stop_daemon_backends)
            row = self.conn.execute(BQ.daemon_backends_left).fetchone()
            if not row or not row[0] or time.monotonic() > deadline:
                return
            time.sleep(0.1)
