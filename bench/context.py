"""What every phase of the bench needs: the database, the receiver, the writers, the sizes."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg

from .config import Sizes
from .env import BenchDB
from .procs import DaemonProcess, ReceiverProcess
from .report import Report
from .sqlq import BQ
from .variants import Variant, use
from .writers import Writers

# The daemon runs with its production defaults; only the log level is pinned (the bench waits
# for its "ready" line).
DAEMON_ENV: dict[str, str] = {}


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

    # -- state of the benchmark database ---------------------------------------------------------
    def reset(self, variant: Variant, *, checkpoint: bool = True) -> None:
        """Empty tables, put ``variant``'s trigger on crm.case, checkpoint."""
        self.conn.execute(BQ.reset)
        use(self.conn, variant)
        if checkpoint:
            self.conn.execute(BQ.checkpoint)

    def set_urls(self, paths: list[str]) -> list[str]:
        """Configure one receiver URL per path for case/create; return the URLs."""
        self.conn.execute(BQ.clear_urls)
        urls = [self.rx.url(p) for p in paths]
        for url in urls:
            self.conn.execute(BQ.add_url, {"url": url})
        return urls

    def drained(self) -> bool:
        row = self.conn.execute(BQ.drained).fetchone()
        return bool(row and row[0])

    def wait_drained(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.drained():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    # -- the daemon ---------------------------------------------------------------------------
    @contextmanager
    def daemon(self, env: dict[str, str] | None = None) -> Iterator[DaemonProcess]:
        d = DaemonProcess(self.db.dsn, self.workdir, {**DAEMON_ENV, **(env or {})})
        d.start()
        try:
            yield d
        finally:
            d.stop()
