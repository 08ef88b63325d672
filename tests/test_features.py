"""Beyond the seed: echo suppression, column filters, per-record ordering, coalescing, pause."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from psycopg import sql

from bridge.devtools.receiver import ReceivedCall, Rule

EDITS = "FROM crm_bridge.delivery WHERE event = 'edit'"


def write_back(dsn: str, *, origin: str | None = None, role: str | None = None):
    """A receiver handler that, like a sync process, writes the record back on every call."""

    def handler(call: ReceivedCall) -> None:
        account = call.query.split("AccountID=", 1)[1]
        with psycopg.connect(dsn, autocommit=True, **({"user": role} if role else {})) as conn:
            if origin:
                conn.execute("SELECT set_config('crm_bridge.origin', %s, false)", [origin])
            conn.execute("UPDATE crm.customer SET name = name || '+' WHERE account_id = %s", [account])

    return handler


def test_echo_suppression_by_origin_marker_prevents_a_sync_loop(db, receiver, daemon):
    receiver.answer("/sync", Rule(handler=write_back(db.dsn, origin="sync")))
    db.add_url("customer", "edit", receiver.url("/sync"), exclude_origins=["sync"])
    db.add_url("customer", "edit", receiver.url("/audit"))  # not excluded: sees the write-back too
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-1', 'Ann')")
    db.execute("UPDATE crm.customer SET name = 'Anna' WHERE account_id = 'acc-1'")
    receiver.wait_for(2, "/audit")  # the user's edit, then the sync's write-back
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'delivered'", expect=3)
    assert db.one("SELECT name FROM crm.customer") == "Anna+"  # the sync did write back once
    assert len(receiver.received("/sync")) == 1


def test_echo_suppression_by_role(db, pg_server, receiver, daemon):
    role = f"sync_{uuid.uuid4().hex[:8]}"
    db.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        db.execute(sql.SQL("GRANT USAGE ON SCHEMA crm TO {0}; GRANT SELECT, UPDATE ON crm.customer TO {0}")
                   .format(sql.Identifier(role)))
        receiver.answer("/sync", Rule(handler=write_back(db.dsn, role=role)))
        db.add_url("customer", "edit", receiver.url("/sync"), exclude_roles=[role])
        db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-1', 'Ann')")
        db.execute("UPDATE crm.customer SET name = 'Anna' WHERE account_id = 'acc-1'")
        receiver.wait_for(1, "/sync")
        db.wait_until("SELECT name FROM crm.customer", expect="Anna+")
        # The write-back's event is dispatched (as unrouted for this URL) and no second call follows.
        db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'unrouted' AND event = 'edit'",
                      expect=1)
        assert len(receiver.attempts) == 1
    finally:
        db.execute(sql.SQL("DROP OWNED BY {0}; DROP ROLE {0}").format(sql.Identifier(role)))


def test_only_columns_fires_edits_only_when_a_listed_column_changed(db, receiver, daemon):
    db.add_url("case", "edit", receiver.url("/status"), only_columns=["status", "priority"])
    db.add_url("case", "edit", receiver.url("/all"))
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('a', 'x')")
    db.execute("INSERT INTO crm.case (case_id, account_id, subject) VALUES ('c', 'a', 'one')")
    db.execute("UPDATE crm.case SET subject = 'two' WHERE case_id = 'c'")
    db.execute("UPDATE crm.case SET status = 'resolved' WHERE case_id = 'c'")
    receiver.wait_for(2, "/all")
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'delivered'", expect=3)
    assert len(receiver.received("/status")) == 1


def test_only_columns_is_rejected_for_non_edit_events(db):
    with pytest.raises(psycopg.errors.CheckViolation, match='only_columns applies to edit events, not "create"'):
        db.add_url("case", "create", "http://127.0.0.1:9/x", only_columns=["status"])


@pytest.mark.slow
def test_ordered_url_keeps_commit_order_per_record_and_isolates_failures(db, receiver, daemon):
    # Record A's first call fails twice, with a 2 s backoff; B must flow meanwhile, A's later
    # edits must wait for A's first call.
    receiver.answer("/ord?AccountID=A", Rule(status=500, times=2))
    db.add_url("customer", "edit", receiver.url("/ord"), ordered=True, retry_schedule=["2 seconds"],
               max_attempts=5)
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('A', 'a0'), ('B', 'b0')")
    for i in range(1, 4):
        for acc in ("A", "B"):
            db.execute("UPDATE crm.customer SET name = %s WHERE account_id = %s", [f"{acc}{i}", acc])
    receiver.wait_for(3, "/ord", timeout=10)
    db.wait_until(f"SELECT count(*) {EDITS} AND ids = '{{B}}' AND status = 'delivered'", expect=3)
    held = db.all(f"SELECT status, attempts {EDITS} AND ids = '{{A}}' ORDER BY event_id")
    assert held[0][0] in ("pending", "in_flight") and held[0][1] >= 1
    assert held[1:] == [("pending", 0), ("pending", 0)]  # held back behind A's first call

    db.wait_until(f"SELECT count(*) {EDITS} AND ids = '{{A}}' AND status = 'delivered'", expect=3, timeout=30)
    rows = db.all(f"SELECT id, attempts, finished_at {EDITS} AND ids = '{{A}}' ORDER BY event_id")
    assert [r[1] for r in rows] == [3, 1, 1]
    assert [r[2] for r in rows] == sorted(r[2] for r in rows)  # finished in commit order
    assert {r[0] for r in db.all("SELECT delivery_id FROM crm_bridge.attempt")} == {rows[0][0]}


def test_coalescing_folds_queued_edits_of_a_record_into_one_call(db, receiver, daemon):
    tid = db.add_url("customer", "edit", receiver.url("/co"), coalesce_edits=True, paused=True)
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('A', 'a'), ('B', 'b')")
    for i in range(5):
        db.execute("UPDATE crm.customer SET name = %s WHERE account_id = 'A'", [f"a{i}"])
    for i in range(2):
        db.execute("UPDATE crm.customer SET name = %s WHERE account_id = 'B'", [f"b{i}"])
    db.wait_until(f"SELECT count(*) {EDITS}", expect=7)
    assert dict(db.all(f"SELECT status, count(*) {EDITS} GROUP BY 1")) == {"pending": 2, "coalesced": 5}
    db.execute("UPDATE crm_bridge.crm_trigger SET paused = false WHERE id = %s", [tid])
    receiver.wait_for(2, "/co")
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'delivered'", expect=2)
    assert sorted(c.query for c in receiver.attempts) == ["AccountID=A", "AccountID=B"]


def test_paused_url_queues_and_resumes_without_losing_events(db, receiver, daemon):
    tid = db.add_url("customer", "create", receiver.url("/p"), paused=True)
    for i in range(10):
        db.execute("INSERT INTO crm.customer (account_id, name) VALUES (%s, 'x')", [f"p{i}"])
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'pending'", expect=10)
    assert receiver.attempts == []
    # Resuming wakes the daemon through the config table's own NOTIFY: no waiting for the poll.
    db.execute("UPDATE crm_bridge.crm_trigger SET paused = false WHERE id = %s", [tid])
    calls = receiver.wait_for(10, "/p", timeout=10)
    assert sorted(c.query for c in calls) == sorted(f"AccountID=p{i}" for i in range(10))
