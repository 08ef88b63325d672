"""Migration 0022: a claim takes a short statement when no URL needs the full one's features.

The short statement must hand out exactly what the full one (crm_bridge.claim_full_v1) would, and
every feature it lacks must send the claim to the full statement."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql

CLAIM = "SELECT * FROM crm_bridge.{}(128, 1000, '1 min', 'w')"
FULL = "crm_bridge.claim_full_v1(integer, integer, interval, text, bigint[])"


def _events(db) -> None:
    db.execute("SELECT crm_bridge.daemon_rotate(interval '7 days')")     # history partitions for now
    for n in (1, 2, 3):     # one statement each: one-record events
        db.execute("INSERT INTO crm.customer (account_id, name) VALUES (%s, 'n')", [f"acc{n}"])
    db.execute("INSERT INTO crm.case (account_id, case_id, subject) VALUES ('acc1', 'case1', 's')")
    db.execute("INSERT INTO crm.task (account_id, task_id, title) VALUES ('acc1', 'task1', 't')")   # no URL
    db.execute("UPDATE crm.customer SET name = 'm' WHERE account_id = 'acc2'")
    # A one-record event in the shape captures stored before migration 0019: a one-row 2-D array.
    db.execute("INSERT INTO crm_bridge.event (object, event, ids) VALUES ('customer', 'create', '{{old}}')")


def _claim(db, function: str, full_calls) -> tuple[list, list, list]:
    """What a claim hands out, queues and writes to history; rolled back.  Call ids are replaced by
    their rank: each claim draws new ones from the sequence."""
    with db.conn.transaction(force_rollback=True):
        assert full_calls(sql.SQL("CREATE TEMP TABLE claimed AS " + CLAIM).format(sql.Identifier(function))) == 1
        cur = db.conn.execute("SELECT * FROM claimed")
        names = [c.name for c in cur.description]
        rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        ranks = {i: n for n, i in enumerate(sorted(r["id"] for r in rows if r["id"] is not None))}
        handed = [{**r, "id": ranks.get(r["id"]), "batch_id": r["batch_id"] is not None} for r in rows]
        batch = db.all("SELECT c.event_id, c.object, c.event, c.ids, c.trigger_id, c.url, c.record_key, c.row "
                       "FROM crm_bridge.batch b, unnest(b.calls) c ORDER BY c.call_id")
        history = db.all("SELECT event_id, trigger_id, object, event, ids, record_key, outcome, worker "
                         "FROM crm_bridge.history ORDER BY call_id")
        assert db.one("SELECT count(*) FROM crm_bridge.event") == 0
        assert db.one("SELECT count(*) FROM crm_bridge.queue") == 0
    return handed, batch, history


def test_the_short_claim_hands_out_what_the_full_statement_would(db, full_calls):
    db.add_url("customer", "create", "http://127.0.0.1:9/a")
    db.add_url("customer", "create", "http://127.0.0.1:9/b?x=1", timeout_ms=900, method="POST", batch_max=5,
               headers='{"X-Team": "sync"}')
    db.add_url("customer", "edit", "http://127.0.0.1:9/c", retry_schedule=["1 s", "2 s"])
    db.add_url("case", "create", "http://127.0.0.1:9/d", max_attempts=3)
    db.add_url("case", "delete", "http://127.0.0.1:9/off", enabled=False)
    _events(db)
    short = _claim(db, "daemon_claim", lambda q: 1 - full_calls(q))    # the short statement: no full one
    full = _claim(db, "claim_full_v1", full_calls)
    assert short == full
    handed, batch, history = short
    assert len(handed) == 10 and {h["n_events"] for h in handed} == {7}
    assert {h["n_unrouted"] for h in handed} == {1} and {h["n_pending"] for h in handed} == {0}
    assert [h["ids"] for h in handed if h["event"] == "create" and h["object"] == "customer"][-2:] == [["old"]] * 2
    assert [(o, e, i) for _, _, o, e, i, _, outcome, _ in history if outcome == "unrouted"] == [
        ("task", "create", ["acc1", "task1"])]
    assert len(batch) == 10


@pytest.fixture
def full_calls(db):
    """full_calls(query, params): how many times running the query called the full statement."""
    db.execute("SET track_functions = 'pl'")
    count = f"SELECT coalesce(pg_stat_get_xact_function_calls('{FULL}'::regprocedure), 0)"

    def run(query: str, params: object = None) -> int:
        # the session's counts not yet reported to the statistics system: before and after
        before = db.one(count)
        db.execute(query, params)
        return db.one(count) - before
    return run


FEATURES = {
    "paused": {"paused": True},
    "ordered": {"ordered": True},
    "coalesce_edits": {"coalesce_edits": True},
    "include_row": {"include_row": True, "method": "POST"},
    "max_per_second": {"max_per_second": 5},
    "max_in_flight": {"max_in_flight": 2},
    "exclude_roles": {"exclude_roles": ["importer"]},
    "exclude_origins": {"exclude_origins": ["sync"]},
    "only_columns": {"only_columns": ["name"]},
}


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_a_url_using_a_feature_the_short_claim_lacks_takes_the_full_statement(db, full_calls, feature):
    db.add_url("customer", "create", "http://127.0.0.1:9/plain")
    tid = db.add_url("task", "edit", "http://127.0.0.1:9/featured", **FEATURES[feature])
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc1', 'n')")
    with db.conn.transaction(force_rollback=True):
        assert full_calls(CLAIM.format("daemon_claim")) == 1
    # the same URL disabled: nothing of it matters to a claim
    db.execute("UPDATE crm_bridge.crm_trigger SET enabled = false WHERE id = %s", [tid])
    with db.conn.transaction(force_rollback=True):
        assert full_calls(CLAIM.format("daemon_claim")) == 0


def test_an_open_breaker_a_bulk_event_or_given_events_take_the_full_statement(db, full_calls):
    tid = db.add_url("customer", "create", "http://127.0.0.1:9/plain")
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc1', 'n')")
    with db.conn.transaction(force_rollback=True):
        assert full_calls(CLAIM.format("daemon_claim")) == 0
    with db.conn.transaction(force_rollback=True):
        db.execute("INSERT INTO crm_bridge.url_stat (trigger_id, breaker_state, breaker_since) "
                   "VALUES (%s, 'open', now())", [tid])
        assert full_calls(CLAIM.format("daemon_claim")) == 1
    with db.conn.transaction(force_rollback=True):
        db.execute("INSERT INTO crm.customer (account_id, name) SELECT 'b' || g, 'n' FROM generate_series(1, 2) g")
        assert full_calls("CREATE TEMP TABLE got AS " + CLAIM.format("daemon_claim")) == 1
        # the one-record event and the bulk one, in commit order
        assert db.all("SELECT ids FROM got ORDER BY id") == [(["acc1"],), (["b1"],), (["b2"],)]
    with db.conn.transaction(force_rollback=True):
        first = db.one("SELECT min(id) FROM crm_bridge.event")
        assert full_calls("SELECT * FROM crm_bridge.daemon_claim(128, 1000, '1 min', 'w', %s)", [[first]]) == 1


def test_the_daemon_role_claims_both_ways_and_cannot_call_the_full_statement_itself(db, roles):
    db.add_url("customer", "create", "http://127.0.0.1:9/plain")
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc1', 'n')")
    db.execute("SELECT crm_bridge.daemon_rotate(interval '7 days')")
    with roles.connect(roles.daemon) as daemon:
        got = daemon.execute("SELECT ids FROM crm_bridge.daemon_claim(128, 1000, '1 min', 'w')").fetchall()
        assert got == [(["acc1"],)]
        db.add_url("customer", "create", "http://127.0.0.1:9/ordered", ordered=True)
        db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc2', 'n')")
        got = daemon.execute("SELECT ids FROM crm_bridge.daemon_claim(128, 1000, '1 min', 'w') "
                             "WHERE id IS NOT NULL").fetchall()
        assert got == [(["acc2"],), (["acc2"],)]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            daemon.execute("SELECT * FROM crm_bridge.claim_full_v1(128, 1000, '1 min', 'w')")
    for role in (roles.admin, roles.monitor, roles.app):
        with roles.connect(role) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM crm_bridge.daemon_claim(128, 1000, '1 min', 'w')")


def test_two_daemons_claiming_at_once_take_different_events_and_lose_none(db, roles):
    """0025: the short claim deletes the rows its locking scan read, by address.  A claim running
    while another daemon holds some events skips them (they stay in the outbox, untouched), and
    hands out each of the others once."""
    db.add_url("customer", "create", "http://127.0.0.1:9/plain")
    db.execute("SELECT crm_bridge.daemon_rotate(interval '7 days')")
    for n in range(6):
        db.execute("INSERT INTO crm.customer (account_id, name) VALUES (%s, 'n')", [f"acc{n}"])
    with roles.connect(roles.daemon) as first, roles.connect(roles.daemon) as second:
        first.autocommit = second.autocommit = False
        # the first daemon's claim of the two oldest events has not committed yet
        a = first.execute("SELECT ids FROM crm_bridge.daemon_claim(2, 1000, '1 min', 'w1')").fetchall()
        assert a == [(["acc0"],), (["acc1"],)]
        b = second.execute("SELECT ids FROM crm_bridge.daemon_claim(3, 1000, '1 min', 'w2')").fetchall()
        assert b == [(["acc2"],), (["acc3"],), (["acc4"],)]
        first.rollback()     # that daemon died before committing: its events are claimable again
        second.commit()
        c = first.execute("SELECT ids FROM crm_bridge.daemon_claim(10, 1000, '1 min', 'w1')").fetchall()
        first.commit()
        assert c == [(["acc0"],), (["acc1"],), (["acc5"],)]
    assert db.one("SELECT count(*) FROM crm_bridge.event") == 0
    assert db.all("SELECT worker, cardinality(calls) FROM crm_bridge.batch ORDER BY id") == [("w2", 3), ("w1", 3)]
