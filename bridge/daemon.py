"""The daemon: claim events and due retries, run deliveries, record outcomes.

Tasks (all in one anyio task group; if one dies the daemon stops loudly):

* main loop   drain (claim new events as one batch of calls, then due retries) until there is
              nothing to claim; then take the idle lock, drain once more (closes the race with
              writers that committed before the lock) and wait for a NOTIFY, a local wake-up or
              the fallback poll.
* deliveries  a pool of sender tasks (grown on demand up to the calls held) takes claimed calls
              from a queue; a per-URL limiter bounds how many requests one URL has running.
              Calls of a URL with batch_max > 1 are grouped per claim (same URL, same attempt
              count, up to batch_max each, in call id order) and sent as one request each.
* flusher     records a batch in one statement when all its calls are done (or, after
              BATCH_RECORD_AFTER seconds, what is done: the rest are then held one by one in the
              queue), and outcomes of calls held one by one in one statement per flush.
* heartbeat   extends the leases of held batches and calls.
* maintenance recovers expired leases of dead daemons, cancels orphans, rotates history.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import secrets
import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta

import anyio
import httpx
import psycopg
from anyio.abc import TaskGroup
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from .aio import Slots
from .calls import batch_key, batch_limit, call_secrets
from .deliver import RetryPolicy, attempt, attempt_batch
from .listen import CHANNEL, CONNECT_KWARGS, Listener
from .models import Delivery, Outcome
from .redact import clean_text, describe_exception, safe_text
from .settings import Settings
from .sqlfiles import Q

log = logging.getLogger("crm_bridge.daemon")

# A batch whose calls are not all done after this many seconds is recorded with what is done;
# its unfinished calls are held one by one (queue rows of this worker) from then on, so that one
# slow receiver does not keep the others' outcomes unrecorded.
BATCH_RECORD_AFTER = 1.0
# A claim waits until at least this share of the daemon's capacity is free (unless it holds
# nothing): fewer, larger batches cost the database less per call.  A claim and its record cost
# the server ~1 ms whatever their size plus ~13 us per event (one URL): 128-event claims ~24 us per
# event, 256-event ~20, 512-event ~16.  Half the default capacity is 512 calls (at most batch_size
# of them claimed at once), and the other half, 16 rounds of one URL's default 32 in flight, is
# still queued while the claim runs (bench/FINDINGS.md).
CLAIM_MIN_ROOM = 0.5
# How long the main loop waits before the next claim when the last one found a few events (at
# least LINGER_FROM, less than a quarter batch): writers are busy, and a claim and its record cost
# the database ~0.25 ms however few events they carry (measured), so fewer, larger batches are
# cheaper.  At low rates a claim finds one event and nobody waits.
LINGER = 0.010
LINGER_FROM = 4
# Longest back-off after a database error that is not a lost connection (a bug, a DBA's trigger).
MAX_ERROR_BACKOFF = 30.0
# Longest dead-letter reason the daemon writes for a row it could not take.
MAX_REASON_LEN = 500


def _db_error(exc: BaseException) -> str:
    """A database error in one line, with its SQLSTATE, for logs and dead-letter reasons."""
    state = getattr(exc, "sqlstate", None)
    diag = getattr(exc, "diag", None)
    text = (diag.message_primary if diag is not None else None) or str(exc)
    text = " ".join(text.split())[:300] or type(exc).__name__
    return f"{text} (SQLSTATE {state})" if state else text


def _storable(text: str | None) -> str | None:
    """The last guard before a text is written: storable (no NUL, which PostgreSQL text cannot
    hold), printable, and within the length the database keeps (daemon_complete: 1000)."""
    return None if text is None else safe_text(text, 1000)


@dataclass
class Stats:
    """Counters of this daemon's work (read by the STATUS= line, the metrics and the stop log line)."""

    delivered: int = 0
    failed_attempts: int = 0
    dead: int = 0
    db_errors: int = 0
    reconnects: int = 0


# The columns of a claimed row that are the URL's settings rather than the call's.
URL_SETTINGS = ("url", "timeout_ms", "max_attempts", "retry_schedule", "max_in_flight", "id_params", "method",
                "headers", "follow_redirects", "signing_secret", "batch_max",
                "max_per_second", "breaker_threshold", "breaker_cooldown")   # migration 0015

# A rate-limited URL (crm_trigger.max_per_second) gets its calls from daemon_claim_due, as its
# token bucket refills: while it has calls waiting, the daemon claims due calls every
# RATE_TICK_SHARE of the time the bucket takes to fill (at least RATE_TICK_MIN seconds), so that
# tokens are used as they come rather than piling up to a burst.
RATE_TICK_SHARE = 0.5
RATE_TICK_MIN = 0.01
# ... and for this long after it last got one of them (seconds, at least; 2 / max_per_second for
# slow limits).
RATE_KEEP = 2.0
# A call of a rate-limited URL not sent within this many seconds of being handed out (the daemon
# was starved of CPU, its event loop held up) goes back to the queue unsent: sent late, it would
# arrive together with the calls handed out after it and crowd the receiver's second.  Once per
# call: a daemon that is always that slow still sends.
RATE_STALE = 0.1


def rate_bucket(max_per_second: float) -> tuple[float, float]:
    """The token bucket of a max_per_second: (size, refill rate per second), as
    crm_bridge.rate_burst() and crm_bridge.rate_refill() (migration 0015) compute them."""
    burst = max(1.0, float(math.ceil(max_per_second / 10)))
    if max_per_second < 1:
        return burst, max_per_second
    return burst, min(max_per_second, math.floor(max_per_second) + 1 - burst - 0.001)


@dataclass
class _Breaker:
    """This daemon's own view of a URL's circuit breaker: after breaker_threshold connection
    failures, timeouts or 5xx in a row it stops sending the calls of that URL it holds (they go
    back to the queue without an attempt) for breaker_cooldown seconds.  The shared breaker is
    in the database (url_stat, see migration 0015): this only keeps a batch that was claimed
    before the receiver went down from being sent call after call."""

    failures: int = 0
    open_until: float = 0.0


@dataclass(eq=False)
class _Batch:
    """A batch of calls claimed together (crm_bridge.batch): recorded in one statement."""

    id: int
    expected: int = 0                       # calls claimed in it (loadable or not)
    claimed: float = field(default_factory=time.monotonic)
    # (call id, the call or None when its row could not be loaded, outcome)
    results: list[tuple[int, Delivery | None, Outcome]] = field(default_factory=list)
    calls: dict[int, Delivery] = field(default_factory=dict)   # loaded calls not finished yet
    # While its record statement runs, calls that finish are kept aside (their outcome belongs
    # to the queue row the record makes, or to the batch again if the record did not happen).
    recording: bool = False
    late: list[tuple[Delivery, Outcome]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.results) >= self.expected


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
    # Planner settings for the claim statements (why: sql/queries.sql, daemon_session).
    await conn.execute(Q.daemon_session)
    conn.add_notice_handler(_log_breaker_notice)


# Migration 0015 RAISEs a NOTICE for every transition of a URL's circuit breaker, to the daemon
# whose statement made it: logged here, so each transition is logged once, by one daemon.
BREAKER_NOTICE = "crm-bridge breaker: "


def _log_breaker_notice(diag: psycopg.errors.Diagnostic) -> None:
    text = diag.message_primary or ""
    if not text.startswith(BREAKER_NOTICE):
        return
    text = clean_text(text[len(BREAKER_NOTICE):], limit=MAX_REASON_LEN)
    if diag.message_detail == "open":
        log.warning("circuit breaker: %s", text)
    else:
        log.info("circuit breaker: %s", text)


class Daemon:
    """``crm-bridge run``: claims the outbox's events and the queue's due calls, sends them, and
    records every outcome -- at least once, however the process ends.

    Contract:

    * every call it claims is recorded (delivered, pending again, dead) or given back: on SIGTERM
      (stop()) it stops claiming, gives in-flight calls ``grace`` seconds, records what finished
      and releases the rest; if it dies instead, its leases expire and another daemon (or its own
      next start, release_previous) takes the calls again;
    * it writes only through the crm_bridge.daemon_* functions (sql/queries.sql);
    * a row it cannot work with becomes one dead letter with the reason, never a dead daemon; a
      database error backs off and retries (``healthy`` is False while the database is gone);
    * it never holds more than ``concurrency`` calls, nor more requests of one URL than the URL's
      max_in_flight, and it respects the URL's rate limit and circuit breaker (claimed from the
      database, plus this daemon's own copy of the breaker: _Breaker).

    ``on_ready`` is called once it listens; ``on_outcome`` after every finished call (metrics).
    """

    def __init__(self, settings: Settings, *, on_ready: Callable[[], None] | None = None,
                 on_outcome: Callable[[Delivery, Outcome], None] | None = None) -> None:
        self.settings = settings
        # Rows are claimed under a name unique to this start (a restarted container gets the same
        # host name and pid): heartbeats can then never keep a predecessor's rows alive.
        self.worker = f"{settings.worker_id}/{secrets.token_hex(4)}"
        self.policy = RetryPolicy(settings)
        self.stats = Stats()
        self._client: httpx.AsyncClient | None = None   # made by run()
        self._on_ready = on_ready
        self._on_outcome = on_outcome   # metrics (bridge/service.py)
        self._listener = Listener(settings.dsn)
        self._pool: AsyncConnectionPool | None = None
        self._url_held: dict[int, int] = {}     # calls of a URL running or waiting for a slot
        self._url_limit: dict[int, int] = {}
        self._url_slots: dict[int, Slots] = {}
        self._breakers: dict[int, _Breaker] = {}     # see _Breaker
        self._stale_calls: set[int] = set()           # see RATE_STALE
        self._rate_tick = math.inf      # see RATE_TICK_SHARE
        self._rate_until = 0.0          # monotonic time until which _rate_tick applies
        self._held = 0
        self._held_ids: set[int] = set()        # calls held one by one (queue rows of this worker)
        self._batches: dict[int, _Batch] = {}   # batches held, by id
        self._call_batch: dict[int, _Batch] = {}  # call id -> the batch that holds it
        # Claimed deliveries waiting for a sender, and senders (tasks running _sender) that are
        # waiting for work or have been started and not yet taken any: a handoff through a
        # queue costs a fifth of a task per call (bench/profile_calls.py).
        self._sendq: asyncio.Queue[Delivery | list[Delivery]] | None = None   # a call, or a batch of one URL's
        self._url_batch: dict[int, int] = {}    # calls per request of a URL (batch_max; 1: single calls)
        self._senders = 0
        self._idle_senders = 0
        self._last_recorded = -math.inf   # monotonic times outcomes were last recorded and
        self._last_dispatched = -math.inf  # events last dispatched (see _recently)
        self._results: list[tuple[Delivery, Outcome]] = []
        self._results_ready = anyio.Event()
        self._flush_lock = anyio.Lock()  # shutdown must not release rows a flush is still recording
        self._wake = anyio.Event()
        self._capacity = anyio.Event()
        self._next_due = 0.0            # monotonic time at which claim_due must run again
        self._waiting_hint = False      # pending deliveries were seen that wait only for a slot
        self._stopping = False
        self._linger = False            # see _step
        self._contended = 0.0           # current back-off while the idle lock is contended
        self.healthy = False
        self.ready = anyio.Event()
        self.loop_tick = time.monotonic()   # last main-loop turn: the systemd watchdog checks it
        self._resting_until = -math.inf     # the loop backs off on purpose until then (not stuck)

    # -- public -----------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop claiming; in-flight deliveries get `grace` seconds to finish."""
        self._stopping = True
        self._wake.set()
        self._capacity.set()

    @property
    def held(self) -> int:
        return self._held

    def loop_stalled(self) -> float:
        """Seconds since the main loop last turned, not counting a deliberate back-off."""
        return max(0.0, time.monotonic() - max(self.loop_tick, self._resting_until))

    async def run(self) -> None:
        s = self.settings
        client = self._client = s.http_client()
        self._sendq, self._senders, self._idle_senders = asyncio.Queue(), 0, 0
        self._pool = AsyncConnectionPool(
            s.dsn, min_size=2, max_size=6, open=False, name="crm-bridge",
            kwargs={"autocommit": True, "application_name": "crm-bridge", **CONNECT_KWARGS},
            timeout=5,  # waiting longer for a connection only delays the reconnect loop
            configure=_configure_connection,
        )
        try:
            await self._pool.open(wait=True, timeout=30)
            await self._release_previous()
            async with self._pool.connection() as conn:   # history partitions before any record
                await self._rotate(conn)
            await self._connect_listener()
            async with anyio.create_task_group() as side:
                side.start_soon(self._flusher)
                side.start_soon(self._heartbeat)
                side.start_soon(self._maintenance)
                async with anyio.create_task_group() as deliveries:
                    self.healthy = True
                    self.ready.set()
                    log.info("ready: listening on channel %s (worker %s)", CHANNEL, self.worker)
                    if self._on_ready:
                        self._on_ready()
                    await self._main_loop(deliveries)
                    await self._leave_idle_quietly()    # writers need not wake a stopping daemon
                    with anyio.move_on_after(s.grace):
                        while self._held:
                            self._capacity = anyio.Event()
                            await self._capacity.wait()
                    if self._held:
                        log.warning("grace period over: releasing %d unfinished deliveries", self._held)
                    deliveries.cancel_scope.cancel()
                await self._flush(everything=True)
                await self._release_all()
                side.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._listener.close()
                await self._pool.close()
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
                # the back-off and the reconnect after it are waits, not a stuck loop (/healthz)
                self._resting_until = time.monotonic() + backoff + CONNECT_KWARGS["connect_timeout"]
                await self._sleep_or_stop(backoff)
                backoff = min(backoff * 2, 5.0)
                try:
                    await self._connect_listener()
                except psycopg.OperationalError:
                    continue
            except psycopg.Error as exc:
                # Not a lost connection: a bug, a DBA's trigger or constraint, odd data.  The daemon
                # stays up (and keeps delivering what it holds) and tries again, more slowly.
                self.stats.db_errors += 1
                error_backoff = min(max(backoff, 1.0) * 2, MAX_ERROR_BACKOFF)
                log.error("database error in the main loop: %s; retrying in %.0f s", _db_error(exc), error_backoff)
                await self._leave_idle_quietly()
                self._resting_until = time.monotonic() + error_backoff
                await self._sleep_or_stop(error_backoff)
                backoff = error_backoff
            except Exception as exc:
                # Last resort: a bug or data nobody foresaw must not end the daemon.  Cancellation
                # (a BaseException) still propagates.
                error_backoff = min(max(backoff, 1.0) * 2, MAX_ERROR_BACKOFF)
                log.error("unexpected error in the main loop; retrying in %.0f s: %s", error_backoff,
                          clean_text("".join(traceback.format_exception(exc)), limit=4000, keep="\t\n"))
                await self._leave_idle_quietly()
                self._resting_until = time.monotonic() + error_backoff
                await self._sleep_or_stop(error_backoff)
                backoff = error_backoff

    async def _leave_idle_quietly(self) -> None:
        """Release the idle lock (kept across claims, see _step) when the loop pauses or ends; on
        failure its mark runs out within IDLE_MARGIN and the connection's end releases it."""
        try:
            await self._listener.leave_idle()
        except psycopg.Error as exc:
            log.debug("could not leave idle: %s", _db_error(exc))

    async def _connect_listener(self) -> None:
        await self._listener.connect()
        self.stats.reconnects += 1
        self._next_due = 0.0    # catch up on everything after a (re)connect
        self.healthy = True

    async def _step(self, tg: TaskGroup) -> None:
        # The idle lock (bridge/listen.py) is kept across claims while events trickle in: a wake-up
        # then goes straight to the claim, with no round trip to release the lock in front of it
        # (that is latency of every live event), and the daemon does not take and mark it again
        # for the next event.  It is released when writers are busy (a claim found LINGER_FROM
        # events or more: they should not pay NOTIFY's commit lock while the daemon polls anyway)
        # and while the daemon is full (it could not act on a wake-up).
        listener = self._listener
        if self._held >= self._max_held() or (
                self._held and self._max_held() - self._held < self._max_held() * CLAIM_MIN_ROOM):
            await listener.leave_idle()
            self._capacity = anyio.Event()
            with anyio.move_on_after(self.settings.poll_interval):  # keep the loop (and watchdog) ticking
                await self._capacity.wait()
            return
        if self._linger:
            # The last claim found a few events, not a full batch: writers are busy.  Waiting a
            # moment lets the next claim take more of them at once (less database work per call);
            # at low rates a claim finds one event and nobody waits.  (The claim that set it let
            # go of the idle lock.)
            await anyio.sleep(LINGER)
        if await self._drain_once(tg):
            self._contended = 0.0
            if self._linger:
                await listener.leave_idle()
            return
        self._linger = False
        if listener.holding_lock:
            # If the mark had (nearly) run out while the daemon was busy, events committed
            # meanwhile did not NOTIFY: look once more now that writers will.
            if await listener.keep_marked() and await self._drain_once(tg):
                return
        elif await listener.enter_idle():
            # Events committed between the claim above and the mark did not NOTIFY.
            if await self._drain_once(tg):
                return
        else:
            # Writers (or another daemon) hold the lock: poll again shortly, backing off from 2 ms
            # to 50 ms while it stays contended.
            self._contended = min(max(self._contended * 2, 0.002), 0.05)
            await self._wait(min(self._contended, self._idle_timeout()))
            return
        if not await self._wait(self._idle_timeout()):
            # A whole wait without a wake-up: let go of the lock once per poll, as a daemon that
            # takes it per event would (another daemon, or a DBA's session queued for it, gets a turn).
            await listener.leave_idle()

    def _max_held(self) -> int:
        return self.settings.concurrency

    def _idle_timeout(self) -> float:
        return max(0.0, min(self.settings.poll_interval, self._next_due - time.monotonic()))

    async def _wait(self, seconds: float) -> bool:
        """Wait for a NOTIFY, a local wake-up (retry due, stop) or the timeout; False on the timeout."""
        if self._wake.is_set():
            # Woken while busy (a slot freed, a retry scheduled): look at due deliveries too.
            self._wake = anyio.Event()
            self._next_due = 0.0
            return True
        if seconds <= 0:
            return False
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
        woke_locally = self._wake.is_set()
        if woke_locally:
            self._wake = anyio.Event()
        if not woke_by_notify:
            self._next_due = 0.0  # poll timer (or local wake): also look at due retries
        return woke_by_notify or woke_locally

    def _busy_arrays(self) -> tuple[list[int], list[int]]:
        ids, free = [], []
        for tid, held in self._url_held.items():
            if held:
                ids.append(tid)
                # Slots count requests; a batching URL's request carries up to batch_max calls.
                limit = self._url_limit[tid] * self._url_batch.get(tid, 1)
                free.append(max(limit - held, 0))
        return ids, free

    def _claim_params(self, batch: int) -> dict:
        return {"batch": batch, "bulk_records": batch, "lease": timedelta(seconds=self.settings.lease),
                "worker": self.worker, "only": None}

    def _due_params(self, batch: int) -> dict:
        busy_ids, busy_free = self._busy_arrays()
        return {"batch": batch, "lease": timedelta(seconds=self.settings.lease), "worker": self.worker,
                "busy_ids": busy_ids, "busy_free": busy_free, "default_limit": self.settings.max_in_flight_per_url}

    async def _dispatch(self, conn: psycopg.AsyncConnection, params: dict) -> list[dict]:
        """Dispatch a batch of events.  When the batch fails as a whole for a reason other than a
        lost connection, dispatch its events one by one and dead-letter the ones that fail alone:
        one odd event never stops the outbox for everyone.  When every event fails alone too, the
        fault is not in the events (see _recently): nothing is dead-lettered and the error is raised."""
        cur = conn.cursor(row_factory=dict_row)
        try:
            await cur.execute(Q.claim, params)
            rows = await cur.fetchall()
            self._last_dispatched = time.monotonic()
            return rows
        except psycopg.OperationalError:
            raise
        except psycopg.Error as exc:
            log.error("dispatching a batch of events failed (%s): isolating them one by one", _db_error(exc))
        await cur.execute(Q.outbox_head, {"limit": params["batch"]})
        head = [r["daemon_outbox_head"] for r in await cur.fetchall()]
        rows: list[dict] = []
        failed: list[tuple[int, str]] = []
        for event_id in head:
            try:
                await cur.execute(Q.claim, {**params, "only": [event_id]})
                got = await cur.fetchall()
            except psycopg.OperationalError:
                raise
            except psycopg.Error as exc:
                failed.append((event_id, _db_error(exc)))
                continue
            self._last_dispatched = time.monotonic()
            if rows:  # one row of counts per call: add them up on the first row
                for key in ("n_events", "n_pending"):
                    rows[0][key] += got[0][key]
                rows += [r for r in got if r["id"] is not None]
            else:
                rows = got
        if failed and not rows and not self._recently(self._last_dispatched):
            raise psycopg.DatabaseError(f"no event can be dispatched: {failed[0][1]}")
        for event_id, reason in failed:
            log.error("event %d cannot be dispatched, moved to the dead letters: %s", event_id, reason)
            await cur.execute(Q.quarantine_event, {"event_id": event_id, "error": _storable(reason)})
        return rows or [{"n_events": 0, "n_pending": 0, "id": None}]

    async def _drain_once(self, tg: TaskGroup) -> bool:
        """Claim new events, then due retries.  True when anything was claimed."""
        assert self._pool is not None
        room = self._max_held() - self._held
        if room <= 0:
            return True
        params = self._claim_params(min(self.settings.batch_size, room))
        async with self._pool.connection() as conn:
            rows = await self._dispatch(conn, params)
            events, pending = rows[0]["n_events"], rows[0]["n_pending"]
            rows = [{k: v for k, v in r.items() if not k.startswith("n_")} for r in rows if r["id"] is not None]
            await self._spawn(conn, tg, rows)
            due = []
            if pending or time.monotonic() >= self._next_due:
                params = self._due_params(max(min(self.settings.batch_size, self._max_held() - self._held), 0))
                # Set before the await: a delivery finishing meanwhile may reset it to 0, and
                # that reset must not be overwritten (a lost wake-up leaves work for the poll).
                self._next_due = time.monotonic() + self.settings.poll_interval
                if params["batch"]:
                    cur = conn.cursor(row_factory=dict_row)
                    await cur.execute(Q.claim_due, params)
                    due = await cur.fetchall()
                    due.sort(key=lambda r: r["id"])   # batches are made in call id order (see _spawn)
                    self._note_rate_limits(due)
                    await self._spawn(conn, tg, due, granted=True)
                    self._waiting_hint = bool(due or pending)
                    if len(due) >= params["batch"]:
                        self._next_due = 0.0  # a full batch: there is probably more
                if time.monotonic() < self._rate_until:
                    # A rate-limited URL had calls handed out lately: come back as its tokens refill.
                    self._next_due = min(self._next_due, time.monotonic() + self._rate_tick)
        self._linger = LINGER_FROM <= events < self.settings.batch_size // 4
        if events or due:
            log.debug("claimed %d events (%d deliveries now, %d waiting) and %d due deliveries; holding %d",
                      events, len(rows), pending, len(due), self._held)
        return bool(events or due)

    def _note_rate_limits(self, rows: list[dict]) -> None:
        """Rate-limited URLs among calls claim_due handed out: claim again soon (see RATE_TICK_SHARE)."""
        rates = [r["max_per_second"] for r in rows if r.get("max_per_second")]
        if not rates:
            if time.monotonic() >= self._rate_until:
                self._rate_tick = math.inf
            return
        rate = min(rates)
        burst, refill = rate_bucket(rate)
        tick = max(RATE_TICK_SHARE * burst / refill, RATE_TICK_MIN)
        self._rate_tick = min(tick, self.settings.poll_interval)
        self._rate_until = time.monotonic() + max(RATE_KEEP, 2.0 / rate)

    async def _spawn(self, conn: psycopg.AsyncConnection, tg: TaskGroup, rows: list[dict],
                     *, granted: bool = False) -> None:
        """Hand every claimed call to a sender, starting one when none is free.  A row that cannot
        become a Delivery (whatever a CRM writer or an admin put in it) is a dead letter with the
        reason; the others go ahead.  Calls of a batch are tracked with it (recorded together,
        see _flush_batches)."""
        queue = self._sendq
        assert queue is not None
        batches: dict[int, _Batch] = {}
        settings: dict[int, dict] = {}
        # Calls of batching URLs, per (URL, attempts): sent as one request per batch_max calls.
        # Rows come in call id order, so a failed batch, retried as a whole (its calls share one
        # retry time), is made of the same calls again and carries the same key.
        grouped: dict[tuple[int, int], list[Delivery]] = {}
        for row in rows:
            batch_id = row.pop("batch_id", None)
            # A claim sends a URL's settings on the first of its calls only (see daemon_claim).
            if row.get("url") is not None:
                settings[row["trigger_id"]] = {k: row[k] for k in URL_SETTINGS}
            elif row.get("trigger_id") in settings:
                row.update(settings[row["trigger_id"]])
            batch = None
            if batch_id is not None:
                batch = batches.get(batch_id)
                if batch is None:
                    batch = batches[batch_id] = self._batches[batch_id] = _Batch(batch_id)
                batch.expected += 1
            try:
                d = Delivery.from_row(row)
            except Exception as exc:
                await self._dead_letter_claimed(conn, row.get("id"), describe_exception(exc), batch)
                continue
            assert d.trigger_id is not None
            d.granted = granted
            if granted:
                d.granted_at = time.monotonic()
            self._held += 1
            if batch is not None:
                batch.calls[d.id] = d
                self._call_batch[d.id] = batch
            else:
                self._held_ids.add(d.id)
            self._url_held[d.trigger_id] = self._url_held.get(d.trigger_id, 0) + 1
            limit = self.settings.url_max_in_flight(d)
            self._url_limit[d.trigger_id] = limit
            slots = self._url_slots.get(d.trigger_id)
            if slots is None:
                self._url_slots[d.trigger_id] = Slots(limit)
            elif slots.total_tokens != limit:
                slots.total_tokens = limit
            size = self._url_batch[d.trigger_id] = batch_limit(d)
            if size > 1:
                group = grouped.setdefault((d.trigger_id, d.attempts), [])
                group.append(d)
                if len(group) >= size:
                    self._enqueue(tg, group)
                    grouped[(d.trigger_id, d.attempts)] = []
                continue
            self._enqueue(tg, d)
        for group in grouped.values():
            if group:
                self._enqueue(tg, group)
        for batch in batches.values():
            if batch.done:   # every call of it failed to load
                self._results_ready.set()

    def _enqueue(self, tg: TaskGroup, item: Delivery | list[Delivery]) -> None:
        """Hand a call (or a batch of one URL's calls) to a sender."""
        queue = self._sendq
        assert queue is not None
        queue.put_nowait(item)
        # Every idle sender takes one; start another for the rest.  At most one sender per
        # call held (a sender may wait for its URL's limiter), so never more than that.
        if queue.qsize() > self._idle_senders and self._senders < self._held:
            self._senders += 1
            self._idle_senders += 1
            tg.start_soon(self._sender)

    async def _sender(self) -> None:
        """Send claimed calls one after the other until the daemon stops (cancelled with the
        deliveries' task group, as a task per call was)."""
        queue = self._sendq
        assert queue is not None
        while True:
            try:
                item = await queue.get()   # counted idle by whoever made this sender idle
            finally:
                self._idle_senders -= 1
            if isinstance(item, list):
                await self._deliver_batch(item)
            else:
                await self._deliver(item)
            self._idle_senders += 1

    async def _dead_letter_claimed(self, conn: psycopg.AsyncConnection, delivery_id: object, error: str,
                                   batch: _Batch | None = None) -> None:
        """A claimed row that cannot be sent: a dead letter with the reason.  A call of a batch is
        recorded with its batch; a call held one by one is made dead at once."""
        self.stats.dead += 1
        reason = f"the claimed delivery cannot be sent: {error}"
        if not isinstance(delivery_id, int):
            log.error("a claimed row without a delivery id was skipped (its lease will expire): %s",
                      clean_text(reason, limit=MAX_REASON_LEN))
            return
        if batch is None:
            await self._dead_letter(conn, delivery_id, reason)
            return
        reason = clean_text(reason, limit=MAX_REASON_LEN)
        log.error("delivery %d is dead: %s", delivery_id, reason)
        batch.results.append((delivery_id, None, Outcome("dead", attempted=0, error=reason)))

    async def _dead_letter(self, conn: psycopg.AsyncConnection, delivery_id: int, reason: str) -> None:
        """Make a delivery this process holds a dead letter with the reason (scrubbed, bounded); if
        even that fails its lease expires and it is sent again later."""
        reason = clean_text(reason, limit=MAX_REASON_LEN)
        try:
            await conn.execute(Q.dead_letter_outcome, {"worker": self.worker, "id": delivery_id, "error": reason})
        except psycopg.OperationalError:
            raise
        except psycopg.Error as exc:
            log.error("delivery %d: %s; dead-lettering it failed too (%s): its lease will expire", delivery_id,
                      reason, _db_error(exc))
            return
        log.error("delivery %d is dead: %s", delivery_id, reason)

    async def _deliver(self, d: Delivery) -> None:
        assert self._client is not None and d.trigger_id is not None
        try:
            async with self._url_slots[d.trigger_id]:   # the URL's max_in_flight
                breaker = self._breakers.get(d.trigger_id)
                if breaker is not None and not d.granted and time.monotonic() < breaker.open_until:
                    # Back to the queue without an attempt: the shared breaker decides when it goes.
                    outcome = Outcome("pending", attempted=0)
                elif (d.max_per_second and d.granted and time.monotonic() - d.granted_at > RATE_STALE
                      and self._stale_once(d.id)):
                    outcome = Outcome("pending", attempted=0)    # see RATE_STALE
                else:
                    outcome = await attempt(self._client, self.policy, d, self.settings)
                    self._note_breaker(d, outcome)
        except Exception as exc:  # attempt() never raises; if it ever did, one dead letter, not a dead daemon
            outcome = self._unexpected(exc, d)
        self._finish(d, outcome)

    async def _deliver_batch(self, ds: list[Delivery]) -> None:
        """One request for the calls ``ds`` of one URL (batch_max); each call's outcome is then
        recorded as if it had been sent alone.  The log says what happened once per batch (and
        names each call that became a dead letter, as for single calls)."""
        assert self._client is not None and ds[0].trigger_id is not None
        try:
            async with self._url_slots[ds[0].trigger_id]:   # one request: one of the URL's slots
                breaker = self._breakers.get(ds[0].trigger_id)
                if (breaker is not None and not any(d.granted for d in ds)
                        and time.monotonic() < breaker.open_until):
                    # Back to the queue without an attempt: the shared breaker decides (0015).
                    outcomes = [Outcome("pending", attempted=0) for _ in ds]
                else:
                    outcomes = await attempt_batch(self._client, self.policy, ds, self.settings)
                    self._note_breaker(ds[0], outcomes[0])   # one request: one answer (0015)
        except Exception as exc:  # attempt_batch() never raises; if it ever did, dead letters, not a dead daemon
            outcomes = [self._unexpected(exc, ds[0]) for _ in ds]
        counts = {"delivered": 0, "pending": 0, "dead": 0}
        for d, outcome in zip(ds, outcomes, strict=True):
            counts[outcome.status] = counts.get(outcome.status, 0) + 1
            self._finish(d, outcome, quiet=outcome.status != "dead")   # each dead letter is logged
        if not any(o.attempted for o in outcomes):
            return   # handed back unsent (circuit breaker): nothing happened to log
        failed = next((o for o in outcomes if o.status != "delivered"), None)
        key = batch_key([d.id for d in ds])
        if failed is None:
            log.debug("batch %s (%d calls to URL %d) delivered in %d ms", key, len(ds), ds[0].trigger_id,
                      outcomes[0].duration_ms)
            return
        retry = min((o.delay for o in outcomes if o.status == "pending"), default=None)
        log.info(
            "batch %s (%d calls to URL %d, attempt %d): %d delivered, %d to retry%s, %d dead: %s", key, len(ds),
            ds[0].trigger_id, ds[0].attempts + 1, counts["delivered"], counts["pending"],
            "" if retry is None else f" in {retry:.1f} s", counts["dead"], failed.error)

    @staticmethod
    def _unexpected(exc: Exception, d: Delivery) -> Outcome:
        return Outcome("dead", error=clean_text(f"unexpected error: {describe_exception(exc)}", call_secrets(d),
                                                MAX_REASON_LEN))

    def _finish(self, d: Delivery, outcome: Outcome, *, quiet: bool = False) -> None:
        """Count, log (unless quiet: a batch logs once) and hand the outcome of one call to its
        record (with its batch row, or one by one)."""
        if self._on_outcome:
            self._on_outcome(d, outcome)
        if outcome.status == "delivered":
            self.stats.delivered += 1
            if not quiet:
                log.debug("delivery %d (%s/%s) delivered in %d ms", d.id, d.object, d.event, outcome.duration_ms)
        elif outcome.status == "dead":
            self.stats.dead += 1
            if not quiet:
                log.warning("delivery %d (%s/%s) is dead: %s", d.id, d.object, d.event, outcome.error)
        elif outcome.attempted:
            self.stats.failed_attempts += 1
            if not quiet:
                log.info("delivery %d (%s/%s) attempt %d failed, retry in %.1f s: %s", d.id, d.object,
                         d.event, d.attempts + 1, outcome.delay, outcome.error)
        batch = self._call_batch.pop(d.id, None)
        if batch is not None and batch.recording:
            batch.calls.pop(d.id, None)
            batch.late.append((d, outcome))
        elif batch is not None:
            batch.calls.pop(d.id, None)
            batch.results.append((d.id, d, outcome))
            if batch.done or len(batch.results) == 1:
                # done: record it now; first result: the flusher records it after BATCH_RECORD_AFTER
                self._results_ready.set()
        else:
            self._held_ids.discard(d.id)
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

    def _stale_once(self, call_id: int) -> bool:
        """True the first time a call is found stale (see RATE_STALE)."""
        if call_id in self._stale_calls:
            self._stale_calls.discard(call_id)
            return False
        if len(self._stale_calls) >= 10000:
            self._stale_calls.clear()
        self._stale_calls.add(call_id)
        return True

    def _note_breaker(self, d: Delivery, outcome: Outcome) -> None:
        """This daemon's copy of the URL's breaker (see _Breaker)."""
        assert d.trigger_id is not None
        if outcome.receiver_down:
            breaker = self._breakers.setdefault(d.trigger_id, _Breaker())
            breaker.failures += 1
            threshold, cooldown = d.breaker
            if threshold and breaker.failures >= threshold and time.monotonic() >= breaker.open_until:
                breaker.open_until = time.monotonic() + cooldown
                log.debug("URL %d: %d failures in a row; calls of it this daemon holds go back to the queue",
                          d.trigger_id, breaker.failures)
        elif outcome.attempted:
            self._breakers.pop(d.trigger_id, None)

    # -- outcomes ---------------------------------------------------------------------------
    async def _flusher(self) -> None:
        while True:
            with anyio.move_on_after(BATCH_RECORD_AFTER / 4 if self._batches else 3600):
                await self._results_ready.wait()
            self._results_ready = anyio.Event()
            try:
                await self._flush()
            except psycopg.OperationalError as exc:
                log.warning("could not record outcomes (%s); retrying", str(exc).strip())
                self._results_ready.set()
                await anyio.sleep(0.5)
            except psycopg.Error as exc:
                log.error("could not record outcomes (%s); retrying in 5 s", _db_error(exc))
                self._results_ready.set()
                await anyio.sleep(5)

    async def _flush(self, *, everything: bool = False) -> None:
        async with self._flush_lock:
            await self._flush_batches(everything)
            await self._flush_locked()

    async def _flush_batches(self, everything: bool) -> None:
        """Record the batches whose calls are all done, and those older than BATCH_RECORD_AFTER
        with what is done (their unfinished calls become queue rows this worker holds: from then
        on they are recorded one by one).  everything: every batch now (shutdown)."""
        now = time.monotonic()
        due = [b for b in self._batches.values()
               if b.done or (b.results and (everything or now - b.claimed >= BATCH_RECORD_AFTER))
               or (everything and b.calls)]
        if not due:
            return
        assert self._pool is not None
        async with self._pool.connection() as conn:
            for batch in due:
                await self._record_batch(conn, batch)

    def _detach(self, batch: _Batch, *, held: bool = True) -> None:
        """The batch is recorded: its unfinished calls are held one by one from now on (held) or
        were taken away (the lease was lost); calls that finished while it was being recorded are
        recorded one by one."""
        self._batches.pop(batch.id, None)
        for call_id in batch.calls:
            self._call_batch.pop(call_id, None)
            if held:
                self._held_ids.add(call_id)
        batch.calls = {}
        if held and batch.late:
            self._results += batch.late
            self._results_ready.set()
        batch.late = []

    @staticmethod
    def _not_recorded(batch: _Batch) -> None:
        """The batch's record did not happen (lost connection): the calls that finished while it
        ran belong to the batch again."""
        batch.recording = False
        batch.results += [(d.id, d, o) for d, o in batch.late]
        batch.late = []

    async def _record_batch(self, conn: psycopg.AsyncConnection, batch: _Batch) -> None:
        results = list(batch.results)
        running = list(batch.calls)
        params = {"worker": self.worker, "batch": batch.id, "lease": timedelta(seconds=self.settings.lease),
                  "ids": [c for c, _, _ in results] + running,
                  "statuses": [o.status for _, _, o in results] + ["running"] * len(running),
                  "attempted": [o.attempted for _, _, o in results] + [0] * len(running),
                  "http_status": [o.http_status for _, _, o in results] + [None] * len(running),
                  "errors": [_storable(o.error) for _, _, o in results] + [None] * len(running),
                  "delays": [o.delay for _, _, o in results] + [0.0] * len(running),
                  "durations": [o.duration_ms for _, _, o in results] + [0] * len(running)}
        batch.recording = True
        try:
            try:
                n = await self._scalar(conn, Q.record, params)
            except psycopg.errors.CheckViolation as exc:
                if "partition" not in str(exc):
                    raise
                # No history partition for now (the daemons were stopped for longer than the
                # partitions made ahead): make them and record again.
                await self._rotate(conn)
                n = await self._scalar(conn, Q.record, params)
        except psycopg.OperationalError:
            self._not_recorded(batch)
            raise
        except psycopg.Error as exc:
            # Something in this batch cannot be recorded (a DBA's trigger, odd data): hold its
            # calls one by one and record them so, which isolates the one that fails.
            log.error("recording batch %d (%d calls) failed (%s): recording its calls one by one", batch.id,
                      len(results) + len(running), _db_error(exc))
            try:
                moved = await self._scalar(conn, Q.unbatch, {"worker": self.worker, "batch": batch.id,
                                                             "lease": timedelta(seconds=self.settings.lease)})
            except psycopg.OperationalError:
                self._not_recorded(batch)
                raise
            except psycopg.Error as exc2:
                log.error("batch %d cannot be taken apart either (%s): its lease will expire and its calls "
                          "will be sent again", batch.id, _db_error(exc2))
                moved = 0
            self._detach(batch, held=bool(moved))
            if moved:
                self._results = [(d, o) for _, d, o in results if d is not None] + self._results
                for call_id, d, o in results:
                    if d is None:
                        await self._dead_letter(conn, call_id, o.error or "the claimed delivery cannot be sent")
            return
        self._last_recorded = time.monotonic()
        if not n:
            log.warning("batch %d was given back to the queue before it was recorded (lease lost): its %d calls "
                        "will be sent again", batch.id, len(results) + len(running))
            self._detach(batch, held=False)
            return
        self._detach(batch)
        self._after_recorded([(d, o) for _, d, o in results if d is not None])

    @staticmethod
    def _outcome_params(batch: list[tuple[Delivery, Outcome]]) -> dict:
        return {"ids": [d.id for d, _ in batch],
                "statuses": [o.status for _, o in batch],
                "attempted": [o.attempted for _, o in batch],
                "http_status": [o.http_status for _, o in batch],
                "errors": [_storable(o.error) for _, o in batch],
                "delays": [o.delay for _, o in batch],
                "durations": [o.duration_ms for _, o in batch]}

    async def _flush_locked(self) -> None:
        if not self._results:
            return
        assert self._pool is not None
        batch, self._results = self._results, []
        try:
            async with self._pool.connection() as conn:
                try:
                    await conn.execute(Q.complete, {**self._outcome_params(batch), "worker": self.worker})
                    self._last_recorded = time.monotonic()
                except psycopg.OperationalError:
                    raise
                except psycopg.Error as exc:
                    log.error("recording %d outcomes failed (%s): recording them one by one", len(batch),
                              _db_error(exc))
                    await self._record_one_by_one(conn, batch)
        except BaseException:
            self._results = batch + self._results
            raise
        self._after_recorded(batch)

    def _after_recorded(self, batch: list[tuple[Delivery, Outcome]]) -> None:
        if any(d.ordered for d, _ in batch):
            # The next call for these records may be claimable now that this one is recorded.
            self._next_due = 0.0
            self._wake.set()
        soonest = min((o.delay for _, o in batch if o.status == "pending"), default=math.inf)
        if soonest < math.inf:
            self._next_due = min(self._next_due, time.monotonic() + soonest)
            self._wake.set()

    async def _record_one_by_one(self, conn: psycopg.AsyncConnection,
                                 batch: list[tuple[Delivery, Outcome]]) -> None:
        """Record a batch that failed as a whole outcome by outcome.  One that cannot be recorded
        even alone, while others can, makes its delivery a dead letter with the reason.  When none
        can be recorded the fault is not in the rows (a bug, a broken database): they are kept and
        the error is raised, so nothing delivered is ever turned into a dead letter wholesale."""
        failed: list[tuple[Delivery, Outcome, str]] = []
        for d, o in batch:
            try:
                await conn.execute(Q.complete, {**self._outcome_params([(d, o)]), "worker": self.worker})
            except psycopg.OperationalError:
                raise
            except psycopg.Error as exc:
                failed.append((d, o, f"outcome could not be recorded ({o.status}): {_db_error(exc)}"))
        if len(failed) == len(batch) and not self._recently(self._last_recorded):
            raise psycopg.DatabaseError(f"no outcome can be recorded: {failed[0][2]}")
        if len(failed) < len(batch):
            self._last_recorded = time.monotonic()
        for d, _, reason in failed:
            await self._dead_letter(conn, d.id, reason)

    @staticmethod
    def _recently(when: float) -> bool:
        """Did the same kind of statement succeed within the last minute?  Then a failure that
        only some rows cause is about those rows, not about the database or the code."""
        return time.monotonic() - when < 60

    async def _release_all(self) -> None:
        assert self._pool is not None
        try:
            async with self._pool.connection() as conn:
                n = await self._scalar(conn, Q.release, {"worker": self.worker})
                if n:
                    log.info("released %d unfinished deliveries back to the queue", n)
        except psycopg.Error as exc:
            log.warning("could not release deliveries (%s); their leases will expire", exc)

    async def _release_previous(self) -> None:
        assert self._pool is not None
        try:
            async with self._pool.connection() as conn:
                n = await self._scalar(conn, Q.release_previous,
                                       {"base": self.settings.worker_id, "worker": self.worker})
        except psycopg.OperationalError:
            raise
        except psycopg.Error as exc:  # their leases expire instead
            log.warning("could not release what an earlier process named %s held (%s)", self.settings.worker_id,
                        _db_error(exc))
            return
        if n:
            log.warning("released %d deliveries an earlier process named %s still held", n, self.settings.worker_id)

    @staticmethod
    async def _scalar(conn: psycopg.AsyncConnection, query: str, params: dict | None = None) -> int:
        cur = await conn.execute(query, params)
        row = await cur.fetchone()
        return int(row[0] or 0) if row else 0

    # -- side tasks -------------------------------------------------------------------------
    async def _heartbeat(self) -> None:
        assert self._pool is not None
        while True:
            await anyio.sleep(self.settings.heartbeat_interval)
            if not self._held_ids and not self._batches:
                continue
            try:
                async with self._pool.connection() as conn:
                    await conn.execute(Q.heartbeat, {"worker": self.worker, "batches": sorted(self._batches),
                                                     "ids": sorted(self._held_ids),
                                                     "lease": timedelta(seconds=self.settings.lease)})
            except psycopg.Error as exc:
                log.warning("heartbeat failed (%s)", _db_error(exc))

    async def _maintenance(self) -> None:
        assert self._pool is not None
        last_retention = 0.0
        first = True
        while True:
            if not first:
                await anyio.sleep(max(self.settings.lease / 2, 0.2) * random.uniform(0.8, 1.2))
            first = False
            try:
                async with self._pool.connection() as conn:
                    recovered = await self._scalar(conn, Q.recover_expired)
                    if recovered:
                        log.warning("recovered %d deliveries whose daemon stopped heart-beating", recovered)
                        self._next_due = 0.0
                        self._wake.set()
                    await conn.execute(Q.cancel_orphans)
                    if time.monotonic() - last_retention > min(self.settings.retention_interval, 60.0):
                        last_retention = time.monotonic()
                        await self._rotate(conn)
            except psycopg.Error as exc:
                log.warning("maintenance failed (%s)", _db_error(exc))

    async def _rotate(self, conn: psycopg.AsyncConnection) -> None:
        """History partitions: made ahead of time, dropped after the retention period."""
        cur = await conn.execute(Q.rotate, {"retention": timedelta(days=self.settings.retention_days)})
        row = await cur.fetchone()
        result = row[0] if row else None
        if result == "busy":
            log.info("history rotation waited too long for a lock (a long query on crm_bridge.history?); "
                     "trying again later")
        elif result and result != "created 0, dropped 0":
            log.info("history rotation: %s partitions (retention %g days)", result, self.settings.retention_days)

    async def _sleep_or_stop(self, seconds: float) -> None:
        with anyio.move_on_after(seconds):
            while not self._stopping:
                self._wake = anyio.Event()
                await self._wake.wait()
