"""The listener: a dedicated connection that LISTENs and, while the daemon waits, holds the idle lock.

Writers NOTIFY only while some daemon holds the idle lock (see emit_v1 in sql/), so NOTIFY's
global commit lock is paid only when a daemon is actually waiting.  The lock is a session
advisory lock: it vanishes with the connection, so a crashed daemon never leaves writers paying.
"""

from __future__ import annotations

import json
import logging
import time

import psycopg
from psycopg import errors

from .sqlfiles import Q

log = logging.getLogger("crm_bridge.listen")

CHANNEL = "crm_bridge"
# A silently dead TCP connection (no RST after a network partition) must not hang the daemon:
# libpq keepalives and a user timeout turn it into an error within about a minute.
CONNECT_KWARGS = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
                  "keepalives_count": 3, "tcp_user_timeout": 60000}
MAX_PAYLOAD = 200


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
    def __init__(self, dsn: str, *, lock_wait_ms: int = 100) -> None:
        self._dsn = dsn
        self._lock_wait_ms = lock_wait_ms
        self._conn: psycopg.AsyncConnection | None = None
        self.holding_lock = False
        self.malformed = 0
        self._last_malformed_log = 0.0

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.closed

    async def connect(self) -> None:
        await self.close()
        conn = await psycopg.AsyncConnection.connect(
            self._dsn, autocommit=True, application_name="crm-bridge listener", **CONNECT_KWARGS,
        )
        # A session lock can only wait for writers briefly: never block behind a long transaction.
        await conn.execute(f"SET lock_timeout = {int(self._lock_wait_ms)}")
        await conn.execute(f"LISTEN {CHANNEL}")
        self._conn = conn
        self.holding_lock = False

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
        """Take the idle lock.  False when writers (or another daemon) hold it past lock_wait_ms."""
        conn = self._require()
        try:
            await conn.execute(Q.idle_lock)
        except errors.LockNotAvailable:
            return False
        self.holding_lock = True
        return True

    async def leave_idle(self) -> None:
        if self.holding_lock:
            self.holding_lock = False
            await self._require().execute(Q.idle_unlock)

    async def wait(self, seconds: float) -> bool:
        """Wait for a well-formed wake-up NOTIFY; True if one came, False on timeout."""
        conn = self._require()
        deadline = time.monotonic() + seconds
        woke = False
        while not woke and (remaining := deadline - time.monotonic()) > 0:
            # One packet may carry several notifications: look at all of them before returning.
            async for n in conn.notifies(timeout=remaining, stop_after=1):
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

    async def ping(self) -> None:
        await self._require().execute("SELECT 1")
