"""systemd integration: the real daemon speaks sd_notify to a real unix datagram socket."""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from bridge.sdnotify import Notifier

_names = itertools.count()


class NotifySocket:
    """What systemd binds for a Type=notify service: a datagram socket, by path or abstract name."""

    def __init__(self, abstract: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._dir: str | None = None
        if abstract:
            name = f"crm-bridge-test-{os.getpid()}-{next(_names)}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self._dir = tempfile.mkdtemp(prefix="nfy-")  # short: unix socket paths max out at 107 bytes
            self.address = str(Path(self._dir) / "notify")
            self.sock.bind(self.address)
        self.messages: list[tuple[float, list[str]]] = []   # (monotonic time, fields)

    def _drain(self, timeout: float) -> None:
        ready, _, _ = select.select([self.sock], [], [], max(timeout, 0))
        while ready:
            data = self.sock.recv(4096)
            self.messages.append((time.monotonic(), data.decode().split("\n")))
            ready, _, _ = select.select([self.sock], [], [], 0)

    def wait_for(self, predicate: Callable[[list[str]], bool], timeout: float = 20,
                 since: int = 0) -> int:
        """Index of the first message (from ``since``) matching ``predicate``; waits for it."""
        deadline = time.monotonic() + timeout
        while True:
            for i in range(since, len(self.messages)):
                if predicate(self.messages[i][1]):
                    return i
            if time.monotonic() > deadline:
                raise TimeoutError(f"no matching sd_notify message; got {self.fields(since)[-10:]}")
            self._drain(min(0.1, deadline - time.monotonic()))

    def wait_quiet(self, field: str, quiet: float, timeout: float) -> None:
        """Wait until ``field`` has not been sent for ``quiet`` seconds (within ``timeout``)."""
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while time.monotonic() - last < quiet:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{field} kept coming for {timeout} s")
            before = len(self.messages)
            self._drain(0.05)
            if any(field in m for _, m in self.messages[before:]):
                last = time.monotonic()

    def fields(self, since: int = 0) -> list[str]:
        return [f for _, m in self.messages[since:] for f in m]

    def close(self) -> None:
        self.sock.close()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest) -> Iterator[NotifySocket]:
    s = NotifySocket(abstract=request.param == "abstract")
    yield s
    s.close()


@pytest.fixture
def plain_notify_socket() -> Iterator[NotifySocket]:
    s = NotifySocket(abstract=False)
    yield s
    s.close()


def systemd_env(sock: NotifySocket, watchdog_usec: int = 300_000) -> dict[str, str]:
    return {"NOTIFY_SOCKET": sock.address, "WATCHDOG_USEC": str(watchdog_usec),
            "CRM_BRIDGE_STATUS_INTERVAL": "0.2"}


def is_status(prefix: str) -> Callable[[list[str]], bool]:
    return lambda m: any(f.startswith("STATUS=") and prefix in f for f in m)


def test_daemon_sends_ready_status_watchdog_and_stopping(db, receiver, daemon_factory, notify_socket):
    db.add_url("customer", "create", receiver.url("/c"))
    for i in range(3):  # written while no daemon runs: READY=1 must not wait for them
        db.execute("INSERT INTO crm.customer (account_id, name) VALUES (%s, 'x')", [f"early-{i}"])
    daemon = daemon_factory(env=systemd_env(notify_socket), start=False).start(wait_ready=False)

    ready = notify_socket.wait_for(lambda m: "READY=1" in m)
    # READY=1 comes after LISTEN: the listener connection exists when systemd hears it.
    assert db.one("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                  "AND application_name = 'crm-bridge listener'") == 1
    assert "WATCHDOG=1" not in notify_socket.fields(0)[: notify_socket.fields(0).index("READY=1")]
    receiver.wait_for(3)  # catch-up runs
    notify_socket.wait_for(is_status("backlog 0, 0 pending, "), since=ready)
    status = notify_socket.wait_for(is_status("0 dead letters"), since=ready)
    line = next(f for f in notify_socket.messages[status][1] if f.startswith("STATUS="))
    assert "deliveries/s" in line and "\n" not in line

    first = notify_socket.wait_for(lambda m: m == ["WATCHDOG=1"], since=ready)
    for _ in range(3):  # keeps coming, about every WATCHDOG_USEC / 3
        first = notify_socket.wait_for(lambda m: m == ["WATCHDOG=1"], since=first + 1, timeout=5)

    assert daemon.stop() == 0
    notify_socket._drain(0.2)
    stopping = notify_socket.wait_for(lambda m: "STOPPING=1" in m, since=ready, timeout=5)
    assert stopping > ready


@pytest.mark.slow
def test_watchdog_stops_while_the_database_is_unreachable_and_resumes(
        db, dsn, pg_server, daemon_factory, plain_notify_socket):
    sock = plain_notify_socket
    daemon = daemon_factory(env=systemd_env(sock), start=False).start(wait_ready=False)
    ready = sock.wait_for(lambda m: "READY=1" in m)
    sock.wait_for(lambda m: m == ["WATCHDOG=1"], since=ready)
    name = conninfo_to_dict(dsn)["dbname"]
    db.close()
    with psycopg.connect(pg_server.dsn, autocommit=True) as admin:
        try:
            admin.execute(psycopg.sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(
                psycopg.sql.Identifier(name)))
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", [name])
            sock.wait_quiet("WATCHDOG=1", quiet=1.5, timeout=20)  # 15 missed pings in a row
            down = len(sock.messages)
            sock.wait_for(is_status("database unavailable"), since=down - 1)
            assert daemon.running
        finally:
            admin.execute(psycopg.sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(
                psycopg.sql.Identifier(name)))
    sock.wait_for(lambda m: m == ["WATCHDOG=1"], since=down, timeout=60)
    daemon.wait_log("watchdog: not pinging systemd: the database is unavailable")
    daemon.wait_log("watchdog: pinging systemd again")
    assert daemon.stop() == 0


def test_notifier_is_a_noop_outside_systemd():
    n = Notifier(env={})
    assert not n.enabled and n.watchdog_interval is None
    assert n.ready("x") is False and n.watchdog() is False


def test_watchdog_usec_meant_for_another_process_is_ignored(plain_notify_socket):
    env = {"NOTIFY_SOCKET": plain_notify_socket.address, "WATCHDOG_USEC": "2000000"}
    assert Notifier(env=env).watchdog_interval == 2.0
    assert Notifier(env={**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 2.0
    assert Notifier(env={**env, "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval is None


def test_multi_field_messages_arrive_as_one_datagram(notify_socket):
    n = Notifier(env={"NOTIFY_SOCKET": notify_socket.address})
    with contextlib.closing(n):
        assert n.stopping("bye\nnow")
    notify_socket.wait_for(lambda m: m == ["STOPPING=1", "STATUS=bye now"], timeout=5)


@pytest.mark.slow
def test_watchdog_stops_while_the_main_loop_is_stuck_on_a_lock(db, daemon_factory, plain_notify_socket):
    sock = plain_notify_socket
    daemon = daemon_factory(env=systemd_env(sock), start=False).start(wait_ready=False)
    ready = sock.wait_for(lambda m: "READY=1" in m)
    sock.wait_for(lambda m: m == ["WATCHDOG=1"], since=ready)
    # A DBA's ALTER TABLE (or VACUUM FULL) on the outbox: the database is up, the daemon's claim
    # query waits.  Stall limit with FAST_ENV: 2 x poll_interval (0.5 s) + 5 s.
    with psycopg.connect(db.dsn) as blocker:
        blocker.execute("LOCK TABLE crm_bridge.event IN ACCESS EXCLUSIVE MODE")
        sock.wait_quiet("WATCHDOG=1", quiet=1.5, timeout=20)
        daemon.wait_log("watchdog: not pinging systemd: the main loop has not turned for")
        stuck = len(sock.messages)
        blocker.rollback()
    sock.wait_for(lambda m: m == ["WATCHDOG=1"], since=stuck, timeout=10)
    assert daemon.stop() == 0
