"""The daemon: claim events and due retries, run deliveries, record outcomes.

Tasks (all in one anyio task group; if one dies the daemon stops loudly):

* main loop   drain (claim new events, then due retries) until there is nothing to claim; then
              take the idle lock, drain once more (closes the race with writers that committed
              before the lock) and wait for a NOTIFY, a local wake-up or the fallback poll.
* deliveries  one task per claimed delivery; per-URL slots bound what one URL can hold.
* flusher     writes outcomes in batches (one statement per batch).
* heartbeat   extends the leases of held deliveries.
* maintenance recovers expired leases of dead daemons, cancels orphans, applies retention.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta

import anyio
import httpx
import psycopg
from anyio.abc import TaskGroup
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from .deliver import Delivery, Outcome, RetryPolicy, attempt
from .http import client_for
from .listen import CHANNEL, CONNECT_KWARGS, Listener
from .settings import Settings
from .sqlfiles import Q

log = logging.getLogger("crm_bridge.daemon")

RETENTION_BATCH = 5000


@dataclass
class Stats:
    delivered: int = 0
    failed_attempts: int = 0
    dead: int = 0
    unrouted: int = 0
    db_errors: int = 0
    reconnects: int = 0
    started: float = field(default_factory=time.monotonic)
    latencies: list[float] = field(default_factory=list)   # event created -> 2xx, seconds (bounded)

    def record_latency(self, seconds: float) -> None:
        if len(self.latencies) >= 10000:
            self.latencies = self.latencies[5000:]
        self.latencies.append(seconds)


@contextlib.asynccontextmanager
async def _first_error_unwrapped() -> AsyncIterator[None]:
    """Task groups wrap errors in ExceptionGroups; the reconnect logic wants the plain error."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaf: BaseException = group
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        raise leaf from group


async def _configure_connection(conn: psycopg.AsyncConnection) -> None:
    # The claim statements are small but look expensive to the planner (CTEs, window
    # functions, sub-plans): JIT compilation would add ~1 s to each of them.
    await conn.execute("SET jit = off")


class Daemon:
    def __init__(self, settings: Settings, *, client: httpx.AsyncClient | None = None,
                 on_ready: Callable[[], None] | None = None,
                 on_outcome: Callable[[Delivery, Outcome], None] | None = None) -> None:
        self.s = settings
        self.policy = RetryPolicy(settings)
        self.stats = Stats()
        self._client = client
        self._on_ready = on_ready
        self._on_outcome = on_outcome   # metrics (bridge/service.py)
        self._listener = Listener(settings.dsn)
        self._pool: AsyncConnectionPool | None = None
        self._url_held: dict[int, int] = {}
        self._url_limit: dict[int, int] = {}
        self._held = 0
        self._results: list[tuple[Delivery, Outcome]] = []
        self._results_ready = anyio.Event()
        self._flush_lock = anyio.Lock()  # shutdown must not release rows a flush is still recording
        self._wake = anyio.Event()
        self._capacity = anyio.Event()
        self._next_due = 0.0            # monotonic time at which claim_due must run again
        self._waiting_hint = False      # pending deliveries were seen that wait only for a slot
        self._stopping = False
        self.healthy = False
        self.ready = anyio.Event()
        self.loop_tick = time.monotonic()   # last main-loop turn: the systemd watchdog checks it

    # -- public -----------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop claiming; in-flight deliveries get `grace` seconds to finish."""
        self._stopping = True
        self._wake.set()
        self._capacity.set()

    @property
    def held(self) -> int:
        return self._held

    async def run(self) -> None:
        s = self.s
        own_client = self._client is None
        client = self._client or client_for(s)
        self._client = client
        self._pool = AsyncConnectionPool(
            s.dsn, min_size=2, max_size=6, open=False, name="crm-bridge",
            kwargs={"autocommit": True, "application_name": "crm-bridge", **CONNECT_KWARGS},
            timeout=5,  # waiting longer for a connection only delays the reconnect loop
            configure=_configure_connection,
        )
        try:
            await self._pool.open(wait=True, timeout=30)
            await self._connect_listener()
            async with anyio.create_task_group() as side:
                side.start_soon(self._flusher)
                side.start_soon(self._heartbeat)
                side.start_soon(self._maintenance)
                async with anyio.create_task_group() as deliveries:
                    self.healthy = True
                    self.ready.set()
                    log.info("ready: listening on channel %s (worker %s)", CHANNEL, s.worker_id)
                    if self._on_ready:
                        self._on_ready()
                    await self._main_loop(deliveries)
                    with anyio.move_on_after(s.grace):
                        while self._held:
                            self._capacity = anyio.Event()
                            await self._capacity.wait()
                    if self._held:
                        log.warning("grace period over: releasing %d unfinished deliveries", self._held)
                    deliveries.cancel_scope.cancel()
                await self._flush()
                await self._release_all()
                side.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._listener.close()
                await self._pool.close()
                if own_client:
                    await client.aclose()
        log.info("stopped: %d delivered, %d dead, %d failed attempts", self.stats.delivered,
                 self.stats.dead, self.stats.failed_attempts)

    # -- main loop --------------------------------------------------------------------------
    async def _main_loop(self, tg: TaskGroup) -> None:
        backoff = 0.1
        while not self._stopping:
            self.loop_tick = time.monotonic()
            try:
                await self._step(tg)
                backoff = 0.1
            except psycopg.OperationalError as exc:
                self.healthy = False
                self.stats.db_errors += 1
                log.warning("database unavailable (%s); retrying in %.1f s", str(exc).strip(), backoff)
                await self._sleep_or_stop(backoff)
                backoff = min(backoff * 2, 5.0)
                try:
                    await self._connect_listener()
                except psycopg.OperationalError:
                    continue

    async def _connect_listener(self) -> None:
        await self._listener.connect()
        self.stats.reconnects += 1
        self._next_due = 0.0    # catch up on everything after a (re)connect
        self.healthy = True

    async def _step(self, tg: TaskGroup) -> None:
        if self._held >= self._max_held():
            self._capacity = anyio.Event()
            with anyio.move_on_after(self.s.poll_interval):  # keep the loop (and watchdog) ticking
                await self._capacity.wait()
            return
        if await self._drain_once(tg):
            return
        if await self._listener.enter_idle():
            try:
                if await self._drain_once(tg):
                    return
                await self._wait(self._idle_timeout())
            finally:
                await self._listener.leave_idle()
        else:
            # Writers (or another daemon) hold the lock: poll again shortly.
            await self._wait(min(0.05, self._idle_timeout()))

    def _max_held(self) -> int:
        return self.s.concurrency

    def _idle_timeout(self) -> float:
        return max(0.0, min(self.s.poll_interval, self._next_due - time.monotonic()))

    async def _wait(self, seconds: float) -> None:
        """Wait for a NOTIFY, a local wake-up (retry due, stop) or the timeout."""
        if self._wake.is_set():
            # Woken while busy (a slot freed, a retry scheduled): look at due deliveries too.
            self._wake = anyio.Event()
            self._next_due = 0.0
            return
        if seconds <= 0:
            return
        woke_by_notify = False
        async with _first_error_unwrapped(), anyio.create_task_group() as tg:
            async def local() -> None:
                await self._wake.wait()
                tg.cancel_scope.cancel()

            async def remote() -> None:
                nonlocal woke_by_notify
                woke_by_notify = await self._listener.wait(seconds)
                tg.cancel_scope.cancel()

            tg.start_soon(local)
            tg.start_soon(remote)
        if self._wake.is_set():
            self._wake = anyio.Event()
        if not woke_by_notify:
            self._next_due = 0.0  # poll timer (or local wake): also look at due retries

    def _busy_arrays(self) -> tuple[list[int], list[int]]:
        ids, free = [], []
        for tid, held in self._url_held.items():
            if held:
                ids.append(tid)
                free.append(max(self._url_limit.get(tid, self.s.max_in_flight_per_url) - held, 0))
        return ids, free

    async def _drain_once(self, tg: TaskGroup) -> bool:
        """Claim new events, then due retries.  True when anything was claimed."""
        assert self._pool is not None
        room = self._max_held() - self._held
        if room <= 0:
            return True
        busy_ids, busy_free = self._busy_arrays()
        params = {"batch": min(self.s.batch_size, room), "lease": timedelta(seconds=self.s.lease),
                  "worker": self.s.worker_id, "busy_ids": busy_ids, "busy_free": busy_free,
                  "default_limit": self.s.max_in_flight_per_url}
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(Q.dispatch_events, params)
            rows = await cur.fetchall()
            events, pending = rows[0]["n_events"], rows[0]["n_pending"]
            self.stats.unrouted += rows[0]["n_unrouted"]
            rows = [{k: v for k, v in r.items() if not k.startswith("n_")} for r in rows if r["id"] is not None]
            self._spawn(tg, rows)
            due = []
            if pending or time.monotonic() >= self._next_due:
                busy_ids, busy_free = self._busy_arrays()
                params.update(busy_ids=busy_ids, busy_free=busy_free,
                              batch=max(min(self.s.batch_size, self._max_held() - self._held), 0))
                # Set before the await: a delivery finishing meanwhile may reset it to 0, and
                # that reset must not be overwritten (a lost wake-up leaves work for the poll).
                self._next_due = time.monotonic() + self.s.poll_interval
                if params["batch"]:
                    await cur.execute(Q.claim_due, params)
                    due = await cur.fetchall()
                    self._spawn(tg, due)
                    self._waiting_hint = bool(due or pending)
                    if len(due) >= params["batch"]:
                        self._next_due = 0.0  # a full batch: there is probably more
        if events or due:
            log.debug("claimed %d events (%d deliveries now, %d waiting) and %d due deliveries; holding %d",
                      events, len(rows), pending, len(due), self._held)
        return bool(events or due)

    def _spawn(self, tg: TaskGroup, rows: list[dict]) -> None:
        """Start a task per claimed delivery."""
        for row in rows:
            d = Delivery.from_row(row)
            assert d.trigger_id is not None
            self._held += 1
            self._url_held[d.trigger_id] = self._url_held.get(d.trigger_id, 0) + 1
            self._url_limit[d.trigger_id] = d.max_in_flight or self.s.max_in_flight_per_url
            tg.start_soon(self._deliver, d)

    async def _deliver(self, d: Delivery) -> None:
        assert self._client is not None
        outcome = await attempt(self._client, self.policy, d, self.s)
        if self._on_outcome:
            self._on_outcome(d, outcome)
        if outcome.status == "delivered":
            self.stats.delivered += 1
            log.debug("delivery %d (%s/%s) delivered in %d ms", d.id, d.object, d.event, outcome.duration_ms)
            self.stats.record_latency(max(0.0, time.time() - d.event_created_at.timestamp()))
        elif outcome.status == "dead":
            self.stats.dead += 1
            log.warning("delivery %d (%s/%s) is dead: %s", d.id, d.object, d.event, outcome.error)
        else:
            self.stats.failed_attempts += 1
            log.info("delivery %d (%s/%s) attempt %d failed, retry in %.1f s: %s", d.id, d.object,
                     d.event, d.attempts + 1, outcome.delay, outcome.error)
        self._results.append((d, outcome))
        self._results_ready.set()
        assert d.trigger_id is not None
        self._held -= 1
        self._url_held[d.trigger_id] -= 1
        if not self._url_held[d.trigger_id]:
            del self._url_held[d.trigger_id]
        self._capacity.set()
        if self._waiting_hint:
            # Deliveries were left waiting for a free slot: this one may now be claimable.
            self._next_due = 0.0
            self._wake.set()

    # -- outcomes ---------------------------------------------------------------------------
    async def _flusher(self) -> None:
        while True:
            await self._results_ready.wait()
            self._results_ready = anyio.Event()
            try:
                await self._flush()
            except psycopg.OperationalError as exc:
                log.warning("could not record outcomes (%s); retrying", str(exc).strip())
                self._results_ready.set()
                await anyio.sleep(0.5)

    async def _flush(self) -> None:
        async with self._flush_lock:
            await self._flush_locked()

    async def _flush_locked(self) -> None:
        if not self._results:
            return
        assert self._pool is not None
        batch, self._results = self._results, []
        try:
            async with self._pool.connection() as conn:
                await conn.execute(Q.complete, {
                    "ids": [d.id for d, _ in batch],
                    "statuses": [o.status for _, o in batch],
                    "attempted": [o.attempted for _, o in batch],
                    "http_status": [o.http_status for _, o in batch],
                    "errors": [o.error for _, o in batch],
                    "delays": [o.delay for _, o in batch],
                    "durations": [o.duration_ms for _, o in batch],
                    "worker": self.s.worker_id,
                })
        except BaseException:
            self._results = batch + self._results
            raise
        if any(d.ordered for d, _ in batch):
            # The next call for these records may be claimable now that this one is recorded.
            self._next_due = 0.0
            self._wake.set()
        soonest = min((o.delay for _, o in batch if o.status == "pending"), default=math.inf)
        if soonest < math.inf:
            self._next_due = min(self._next_due, time.monotonic() + soonest)
            self._wake.set()

    async def _release_all(self) -> None:
        assert self._pool is not None
        try:
            async with self._pool.connection() as conn:
                cur = await conn.execute(Q.release, {"worker": self.s.worker_id})
                if cur.rowcount:
                    log.info("released %d unfinished deliveries back to the queue", cur.rowcount)
        except psycopg.Error as exc:
            log.warning("could not release deliveries (%s); their leases will expire", exc)

    # -- side tasks -------------------------------------------------------------------------
    async def _heartbeat(self) -> None:
        assert self._pool is not None
        while True:
            await anyio.sleep(self.s.heartbeat_interval)
            if not self._held:
                continue
            try:
                async with self._pool.connection() as conn:
                    await conn.execute(Q.heartbeat, {"worker": self.s.worker_id,
                                                     "lease": timedelta(seconds=self.s.lease)})
            except psycopg.OperationalError as exc:
                log.warning("heartbeat failed (%s)", str(exc).strip())

    async def _maintenance(self) -> None:
        assert self._pool is not None
        last_retention = 0.0
        while True:
            await anyio.sleep(max(self.s.lease / 2, 0.2) * random.uniform(0.8, 1.2))
            try:
                async with self._pool.connection() as conn:
                    cur = await conn.execute(Q.recover_expired)
                    if cur.rowcount:
                        log.warning("recovered %d deliveries whose daemon stopped heart-beating",
                                    cur.rowcount)
                        self._next_due = 0.0
                        self._wake.set()
                    await conn.execute(Q.cancel_orphans)
                    if time.monotonic() - last_retention > self.s.retention_interval:
                        last_retention = time.monotonic()
                        await self._retention(conn)
            except psycopg.OperationalError as exc:
                log.warning("maintenance failed (%s)", str(exc).strip())

    async def _retention(self, conn: psycopg.AsyncConnection) -> None:
        retention = timedelta(days=self.s.retention_days)
        deleted = 0
        while True:
            cur = await conn.execute(Q.retention_delete, {"retention": retention, "batch": RETENTION_BATCH})
            deleted += cur.rowcount
            if cur.rowcount < RETENTION_BATCH:
                break
            await anyio.sleep(0.05)  # let writers and deliveries breathe between batches
        if deleted:
            log.info("retention: deleted %d finished deliveries older than %g days", deleted,
                     self.s.retention_days)

    async def _sleep_or_stop(self, seconds: float) -> None:
        with anyio.move_on_after(seconds):
            while not self._stopping:
                self._wake = anyio.Event()
                await self._wake.wait()
