"""The wake-up lock cannot be hijacked (issue 10, item 15).

Writers NOTIFY only when the advisory lock (1668441442, 1) is held exclusively AND
crm_bridge.wake_state says the daemon is idle; only the daemon role can set that, and only while
it holds the lock.  A foreign session holding the lock therefore makes nobody NOTIFY (exclusive)
or only makes the daemon poll (shared); deliveries flow either way.
"""

from __future__ import annotations

import threading

import anyio
import psycopg
import pytest
from psycopg import errors

from bridge.devtools.receiver import Rule
from bridge.listen import Listener

LOCK = (1668441442, 1)


@pytest.fixture
def daemon_grants(roles):
    """The daemon login: apply_grants() gives it every crm_bridge.daemon_* function."""
    return roles


def wake_ups(listener: psycopg.Connection) -> int:
    """Wake-up NOTIFYs received so far: a sentinel sent last (delivery is in commit order) ends the count."""
    listener.execute("NOTIFY crm_bridge, 'sentinel'")
    for count, n in enumerate(listener.notifies(timeout=20)):
        if n.payload == "sentinel":
            return count
    raise AssertionError("the sentinel NOTIFY never arrived")


def holds_idle_lock() -> str:
    return ("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 1668441442 "
            "AND objid = 1 AND mode = 'ExclusiveLock' AND granted")


def test_attacker_holding_the_lock_exclusively_makes_no_writer_notify(db, daemon_grants, receiver, daemon_factory):
    roles = daemon_grants
    db.add_url("customer", "create", receiver.url("/c"))
    daemon_factory(target_dsn=roles.dsn(roles.daemon))
    db.wait_until("SELECT count(*) FROM crm_bridge.wake_state WHERE idle_until > now()", expect=1)
    with roles.connect(roles.app) as attacker, roles.connect(roles.app) as writer, \
            psycopg.connect(db.dsn, autocommit=True) as listener:
        attacker.execute("SELECT pg_advisory_lock(%s, %s)", LOCK)   # waits until the daemon lets go
        listener.execute("LISTEN crm_bridge")
        for i in range(200):
            writer.execute("INSERT INTO crm.customer (account_id, name) VALUES (%s, 'x')", [f"w{i}"])
        assert wake_ups(listener) == 0
        receiver.wait_for(200, timeout=60)
        assert db.one("SELECT count(*) FROM crm_bridge.wake_state WHERE idle_until > now()") == 0
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'delivered'", expect=200)


def test_attacker_holding_the_lock_shared_only_makes_the_daemon_poll(db, daemon_grants, receiver, daemon_factory):
    roles = daemon_grants
    db.add_url("customer", "create", receiver.url("/c"))
    d = daemon_factory(target_dsn=roles.dsn(roles.daemon))
    with roles.connect(roles.app) as attacker, roles.connect(roles.app) as writer:
        attacker.execute("SELECT pg_advisory_lock_shared(%s, %s)", LOCK)
        for i in range(20):
            writer.execute("INSERT INTO crm.customer (account_id, name) VALUES (%s, 'x')", [f"s{i}"])
        receiver.wait_for(20, timeout=30)
    assert d.running


def test_a_daemon_killed_while_idle_leaves_no_writer_notifying(db, daemon_grants, receiver, daemon_factory):
    roles = daemon_grants
    db.add_url("customer", "create", receiver.url("/c"))
    d = daemon_factory(target_dsn=roles.dsn(roles.daemon))
    db.wait_until(holds_idle_lock(), expect=1)
    db.wait_until("SELECT count(*) FROM crm_bridge.wake_state WHERE idle_until > now()", expect=1)
    d.kill()                                                         # SIGKILL: no clean-up at all
    db.wait_until(holds_idle_lock(), expect=0)
    with roles.connect(roles.app) as writer, psycopg.connect(db.dsn, autocommit=True) as listener:
        listener.execute("LISTEN crm_bridge")
        for i in range(20):
            writer.execute("INSERT INTO crm.customer (account_id, name) VALUES (%s, 'x')", [f"k{i}"])
        assert wake_ups(listener) == 0
    daemon_factory(target_dsn=roles.dsn(roles.daemon))
    receiver.wait_for(20, timeout=30)


def test_an_idle_daemon_is_woken_by_a_notify(db, daemon_grants, receiver, daemon_factory):
    roles = daemon_grants
    db.add_url("customer", "create", receiver.url("/c"))
    daemon_factory(target_dsn=roles.dsn(roles.daemon))
    db.wait_until("SELECT count(*) FROM crm_bridge.wake_state WHERE idle_until > now()", expect=1)
    with roles.connect(roles.app) as writer, psycopg.connect(db.dsn, autocommit=True) as listener:
        listener.execute("LISTEN crm_bridge")
        writer.execute("INSERT INTO crm.customer (account_id, name) VALUES ('n1', 'x')")
        assert wake_ups(listener) == 1
    receiver.wait_for(1)


def test_only_the_lock_holding_daemon_can_mark_itself_idle(db, daemon_grants):
    roles = daemon_grants
    with roles.connect(roles.daemon) as daemon:
        # Not holding the lock: no effect.
        assert daemon.execute("SELECT crm_bridge.daemon_enter_idle(30)").fetchone() == (False,)
        assert db.one("SELECT idle_until FROM crm_bridge.wake_state") is None
        daemon.execute("SELECT pg_advisory_lock(%s, %s)", LOCK)
        assert daemon.execute("SELECT crm_bridge.daemon_enter_idle(3600)").fetchone() == (True,)
        assert db.one("SELECT idle_until <= now() + interval '60 seconds' FROM crm_bridge.wake_state") is True
        daemon.execute("SELECT crm_bridge.daemon_leave_idle()")
        assert db.one("SELECT idle_until FROM crm_bridge.wake_state") is None
    for login in (roles.app, roles.admin, roles.daemon):
        with roles.connect(login) as conn:
            # (apply_grants() of 0003 lets the admin role read every table; reading is harmless.)
            queries = ["UPDATE crm_bridge.wake_state SET idle_until = 'infinity'",
                       "DELETE FROM crm_bridge.wake_state", "TRUNCATE crm_bridge.wake_state",
                       "INSERT INTO crm_bridge.wake_state VALUES (1, 'infinity', 1)"]
            if login != roles.admin:
                queries.append("SELECT * FROM crm_bridge.wake_state")
            for query in queries:
                with pytest.raises(errors.InsufficientPrivilege):
                    conn.execute(query)
            if login != roles.daemon:
                with pytest.raises(errors.InsufficientPrivilege):
                    conn.execute("SELECT crm_bridge.daemon_enter_idle(1)")


def test_leaving_idle_clears_the_mark_and_releases_the_lock(db, daemon_grants):
    """The listener as the daemon role: entering idle takes the lock and marks the daemon idle;
    leaving (one statement, on the path from a wake-up to the claim) does both undos, so writers
    neither NOTIFY nor find the lock taken once the daemon drains."""
    roles = daemon_grants

    async def cycle() -> list[tuple]:
        listener = Listener(roles.dsn(roles.daemon))
        await listener.connect()
        try:
            seen = []
            for _ in range(2):                       # twice: the second entry finds the lock free again
                assert await listener.enter_idle() is True
                seen.append((db.one(holds_idle_lock()),
                             db.one("SELECT count(*) FROM crm_bridge.wake_state WHERE idle_until > now()")))
                await listener.leave_idle()
                seen.append((db.one(holds_idle_lock()),
                             db.one("SELECT count(*) FROM crm_bridge.wake_state WHERE idle_until > now()")))
            return seen
        finally:
            await listener.close()

    assert anyio.run(cycle) == [(1, 1), (0, 0), (1, 1), (0, 0)]
    with roles.connect(roles.app) as writer, psycopg.connect(db.dsn, autocommit=True) as listener:
        listener.execute("LISTEN crm_bridge")
        writer.execute("INSERT INTO crm.customer (account_id, name) VALUES ('after-idle', 'x')")
        assert wake_ups(listener) == 0


def _listener_pid(db) -> int:
    return db.one("SELECT pid FROM pg_stat_activity WHERE application_name = 'crm-bridge listener'")


def test_a_daemon_keeps_the_idle_lock_while_events_trickle_in(db, daemon_grants, receiver, daemon_factory):
    """Taking the lock and marking the daemon idle again for every event put a round trip in front
    of every live event's claim (bridge/daemon.py _step): its listener now runs no statement
    between the events of a trickle."""
    roles = daemon_grants
    db.add_url("customer", "create", receiver.url("/c"))
    daemon_factory(target_dsn=roles.dsn(roles.daemon), env={"CRM_BRIDGE_POLL_INTERVAL": "30"})
    db.wait_until("SELECT count(*) FROM crm_bridge.wake_state WHERE idle_until > now()", expect=1)
    pid = _listener_pid(db)
    statements = set()
    with roles.connect(roles.app) as writer:
        for i in range(10):
            writer.execute("INSERT INTO crm.customer (account_id, name) VALUES (%s, 'x')", [f"t{i}"])
            receiver.wait_for(i + 1, "/c")
            statements.add(db.one("SELECT query_start FROM pg_stat_activity WHERE pid = %s", [pid]))
    # at most a renewal of the idle mark (every few seconds) besides the one before the first event
    assert len(statements) <= 2, sorted(statements)
    assert db.one(holds_idle_lock() + " AND pid = %s", [pid]) == 1


def test_a_full_daemon_lets_go_of_the_idle_lock_and_takes_it_again_when_done(db, daemon_grants, receiver,
                                                                           daemon_factory):
    """A daemon with no room for more calls cannot act on a wake-up: writers must not pay NOTIFY's
    commit lock meanwhile."""
    roles = daemon_grants
    gate = threading.Event()
    receiver.answer("/held", Rule(handler=lambda call: gate.wait(60)))
    db.add_url("customer", "create", receiver.url("/held"))
    daemon_factory(target_dsn=roles.dsn(roles.daemon), env={"CRM_BRIDGE_CONCURRENCY": "2"})
    db.wait_until(holds_idle_lock(), expect=1)
    try:
        with roles.connect(roles.app) as writer:
            for i in range(3):
                writer.execute("INSERT INTO crm.customer (account_id, name) VALUES (%s, 'x')", [f"f{i}"])
        receiver.wait_for(2, "/held")
        db.wait_until(holds_idle_lock(), expect=0)
    finally:
        gate.set()
    receiver.wait_for(3, "/held")
    db.wait_until("SELECT count(*) FROM crm_bridge.history WHERE outcome = 'delivered'", expect=3)
    db.wait_until(holds_idle_lock(), expect=1)
