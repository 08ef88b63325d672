"""Batched calls (issue 13.3, migration 0013): crm_trigger.batch_max > 1 on a POST URL sends up
to that many calls in one request, a JSON array of the single-call bodies, signed once, with one
key per batch; against the real daemon and a real receiver on 127.0.0.1."""

from __future__ import annotations

import json
import threading

import psycopg
import pytest
from psycopg import errors, sql
from standardwebhooks import Webhook

from bridge.calls import batch_key
from bridge.devtools.receiver import ReceivedCall, Rule

CUSTOMERS = "INSERT INTO crm.customer (account_id, name) VALUES (%s, 'x')"


def elements(call: ReceivedCall) -> list[dict]:
    doc = json.loads(call.body)
    assert isinstance(doc, list), call.body[:200]
    return doc


def write_customers(db, n: int, prefix: str = "acc") -> None:
    """``n`` one-record events, one transaction each (written while no daemon runs: a backlog
    that one claim takes whole)."""
    for i in range(n):
        db.execute(CUSTOMERS, [f"{prefix}-{i:03d}"])


def call_ids(db, event_ids: list[int]) -> list[int]:
    return [r[0] for r in db.all("SELECT id FROM crm_bridge.delivery WHERE event_id = ANY (%s) AND url IS NOT NULL "
                                 "ORDER BY id", [event_ids])]


def test_batch_max_needs_a_post_url_and_a_bound(db, roles):
    with roles.connect(roles.admin) as admin:
        made = iter(range(100))

        def add(**cols) -> None:
            names = ["object", "event", "url", *cols]
            admin.execute(sql.SQL("INSERT INTO crm_bridge.crm_trigger ({}) VALUES ({})").format(
                sql.SQL(", ").join(map(sql.Identifier, names)), sql.SQL(", ").join([sql.Placeholder()] * len(names))),
                ["customer", "create", f"http://127.0.0.1:9/{next(made)}", *cols.values()])

        with pytest.raises(errors.CheckViolation, match=r"batch_max = 10 needs method = 'POST'"):
            add(batch_max=10)
        for bad in (0, 1001, -5):
            with pytest.raises(errors.CheckViolation, match=r"batch_max must be between 1 and 1000"):
                add(method="POST", batch_max=bad)
        add(batch_max=1)                       # one call per request: fine on GET
        add(method="POST", batch_max=1000)
        with pytest.raises(errors.CheckViolation, match=r"batch_max = 1000 needs method = 'POST'"):
            admin.execute("UPDATE crm_bridge.crm_trigger SET method = 'GET' WHERE batch_max = 1000")
    assert db.one("SELECT count(*) FROM crm_bridge.crm_trigger") == 2


def test_batched_calls_arrive_as_one_signed_json_array_of_single_call_bodies(db, roles, receiver, daemon_factory):
    with roles.connect(roles.admin) as admin:
        tid = admin.execute("INSERT INTO crm_bridge.crm_trigger (object, event, url, method, batch_max) "
                            "VALUES ('customer', 'create', %s, 'POST', 10) RETURNING id",
                            [receiver.url("/batch")]).fetchone()[0]
        secret = admin.execute("SELECT crm_bridge.set_signing_secret(%s)", [tid]).fetchone()[0]
    write_customers(db, 25)
    daemon_factory(target_dsn=roles.dsn(roles.daemon))        # the daemon login, as in production
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'delivered'", expect=25)
    calls = receiver.received("/batch")
    assert sorted(len(elements(c)) for c in calls) == [5, 10, 10]
    rows = {r[0]: r for r in db.all("SELECT event_id, id, event_created_at FROM crm_bridge.delivery")}
    seen = []
    for call in calls:
        assert call.method == "POST" and call.headers["Content-Type"] == "application/json"
        docs = Webhook(secret).verify(call.body, call.headers)   # one signature over the whole body
        assert docs == elements(call)
        ids = [rows[d["event_id"]][1] for d in docs]
        assert ids == sorted(ids)                                # in call id order
        assert call.headers["webhook-id"] == call.headers["Idempotency-Key"] == batch_key(ids)
        for d in docs:                                           # exactly the single-call POST body
            assert list(d) == ["object", "event", "ids", "occurred_at", "event_id"]
            assert (d["object"], d["event"]) == ("customer", "create")
            assert d["occurred_at"].endswith("Z")
        seen += [d["ids"]["AccountID"] for d in docs]
    assert sorted(seen) == [f"acc-{i:03d}" for i in range(25)]
    assert db.one("SELECT count(*) FROM crm_bridge.history WHERE outcome = 'delivered'") == 25


def test_a_failed_batch_is_retried_whole_with_the_same_key(db, receiver, daemon_factory):
    receiver.answer("/retry", Rule(status=503, times=1))
    db.add_url("customer", "create", receiver.url("/retry"), method="POST", batch_max=50)
    write_customers(db, 7)
    daemon_factory()
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'delivered'", expect=7)
    first, second = receiver.attempts
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert first.body == second.body and len(elements(first)) == 7
    assert db.all("SELECT DISTINCT attempts FROM crm_bridge.delivery") == [(2,)]
    assert db.one("SELECT count(*) FROM crm_bridge.history WHERE outcome = 'failed' AND http_status = 503") == 7


def test_a_receiver_lists_failed_events_and_only_those_are_retried(db, receiver, daemon_factory):
    lock = threading.Lock()
    failed_once: list[int] = []

    def respond(call: ReceivedCall) -> tuple[int, str]:
        docs = elements(call)
        with lock:
            if not failed_once:                       # the first answer: 2 of 5 failed
                failed_once.extend(d["event_id"] for d in docs[1:4:2])
                return 207, json.dumps({"failed": [failed_once[0], str(failed_once[1])]})
        return 200, "{}"

    receiver.answer("/partial", Rule(respond=respond))
    db.add_url("customer", "create", receiver.url("/partial"), method="POST", batch_max=10)
    write_customers(db, 5)
    daemon_factory()
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'delivered'", expect=5)
    first, retry = receiver.attempts
    assert len(elements(first)) == 5
    assert [d["event_id"] for d in elements(retry)] == failed_once
    assert retry.headers["webhook-id"] == batch_key(call_ids(db, failed_once)) != first.headers["webhook-id"]
    assert dict(db.all("SELECT event_id, attempts FROM crm_bridge.delivery")) == {
        d["event_id"]: 2 if d["event_id"] in failed_once else 1 for d in elements(first)}
    assert sorted(db.all("SELECT call_id, http_status FROM crm_bridge.history WHERE outcome = 'failed'")) == [
        (c, 207) for c in call_ids(db, failed_once)]


def test_an_ordered_url_keeps_each_records_order_inside_and_across_batches(db, receiver, daemon_factory):
    receiver.answer("/ordered", Rule(status=500, times=1))     # the first batch is retried
    db.add_url("customer", "edit", receiver.url("/ordered"), method="POST", batch_max=10, ordered=True)
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('A', 'a'), ('B', 'b'), ('C', 'c')")
    for i in range(4):
        for acc in "ABC":
            db.execute("UPDATE crm.customer SET name = %s WHERE account_id = %s", [f"{acc}{i}", acc])
    edits = {acc: [r[0] for r in db.all("SELECT id FROM crm_bridge.event WHERE event = 'edit' AND ids = %s "
                                        "ORDER BY id", [[acc]])] for acc in "ABC"}
    daemon_factory()
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'delivered'", expect=12, timeout=30)
    sent: dict[str, list[int]] = {acc: [] for acc in "ABC"}
    for call in receiver.received("/ordered"):                 # in the order they were answered 2xx
        records = [d["ids"]["AccountID"] for d in elements(call)]
        assert len(records) == len(set(records)), "a batch held two calls of one record"
        for d in elements(call):
            sent[d["ids"]["AccountID"]].append(d["event_id"])
    assert sent == edits
    assert len(receiver.attempts) >= 5                          # 4 rounds of 3 records, one retried


def test_each_call_of_a_batch_that_keeps_failing_becomes_its_own_dead_letter(db, receiver, daemon_factory):
    receiver.answer("/down", Rule(status=500, body="receiver down"))
    db.add_url("customer", "create", receiver.url("/down"), method="POST", batch_max=10, max_attempts=2)
    write_customers(db, 3)
    d = daemon_factory()
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'dead'", expect=3)
    dead = db.all("SELECT attempts, last_status, last_error FROM crm_bridge.delivery WHERE status = 'dead'")
    assert dead == [(2, 500, "gave up after 2 attempts: HTTP 500: receiver down")] * 3
    assert len(receiver.attempts) == 2
    assert receiver.attempts[0].body == receiver.attempts[1].body
    assert db.one("SELECT count(*) FROM crm_bridge.dead_letter") == 3
    d.wait_log("3 dead")                                        # one log line for the batch


def test_a_call_that_cannot_be_built_is_a_dead_letter_alone_and_the_batch_goes_out(db, receiver, daemon_factory):
    db.add_url("customer", "create", receiver.url("/odd"), method="POST", batch_max=10)
    write_customers(db, 3)
    # A NULL ID (a column dropped after attach, say): that call cannot be sent, the others can.
    db.execute("UPDATE crm_bridge.event SET ids = ARRAY[NULL]::text[] "
               "WHERE id = (SELECT min(id) FROM crm_bridge.event)")
    daemon_factory()
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status IN ('delivered', 'dead')", expect=3)
    [call] = receiver.received("/odd")
    assert len(elements(call)) == 2
    [(error,)] = db.all("SELECT last_error FROM crm_bridge.delivery WHERE status = 'dead'")
    assert "AccountID is NULL" in error


@pytest.mark.parametrize("answer", ['{"failed": "all"}', "[1, 2]", "not json", '{"failed": [true, 1.5, "x"]}'])
def test_a_2xx_without_a_list_of_failed_events_acknowledges_the_whole_batch(db, receiver, daemon_factory, answer):
    receiver.answer("/ack", Rule(status=200, body=answer))
    db.add_url("customer", "create", receiver.url("/ack"), method="POST", batch_max=10)
    write_customers(db, 3)
    daemon_factory()
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'delivered'", expect=3)
    assert len(receiver.attempts) == 1


def test_get_urls_and_urls_without_batch_max_keep_single_calls(db, receiver, daemon_factory):
    db.add_url("customer", "create", receiver.url("/single"), method="POST")
    db.add_url("customer", "create", receiver.url("/one"), method="POST", batch_max=1)
    # Validation switched off (replica mode skips triggers): the daemon still never batches a GET.
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute("INSERT INTO crm_bridge.crm_trigger (object, event, url, batch_max) "
                     "VALUES ('customer', 'create', %s, 50)", [receiver.url("/get")])
    write_customers(db, 3)
    daemon_factory()
    receiver.wait_for(9)
    for path in ("/single", "/one"):
        assert all(isinstance(json.loads(c.body), dict) for c in receiver.received(path))
    assert sorted(c.query for c in receiver.received("/get")) == [f"AccountID=acc-{i:03d}" for i in range(3)]
