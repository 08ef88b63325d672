"""What runs around the daemon in production: systemd notifications and the opt-in metrics.

* ``READY=1`` once the daemon LISTENs and its catch-up drain is running (Daemon's on_ready).
* ``WATCHDOG=1`` every third of ``WatchdogSec`` -- only while the daemon reaches its database
  (``Daemon.healthy``) and its main loop keeps turning (``Daemon.loop_tick``).  A daemon that
  cannot reach PostgreSQL, or whose loop is stuck (e.g. a query on a half-open TCP connection),
  stops pinging and systemd restarts it after ``WatchdogSec``.
* ``STATUS=`` every ``status_interval``: backlog, pending/retrying, deliveries/s, dead letters
  (read from the crm_bridge.summary view; ``systemctl status crm-bridge`` shows it).
* ``STOPPING=1`` when a stop begins.
* ``/healthz`` and ``/readyz`` on the metrics server (health / readiness below): liveness is the
  watchdog's "main loop turning" without the database (restarting a daemon does not bring a
  database back); readiness is "reaches the database, and its schema is the version this code was
  written for" (read by the status task every ``status_interval``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator

import anyio
import psycopg
from psycopg.rows import dict_row

from .daemon import Daemon
from .listen import CONNECT_KWARGS
from .metrics import MAX_URL_LABELS, Metrics, Snapshot
from .migrate import latest_version
from .models import Delivery, Outcome
from .redact import clean_text
from .sdnotify import Notifier
from .settings import Settings
from .sqlfiles import Q

log = logging.getLogger("crm_bridge.service")


def format_age(seconds: float | None) -> str:
    """``0.4 s``, ``12 s``, ``5 min``, ``3.2 h``, ``2.0 d``; ``-`` when there is nothing."""
    if seconds is None or math.isnan(seconds):
        return "-"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def status_line(snapshot: Snapshot | None, rate: float, healthy: bool) -> str:
    """The one-line STATUS= summary."""
    parts = [] if healthy else ["database unavailable"]
    if snapshot is not None:
        s = snapshot.summary
        backlog = f"backlog {s['backlog']}"
        if s["backlog"]:
            backlog += f" (oldest {format_age(s['oldest_event_age'])})"
        pending = f"{s['pending']} pending"
        if s["retrying"]:
            pending += f" ({s['retrying']} retrying)"
        parts += [backlog, pending]
    parts.append(f"{rate:.1f} deliveries/s")
    if snapshot is not None:
        dead = snapshot.summary["dead"]
        parts.append(f"{dead} dead letter{'' if dead == 1 else 's'}")
    return ", ".join(parts)


class Service:
    """The process around one Daemon: its hooks (on_ready, on_outcome) feed systemd and the
    metrics; run() pings the watchdog and refreshes STATUS= and the metrics' database numbers."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.notifier = Notifier()
        self.metrics = Metrics() if settings.metrics_addr else None
        self.daemon: Daemon | None = None
        self.snapshot: Snapshot | None = None
        self.rate = 0.0
        self._stopping = False
        self._held_back = False         # watchdog pings withheld (logged once per outage)
        self._schema_warned = False
        self._status_error: str | None = None   # why the last status read failed (readiness)
        self._started = time.monotonic()
        self.latest_schema = latest_version()

    # -- hooks the daemon calls -------------------------------------------------------------
    def on_ready(self) -> None:
        self.notifier.ready(f"ready; {status_line(self.snapshot, self.rate, True)}")

    def on_outcome(self, d: Delivery, outcome: Outcome) -> None:
        if self.metrics is None:
            return
        try:
            self.metrics.observe(d, outcome)
        except Exception:  # metrics must never break a delivery
            log.exception("could not record metrics for delivery %d", d.id)

    def stopping(self) -> None:
        if not self._stopping:
            self._stopping = True
            self.notifier.stopping("stopping: finishing in-flight deliveries")

    # -- lifetime ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def serving(self, daemon: Daemon) -> Iterator[Service]:
        """Start the metrics endpoint (before anything else, so a busy port fails at once)."""
        self.daemon = daemon
        if self.metrics is not None:
            self.metrics.daemon = daemon
            host, port = self.metrics.serve(self.settings.metrics_addr, probes=self)
            shown = f"[{host}]" if ":" in host else host
            log.info("serving Prometheus metrics on http://%s:%d/metrics (probes: /healthz, /readyz)",
                     shown, port)
        self.notifier.status("starting: connecting to PostgreSQL")
        try:
            yield self
        finally:
            self.stopping()
            if self.metrics is not None:
                self.metrics.close()
            self.notifier.close()

    async def run(self) -> None:
        """The watchdog and status tasks; runs until cancelled."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watchdog_loop)
            tg.start_soon(self._status_loop)

    # -- watchdog and probes -----------------------------------------------------------------
    def alive(self) -> bool:
        """Healthy enough to ping the watchdog: database reachable and the main loop turning."""
        d = self.daemon
        if d is None or not d.healthy or not d.ready.is_set():
            return False
        return self._loop_turning(d)

    def _loop_turning(self, d: Daemon) -> bool:
        if self._stopping:
            return True  # the main loop has ended on purpose; TimeoutStopSec governs now
        # A loop waiting for free delivery slots is not stuck: each call has its own timeout.
        return d.loop_stalled() < self.stall_limit() or d.held >= self.settings.concurrency

    def stall_limit(self) -> float:
        """How long the main loop may go without a turn before it counts as stuck: twice the poll
        interval plus 5 s (9 s by default), or WatchdogSec when that is longer.  Deliberate
        back-off after a database error (and the reconnect after it) does not count."""
        watchdog = self.notifier.watchdog_interval or 0.0
        return max(watchdog, 2 * self.settings.poll_interval + 5.0)

    def health(self) -> tuple[bool, str]:
        """/healthz: the process is up and its main loop turns (the database is readiness's)."""
        d = self.daemon
        if d is None or not d.ready.is_set():
            # Start-up: the pool waits up to 30 s for PostgreSQL, then the daemon exits.
            waited = time.monotonic() - self._started
            limit = self.stall_limit() + 30.0 + CONNECT_KWARGS["connect_timeout"]
            if waited < limit:
                return True, f"starting ({waited:.0f} s)"
            return False, f"not started after {waited:.0f} s"
        if self._loop_turning(d):
            return True, "alive: main loop turning" + ("" if d.healthy else " (database unavailable: see /readyz)")
        return False, (f"main loop has not turned for {d.loop_stalled():.0f} s "
                       f"(limit {self.stall_limit():.0f} s)")

    def readiness(self) -> tuple[bool, str]:
        """/readyz: connected to the database, and the schema is the version this code expects."""
        d = self.daemon
        if d is None or not d.ready.is_set():
            return False, "not ready: starting (not connected to the database yet)"
        if self._stopping:
            return False, "not ready: stopping"
        if not d.healthy:
            return False, "not ready: database unavailable (reconnecting)"
        if self._status_error is not None:
            return False, f"not ready: {self._status_error}"
        version = self.snapshot.schema_version if self.snapshot is not None else None
        if version is None:
            return False, "not ready: schema version not read yet"
        if version < self.latest_schema:
            return False, (f"not ready: schema crm_bridge is at version {version}, this crm-bridge needs "
                           f"{self.latest_schema}: run `crm-bridge migrate`")
        if version > self.latest_schema:
            return False, (f"not ready: schema crm_bridge is at version {version}, newer than this crm-bridge "
                           f"({self.latest_schema}): upgrade crm-bridge")
        return True, f"ready: database reachable, schema version {version}"

    async def _watchdog_loop(self) -> None:
        interval = self.notifier.watchdog_interval
        if interval is None:
            return
        while True:
            d = self.daemon
            if self.alive():
                self.notifier.watchdog()
                if self._held_back:
                    self._held_back = False
                    log.info("watchdog: pinging systemd again")
            elif d is not None and d.ready.is_set() and not self._held_back:
                # Said once per outage: systemd restarts the daemon after WatchdogSec without pings.
                self._held_back = True
                why = ("the database is unavailable" if not d.healthy
                       else f"the main loop has not turned for {d.loop_stalled():.0f} s")
                log.warning("watchdog: not pinging systemd: %s", why)
            await anyio.sleep(max(interval / 3, 0.02))

    # -- status -----------------------------------------------------------------------------
    async def _status_loop(self) -> None:
        assert self.daemon is not None
        await self.daemon.ready.wait()
        conn: psycopg.AsyncConnection | None = None
        last = (time.monotonic(), self.daemon.stats.delivered)
        try:
            while True:
                try:
                    with anyio.fail_after(max(self.settings.status_interval, 5.0)):
                        if conn is None or conn.closed:
                            conn = await self._connect()
                        self.snapshot = await take_snapshot(conn, urls=self.metrics is not None)
                    self._status_error = None
                    if self.metrics is not None:
                        self.metrics.snapshot = self.snapshot
                except psycopg.errors.UndefinedTable as exc:
                    self._status_error = "status views missing: run `crm-bridge migrate`"
                    if not self._schema_warned:
                        self._schema_warned = True
                        log.warning("status views missing (%s): run `crm-bridge migrate`", str(exc).strip())
                except (psycopg.Error, TimeoutError) as exc:
                    why = "timed out" if isinstance(exc, TimeoutError) else f"failed: {str(exc).strip()}"
                    self._status_error = clean_text(f"database status query {why}", limit=300)
                    log.debug("status query failed: %s", exc)
                    if conn is not None:
                        await conn.close()
                    conn = None
                now, delivered = time.monotonic(), self.daemon.stats.delivered
                if now > last[0]:
                    self.rate = (delivered - last[1]) / (now - last[0])
                last = (now, delivered)
                if not self._stopping:
                    self.notifier.status(status_line(self.snapshot, self.rate, self.daemon.healthy))
                await anyio.sleep(self.settings.status_interval)
        finally:
            if conn is not None:
                with anyio.CancelScope(shield=True):
                    await conn.close()

    async def _connect(self) -> psycopg.AsyncConnection:
        conn = await psycopg.AsyncConnection.connect(
            self.settings.dsn, autocommit=True, application_name="crm-bridge status", connect_timeout=5)
        await conn.execute(Q.status_session, {"timeout": "5s"})
        # One snapshot per refresh: the totals and the per-URL numbers must agree.
        await conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
        await conn.set_read_only(True)
        return conn


async def take_snapshot(conn: psycopg.AsyncConnection, *, urls: bool) -> Snapshot:
    """Read crm_bridge.summary (and, for the metrics, url_queue) in one read-only transaction."""
    async with conn.transaction():
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(Q.status_summary)
        summary = await cur.fetchone()
        assert summary is not None
        rows: list[dict] = []
        if urls:
            await cur.execute(Q.metrics_urls, {"limit": MAX_URL_LABELS})
            rows = await cur.fetchall()
        await cur.execute(Q.probe_state)
        state = await cur.fetchone()
        assert state is not None
    return Snapshot(summary=summary, urls=rows, schema_version=state["schema_version"],
                    notify_queue_usage=state["notify_queue_usage"])
