"""One bad input is isolated: odd rows, absurd config, bulk statements, unrecordable outcomes and a
restarted container never stop the daemon or hold up everyone else's deliveries (issue 10, items
5-10 and 16)."""

from __future__ import annotations

import json
import os
import secrets
import socket

import psycopg
import pytest

from bridge.daemon import Daemon
from bridge.devtools.receiver import Rule
from bridge.settings import Settings


def alive_and_delivering(db, receiver, daemon, path: str = "/after") -> None:
    """The daemon is still up and still delivers a fresh event."""
    db.add_url("task", "create", receiver.url(path))
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES (%s, 'x') ON CONFLICT DO NOTHING", [path])
    db.execute("INSERT INTO crm.task (task_id, account_id, title) VALUES (%s, %s, 's')", [path, path])
    receiver.wait_for(1, path, timeout=20)
    assert daemon.running


def test_long_ids_on_an_ordered_url_do_not_stop_the_outbox(db, receiver, daemon):
    # Two IDs of 1,440 characters each: the key of record fits the CRM's own index, not a b-tree row
    # of the bridge's (index row size 2904 exceeds maximum 2704).
    long_account, long_case = secrets.token_hex(720), secrets.token_hex(720)  # incompressible
    db.add_url("case", "edit", receiver.url("/ordered"), ordered=True)
    db.add_url("case", "edit", receiver.url("/coalesced"), coalesce_edits=True, paused=True)
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES (%s, 'x')", [long_account])
    db.execute("INSERT INTO crm.case (case_id, account_id, subject) VALUES (%s, %s, 's')", [long_case, long_account])
    db.execute("UPDATE crm.case SET subject = 'x' WHERE case_id = %s", [long_case])
    db.execute("UPDATE crm.case SET subject = 'y' WHERE case_id = %s", [long_case])
    got = receiver.wait_for(2, "/ordered", timeout=20)
    assert all(long_case in c.query for c in got)
    alive_and_delivering(db, receiver, daemon)


def test_absurd_retry_schedule_that_slipped_past_validation_does_not_kill_the_daemon(db, receiver, daemon):
    receiver.answer("/absurd", Rule(status=500))
    db.execute("ALTER TABLE crm_bridge.crm_trigger DISABLE TRIGGER USER")
    try:
        for schedule in ("{100000000 years}", "{1000000 years}"):
            db.execute("INSERT INTO crm_bridge.crm_trigger (object, event, url, retry_schedule) "
                       "VALUES ('customer', 'create', %s, %s::interval[])",
                       [receiver.url(f"/absurd?s={len(schedule)}"), schedule])
    finally:
        db.execute("ALTER TABLE crm_bridge.crm_trigger ENABLE TRIGGER USER")
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-absurd', 'x')")
    # Each URL got its first attempt and now waits for a retry within the longest allowed delay.
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE attempts = 1 AND status = 'pending'", expect=2)
    assert db.one("SELECT max(next_attempt_at - now()) < interval '8 days' FROM crm_bridge.delivery") is True
    alive_and_delivering(db, receiver, daemon)


def refuse_inserts(db, table: str, condition: str, raise_args: str) -> None:
    """A DBA's own BEFORE INSERT trigger on crm_bridge.<table>: rows for which ``condition`` (SQL
    over NEW) holds fail with check_violation (RAISE EXCEPTION ``raise_args``); others pass."""
    sql = psycopg.sql
    db.execute(sql.SQL("""
        CREATE FUNCTION public.{fn}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF {condition} THEN
                RAISE EXCEPTION {raise_args} USING ERRCODE = 'check_violation';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER {fn} BEFORE INSERT ON crm_bridge.{table}
            FOR EACH ROW EXECUTE FUNCTION public.{fn}();""").format(
        fn=sql.Identifier(f"refuse_{table}"), table=sql.Identifier(table), condition=sql.SQL(condition),
        raise_args=sql.SQL(raise_args)))


def test_an_outcome_that_cannot_be_recorded_is_isolated_not_retried_forever(db, receiver, daemon):
    """A DBA's own trigger (or any database error) refuses one delivery's outcome: that delivery
    becomes a dead letter with a reason; every other delivery is recorded and the daemon stays up."""
    refuse_inserts(db, "history", "NEW.ids[1] = 'poison' AND NEW.outcome = 'delivered'",
                   "'refusing to record %', NEW.call_id")
    db.add_url("customer", "create", receiver.url("/c"))
    db.execute("INSERT INTO crm.customer (account_id, name) SELECT 'ok-' || g, 'x' FROM generate_series(1, 20) g")
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('poison', 'x')")
    db.execute("INSERT INTO crm.customer (account_id, name) SELECT 'ok2-' || g, 'x' FROM generate_series(1, 20) g")
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'delivered'", expect=40, timeout=30)
    db.wait_until("SELECT status FROM crm_bridge.delivery WHERE ids[1] = 'poison'", expect="dead", timeout=30)
    reason = db.one("SELECT last_error FROM crm_bridge.delivery WHERE ids[1] = 'poison'")
    assert "could not be recorded" in reason and "refusing to record" in reason
    alive_and_delivering(db, receiver, daemon)


def test_an_event_that_cannot_be_dispatched_is_dead_lettered_alone(db, receiver, daemon):
    refuse_inserts(db, "batch", "EXISTS (SELECT 1 FROM unnest(NEW.calls) c WHERE c.ids[1] = 'poison')",
                   "'cannot take this one'")
    db.add_url("customer", "create", receiver.url("/c"))
    for account in ("ok-1", "poison", "ok-2"):
        db.execute("INSERT INTO crm.customer (account_id, name) VALUES (%s, 'x')", [account])
    receiver.wait_for(2, "/c", timeout=30)
    db.wait_until("SELECT count(*) FROM crm_bridge.event", expect=0)
    row = db.all("SELECT status, last_error FROM crm_bridge.delivery WHERE ids[1] = 'poison'")
    assert len(row) == 1 and row[0][0] == "dead" and "cannot take this one" in row[0][1]
    alive_and_delivering(db, receiver, daemon)


@pytest.mark.slow
def test_a_bulk_import_does_not_hold_up_other_objects(db, receiver, daemon):
    db.add_url("customer", "create", receiver.url("/bulk"), paused=True)
    db.add_url("task", "create", receiver.url("/live"))
    db.execute("INSERT INTO crm.customer (account_id, name) SELECT 'b-' || g, 'x' FROM generate_series(1, 100000) g")
    db.execute("INSERT INTO crm.task (task_id, account_id, title) VALUES ('t-live', 'b-1', 's')")
    receiver.wait_for(1, "/live", timeout=30)
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE trigger_id IS NOT NULL AND status = 'pending'",
                  expect=100000, timeout=60)
    assert daemon.running


def test_worker_ids_are_unique_per_start():
    settings = Settings()
    base = f"{socket.gethostname()}:{os.getpid()}"
    assert settings.worker_id == base               # the configured name: host:pid by default
    a, b = Daemon(settings), Daemon(settings)
    assert a.worker != b.worker                     # what rows are claimed under: unique per start
    assert a.worker.startswith(base + "/") and b.worker.startswith(base + "/")


def test_a_restarted_daemon_releases_its_previous_incarnations_calls(db, receiver, daemon_factory):
    """A container restarted with the same host name and pid 1: the rows its predecessor held are
    sent again at once, not kept alive by the new process's heartbeats."""
    tid = db.add_url("customer", "create", receiver.url("/orphan"))
    db.execute("SELECT crm_bridge.detach('crm.customer')")
    db.execute("""INSERT INTO crm_bridge.delivery (event_id, object, event, ids, record_key, event_created_at,
                                                   trigger_id, url, status, lease_until, worker)
                  VALUES (1, 'customer', 'create', '{acc-orphan}', 'k', now(), %s, %s, 'in_flight',
                          now() + interval '1 hour', 'container-7:1')""", [tid, receiver.url("/orphan")])
    daemon_factory(env={"CRM_BRIDGE_WORKER_ID": "container-7:1", "CRM_BRIDGE_LEASE": "30"})
    receiver.wait_for(1, "/orphan", timeout=20)
    db.wait_until("SELECT status FROM crm_bridge.delivery", expect="delivered")


def test_heartbeat_extends_only_the_calls_this_process_holds(db, receiver, daemon_factory):
    db.add_url("customer", "create", receiver.url("/slow"))
    fast = db.add_url("task", "create", receiver.url("/fast"))
    receiver.answer("/slow", Rule(delay=60))
    d = daemon_factory(env={"CRM_BRIDGE_LEASE": "1", "CRM_BRIDGE_TIMEOUT": "60", "CRM_BRIDGE_GRACE": "0.5"})
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-held', 'x')")
    db.wait_until("SELECT status FROM crm_bridge.delivery WHERE ids[1] = 'acc-held'", expect="in_flight")
    worker = db.one("SELECT worker FROM crm_bridge.delivery WHERE ids[1] = 'acc-held'")
    # A row of the same worker id that this process does not hold (forged, or left by a predecessor
    # that happened to get the same id) must expire, not live on through our heartbeats.
    db.execute("""INSERT INTO crm_bridge.delivery (event_id, object, event, ids, record_key, event_created_at,
                                                   trigger_id, url, status, lease_until, worker)
                  VALUES (1, 'task', 'create', '{acc-stranger,t-1}', 'k2', now(), %s, %s, 'in_flight',
                          now() + interval '1 second', %s)""", [fast, receiver.url("/fast"), worker])
    receiver.wait_for(1, "/fast", timeout=10)
    db.wait_until("SELECT status FROM crm_bridge.delivery WHERE ids[1] = 'acc-stranger'", expect="delivered")
    assert db.one("SELECT status FROM crm_bridge.delivery WHERE ids[1] = 'acc-held'") == "in_flight"
    assert d.running


def test_daemon_role_cannot_lock_the_outbox_or_forge_deliveries(db, roles):
    with roles.connect(roles.daemon) as conn:
        for statement in ("BEGIN; LOCK TABLE crm_bridge.event IN ACCESS EXCLUSIVE MODE",
                          "BEGIN; LOCK TABLE crm_bridge.delivery IN EXCLUSIVE MODE",
                          "INSERT INTO crm_bridge.delivery (event_id, object, event, ids, record_key, "
                          "event_created_at, status) VALUES (1, 'customer', 'create', '{x}', 'x', now(), 'dead')",
                          "DELETE FROM crm_bridge.event",
                          "UPDATE crm_bridge.delivery SET status = 'delivered'"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
            conn.rollback() if not conn.autocommit else conn.execute("ROLLBACK")


def test_coalesced_edits_with_include_row_send_the_newest_row(db, receiver, daemon):
    db.execute("SELECT crm_bridge.capture_rows('crm.customer')")
    db.add_url("customer", "edit", receiver.url("/rows"), method="POST", include_row=True,
               coalesce_edits=True, paused=True)
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-rows', 'v1')")
    for name in ("v2", "v3", "v4"):
        db.execute("UPDATE crm.customer SET name = %s WHERE account_id = 'acc-rows'", [name])
    db.wait_until("SELECT count(*) FROM crm_bridge.event", expect=0)
    db.execute("UPDATE crm_bridge.crm_trigger SET paused = false")
    got = receiver.wait_for(1, "/rows")
    body = json.loads(got[0].body)
    assert body["new"]["name"] == "v4"
    assert body["old"]["name"] == "v1"
    assert db.one("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'coalesced'") == 2
