"""Richer calls, opt-in per URL in SQL: POST with a JSON body, static headers, and an idempotency
key on every call (GET too)."""

from __future__ import annotations

import json
from datetime import datetime

import psycopg
import pytest
from psycopg.types.json import Jsonb

from bridge.devtools.receiver import Rule


def test_post_sends_the_json_document_to_the_url_as_configured(db, receiver, daemon):
    db.add_url("followup", "create", receiver.url("/fu?src=crm"), method="post")
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-1', 'x')")
    db.execute("INSERT INTO crm.case (case_id, account_id, subject) VALUES ('case-1', 'acc-1', 's')")
    db.execute("INSERT INTO crm.followup (followup_id, case_id, account_id, author, body) "
               "VALUES ('fu é&1', 'case-1', 'acc-1', 'me', 'b')")
    [call] = receiver.wait_for(1)
    assert (call.method, call.target) == ("POST", "/fu?src=crm")
    assert call.headers["Content-Type"] == "application/json"
    doc = json.loads(call.body)
    event_id, created = db.all("SELECT event_id, event_created_at FROM crm_bridge.delivery WHERE url IS NOT NULL")[0]
    assert doc == {"object": "followup", "event": "create",
                   "ids": {"AccountID": "acc-1", "CaseID": "case-1", "FollowupID": "fu é&1"},
                   "occurred_at": doc["occurred_at"], "event_id": event_id}
    assert list(doc["ids"]) == ["AccountID", "CaseID", "FollowupID"]
    assert doc["occurred_at"].endswith("Z")
    assert datetime.fromisoformat(doc["occurred_at"]) == created
    assert db.one("SELECT method FROM crm_bridge.crm_trigger") == "POST"  # normalised


def test_every_call_carries_its_call_id_as_idempotency_key_also_on_get_and_retries(db, receiver, daemon):
    receiver.answer("/get", Rule(status=503, times=1))
    db.add_url("customer", "delete", receiver.url("/get"))
    db.add_url("customer", "delete", receiver.url("/post"), method="POST")
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-i', 'x')")
    db.execute("DELETE FROM crm.customer")
    receiver.wait_for(2)
    call_ids = {r[0] for r in db.all("SELECT id::text FROM crm_bridge.delivery WHERE event = 'delete'")}
    assert len(receiver.attempts) == 3
    for call in receiver.attempts:
        assert call.headers["Idempotency-Key"] == call.headers["webhook-id"]
    assert {c.headers["webhook-id"] for c in receiver.attempts} == call_ids   # the retry kept its id


def test_each_record_of_a_bulk_statement_has_its_own_idempotency_key(db, receiver, daemon):
    """All records of one INSERT share an event (statement capture): with the event id as the key,
    a receiver that drops repeated keys would have dropped all records but the first."""
    receiver.answer("/bulk", Rule(status=503, times=1))
    db.add_url("customer", "create", receiver.url("/bulk"))
    db.execute("INSERT INTO crm.customer (account_id, name) SELECT 'acc-' || g, 'x' FROM generate_series(1, 5) g")
    got = receiver.wait_for(5, "/bulk", timeout=20)
    keys = {c.headers["Idempotency-Key"] for c in got}
    assert len(keys) == 5
    first = receiver.attempts[0]            # answered 503, retried with the same key
    retried = [c for c in got if c.query == first.query]
    assert [c.headers["Idempotency-Key"] for c in retried] == [first.headers["Idempotency-Key"]]


def test_static_headers_are_sent_as_configured(db, receiver, daemon):
    headers = {"X-Api-Key": "k-1234567890", "X-Tenant": "acme", "Authorization": "Bearer abc.def"}
    db.add_url("customer", "create", receiver.url("/h"), headers=Jsonb(headers))
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-h', 'x')")
    [call] = receiver.wait_for(1)
    for name, value in headers.items():
        assert call.headers[name] == value
    assert call.headers["User-Agent"] == "crm-bridge/0.1"


def test_a_changed_url_method_or_headers_take_effect_with_the_next_call(db, receiver, daemon):
    # What every call of a URL shares is prepared once per configuration (calls.plan_for): each
    # change in crm_trigger must be seen by the next call, without a restart.
    tid = db.add_url("customer", "create", receiver.url("/v1"), headers=Jsonb({"X-Version": "one"}))
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-1', 'x')")
    [call] = receiver.wait_for(1)
    assert (call.target, call.headers["X-Version"]) == ("/v1?AccountID=acc-1", "one")

    db.execute("UPDATE crm_bridge.crm_trigger SET url = %s, headers = %s WHERE id = %s",
               [receiver.url("/v2?src=crm"), Jsonb({"X-Version": "two", "X-Tenant": "acme"}), tid])
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-2', 'x')")
    call = receiver.wait_for(1, "/v2")[0]
    assert call.target == "/v2?src=crm&AccountID=acc-2"
    assert (call.headers["X-Version"], call.headers["X-Tenant"]) == ("two", "acme")

    db.execute("UPDATE crm_bridge.crm_trigger SET method = 'POST', headers = NULL WHERE id = %s", [tid])
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-3', 'x')")
    call = receiver.wait_for(2, "/v2")[1]
    assert (call.method, call.target) == ("POST", "/v2?src=crm")
    assert json.loads(call.body)["ids"] == {"AccountID": "acc-3"}
    assert "X-Version" not in call.headers and "X-Tenant" not in call.headers


@pytest.mark.parametrize(("headers", "message"), [
    (["X-A", "b"], "headers must be a JSON object"),
    ({"X-A": 1}, 'header "X-A" must have a string value (got a JSON number)'),
    ({"Bad Name": "v"}, 'header name "Bad Name" is not a valid HTTP header name'),
    ({"X-Evil": "v\r\nX-Injected: 1"}, 'header "X-Evil": the value must be printable ASCII'),
    ({"Content-Length": "0"}, 'header "Content-Length" is set by crm-bridge itself'),
    ({"Idempotency-Key": "mine"}, 'header "Idempotency-Key" is set by crm-bridge itself'),
    ({"webhook-signature": "v1,x"}, "is set by crm-bridge itself"),
    ({f"X-{i}": "v" for i in range(51)}, "at most 50 headers per URL (got 51)"),
])
def test_bad_static_headers_are_rejected_naming_the_header_not_its_value(db, headers, message):
    with pytest.raises(psycopg.errors.CheckViolation) as exc:
        db.add_url("customer", "create", "http://127.0.0.1:9/h", headers=Jsonb(headers))
    assert message in str(exc.value)
    assert "X-Injected" not in str(exc.value)


def test_url_credentials_are_sent_as_basic_auth(db, receiver, daemon):
    db.add_url("customer", "create", receiver.url("/basic").replace("http://", "http://bob:pa%40ss@"))
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-b', 'x')")
    [call] = receiver.wait_for(1)
    assert call.headers["Authorization"] == "Basic Ym9iOnBhQHNz"  # bob:pa@ss
    assert call.target == "/basic?AccountID=acc-b"


def test_url_credentials_and_an_authorization_header_are_not_combined(db):
    with pytest.raises(psycopg.errors.CheckViolation, match=r"url has credentials .* and headers set Authorization"):
        db.add_url("customer", "create", "http://u:p@127.0.0.1:9/h", headers=Jsonb({"authorization": "Bearer x"}))


def test_unsupported_method_is_rejected(db):
    with pytest.raises(psycopg.errors.CheckViolation, match='method "PUT" is not supported'):
        db.add_url("customer", "create", "http://127.0.0.1:9/h", method="put")


def test_post_with_a_null_id_is_recorded_as_an_error(db, receiver, daemon):
    db.execute("CREATE TABLE public.loose (acct text)")
    db.execute("SELECT crm_bridge.attach('public.loose', 'customer', ARRAY['acct'])")
    db.add_url("customer", "create", receiver.url("/loose"), method="POST")
    db.execute("INSERT INTO public.loose VALUES (NULL)")
    db.wait_until("SELECT status FROM crm_bridge.delivery", expect="dead")
    assert db.one("SELECT last_error FROM crm_bridge.delivery") == "ID AccountID is NULL in the captured row"
    assert receiver.attempts == []
