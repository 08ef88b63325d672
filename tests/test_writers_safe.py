"""The bridge never makes a CRM write fail: locked or broken configuration, dropped columns, NULL
IDs, a missing or killed daemon.  Problems end up as recorded delivery errors instead."""

from __future__ import annotations

import re

import psycopg
import pytest

from bridge.devtools.receiver import Rule

LOCKABLE = ["crm_trigger", "object_type", "delivery", "attempt", "attachment", "signing_secret",
            "schema_version", "role_name"]


def write_as(dsn: str, query: str, params: object = None, *, timeout_ms: int = 2000) -> None:
    """One CRM write in its own transaction, under a statement_timeout: it must not wait."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"SET statement_timeout = {int(timeout_ms)}")
        conn.execute(query, params)


def test_crm_write_succeeds_while_every_bridge_config_and_state_table_is_locked(db, roles):
    with psycopg.connect(db.dsn) as locker:  # holds ACCESS EXCLUSIVE until the block ends
        locker.execute("LOCK TABLE " + ", ".join(f"crm_bridge.{t}" for t in LOCKABLE) + " IN ACCESS EXCLUSIVE MODE")
        write_as(roles.dsn(roles.app), "INSERT INTO crm.customer (account_id, name) VALUES ('locked', 'x')")
        write_as(roles.dsn(roles.app), "UPDATE crm.customer SET name = 'y' WHERE account_id = 'locked'")
        assert db.one("SELECT count(*) FROM crm_bridge.event") == 2
        locker.rollback()


def test_crm_write_succeeds_with_garbage_config_and_the_daemon_records_it(db, receiver, daemon):
    good = db.add_url("customer", "create", receiver.url("/good"))
    # A DBA switched validation off and stored nonsense.
    db.execute("ALTER TABLE crm_bridge.crm_trigger DISABLE TRIGGER USER")
    garbage = {
        "not a url at all": None,
        "http://[::1": None,
        "https://127.0.0.1:99999/x": None,
        receiver.url("/bad-headers-a"): '"just a string"',
        receiver.url("/bad-headers-b"): '{"X-A": "line\\r\\nX-Injected: 1"}',
        receiver.url("/bad-headers-c"): '{"Content-Length": "0"}',
    }
    ids = {url: db.one("INSERT INTO crm_bridge.crm_trigger (object, event, url, headers) "
                       "VALUES ('customer', 'create', %s, %s::jsonb) RETURNING id", [url, hdr])
           for url, hdr in garbage.items()}
    db.execute("ALTER TABLE crm_bridge.crm_trigger ENABLE TRIGGER USER")
    write_as(db.dsn, "INSERT INTO crm.customer (account_id, name) VALUES ('acc-g', 'x')")
    receiver.wait_for(1, "/good")
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'dead'", expect=len(garbage))
    errors = dict(db.all("SELECT trigger_id, last_error FROM crm_bridge.delivery WHERE status = 'dead'"))
    assert "headers must be a JSON object" in errors[ids[receiver.url("/bad-headers-a")]]
    assert "must be printable ASCII" in errors[ids[receiver.url("/bad-headers-b")]]
    assert "is set by crm-bridge itself" in errors[ids[receiver.url("/bad-headers-c")]]
    assert all(errors.values())
    assert [c.path for c in receiver.attempts] == ["/good"]
    # The daemon is still at work.
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-h', 'x')")
    receiver.wait_for(2, "/good")
    assert daemon.running and db.one("SELECT status FROM crm_bridge.delivery WHERE trigger_id = %s "
                                     "ORDER BY id LIMIT 1", [good]) == "delivered"


def test_column_dropped_after_attach_turns_into_a_recorded_error(db, receiver, daemon):
    db.execute("CREATE TABLE public.tickets (acct text, ticket text, title text)")
    db.execute("SELECT crm_bridge.attach('public.tickets', 'case', ARRAY['acct', 'ticket'])")
    db.add_url("case", "create", receiver.url("/t"))
    db.execute("ALTER TABLE public.tickets DROP COLUMN ticket")
    write_as(db.dsn, "INSERT INTO public.tickets (acct, title) VALUES ('a-1', 'still works')")
    db.wait_until("SELECT status FROM crm_bridge.delivery", expect="dead")
    assert db.one("SELECT last_error FROM crm_bridge.delivery") == "ID CaseID is NULL in the captured row"
    assert receiver.attempts == []


def test_all_ids_null_is_one_clear_error(db, receiver, daemon):
    db.execute("CREATE TABLE public.loose (a text, c text)")
    db.execute("SELECT crm_bridge.attach('public.loose', 'case', ARRAY['a', 'c'])")
    db.add_url("case", "create", receiver.url("/t"))
    write_as(db.dsn, "INSERT INTO public.loose VALUES (NULL, NULL)")
    db.wait_until("SELECT status FROM crm_bridge.delivery", expect="dead")
    assert db.one("SELECT last_error FROM crm_bridge.delivery") == "ID AccountID, CaseID is NULL in the captured row"


@pytest.mark.slow
def test_writes_never_wait_for_the_daemon_idle_killed_or_absent(db, receiver, daemon_factory):
    db.add_url("customer", "create", receiver.url("/c"))
    d = daemon_factory()
    db.wait_until("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND mode = 'ExclusiveLock'", expect=1)
    write_as(db.dsn, "INSERT INTO crm.customer (account_id, name) VALUES ('idle', 'x')", timeout_ms=1000)
    receiver.wait_for(1)
    receiver.answer("/c", Rule(delay=5))   # the daemon is busy with a hanging call...
    write_as(db.dsn, "INSERT INTO crm.customer (account_id, name) VALUES ('busy', 'x')", timeout_ms=1000)
    db.wait_until("SELECT status FROM crm_bridge.delivery WHERE ids = ARRAY['busy']", expect="in_flight")
    d.kill()                                # ...and is killed mid-call
    write_as(db.dsn, "INSERT INTO crm.customer (account_id, name) VALUES ('absent', 'x')", timeout_ms=1000)
    assert db.one("SELECT count(*) FROM crm_bridge.event") == 1
    receiver.clear_rules()
    daemon_factory(env={"CRM_BRIDGE_LEASE": "0.5"})
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'delivered'", expect=3)
    assert {c.query for c in receiver.calls} == {"AccountID=absent", "AccountID=busy", "AccountID=idle"}


def test_emit_keeps_its_safety_properties(db):
    """SECURITY DEFINER, a fixed search_path, and one EXCEPTION block only around the row's
    conversion to jsonb: that subtransaction writes nothing, so it never takes a transaction id
    (a subtransaction that writes, once per row, would; and 64 of them overflow the subxid cache)."""
    secdef, config, src = db.all("SELECT prosecdef, proconfig, prosrc FROM pg_proc "
                                 "WHERE oid = 'crm_bridge.emit_v1()'::regprocedure")[0]
    assert secdef is True
    assert config == ["search_path=pg_catalog, crm_bridge, pg_temp"]
    handlers = [m.start() for m in re.finditer(r"(?i)\bEXCEPTION\s+WHEN\b", src)]
    assert len(handlers) == 1
    guarded = src[src.rindex("BEGIN", 0, handlers[0]):handlers[0]]
    assert "to_jsonb(NEW)" in guarded
    assert not re.search(r"(?i)\b(INSERT\s+INTO|UPDATE\s+[\w.]+\s+SET|DELETE\s+FROM|pg_notify|nextval)\b", guarded)
    assert src.index("INSERT INTO crm_bridge.event") > handlers[0]
    assert not re.search(r"(?i)\bFROM\s+crm_bridge\.(crm_trigger|object_type|attachment)\b", src)
