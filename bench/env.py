"""Where the bench runs: a throwaway durable PostgreSQL (or the user's server), one benchmark
database with crm_bridge, the reference CRM and the bench's own objects, and the machine facts
that go into RESULTS.md."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from bridge.devtools.pgserver import PostgresNotFound, TempPostgres, find_bindir
from bridge.migrate import migrate

from . import procstat
from .sqlq import BQ, variants_sql


@dataclass
class BenchDB:
    dsn: str                     # the benchmark database
    pg_version: str
    pgbench: Path | None         # None: fall back to Python writers
    postmaster: int | None       # None: server CPU cannot be read (not on this machine)
    server: str                  # "throwaway cluster (...)" or "--dsn"
    work_tables: list[str]       # crm_bridge tables a reset empties (see _install)
    pgq_missing: str | None      # why PgQ cannot be compared here; None: it can
    statements: bool = False     # pg_stat_statements is there (goal 4's breakdown)

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.dsn, autocommit=True)

    def server_cpu(self) -> float | None:
        """CPU seconds the whole server (all backends, walwriter, checkpointer...) used so far."""
        return procstat.tree_cpu_seconds(self.postmaster) if self.postmaster else None


def _find_pgbench(bindir: Path | None) -> Path | None:
    if bindir is not None and (bindir / "pgbench").is_file():
        return bindir / "pgbench"
    if found := shutil.which("pgbench"):
        return Path(found)
    with contextlib.suppress(PostgresNotFound):
        candidate = find_bindir() / "pgbench"
        if candidate.is_file():
            return candidate
    return None


def _local_postmaster(conn: psycopg.Connection) -> int | None:
    """The postmaster's pid if the server runs on this machine (our backend's parent)."""
    row = conn.execute(BQ.backend_pid).fetchone()
    backend = int(row[0]) if row else 0
    try:
        cmd = Path(f"/proc/{backend}/cmdline").read_bytes()
        ppid = int(Path(f"/proc/{backend}/stat").read_text().rsplit(")", 1)[1].split()[1])
        parent = Path(f"/proc/{ppid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return None
    # A pid on this machine that is not a PostgreSQL backend means the server is elsewhere.
    return ppid if cmd.startswith(b"postgres") and b"postgres" in parent else None


def _install(dsn: str) -> tuple[list[str], str | None]:
    """Install the bridge, the reference CRM and the bench's own objects; return the crm_bridge
    tables that hold work and whether PgQ is missing.

    The bench names no table of the delivery engine: right after `migrate`, tables that already
    have rows are the engine's own bookkeeping (versions, object types, attachments...) and are
    kept; crm_trigger is configuration, rewritten through its interface by every reset; every
    other table holds work (outbox, deliveries, history, whatever the installed engine has) and
    is emptied between runs."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrate(conn, reference=True)
        work = []
        for (name,) in conn.execute(BQ.crm_bridge_tables).fetchall():
            has_rows = conn.execute(sql.SQL("SELECT EXISTS (SELECT FROM {})").format(
                sql.Identifier("crm_bridge", name))).fetchone()
            if name != "crm_trigger" and not (has_rows and has_rows[0]):
                work.append(str(name))
        conn.execute(variants_sql())
        conn.execute(BQ.seed_customers)
        pgq_missing = None
        try:
            conn.execute(BQ.pgq_install)
        except psycopg.Error:
            pgq_missing = "skipped: pgq not installed on this server"
    return work, pgq_missing


def open_bench_db(stack: ExitStack, dsn: str | None, log: Callable[[str], None]) -> BenchDB:
    """Start a durable throwaway cluster (or use ``dsn``) and create the benchmark database.

    Everything created is registered on ``stack`` and removed when it closes."""
    dbname = f"crm_bridge_bench_{os.getpid()}"
    cluster: TempPostgres | None = None
    if dsn is None:
        # fsync, synchronous_commit and full_page_writes on: commit cost is what is measured.
        cluster = TempPostgres(durable=True)
        if (cluster.bindir.parent / "lib" / "pg_stat_statements.so").exists():
            cluster.settings["shared_preload_libraries"] = "'pg_stat_statements'"

        log(f"starting a throwaway durable PostgreSQL from {cluster.bindir}")
        stack.enter_context(cluster)
        admin_dsn = cluster.dsn()
        server = f"throwaway cluster, {cluster.bindir}, fsync=on, synchronous_commit=on, shared_buffers=128MB"
    else:
        admin_dsn = dsn
        server = "user-supplied --dsn"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(dbname)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        version = str(conn.execute(BQ.server_version).fetchone()[0])  # type: ignore[index]
        postmaster = (procstat.postmaster_pid(cluster.datadir) if cluster else _local_postmaster(conn))
    if cluster is None:
        stack.callback(_drop_database, admin_dsn, dbname)
    bench_dsn = make_conninfo(admin_dsn, dbname=dbname)
    work_tables, pgq_missing = _install(bench_dsn)
    statements = True
    try:
        with psycopg.connect(bench_dsn, autocommit=True) as conn:
            conn.execute(BQ.statements_install)
            conn.execute(BQ.statements_reset)
    except psycopg.Error:
        statements = False      # not preloaded (a --dsn server, or no contrib): no breakdown
    return BenchDB(dsn=bench_dsn, pg_version=version,
                   pgbench=_find_pgbench(cluster.bindir if cluster else None),
                   postmaster=postmaster, server=server, work_tables=work_tables, pgq_missing=pgq_missing,
                   statements=statements)


def _drop_database(admin_dsn: str, dbname: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))


def machine_facts() -> dict[str, str]:
    """What RESULTS.md records about the machine."""
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpus (nproc)": str(os.cpu_count()),
        "cpu": cpu,
        "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
    }


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"
