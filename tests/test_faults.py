"""Delivery guarantees under faults: crashes, database restarts, bad receivers, several daemons."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import psycopg
import pytest

from bridge.devtools.pgserver import TempPostgres
from bridge.devtools.receiver import Receiver, Rule
from bridge.migrate import migrate


def write_customers(dsn: str, start: int, count: int, per_tx: int = 100) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for lo in range(start, start + count, per_tx):
            hi = min(lo + per_tx, start + count) - 1
            conn.execute("INSERT INTO crm.customer (account_id, name) "
                         "SELECT 'acc-' || g, 'burst' FROM generate_series(%s::int, %s::int) g", [lo, hi])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- crashes ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_kill_9_mid_burst_loses_nothing_and_duplicates_only_in_flight(db, receiver, daemon_factory):
    n = 5000
    db.add_url("customer", "create", receiver.url("/a"))
    db.add_url("customer", "create", receiver.url("/b"))
    first = daemon_factory()
    write_customers(db.dsn, 0, n)
    receiver.wait_for(n // 2, timeout=60)
    first.kill()
    in_flight = db.one("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'in_flight'")
    killed_at = time.monotonic()
    daemon_factory()
    receiver.wait_for(2 * n, timeout=120)
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'delivered'", expect=2 * n, timeout=60)
    recovery = time.monotonic() - killed_at
    counts = Counter(c.target for c in receiver.received())
    expected = {f"/{p}?AccountID=acc-{i}" for p in "ab" for i in range(n)}
    assert set(counts) == expected                      # every event reached every URL
    duplicates = sum(c - 1 for c in counts.values())
    assert duplicates <= in_flight                      # only deliveries that were in flight
    print(f"\nkill -9: {2 * n} deliveries, lost 0, duplicated {duplicates} "
          f"(in flight at kill: {in_flight}), all delivered {recovery:.1f} s after the kill")


@pytest.mark.slow
def test_postgres_restart_mid_burst_recovers_by_itself(daemon_factory, receiver):
    with TempPostgres() as cluster:
        dsn = cluster.dsn()
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrate(conn, reference=True)
            conn.execute("INSERT INTO crm_bridge.crm_trigger (object, event, url) VALUES ('customer', 'create', %s)",
                         [receiver.url("/r")])
        daemon = daemon_factory(target_dsn=dsn)
        write_customers(dsn, 0, 3000)
        receiver.wait_for(1000, timeout=60)
        cluster.restart()
        restarted = time.monotonic()
        before = len(receiver.received())
        write_customers(dsn, 3000, 1000)
        receiver.wait_for(before + 1, timeout=30)
        recovery = time.monotonic() - restarted
        receiver.wait_for(4000, timeout=120)
        with psycopg.connect(dsn, autocommit=True) as conn:
            deadline = time.monotonic() + 60
            while conn.execute("SELECT count(*) FROM crm_bridge.delivery WHERE status <> 'delivered'").fetchone()[0]:
                assert time.monotonic() < deadline, "deliveries not all recorded as delivered"
                time.sleep(0.05)
        got = {c.query for c in receiver.received()}
        assert got == {f"AccountID=acc-{i}" for i in range(4000)}
        duplicates = len(receiver.received()) - 4000
        assert daemon.running
        assert "database unavailable" in daemon.log
        print(f"\nPostgreSQL restart: 4000 deliveries, lost 0, duplicated {duplicates}, "
              f"first delivery {recovery:.2f} s after the server was back")
        assert daemon.stop() == 0


@pytest.mark.slow
def test_two_daemons_share_a_burst_without_duplicates(db, receiver, daemon_factory):
    n = 2000
    db.add_url("customer", "create", receiver.url("/shared"))
    write_customers(db.dsn, 0, n)  # backlog first, so that both daemons start on the same work
    daemon_factory(env={"CRM_BRIDGE_BATCH_SIZE": "50", "CRM_BRIDGE_CONCURRENCY": "32"})
    daemon_factory(env={"CRM_BRIDGE_BATCH_SIZE": "50", "CRM_BRIDGE_CONCURRENCY": "32"})
    write_customers(db.dsn, n, n)
    receiver.wait_for(2 * n, timeout=60)
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'delivered'", expect=2 * n)
    counts = Counter(c.query for c in receiver.received())
    assert len(counts) == 2 * n and max(counts.values()) == 1
    per_worker = dict(db.all("SELECT worker, count(*) FROM crm_bridge.delivery GROUP BY worker"))
    assert len(per_worker) == 2, per_worker
    assert min(per_worker.values()) > 0


# -- receivers misbehaving --------------------------------------------------------------------
def test_receiver_down_then_up_gets_everything(db, daemon_factory):
    port = free_port()
    # Retries only: with the circuit breaker (on by default) the URL would wait out its cool-down
    # after 5 failures (tests/test_url_protection.py has the breaker's version of this test).
    db.add_url("customer", "create", f"http://127.0.0.1:{port}/late", breaker_threshold=0)
    daemon_factory(env={"CRM_BRIDGE_RETRY_SCHEDULE": "0.2", "CRM_BRIDGE_MAX_ATTEMPTS": "100"})
    write_customers(db.dsn, 0, 5)
    db.wait_until("SELECT bool_and(attempts >= 2) FROM crm_bridge.delivery", timeout=30)
    errors = {r[0] for r in db.all("SELECT last_error FROM crm_bridge.delivery")}
    assert all("ConnectError" in e for e in errors), errors
    assert db.one("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'pending'") == 5
    with Receiver(port=port) as rx:
        rx.wait_for(5, timeout=30)
        db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'delivered'", expect=5)
    assert {c.query for c in rx.received()} == {f"AccountID=acc-{i}" for i in range(5)}


def test_503_with_retry_after_is_honoured(db, receiver, daemon):
    receiver.answer("/busy", Rule(status=503, headers={"Retry-After": "2"}, times=1))
    db.add_url("customer", "create", receiver.url("/busy"))
    write_customers(db.dsn, 0, 1)
    receiver.wait_for(1, "/busy", timeout=20)
    first, second = receiver.attempts
    assert second.at - first.at >= 1.9  # the schedule alone would have retried after 0.05 s
    db.wait_until("SELECT status FROM crm_bridge.delivery", expect="delivered")
    assert db.all("SELECT status FROM crm_bridge.attempt") == [(503,)]


def test_404_is_permanent_and_dead_at_once(db, receiver, daemon):
    receiver.answer("/gone", Rule(status=404))
    db.add_url("customer", "create", receiver.url("/gone"))
    write_customers(db.dsn, 0, 1)
    db.wait_until("SELECT status FROM crm_bridge.delivery", expect="dead")
    assert db.all("SELECT attempts, last_status, last_error LIKE 'permanent failure: HTTP 404%%' "
                  "FROM crm_bridge.delivery") == [(1, 404, True)]
    assert len(receiver.attempts) == 1


@pytest.mark.parametrize("status", [408, 429])
def test_retryable_4xx_are_retried(db, receiver, daemon, status):
    receiver.answer("/later", Rule(status=status, times=1))
    db.add_url("customer", "create", receiver.url("/later"))
    write_customers(db.dsn, 0, 1)
    db.wait_until("SELECT status FROM crm_bridge.delivery", expect="delivered")
    assert db.one("SELECT attempts FROM crm_bridge.delivery") == 2


def test_slow_receiver_beyond_the_per_url_timeout(db, receiver, daemon):
    receiver.answer("/slow", Rule(delay=3))
    db.add_url("customer", "create", receiver.url("/slow"), timeout_ms=300, max_attempts=2)
    write_customers(db.dsn, 0, 1)
    db.wait_until("SELECT status FROM crm_bridge.delivery", expect="dead", timeout=20)
    error = db.one("SELECT last_error FROM crm_bridge.delivery")
    assert "gave up after 2 attempts: timed out after 0.3 s" in error
    assert db.one("SELECT count(*) FROM crm_bridge.attempt WHERE error LIKE '%%timed out after 0.3 s'") == 2


def test_connection_resets_are_retried(db, receiver, daemon):
    receiver.answer("/reset", Rule(reset=True, times=2))
    db.add_url("customer", "create", receiver.url("/reset"))
    write_customers(db.dsn, 0, 1)
    receiver.wait_for(1, "/reset")
    db.wait_until("SELECT status FROM crm_bridge.delivery", expect="delivered")
    errors = [r[0] for r in db.all("SELECT error FROM crm_bridge.attempt ORDER BY at, attempt")]
    # aiohttp itself retries a GET once when a kept-alive connection is reset, so the two resets
    # may cost one recorded attempt or two.
    assert errors and all("RemoteProtocolError" in e for e in errors), errors
    assert len(receiver.attempts) == 3


def test_a_slow_url_does_not_hold_up_the_others(db, receiver, daemon):
    receiver.answer("/slow", Rule(delay=2))
    db.add_url("customer", "create", receiver.url("/slow"), max_in_flight=2)
    db.add_url("customer", "create", receiver.url("/fast"))
    write_customers(db.dsn, 0, 40)
    receiver.wait_for(40, "/fast", timeout=10)
    # The slow URL can have finished at most its first couple of calls by now.
    slow_done = len(receiver.received("/slow"))
    assert slow_done <= 4
    # The slow URL's calls are handed out from the queue (a URL with max_in_flight is coordinated
    # in the database, migration 0015), at most max_in_flight at a time.
    receiver.wait_for(2, "/slow", attempts=True, timeout=10)
    assert receiver.max_concurrent("/slow") == 2


# -- dead letters, retention, shutdown --------------------------------------------------------
def _cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge.cli", "--dsn", dsn, *args],
                          capture_output=True, text=True, timeout=60)


def test_replay_delivers_dead_letters_and_purge_removes_them(db, receiver, daemon):
    receiver.answer("/flaky", Rule(status=404, times=3))
    receiver.answer("/other", Rule(status=410))
    db.add_url("customer", "create", receiver.url("/flaky"))
    db.add_url("customer", "create", receiver.url("/other"))
    write_customers(db.dsn, 0, 3)
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'dead'", expect=6)

    dry = _cli(db.dsn, "replay", "--url", receiver.url("/flaky"), "--dry-run")
    assert dry.returncode == 0 and "3 dead letter(s) would be replayed" in dry.stdout
    assert db.one("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'dead'") == 6

    done = _cli(db.dsn, "replay", "--url", receiver.url("/flaky"))
    assert done.returncode == 0 and "replayed 3 dead letter(s)" in done.stdout, done
    receiver.wait_for(3, "/flaky")
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'delivered'", expect=3)

    purge = _cli(db.dsn, "purge", "--object", "customer")
    assert purge.returncode == 0 and "purged 3 dead letter(s)" in purge.stdout
    assert db.one("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'dead'") == 0
    # The purged calls' failed attempts stay in history until its partition is dropped (retention).
    assert db.one("SELECT count(*) FROM crm_bridge.queue") == 0


def test_replay_in_sql_by_ids(db, receiver, daemon):
    receiver.answer("/x", Rule(status=400, times=2))
    db.add_url("customer", "create", receiver.url("/x"))
    write_customers(db.dsn, 0, 2)
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'dead'", expect=2)
    first = db.one("SELECT min(id) FROM crm_bridge.delivery")
    assert db.one("SELECT crm_bridge.replay(p_ids => ARRAY[%s::bigint])", [first]) == 1
    db.wait_until("SELECT status FROM crm_bridge.delivery WHERE id = %s", [first], expect="delivered")
    assert db.one("SELECT count(*) FROM crm_bridge.dead_letters()") == 1


def test_replay_rejects_bad_filters_clearly(db):
    proc = _cli(db.dsn, "replay", "--since", "yesterday")
    assert proc.returncode == 2 and "invalid timestamp 'yesterday'" in proc.stderr


def test_retention_deletes_old_finished_deliveries_and_keeps_dead_letters(db, receiver, daemon_factory):
    receiver.answer("/c/dead", Rule(status=404))
    db.add_url("customer", "create", receiver.url("/c/ok"))
    db.add_url("customer", "create", receiver.url("/c/dead"))
    daemon_factory(env={"CRM_BRIDGE_RETENTION_DAYS": "0.00002", "CRM_BRIDGE_RETENTION_INTERVAL": "0.2",
                        "CRM_BRIDGE_LEASE": "1"})
    write_customers(db.dsn, 0, 5)
    receiver.wait_for(5, "/c/ok")
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'dead'", expect=5)
    # History is kept in time partitions (10 s long for this retention): whole partitions are dropped.
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'delivered'", expect=0, timeout=40)
    assert db.one("SELECT count(*) FROM crm_bridge.delivery") == 5
    # The dead letters stay, with their last outcome; their failed attempts were history like the rest.
    assert db.one("SELECT count(*) FROM crm_bridge.queue WHERE status = 'dead' AND last_status = 404") == 5


def test_sigterm_waits_for_in_flight_calls(db, receiver, daemon):
    receiver.answer("/slowish", Rule(delay=1))
    db.add_url("customer", "create", receiver.url("/slowish"))
    write_customers(db.dsn, 0, 1)
    db.wait_until("SELECT status FROM crm_bridge.delivery", expect="in_flight")
    assert daemon.stop() == 0
    assert db.one("SELECT status FROM crm_bridge.delivery") == "delivered"


@pytest.mark.slow
def test_sigterm_grace_over_releases_unfinished_calls(db, receiver, daemon_factory):
    receiver.answer("/stuck", Rule(delay=20))
    db.add_url("customer", "create", receiver.url("/stuck"))
    daemon = daemon_factory(env={"CRM_BRIDGE_GRACE": "0.5", "CRM_BRIDGE_TIMEOUT": "30"})
    write_customers(db.dsn, 0, 1)
    db.wait_until("SELECT status FROM crm_bridge.delivery", expect="in_flight")
    receiver.wait_for(1, "/stuck", attempts=True)
    started = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - started < 10
    assert db.all("SELECT status, attempts FROM crm_bridge.delivery") == [("pending", 0)]
    assert "releasing 1 unfinished deliveries" in daemon.log


@pytest.mark.slow
def test_writes_continue_while_the_daemon_is_killed(db, receiver, daemon_factory):
    """Writers never depend on the daemon: kill it while a writer is busy; the writer never fails."""
    db.add_url("customer", "create", receiver.url("/w"))
    daemon = daemon_factory()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            write_customers(db.dsn, 0, 2000, per_tx=1)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    receiver.wait_for(100, timeout=30)
    daemon.kill()
    t.join(60)
    assert not errors
    daemon_factory()
    receiver.wait_for(2000, timeout=60)
