"""Capture never runs a table owner's code with the bridge owner's rights, and never fails a CRM
write over a value json accepts (outside review after issue 10: casts, \\u0000, a column named r)."""

from __future__ import annotations

import os
import subprocess
import sys

from psycopg import sql


def test_a_cast_defined_by_the_table_owner_runs_as_the_capture_role_not_the_owner(db, roles):
    """The owner of an attached table adds a column of its own enum type with a CREATE CAST to json
    and to text: to_json() and ::text call the cast function inside the SECURITY DEFINER capture."""
    app = sql.Identifier(roles.app)
    db.execute(sql.SQL("CREATE SCHEMA appschema AUTHORIZATION {}").format(app))
    with roles.connect(roles.app) as conn:
        conn.execute("CREATE TABLE appschema.acct (id text PRIMARY KEY, name text)")
        conn.execute("CREATE TABLE appschema.log (who text, what text)")
        conn.execute(sql.SQL("GRANT INSERT ON appschema.log TO PUBLIC; GRANT USAGE ON SCHEMA appschema TO PUBLIC"))
    db.execute("SELECT crm_bridge.attach('appschema.acct', 'customer', ARRAY['id'])")
    db.execute("SELECT crm_bridge.capture_rows('appschema.acct')")
    with roles.connect(roles.app) as conn:
        conn.execute("CREATE TYPE appschema.mood AS ENUM ('ok')")
        for target in ("json", "text"):
            conn.execute(sql.SQL("""
                CREATE FUNCTION appschema.mood_{t}(appschema.mood) RETURNS {t} LANGUAGE plpgsql AS $$
                BEGIN
                    INSERT INTO appschema.log VALUES (current_user, 'cast ran');
                    BEGIN
                        EXECUTE pg_catalog.format('ALTER ROLE %I SUPERUSER', session_user);
                        INSERT INTO appschema.log VALUES (current_user, 'made superuser');
                    EXCEPTION WHEN OTHERS THEN NULL;
                    END;
                    RETURN '"ok"';
                END $$;
                CREATE CAST (appschema.mood AS {t}) WITH FUNCTION appschema.mood_{t}(appschema.mood);
                """).format(t=sql.SQL(target)))
        conn.execute("ALTER TABLE appschema.acct ADD COLUMN m appschema.mood")
        conn.execute("INSERT INTO appschema.acct VALUES ('a1', 'n', 'ok')")
        conn.execute("UPDATE appschema.acct SET name = 'x'")
        conn.execute("ALTER TABLE appschema.acct ALTER COLUMN id TYPE appschema.mood USING 'ok'")
        conn.execute("DELETE FROM appschema.acct")
    ran_as = {who for who, _ in db.all("SELECT who, what FROM appschema.log")}
    assert ran_as and ran_as <= {roles.app, "crm_bridge_capture"}, ran_as
    assert not db.one("SELECT rolsuper FROM pg_roles WHERE rolname = %s", [roles.app])
    assert ("crm_bridge_capture", "made superuser") not in db.all("SELECT who, what FROM appschema.log")
    assert db.one("SELECT count(*) FROM crm_bridge.event") == 3  # insert, update, delete


def test_the_capture_role_may_only_write_the_outbox(db):
    privileges = db.all("""
        SELECT c.relname, p.privilege_type FROM pg_class c
          JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'crm_bridge'
         CROSS JOIN LATERAL (SELECT unnest(ARRAY['SELECT','INSERT','UPDATE','DELETE','TRUNCATE','REFERENCES','TRIGGER'])
                               AS privilege_type) p
         WHERE c.relkind IN ('r', 'v', 'p', 'S')
           AND has_table_privilege('crm_bridge_capture', c.oid, p.privilege_type)
         ORDER BY 1, 2""")
    assert privileges == [("event", "INSERT"), ("wake_state", "SELECT")]
    owners = dict(db.all("SELECT p.proname, pg_get_userbyid(p.proowner) FROM pg_proc p "
                         "WHERE p.pronamespace = 'crm_bridge'::regnamespace "
                         "AND (p.proname = 'emit_v1' OR p.proname ~ '^emit_rows_[0-9]+_v1$')"))
    assert owners and set(owners.values()) == {"crm_bridge_capture"}, owners
    role = db.all("SELECT rolsuper, rolcanlogin, rolcreaterole, rolcreatedb, rolbypassrls FROM pg_roles "
                  "WHERE rolname = 'crm_bridge_capture'")
    assert role == [(False, False, False, False, False)]


def test_json_values_that_jsonb_refuses_never_fail_a_crm_write(db):
    db.execute("CREATE TABLE public.t_json (id int PRIMARY KEY, doc json)")
    db.execute("CREATE TABLE public.t_json_part (id int, doc json) PARTITION BY RANGE (id)")
    db.execute("CREATE TABLE public.t_json_p1 PARTITION OF public.t_json_part FOR VALUES FROM (0) TO (100)")
    db.execute("SELECT crm_bridge.attach('public.t_json', 'customer', '{id}')")
    db.execute("SELECT crm_bridge.attach('public.t_json_part', 'task', '{id,id}')")
    for table in ("public.t_json", "public.t_json_part"):
        t = sql.SQL(table)
        for value in ('{"a": "\\u0000"}', '"\\ud83d"'):
            db.execute(sql.SQL("INSERT INTO {} VALUES (1, %s)").format(t), [value])
            db.execute(sql.SQL("UPDATE {} SET doc = %s").format(t), ['{"b": "\\u0000"}'])
            db.execute(sql.SQL("DELETE FROM {}").format(t))
        db.execute(sql.SQL("SELECT crm_bridge.capture_rows({})").format(sql.Literal(table)))
        db.execute(sql.SQL("INSERT INTO {} VALUES (1, %s)").format(t), ['{"a": "\\u0000"}'])
        db.execute(sql.SQL("UPDATE {} SET doc = %s").format(t), ['"\\ud83d"'])
        db.execute(sql.SQL("DELETE FROM {}").format(t))
    assert db.one("SELECT count(*) FROM crm_bridge.event") == 2 * (6 + 3)


def test_a_column_named_r_is_captured_like_any_other(db):
    db.execute("CREATE TABLE public.t_r (acc int, tid int, r int)")
    db.execute("SELECT crm_bridge.attach('public.t_r', 'task', '{acc,tid}')")
    db.execute("SELECT crm_bridge.capture_rows('public.t_r')")
    db.execute("INSERT INTO public.t_r VALUES (1, 0, 7)")
    db.execute("INSERT INTO public.t_r SELECT 1, g, g FROM generate_series(1, 1001) g")
    rows = db.one("SELECT rows -> 0 -> 'new' FROM crm_bridge.event ORDER BY id LIMIT 1")
    assert rows == {"acc": 1, "tid": 0, "r": 7}
    assert db.one("SELECT sum(coalesce(n_records, 1)) FROM crm_bridge.event") == 1002
    assert db.one("SELECT (rows -> 0 -> 'new' ->> 'r')::int FROM crm_bridge.event ORDER BY id OFFSET 1 LIMIT 1") == 1


def _check(dsn: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRM_BRIDGE_")}
    return subprocess.run([sys.executable, "-m", "bridge.cli", "--dsn", dsn, "check"],
                          capture_output=True, text=True, timeout=60, env=env)


def test_check_reports_what_capture_cannot_guarantee(db):
    """A user-defined cast on a column type of an attached table (a warning), and a capture function
    someone changed (an error: e.g. made SECURITY INVOKER, which fails every write)."""
    assert "cast to" not in _check(db.dsn).stdout
    db.execute("CREATE TYPE public.mood AS ENUM ('ok')")
    db.execute("CREATE FUNCTION public.mood_json(public.mood) RETURNS json LANGUAGE sql AS $$ SELECT '1'::json $$")
    db.execute("CREATE CAST (public.mood AS json) WITH FUNCTION public.mood_json(public.mood)")
    db.execute("ALTER TABLE crm.customer ADD COLUMN m public.mood")
    fn = db.one("SELECT crm_bridge.emit_rows_name_v1('crm.task')")
    db.execute(sql.SQL("ALTER FUNCTION crm_bridge.{}() SECURITY INVOKER").format(sql.Identifier(fn)))
    db.execute("ALTER FUNCTION crm_bridge.emit_v1() SET statement_timeout = 1")
    proc = _check(db.dsn)
    assert proc.returncode == 1
    out = proc.stdout
    assert "warn   table crm.customer (customer): column m has type mood, which has a user-defined cast to json" in out
    assert f"error  capture function crm_bridge.{fn}() is no longer SECURITY DEFINER" in out
    assert "error  capture function crm_bridge.emit_v1() is running with changed settings" in out
