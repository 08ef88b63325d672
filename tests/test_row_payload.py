"""POST bodies with the captured row (issue 7): opt-in per table (capture_rows) and per URL (include_row)."""

from __future__ import annotations

import json

import psycopg
import pytest


def bodies(calls):
    return [json.loads(c.body) for c in calls]


def test_include_row_sends_new_old_and_both(db, receiver, daemon):
    db.execute("SELECT crm_bridge.capture_rows('crm.customer')")
    for event in ("create", "edit", "delete"):
        db.add_url("customer", event, receiver.url(f"/rows/{event}"), method="POST", include_row=True)
    db.add_url("customer", "edit", receiver.url("/ids-only"), method="POST")
    db.execute("INSERT INTO crm.customer (account_id, name, email) VALUES ('r1', 'Ada', 'ada@example.org')")
    db.execute("UPDATE crm.customer SET email = 'ada@engine.example' WHERE account_id = 'r1'")
    db.execute("DELETE FROM crm.customer WHERE account_id = 'r1'")
    [created] = bodies(receiver.wait_for(1, "/rows/create"))
    [edited] = bodies(receiver.wait_for(1, "/rows/edit"))
    [deleted] = bodies(receiver.wait_for(1, "/rows/delete"))
    [plain] = bodies(receiver.wait_for(1, "/ids-only"))
    assert created["new"]["email"] == "ada@example.org" and "old" not in created
    assert (edited["old"]["email"], edited["new"]["email"]) == ("ada@example.org", "ada@engine.example")
    assert deleted["old"]["name"] == "Ada" and "new" not in deleted
    assert deleted["ids"] == {"AccountID": "r1"}
    assert "new" not in plain and "old" not in plain  # the row goes only where it was asked for
    # Only the URLs that asked for it keep a copy of the row in the bridge's tables.
    assert db.one("SELECT count(*) FROM crm_bridge.delivery WHERE row IS NOT NULL") == 3


def test_bulk_statement_rows_line_up_with_their_ids(db, receiver, daemon):
    db.execute("SELECT crm_bridge.capture_rows('crm.customer')")
    db.add_url("customer", "create", receiver.url("/bulk"), method="POST", include_row=True)
    db.execute("INSERT INTO crm.customer (account_id, name) "
               "SELECT 'b' || g, 'name-' || g FROM generate_series(1, 50) g")
    for body in bodies(receiver.wait_for(50, "/bulk")):
        assert body["new"]["account_id"] == body["ids"]["AccountID"]
        assert body["new"]["name"] == "name-" + body["ids"]["AccountID"][1:]


def test_include_row_needs_post(db):
    with pytest.raises(psycopg.errors.CheckViolation, match="include_row needs method = 'POST'"):
        db.add_url("customer", "create", "http://127.0.0.1:9/x", include_row=True)


def test_capture_rows_needs_an_attached_table(db):
    db.execute("CREATE TABLE public.loose (a text)")
    with pytest.raises(psycopg.errors.UndefinedObject, match=r"table public\.loose is not attached"):
        db.execute("SELECT crm_bridge.capture_rows('public.loose')")


def test_capture_rows_can_be_switched_off_again(db):
    db.execute("SELECT crm_bridge.capture_rows('crm.customer')")
    db.execute("SELECT crm_bridge.capture_rows('crm.customer', false)")
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('x', 'y')")
    db.execute("UPDATE crm.customer SET name = 'z'")
    assert db.all("SELECT rows FROM crm_bridge.event") == [(None,), (None,)]
