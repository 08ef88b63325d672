"""Least privilege in the database: PUBLIC and the CRM application get nothing on crm_bridge, the
daemon role cannot touch CRM data, the admin role edits config but cannot read signing secrets."""

from __future__ import annotations

import subprocess
import sys

import psycopg
import pytest
from fixtures.factories import add_expired_history
from psycopg import errors

from bridge.devtools.receiver import Rule

BRIDGE_TABLES = ["crm_trigger", "object_type", "event", "delivery", "attempt", "attachment",
                 "signing_secret", "schema_version", "role_name"]


def denied(conn: psycopg.Connection, query: str, params: object = None) -> None:
    with pytest.raises(errors.InsufficientPrivilege):
        conn.execute(query, params)


def test_public_has_no_privilege_on_any_crm_bridge_object(db):
    assert db.one("SELECT has_schema_privilege('public', 'crm_bridge', 'USAGE')") is False
    table_privs = db.all("""
        SELECT c.relname FROM pg_class c
         WHERE c.relnamespace = 'crm_bridge'::regnamespace AND c.relkind IN ('r', 'v', 'S')
           AND (has_table_privilege('public', c.oid, 'SELECT,INSERT,UPDATE,DELETE,TRUNCATE')
                OR (c.relkind = 'S' AND has_sequence_privilege('public', c.oid, 'USAGE')))""")
    assert table_privs == []
    functions = db.all("""
        SELECT p.oid::regprocedure::text FROM pg_proc p
         WHERE p.pronamespace = 'crm_bridge'::regnamespace AND has_function_privilege('public', p.oid, 'EXECUTE')""")
    assert functions == []


def test_app_role_writes_crm_rows_and_the_events_appear(db, roles):
    with roles.connect(roles.app) as app:
        app.execute("INSERT INTO crm.customer (account_id, name) VALUES ('by-app', 'x')")
        app.execute("UPDATE crm.customer SET name = 'y' WHERE account_id = 'by-app'")
    assert db.all("SELECT object, event, ids, origin_role FROM crm_bridge.event ORDER BY id") == [
        ("customer", "create", ["by-app"], roles.app),  # statement capture of one record: its IDs
        ("customer", "edit", ["by-app"], roles.app),
    ]


@pytest.mark.parametrize("query", [
    *(f"SELECT * FROM crm_bridge.{t}" for t in BRIDGE_TABLES),
    "INSERT INTO crm_bridge.event (object, event, ids) VALUES ('customer', 'create', ARRAY['forged'])",
    "INSERT INTO crm_bridge.crm_trigger (object, event, url) VALUES ('customer', 'create', 'http://127.0.0.1:9/x')",
    "UPDATE crm_bridge.crm_trigger SET url = 'http://127.0.0.1:9/x'",
    "DELETE FROM crm_bridge.delivery",
    "SELECT crm_bridge.emit_v1()",
    "SELECT crm_bridge.set_signing_secret(1)",
    "SELECT crm_bridge.attach('crm.customer', 'customer', ARRAY['account_id'])",
    "SELECT crm_bridge.detach('crm.customer')",
    "SELECT crm_bridge.apply_grants('a', 'b')",
    "SELECT crm_bridge.apply_grants('a', 'b', 'c')",
    "SELECT crm_bridge.retry_now()",
])
def test_app_role_cannot_read_change_or_call_anything_in_crm_bridge(roles, query):
    with roles.connect(roles.app) as app:
        denied(app, query)


def test_app_role_cannot_forge_events_with_its_own_trigger(db, roles):
    db.execute(psycopg.sql.SQL("CREATE SCHEMA appown AUTHORIZATION {}").format(psycopg.sql.Identifier(roles.app)))
    with roles.connect(roles.app) as app:
        app.execute("CREATE TABLE appown.fake (account_id text)")
        denied(app, "CREATE TRIGGER forge AFTER INSERT ON appown.fake FOR EACH ROW "
                    "EXECUTE FUNCTION crm_bridge.emit_v1('customer', 'account_id')")
    assert db.one("SELECT count(*) FROM crm_bridge.event") == 0


def test_emit_cannot_be_hijacked_through_the_writers_search_path(db, roles):
    """emit_v1 runs as its owner; its fixed search_path keeps a writer's look-alike functions out."""
    db.execute(psycopg.sql.SQL("CREATE SCHEMA evil AUTHORIZATION {}").format(psycopg.sql.Identifier(roles.app)))
    with roles.connect(roles.app) as app:
        app.execute("CREATE TABLE evil.ran_as (who name)")
        app.execute("GRANT INSERT ON evil.ran_as TO PUBLIC")
        app.execute("""CREATE FUNCTION evil.pg_try_advisory_xact_lock_shared(integer, integer) RETURNS boolean
                       LANGUAGE sql AS 'INSERT INTO evil.ran_as VALUES (current_user) RETURNING true'""")
        app.execute("SET search_path = evil, pg_catalog")
        # INSERT runs the generated statement-level function, UPDATE the generic emit_v1.
        app.execute("INSERT INTO crm.customer (account_id, name) VALUES ('sp-1', 'x')")
        app.execute("UPDATE crm.customer SET name = 'y' WHERE account_id = 'sp-1'")
        assert app.execute("SELECT count(*) FROM evil.ran_as").fetchone() == (0,)
        # Defence in depth: every function in emit_v1 is also schema-qualified, so even without
        # its fixed search_path the look-alike is not reached (tests/test_definer_security.py).
        db.execute("ALTER FUNCTION crm_bridge.emit_v1() RESET search_path")
        app.execute("UPDATE crm.customer SET name = 'z' WHERE account_id = 'sp-1'")
        assert app.execute("SELECT count(*) FROM evil.ran_as").fetchone() == (0,)


@pytest.mark.parametrize("query", [
    "SELECT * FROM crm.customer",
    "INSERT INTO crm.customer (account_id, name) VALUES ('by-daemon', 'x')",
    "UPDATE crm.case SET subject = 'x'",
    "DELETE FROM crm.task",
    "INSERT INTO crm_bridge.event (object, event, ids) VALUES ('customer', 'create', ARRAY['forged'])",
    "UPDATE crm_bridge.crm_trigger SET url = 'http://127.0.0.1:9/x'",
    "INSERT INTO crm_bridge.signing_secret VALUES (1, 'whsec_AAAA')",
    "SELECT crm_bridge.set_signing_secret(1)",
    "TRUNCATE crm_bridge.event",
])
def test_daemon_role_cannot_touch_crm_data_or_change_config(roles, query):
    with roles.connect(roles.daemon) as daemon:
        denied(daemon, query)


def test_admin_role_edits_config_and_sets_secrets_it_cannot_read(db, roles):
    with roles.connect(roles.admin) as admin:
        tid = admin.execute("INSERT INTO crm_bridge.crm_trigger (object, event, url) "
                            "VALUES ('case', 'create', 'http://127.0.0.1:9/h') RETURNING id").fetchone()[0]
        admin.execute("UPDATE crm_bridge.crm_trigger SET enabled = false WHERE id = %s", [tid])
        secret = admin.execute("SELECT crm_bridge.set_signing_secret(%s)", [tid]).fetchone()[0]
        assert secret.startswith("whsec_")
        assert admin.execute("SELECT trigger_id FROM crm_bridge.signed_urls()").fetchall() == [(tid,)]
        assert admin.execute("SELECT count(*) FROM crm_bridge.delivery").fetchone() == (0,)
        denied(admin, "SELECT * FROM crm_bridge.signing_secret")
        denied(admin, "SELECT * FROM crm.customer")
        denied(admin, "INSERT INTO crm_bridge.event (object, event, ids) VALUES ('customer', 'create', ARRAY['x'])")
    with roles.connect(roles.daemon) as daemon:
        assert daemon.execute("SELECT secret FROM crm_bridge.signing_secret").fetchall() == [(secret,)]


def test_daemon_connected_as_the_daemon_role_does_its_whole_job(db, roles, receiver, daemon_factory):
    seen = db.add_url("customer", "create", receiver.url("/ok"))
    receiver.answer("/flaky", Rule(status=503, times=1))
    db.add_url("customer", "create", receiver.url("/flaky"))
    # A delivery left behind by a dead daemon (lease expired) and one old enough for retention.
    db.execute("""INSERT INTO crm_bridge.delivery (event_id, object, event, ids, record_key, event_created_at,
                                                   trigger_id, url, status, lease_until, worker)
                  VALUES (0, 'customer', 'create', ARRAY['orphan'], '{orphan}', now(), %s, %s, 'in_flight',
                          now() - interval '1 minute', 'dead-worker')""", [seen, receiver.url("/ok")])
    add_expired_history(db, call_id=0, ids=["old"], record_key="{old}")
    d = daemon_factory(target_dsn=roles.dsn(roles.daemon))
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('as-daemon', 'x')")
    receiver.wait_for(1, "/flaky")
    receiver.wait_for(2, "/ok")
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'delivered'", expect=3)
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE ids = ARRAY['old']", expect=0)
    assert db.one("SELECT to_regclass('crm_bridge.history_old')") is None   # rotated away
    assert db.one("SELECT count(*) FROM crm_bridge.attempt") == 1
    assert db.one("SELECT usename FROM pg_stat_activity WHERE application_name = 'crm-bridge listener'") \
        == roles.daemon
    assert d.running
    assert "permission denied" not in d.log


def test_migrate_roles_creates_nologin_groups_and_reapplies_them(empty_dsn):
    suffix = id(empty_dsn)
    admin, daemon, monitor = f"crmb_cli_admin_{suffix}", f"crmb_cli_daemon_{suffix}", f"crmb_cli_monitor_{suffix}"
    cmd = [sys.executable, "-m", "bridge.cli", "--dsn", empty_dsn, "migrate"]
    try:
        out = subprocess.run([*cmd, "--roles", "--admin-role", admin, "--daemon-role", daemon,
                              "--monitor-role", monitor], capture_output=True, text=True, check=True).stdout
        assert f"roles: admin {admin}, daemon {daemon}, monitor {monitor}" in out
        again = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        assert "up to date" in again and f"roles: admin {admin}, daemon {daemon}, monitor {monitor}" in again
        with psycopg.connect(empty_dsn, autocommit=True) as conn:
            rows = conn.execute("SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname IN (%s, %s, %s) ORDER BY 1",
                                [admin, daemon, monitor]).fetchall()
            assert rows == [(admin, False), (daemon, False), (monitor, False)]
            assert conn.execute("SELECT has_table_privilege(%s, 'crm_bridge.crm_trigger', 'UPDATE'), "
                                "has_table_privilege(%s, 'crm_bridge.crm_trigger', 'UPDATE'), "
                                "has_table_privilege(%s, 'crm_bridge.summary', 'SELECT')",
                                [admin, daemon, monitor]).fetchone() == (True, False, True)
            with pytest.raises(errors.InvalidParameterValue, match="is a superuser"):
                conn.execute("SELECT crm_bridge.apply_grants(current_user, %s, %s)", [daemon, monitor])
            # A database set up before the monitor role (version 3 recorded two roles) gets the
            # default monitor role on the next migrate.
            conn.execute("DELETE FROM crm_bridge.role_name WHERE kind = 'monitor'")
            conn.execute("DROP ROLE IF EXISTS crm_bridge_monitor")
        upgraded = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        assert f"roles: admin {admin}, daemon {daemon}, monitor crm_bridge_monitor" in upgraded
    finally:
        with psycopg.connect(empty_dsn, autocommit=True) as conn:
            for role in (admin, daemon, monitor, "crm_bridge_monitor"):
                if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role]).fetchone():
                    conn.execute(psycopg.sql.SQL("DROP OWNED BY {} CASCADE").format(psycopg.sql.Identifier(role)))
                    conn.execute(psycopg.sql.SQL("DROP ROLE {}").format(psycopg.sql.Identifier(role)))


def test_admin_role_attaches_a_table_it_may_trigger_and_app_writes_are_captured(db, roles):
    sql = psycopg.sql
    db.execute("CREATE TABLE public.tickets (acct text, ticket text)")
    db.execute(sql.SQL("GRANT TRIGGER ON public.tickets TO {}").format(sql.Identifier(roles.admin)))
    db.execute(sql.SQL("GRANT INSERT, DELETE ON public.tickets TO {}").format(sql.Identifier(roles.app)))
    db.execute("CREATE TABLE public.secret_stuff (acct text, ticket text)")  # no TRIGGER for admin
    with roles.connect(roles.admin) as admin:
        admin.execute("SELECT crm_bridge.attach('public.tickets', 'case', ARRAY['acct', 'ticket'])")
        denied(admin, "SELECT crm_bridge.attach('public.secret_stuff', 'case', ARRAY['acct', 'ticket'])")
    with roles.connect(roles.app) as app:
        app.execute("INSERT INTO public.tickets VALUES ('a1', 't1')")
        app.execute("DELETE FROM public.tickets")
    assert db.all("SELECT event, ids FROM crm_bridge.event ORDER BY id") == [
        ("create", ["a1", "t1"]), ("delete", ["a1", "t1"])]
