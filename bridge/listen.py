"""The listener: a dedicated connection that LISTENs and, while the daemon waits, holds the idle lock.

Writers NOTIFY only while some daemon holds the idle lock (see emit_v1 in sql/), so NOTIFY's
global commit lock is paid only when a daemon is actually waiting.  The lock is a session
advisory lock: it vanishes with the connection, so a crashed daemon never leaves writers paying.

Any session can take an advisory lock, so the lock alone does not make writers NOTIFY: the daemon
also marks itself idle in crm_bridge.wake_state (daemon_enter_idle, only the daemon role may call
it) for a bounded time, refreshed while it waits, and clears the mark before releasing the lock.
"""

from __future__ import annotations

import json
import logging
import time

import psycopg
from psycopg import errors, sql

from .sqlfiles import Q

log = logging.getLogger("crm_bridge.listen")

CHANNEL = "crm_bridge"
# A silently dead TCP connection (no RST after a network partition) must not hang the daemon:
# libpq keepalives and a user timeout turn it into an error within about a minute.
CONNECT_KWARGS = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
                  "keepalives_count": 3, "tcp_user_timeout": 60000}
MAX_PAYLOAD = 200
# The idle mark in crm_bridge.wake_state lasts this long past the current wait (a daemon killed
# while idle leaves writers notifying at most this long, and only while someone holds the lock).
IDLE_MARGIN = 5.0
# The database caps one mark at 60 s: longer waits refresh it.
IDLE_SLICE = 50.0
# A mark is renewed when it would end within this many seconds (of a wait, or now).
MARK_RENEW = 1.0
# A session lock can only wait for writers briefly: never block behind a long transaction.
LOCK_WAIT = "100ms"


def valid_payload(payload: str) -> bool:
    """Only ``{"xid": <int>}`` is what emit_v1 sends; anything else is noise (or forged)."""
    if len(payload) > MAX_PAYLOAD:
        return False
    try:
        data = json.loads(payload)
    except ValueError:
        return False
    return isinstance(data, dict) and set(data) == {"xid"} and isinstance(data["xid"], int)


class Listener:
    """The daemon's LISTEN connection, apart from its pool.

    Contract: connect() (again after any OperationalError: it closes the old connection first)
    LISTENs on CHANNEL; enter_idle() takes the idle lock (False at once when writers or another
    daemon hold it past LOCK_WAIT) and marks the daemon idle so that writers NOTIFY; wait() returns
    True on a well-formed wake-up NOTIFY and False on timeout, ignoring (and counting) malformed
    ones; keep_marked() renews the mark of a daemon that keeps the lock across claims (True when
    it may have run out: claim once more); leave_idle() clears the mark and releases the lock when
    the daemon drains a backlog, is full, or stops.  A closed
    connection raises psycopg.OperationalError, which the daemon's reconnect loop handles.
    """

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._conn: psycopg.AsyncConnection | None = None
        self.holding_lock = False
        self.malformed = 0
        self._last_malformed_log = 0.0
        self._idle_until = 0.0         # monotonic time the database's idle mark lasts until
        self._can_mark = True          # False when the role may not call daemon_enter_idle

    async def connect(self) -> None:
        await self.close()
        conn = await psycopg.AsyncConnection.connect(
            self._dsn, autocommit=True, application_name="crm-bridge listener", **CONNECT_KWARGS,
        )
        await conn.execute(Q.listener_session, {"lock_timeout": LOCK_WAIT})
        await conn.execute(sql.SQL(Q.listen).format(channel=sql.Identifier(CHANNEL)))
        self._conn = conn
        self.holding_lock = False
        self._can_mark = True

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            self.holding_lock = False
            try:
                await conn.close()
            except Exception:  # already broken
                log.debug("closing a broken listener connection", exc_info=True)

    def _require(self) -> psycopg.AsyncConnection:
        if self._conn is None or self._conn.closed:
            raise psycopg.OperationalError("listener connection is closed")
        return self._conn

    async def enter_idle(self) -> bool:
        """Take the idle lock.  False when writers (or another daemon) hold it past LOCK_WAIT."""
        conn = self._require()
        try:
            await conn.execute(Q.idle_lock)
        except errors.LockNotAvailable:
            return False
        self.holding_lock = True
        self._idle_until = 0.0
        await self._mark_idle(IDLE_MARGIN)
        return True

    async def leave_idle(self) -> None:
        if self.holding_lock:
            self.holding_lock = False
            conn = self._require()
            if self._can_mark and self._idle_until:
                self._idle_until = 0.0
                await conn.execute(Q.idle_clear_unlock)
            else:
                await conn.execute(Q.idle_unlock)

    async def keep_marked(self) -> bool:
        """While holding the lock, renew the idle mark if it ends within MARK_RENEW seconds.
        True when it was renewed: it may have run out, and events committed since did not NOTIFY."""
        if not self.holding_lock or not self._can_mark or time.monotonic() + MARK_RENEW < self._idle_until:
            return False
        await self._mark_idle(IDLE_MARGIN)
        return True

    async def _mark_idle(self, seconds: float) -> None:
        """Tell writers (through crm_bridge.wake_state) that this daemon waits for the next ``seconds``."""
        if not self._can_mark:
            return
        try:
            await self._require().execute(Q.idle_mark, {"seconds": seconds})
        except (errors.InsufficientPrivilege, errors.UndefinedFunction) as exc:
            # Deliveries still flow (the poll interval is the floor), only wake-ups are lost.
            self._can_mark = False
            log.warning("cannot mark the daemon idle (%s): writers will not wake it and new events wait "
                        "for the poll interval; run `crm-bridge migrate --roles` to grant the daemon "
                        "role EXECUTE on crm_bridge.daemon_enter_idle / daemon_leave_idle",
                        str(exc).splitlines()[0])
            return
        self._idle_until = time.monotonic() + seconds

    async def wait(self, seconds: float) -> bool:
        """Wait for a well-formed wake-up NOTIFY; True if one came, False on timeout."""
        conn = self._require()
        deadline = time.monotonic() + seconds
        woke = False
        while not woke and (remaining := deadline - time.monotonic()) > 0:
            step = min(remaining, IDLE_SLICE)
            if self.holding_lock and time.monotonic() + step > self._idle_until - MARK_RENEW:
                await self._mark_idle(step + IDLE_MARGIN)
            # One packet may carry several notifications: look at all of them before returning.
            async for n in conn.notifies(timeout=step, stop_after=1):
                if valid_payload(n.payload):
                    woke = True
                else:
                    self._note_malformed(n)
        return woke

    def _note_malformed(self, n: psycopg.Notify) -> None:
        self.malformed += 1
        now = time.monotonic()
        if now - self._last_malformed_log > 60:
            self._last_malformed_log = now
            log.warning("ignoring malformed NOTIFY on %s from backend pid %s (%d bytes; %d so far): "
                        "payloads are hints, only event rows are acted on",
                        n.channel, n.pid, len(n.payload), self.malformed)
