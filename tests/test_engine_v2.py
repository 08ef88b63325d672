"""Delivery engine v2 (issue 11, migration 0010): batches, history, the queue, the two claim lanes,
history rotation and replaying what a URL was delivered."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psycopg
import pytest
from fixtures.databases import install_schema_up_to
from fixtures.factories import add_expired_history

from bridge.devtools.receiver import Rule
from bridge.migrate import migrate


def cli(dsn: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge.cli", "--dsn", dsn, *args], capture_output=True,
                          text=True, timeout=timeout)


def test_the_happy_path_leaves_one_history_row_per_call_and_nothing_else(db, receiver, daemon):
    db.add_url("customer", "create", receiver.url("/a"))
    db.add_url("customer", "create", receiver.url("/b"))
    db.execute("INSERT INTO crm.customer (account_id, name) SELECT 'acc-' || g, 'x' FROM generate_series(1, 300) g")
    for i in range(20):
        db.execute("INSERT INTO crm.customer (account_id, name) VALUES (%s, 'x')", [f"one-{i}"])
    receiver.wait_for(320, "/a", timeout=30)
    receiver.wait_for(320, "/b", timeout=30)
    db.wait_until("SELECT count(*) FROM crm_bridge.history WHERE outcome = 'delivered'", expect=640)
    assert db.one("SELECT count(*) FROM crm_bridge.batch") == 0
    assert db.one("SELECT count(*) FROM crm_bridge.queue") == 0
    assert db.one("SELECT count(*) FROM crm_bridge.event") == 0
    # one history row per call, each call once
    assert db.one("SELECT count(DISTINCT call_id) FROM crm_bridge.history") == 640
    # the compatibility view shows them as delivered deliveries, with their URL
    assert db.all("SELECT status, count(*) FROM crm_bridge.delivery GROUP BY 1") == [("delivered", 640)]
    assert db.one("SELECT count(*) FROM crm_bridge.delivery WHERE url LIKE '%%/a'") == 320
    # url_status knows the last success without reading history
    assert db.one("SELECT count(*) FROM crm_bridge.url_status WHERE last_success_at IS NOT NULL") == 2


def test_what_happened_to_the_calls_of_one_record_is_one_indexed_query(db, receiver, daemon):
    """docs/DBA.md: history by record_key, retries included."""
    receiver.answer("/flaky", Rule(status=503, times=1))
    db.add_url("case", "create", receiver.url("/flaky"), retry_schedule="{0 seconds}")
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-r', 'x')")
    db.execute("INSERT INTO crm.case (case_id, account_id, subject) VALUES ('case-r', 'acc-r', 's')")
    receiver.wait_for(2, "/flaky", attempts=True, timeout=20)
    db.wait_until("SELECT count(*) FROM crm_bridge.history WHERE outcome = 'delivered'", expect=1)
    query = ("SELECT outcome, attempt, http_status FROM crm_bridge.history "
             "WHERE record_key = crm_bridge.record_key(ARRAY['acc-r', 'case-r']) ORDER BY at, attempt")
    assert db.all(query) == [("failed", 1, 503), ("delivered", 2, 200)]
    db.execute("SET enable_seqscan = off")
    plan = "\n".join(r[0] for r in db.all("EXPLAIN " + query))
    assert "history_record_idx" in plan or "record_key_idx" in plan


def test_a_slow_receiver_does_not_keep_the_other_calls_of_its_batch_unrecorded(db, receiver, daemon_factory):
    receiver.answer("/slow", Rule(delay=6))
    db.add_url("customer", "create", receiver.url("/slow"))
    db.add_url("customer", "create", receiver.url("/fast"))
    daemon_factory(env={"CRM_BRIDGE_TIMEOUT": "30"})
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-s', 'x')")
    receiver.wait_for(1, "/fast", timeout=10)
    # The fast call is recorded well before the slow one returns; the slow one is then held one by
    # one in the queue by the same daemon, and recorded when it is done.
    db.wait_until("SELECT count(*) FROM crm_bridge.history WHERE outcome = 'delivered'", expect=1, timeout=4)
    assert db.one("SELECT status FROM crm_bridge.queue") == "in_flight"
    assert db.one("SELECT count(*) FROM crm_bridge.batch") == 0
    db.wait_until("SELECT count(*) FROM crm_bridge.history WHERE outcome = 'delivered'", expect=2, timeout=20)
    assert db.one("SELECT count(*) FROM crm_bridge.queue") == 0


def test_a_per_url_limit_holds_with_its_calls_handed_out_from_the_queue(db, receiver, daemon):
    """Since migration 0015 a URL with max_in_flight is coordinated in the database (its calls go
    through the queue, daemon_claim_due grants them): tests/test_url_protection.py has several daemons."""
    receiver.answer("/one", Rule(delay=0.05))
    db.add_url("customer", "create", receiver.url("/one"), max_in_flight=1)
    db.execute("INSERT INTO crm.customer (account_id, name) SELECT 'l-' || g, 'x' FROM generate_series(1, 30) g")
    receiver.wait_for(30, "/one", timeout=30)
    assert receiver.max_concurrent("/one") == 1
    db.wait_until("SELECT count(*) FROM crm_bridge.history WHERE outcome = 'delivered'", expect=30)


def test_a_batch_whose_daemon_died_is_sent_again_by_another(db, receiver, daemon_factory):
    receiver.answer("/hang", Rule(delay=60))
    db.add_url("customer", "create", receiver.url("/hang"))
    first = daemon_factory(env={"CRM_BRIDGE_LEASE": "2", "CRM_BRIDGE_TIMEOUT": "60"})
    db.execute("INSERT INTO crm.customer (account_id, name) SELECT 'k-' || g, 'x' FROM generate_series(1, 5) g")
    receiver.wait_for(5, "/hang", timeout=10, attempts=True)
    assert db.one("SELECT count(*) FROM crm_bridge.batch") == 1
    first.kill()
    receiver.clear_rules()
    daemon_factory(env={"CRM_BRIDGE_LEASE": "2"})
    receiver.wait_for(5, "/hang", timeout=20)          # each call again, answered: at least once
    db.wait_until("SELECT count(*) FROM crm_bridge.history WHERE outcome = 'delivered'", expect=5, timeout=20)
    assert db.one("SELECT count(*) FROM crm_bridge.batch") == 0


def test_a_live_change_is_not_held_up_by_a_bulk_import(db, receiver, daemon):
    db.add_url("customer", "create", receiver.url("/bulk"))
    db.add_url("task", "create", receiver.url("/live"))
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-live', 'x')")
    db.execute("INSERT INTO crm.customer (account_id, name) SELECT 'b-' || g, 'x' FROM generate_series(1, 20000) g")
    db.execute("INSERT INTO crm.task (task_id, account_id, title) VALUES ('t-live', 'acc-live', 's')")
    committed = time.time()
    got = receiver.wait_for(1, "/live", timeout=20)
    # The live event went out in the next claim (its own lane), while most of the import waited.
    assert got[0].at - committed < 5
    assert len(receiver.received("/bulk")) < 20000
    receiver.wait_for(20001, "/bulk", timeout=120)


@pytest.mark.slow
def test_a_million_row_statement_is_claimed_in_chunks_while_live_changes_flow(db, receiver, daemon):
    """One 1,000,000-row INSERT (no URL for it: every record is routed, found unrouted and written to
    history) and a live change committed right after it on another object."""
    db.add_url("task", "create", receiver.url("/live"))
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-live', 'x')")
    db.execute("INSERT INTO crm.customer (account_id, name) SELECT 'm-' || g, 'x' FROM generate_series(1, 1000000) g")
    assert db.one("SELECT count(*) FROM crm_bridge.event") >= 1000        # chunks of at most 1000 records
    assert db.one("SELECT max(n_records) FROM crm_bridge.event") == 1000
    db.execute("INSERT INTO crm.task (task_id, account_id, title) VALUES ('t-live', 'acc-live', 's')")
    committed = time.time()
    got = receiver.wait_for(1, "/live", timeout=30)
    assert got[0].at - committed < 5
    db.wait_until("SELECT count(*) FROM crm_bridge.event", expect=0, timeout=600)
    assert db.one("SELECT count(*) FROM crm_bridge.history WHERE outcome = 'unrouted'") == 1000001
    assert daemon.running


def test_rotation_drops_partitions_past_the_retention_and_makes_new_ones(db):
    db.execute("SELECT crm_bridge.daemon_rotate(interval '7 days')")
    # An old partition with a finished call, as if written 30 days ago.
    add_expired_history(db, call_id=1, ids=["a"], record_key="k")
    result = db.one("SELECT crm_bridge.daemon_rotate(interval '7 days')")
    assert "dropped 1" in result
    assert db.one("SELECT to_regclass('crm_bridge.history_old')") is None
    assert db.one("SELECT count(*) FROM crm_bridge.history") == 0
    # partitions reach well past now
    assert db.one("SELECT max(upper_bound) > now() + interval '2 days' FROM crm_bridge.history_partition")


def test_a_shorter_retention_remakes_the_empty_partitions_made_for_a_longer_one(db):
    db.execute("SELECT crm_bridge.daemon_rotate(interval '7 days')")       # a day wide, days ahead
    assert db.one("SELECT count(*) FROM crm_bridge.history_partition WHERE upper_bound > now() + interval '2 days'") > 0
    db.execute("SELECT crm_bridge.daemon_rotate(interval '1 minute')")     # 15 s wide from now on
    assert db.one("SELECT max(upper_bound - lower_bound) FROM crm_bridge.history_partition "
                  "WHERE upper_bound > now()") == db.one("SELECT interval '15 seconds'")
    assert db.one("SELECT max(upper_bound) < now() + interval '10 minutes' FROM crm_bridge.history_partition")
    # A partition that already holds rows is kept until it ends (its rows are not moved).
    db.execute("SELECT crm_bridge.daemon_rotate(interval '7 days')")
    db.execute("""INSERT INTO crm_bridge.history (at, call_id, event_id, object, event, ids, event_created_at,
                                                  record_key, outcome)
                  VALUES (now() + interval '20 minutes', 1, 1, 'customer', 'create', '{a}', now(), 'k', 'unrouted')""")
    db.execute("SELECT crm_bridge.daemon_rotate(interval '1 minute')")
    assert db.one("SELECT count(*) FROM crm_bridge.history") == 1


def test_a_short_retention_gives_short_partitions(db):
    assert db.one("SELECT crm_bridge.history_width(interval '7 days')") == db.one("SELECT interval '1 day'")
    assert db.one("SELECT crm_bridge.history_width(interval '1 hour')") == db.one("SELECT interval '15 minutes'")
    assert db.one("SELECT crm_bridge.history_width(interval '10 seconds')") == db.one("SELECT interval '10 seconds'")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="retention positive"):
        db.execute("SELECT crm_bridge.history_rotate(interval '0', interval '1 minute', interval '1 hour')")


def test_rotation_waits_briefly_for_a_long_query_and_says_busy(db, dsn):
    db.execute("SELECT crm_bridge.daemon_rotate(interval '7 days')")
    with psycopg.connect(dsn) as other:
        other.execute("LOCK TABLE crm_bridge.history IN ACCESS SHARE MODE")   # a long DBA query
        started = time.monotonic()
        # one more day ahead needs a new partition: DDL that must wait for the query
        result = db.one("SELECT crm_bridge.history_rotate(interval '7 days', interval '1 day', interval '5 days')")
        assert result == "busy"
        assert time.monotonic() - started < 5
        other.rollback()
    assert db.one("SELECT crm_bridge.history_rotate(interval '7 days', interval '1 day', interval '5 days')") \
        == "created 2, dropped 0"


def test_replay_delivered_sends_again_what_one_url_was_sent(db, receiver, daemon, dsn):
    a = db.add_url("customer", "create", receiver.url("/lost"))
    db.add_url("customer", "create", receiver.url("/other"))
    db.execute("INSERT INTO crm.customer (account_id, name) SELECT 'r-' || g, 'x' FROM generate_series(1, 1500) g")
    receiver.wait_for(1500, "/lost", timeout=60)
    receiver.wait_for(1500, "/other", timeout=60)
    db.wait_until("SELECT count(*) FROM crm_bridge.history WHERE outcome = 'delivered'", expect=3000, timeout=30)
    first_ids = {c.headers.get("webhook-id") for c in receiver.received("/lost")}

    dry = cli(dsn, "replay", "--delivered", "--url", str(a), "--since", "2000-01-01T00:00:00Z", "--dry-run")
    assert dry.returncode == 2 and "history only goes back to" in dry.stderr
    since = db.one("SELECT min(lower_bound) FROM crm_bridge.history_partition").isoformat()
    dry = cli(dsn, "replay", "--delivered", "--url", str(a), "--since", since, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "1500 call(s) delivered to URL" in dry.stdout and "would be sent again" in dry.stdout
    time.sleep(0.2)
    assert len(receiver.received("/lost")) == 1500          # a dry run sends nothing

    done = cli(dsn, "replay", "--delivered", "--url", receiver.url("/lost"), "--since", since)
    assert done.returncode == 0, done.stderr
    assert "queued 1500 call(s)" in done.stdout and "queued 1500/1500" in done.stderr
    receiver.wait_for(3000, "/lost", timeout=60)
    assert len(receiver.received("/other")) == 1500         # only that URL
    again = receiver.received("/lost")[1500:]
    assert {c.headers.get("webhook-id") for c in again} == first_ids   # the original calls' ids
    assert sorted(c.query for c in again) == sorted(c.query for c in receiver.received("/lost")[:1500])


def test_replay_delivered_refuses_bad_input_with_a_clear_message(db, dsn):
    db.add_url("customer", "create", "http://127.0.0.1:9/x")
    cases = [
        (["--delivered", "--url", "1"], "give the URL (--url ID|URL) and where to start (--since TIME)"),
        (["--delivered", "--since", "2026-01-01"], "give the URL"),
        (["--delivered", "--url", "1", "--since", "2026-01-02", "--until", "2026-01-01"], "--until must be after"),
        (["--delivered", "--url", "1", "--since", "2026-01-01", "--object", "case"], "only --url, --since"),
        (["--delivered", "--url", "77", "--since", "2026-01-01"], "no configured URL with id 77"),
    ]
    for args, message in cases:
        r = cli(dsn, "replay", *args)
        assert r.returncode == 2 and message in r.stderr, (args, r.stdout, r.stderr)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="limit must be at least 1"):
        db.execute("SELECT * FROM crm_bridge.replay_delivered(1, now() - interval '1 minute', NULL, false, 0)")


def test_writes_through_the_delivery_view_reach_the_queue_and_finished_calls_are_history(db):
    db.execute("SELECT crm_bridge.daemon_rotate(interval '7 days')")
    db.execute("""INSERT INTO crm_bridge.delivery (event_id, object, event, ids, event_created_at, status,
                                                   finished_at, last_error)
                  VALUES (1, 'customer', 'create', '{acc-v}', now(), 'dead', now(), 'by hand')""")
    assert db.one("SELECT status FROM crm_bridge.queue") == "dead"
    db.execute("UPDATE crm_bridge.delivery SET last_error = 'changed' WHERE ids = '{acc-v}'")
    assert db.one("SELECT last_error FROM crm_bridge.queue") == "changed"
    db.execute("""INSERT INTO crm_bridge.history (at, call_id, event_id, object, event, ids, event_created_at,
                                                  record_key, outcome)
                  VALUES (now(), 99, 1, 'customer', 'create', '{acc-h}', now(), 'k', 'delivered')""")
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="finished"):
        db.execute("UPDATE crm_bridge.delivery SET last_error = 'x' WHERE id = 99")
    with pytest.raises(psycopg.errors.CheckViolation, match="only pending, in_flight or dead"):
        db.execute("""INSERT INTO crm_bridge.delivery (event_id, object, event, ids, event_created_at, status)
                      VALUES (1, 'customer', 'create', '{x}', now(), 'delivered')""")
    db.execute("DELETE FROM crm_bridge.delivery WHERE ids = '{acc-v}'")
    assert db.one("SELECT count(*) FROM crm_bridge.queue") == 0


def test_upgrading_from_version_9_keeps_every_call_where_it_belongs(empty_dsn, receiver):
    """Deliveries of every status and failed attempts written by the v9 engine: after the migration
    the waiting and dead ones are in the queue with their ids, finished ones and attempts are
    history, and the daemon delivers what waited."""
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        with conn.transaction():
            install_schema_up_to(conn, 9)
            tid = conn.execute("INSERT INTO crm_bridge.crm_trigger (object, event, url) VALUES "
                               "('customer', 'create', %s) RETURNING id", [receiver.url("/up")]).fetchone()[0]
            url = receiver.url("/up")
            for call_id, status, finished, due, lease, worker in (
                    (11, "delivered", "-2 days", None, None, None), (12, "unrouted", "0", None, None, None),
                    (13, "dead", "0", None, None, None), (14, "pending", None, "0", None, None),
                    (15, "in_flight", None, None, "-1 minute", "old")):
                conn.execute("""INSERT INTO crm_bridge.delivery (id, event_id, object, event, ids, event_created_at,
                                    trigger_id, url, record_key, status, attempts, finished_at, next_attempt_at,
                                    lease_until, worker)
                                VALUES (%s, 1, 'customer', 'create', ARRAY[%s], now(), %s, %s, md5(%s), %s, 1,
                                        now() + %s::interval, now() + %s::interval, now() + %s::interval, %s)""",
                             [call_id, f"acc-{status}", tid, url, f"acc-{status}", status, finished, due, lease,
                              worker])
            conn.execute("INSERT INTO crm_bridge.attempt (delivery_id, attempt, status, error) "
                         "VALUES (13, 1, 500, 'x')")
        migrate(conn)
        assert conn.execute("SELECT id, status FROM crm_bridge.queue ORDER BY id").fetchall() == \
            [(13, "dead"), (14, "pending"), (15, "in_flight")]
        assert conn.execute("SELECT call_id, outcome FROM crm_bridge.history ORDER BY call_id, outcome").fetchall() == \
            [(11, "delivered"), (12, "unrouted"), (13, "failed")]
        assert conn.execute("SELECT id, status FROM crm_bridge.delivery ORDER BY id").fetchall() == \
            [(11, "delivered"), (12, "unrouted"), (13, "dead"), (14, "pending"), (15, "in_flight")]
        # new call ids continue after the old delivery ids
        assert conn.execute("SELECT nextval('crm_bridge.call_id_seq')").fetchone()[0] > 15
    proc = subprocess.Popen([sys.executable, "-m", "bridge.cli", "--dsn", empty_dsn, "run"],
                            env={**os.environ, "CRM_BRIDGE_LEASE": "2", "CRM_BRIDGE_POLL_INTERVAL": "0.5"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        got = receiver.wait_for(2, "/up", timeout=30)       # the pending one, and the expired in_flight one
        assert sorted(c.query for c in got) == ["AccountID=acc-in_flight", "AccountID=acc-pending"]
    finally:
        proc.terminate()
        proc.wait(30)


def test_the_daemons_hot_path_keeps_its_plans_between_calls(db):
    """PostgreSQL plans a LANGUAGE sql function's query again on every call (before 18) and never
    inlines one with a SET clause: on the claim/record path that cost ~1 ms per record statement
    (note_url_stats_v1) and ~2 us per claimed call (loadable_time).  Every function the daemon runs
    per claim, record or idle cycle is PL/pgSQL; the per-row helpers are inlinable (no SET clause)."""
    per_call = ["daemon_claim", "daemon_claim_due", "daemon_record", "daemon_complete", "daemon_enter_idle",
                "daemon_leave_idle", "daemon_heartbeat", "note_url_stats_v1", "check_statuses_v1", "retry_seconds"]
    rows = db.all("""SELECT p.proname::text, l.lanname::text FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
                      WHERE p.pronamespace = 'crm_bridge'::regnamespace AND p.proname = ANY (%s)""", (per_call,))
    assert {name for name, _ in rows} == set(per_call)
    assert [name for name, lang in rows if lang != "plpgsql"] == []
    inlined = ["loadable_time", "rate_burst", "rate_refill"]    # per claimed call / per limited URL
    rows = db.all("""SELECT p.proname::text, l.lanname::text, p.proconfig
                       FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
                      WHERE p.pronamespace = 'crm_bridge'::regnamespace AND p.proname = ANY (%s)""", (inlined,))
    assert sorted(rows) == [(name, "sql", None) for name in sorted(inlined)]


def as_captured_before_0019(db) -> None:
    """Give the outbox's one-record events the shape statement captures wrote before migration
    0019, a two-dimensional array of one row ({{acc,case}}): such events may still be waiting
    in an outbox when a site upgrades, and must be treated as the record's."""
    db.execute("UPDATE crm_bridge.event SET ids = ARRAY[ids] WHERE n_records IS NULL AND array_ndims(ids) = 1")


SHAPES = pytest.mark.parametrize("legacy", [False, True], ids=["1-D ids", "2-D ids written before 0019"])


@SHAPES
@pytest.mark.parametrize("table, values, columns", [
    # a statement capture (INSERT/DELETE: one event per statement)
    ("crm.case", "('acc-o', 'case-o', 'x')", "(account_id, case_id, subject)"),
    # the customer table too: its INSERT and DELETE are statement captures as well
    ("crm.customer", "('acc-o', 'x')", "(account_id, name)"),
])
def test_an_ordered_call_waits_for_an_earlier_event_of_its_record_that_another_daemon_is_claiming(
        db, dsn, table, values, columns, legacy):
    # Two daemons claim at the same time: one holds the record's create event (claimed, not yet
    # committed), the other claims its delete.  The delete's call must wait in the queue, not be
    # sent ahead of the create's (ordered URLs keep commit order per record across daemons).
    obj = "case" if table == "crm.case" else "customer"
    if obj == "case":
        db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-o', 'x')")
        db.execute("DELETE FROM crm_bridge.event")
    for event in ("create", "delete"):
        db.add_url(obj, event, "http://127.0.0.1:9/ord", ordered=True)
    db.execute(f"INSERT INTO {table} {columns} VALUES {values}")
    db.execute(f"DELETE FROM {table} WHERE account_id = 'acc-o'" + (" AND case_id = 'case-o'" if obj == "case" else ""))
    assert db.one("SELECT count(*) FROM crm_bridge.event") == 2
    if legacy:
        as_captured_before_0019(db)
    with psycopg.connect(dsn) as first:   # a transaction: holds the create event it claimed
        got = first.execute("SELECT id, n_pending FROM crm_bridge.daemon_claim(1, 1, '1 min', 'w-first')").fetchall()
        assert len([r for r in got if r[0] is not None]) == 1    # the create call, held by the first daemon
        second = db.all("SELECT id, event, n_pending FROM crm_bridge.daemon_claim(10, 10, '1 min', 'w-second')")
        assert [r[0] for r in second if r[0] is not None] == []   # the delete is not handed out...
        assert second[0][2] == 1                                 # ...it waits in the queue
        first.rollback()


@SHAPES
def test_a_due_ordered_call_waits_for_an_earlier_event_of_its_record_that_another_daemon_is_claiming(
        db, dsn, legacy):
    # The same rule in daemon_claim_due: a queued call of an ordered URL (a retry, say) is not
    # handed out while an earlier event of its record is still being claimed by another daemon,
    # whatever the shape of that event's IDs.
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-o', 'x')")
    db.execute("DELETE FROM crm_bridge.event")
    tid = db.add_url("case", "create", "http://127.0.0.1:9/ord", ordered=True)
    db.execute("INSERT INTO crm.case (account_id, case_id, subject) VALUES ('acc-o', 'case-o', 'x')")
    event_id = db.one("SELECT id FROM crm_bridge.event")
    if legacy:
        as_captured_before_0019(db)
    assert db.one("SELECT ids::text FROM crm_bridge.event") == ("{{acc-o,case-o}}" if legacy else "{acc-o,case-o}")
    # A later call of the same record, due in the queue.
    db.execute("""INSERT INTO crm_bridge.queue (id, event_id, object, event, ids, event_created_at, trigger_id, url,
                                               record_key, ordered, status, next_attempt_at)
                  SELECT nextval('crm_bridge.call_id_seq'), %(e)s + 1, 'case', 'create', ARRAY['acc-o', 'case-o'],
                         now(), %(t)s, 'http://127.0.0.1:9/ord', crm_bridge.record_key(ARRAY['acc-o', 'case-o']),
                         true, 'pending', now() - interval '1 second'""", {"e": event_id, "t": tid})
    with psycopg.connect(dsn) as first:
        got = first.execute("SELECT id FROM crm_bridge.daemon_claim(10, 10, '1 min', 'w-first')").fetchall()
        assert len([r for r in got if r[0] is not None]) == 0     # the create: queued behind... nothing
        due = db.all("SELECT id FROM crm_bridge.daemon_claim_due(10, '1 min', 'w-second', '{}', '{}', 32)")
        assert due == []
        first.rollback()
    # Once the earlier event is gone from the outbox, the call is handed out.
    db.execute("DELETE FROM crm_bridge.event")
    due = db.all("SELECT id FROM crm_bridge.daemon_claim_due(10, '1 min', 'w-second', '{}', '{}', 32)")
    assert len(due) == 1


@SHAPES
def test_an_event_moved_to_the_dead_letters_keeps_the_key_of_its_record(db, legacy):
    # Once a one-record event is quarantined (it could not be claimed even alone), its dead letter
    # must carry the record's IDs and key, the ones every other call of the record has, so that
    # "what happened to this record?" finds it, whatever the shape of the event's IDs.
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-q', 'x')")
    db.execute("INSERT INTO crm.case (account_id, case_id, subject) VALUES ('acc-q', 'case-q', 'x')")
    if legacy:
        as_captured_before_0019(db)
    event_id = db.one("SELECT id FROM crm_bridge.event WHERE object = 'case'")
    assert db.one("SELECT crm_bridge.daemon_quarantine_event(%s, 'broken')", [event_id]) is True
    ids, key = db.all("SELECT ids, record_key FROM crm_bridge.queue WHERE event_id = %s", [event_id])[0]
    assert ids == ["acc-q", "case-q"]
    assert key == db.one("SELECT crm_bridge.record_key(ARRAY['acc-q', 'case-q'])")


def test_a_statement_of_one_record_is_captured_as_that_record_without_an_aggregate(db):
    """Migration 0019: an INSERT or DELETE of one record (nearly every CRM write) stores the
    record's IDs as a one-dimensional array and no n_records, the shape of a row trigger's edit
    event; its row, when captured, is the same one-element array a bulk event's rows are."""
    db.execute("SELECT crm_bridge.capture_rows('crm.customer')")
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('one', 'x')")
    # what the aggregate of earlier versions stored for it, byte for byte
    aggregated = db.one("SELECT json_agg(json_build_object('new', to_json(c.*)))::text FROM crm.customer c")
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('two-a', 'x'), ('two-b', 'y')")
    db.execute("UPDATE crm.customer SET name = 'z' WHERE account_id = 'one'")
    db.execute("DELETE FROM crm.customer WHERE account_id = 'one'")
    got = db.all("SELECT event, ids::text, n_records, rows::text FROM crm_bridge.event ORDER BY id")
    assert [(e, i, n) for e, i, n, _ in got] == [
        ("create", "{one}", None), ("create", "{{two-a},{two-b}}", 2), ("edit", "{one}", None),
        ("delete", "{one}", None)]
    assert got[0][3] == aggregated
    assert db.one("SELECT rows -> 0 -> 'old' ->> 'name' FROM crm_bridge.event WHERE event = 'delete'") == "z"


def test_upgrading_from_version_18_delivers_events_of_both_shapes_alike(empty_dsn, receiver):
    """One-record events captured before 0019 ({{acc,case}}) wait in the outbox during the upgrade;
    after it, new ones are captured with 1-D IDs.  Both are delivered with the same query strings,
    and every attached table got the new capture."""
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        with conn.transaction():
            install_schema_up_to(conn, 18)
            for obj in ("customer", "case"):
                conn.execute("INSERT INTO crm_bridge.crm_trigger (object, event, url) VALUES (%s, 'create', %s)",
                             [obj, receiver.url(f"/{obj}")])
            conn.execute("INSERT INTO crm.customer (account_id, name) VALUES ('old-acc', 'x')")
            conn.execute("INSERT INTO crm.case (account_id, case_id, subject) VALUES ('old-acc', 'old-case', 'x')")
        assert conn.execute("SELECT ids::text FROM crm_bridge.event ORDER BY id").fetchall() == [
            ("{{old-acc}}",), ("{{old-acc,old-case}}",)]
        migrate(conn)
        conn.execute("INSERT INTO crm.customer (account_id, name) VALUES ('new-acc', 'x')")
        conn.execute("INSERT INTO crm.case (account_id, case_id, subject) VALUES ('new-acc', 'new-case', 'x')")
        assert conn.execute("SELECT ids::text FROM crm_bridge.event WHERE id > 2 ORDER BY id").fetchall() == [
            ("{new-acc}",), ("{new-acc,new-case}",)]
    proc = subprocess.Popen([sys.executable, "-m", "bridge.cli", "--dsn", empty_dsn, "run"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        customers = receiver.wait_for(2, "/customer", timeout=30)
        cases = receiver.wait_for(2, "/case", timeout=30)
    finally:
        proc.terminate()
        proc.wait(30)
    assert sorted(c.query for c in customers) == ["AccountID=new-acc", "AccountID=old-acc"]
    assert sorted(c.query for c in cases) == ["AccountID=new-acc&CaseID=new-case",
                                              "AccountID=old-acc&CaseID=old-case"]


@pytest.mark.parametrize("statement", ["short", "full"])
def test_a_claim_made_after_a_burst_does_not_read_the_whole_outbox(db, dsn, statement):
    """Migration 0020: a daemon connection keeps one plan of the claim, made while the outbox was
    nearly empty (an idle daemon).  When writers then get 5,000 events ahead, a claim of 128 must
    still reach them through the primary key, not read (and sort) every waiting event.  Both
    statements of migration 0022: an ordered URL elsewhere makes every claim take the full one."""
    db.add_url("customer", "create", "http://127.0.0.1:9/burst")
    if statement == "full":
        db.add_url("task", "edit", "http://127.0.0.1:9/ordered", ordered=True)
    db.execute("INSERT INTO crm_bridge.event (object, event, ids) SELECT 'customer', 'create', ARRAY['a' || g] "
               "FROM generate_series(1, 5) g")
    with psycopg.connect(dsn, autocommit=True) as daemon:
        for _ in range(8):      # past the five custom plans: the cached generic plan is the one used
            with daemon.transaction(force_rollback=True):
                daemon.execute("SELECT count(*) FROM crm_bridge.daemon_claim(128, 1000, '1 min', 'w')")
        db.execute("INSERT INTO crm_bridge.event (object, event, ids) SELECT 'customer', 'create', "
                   "ARRAY['b' || g] FROM generate_series(1, 5000) g")
        with daemon.transaction(force_rollback=True):
            claimed = daemon.execute("SELECT count(*) FROM crm_bridge.daemon_claim(128, 1000, '1 min', 'w') "
                                     "WHERE id IS NOT NULL").fetchone()[0]
            read = daemon.execute("SELECT pg_stat_get_xact_tuples_returned('crm_bridge.event'::regclass)").fetchone()[0]
    assert claimed == 128
    assert read < 1000, f"the claim read {read} rows of the outbox sequentially to take 128"
