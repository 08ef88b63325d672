"""SECURITY DEFINER functions run as the owner of crm_bridge: nothing a caller controls may choose
the code they run (issue 10, items 1 and 2).

An attacker shadows every type, catalog relation, function and operator name the bridge uses --
in pg_temp (searched *first* for types and relations unless listed) and in a schema of its own
placed first in search_path -- with objects that call ``evil()``.  ``evil()`` records who it ran
as, tries ``ALTER ROLE ... SUPERUSER`` and tries to read the signing secrets.  Then it exercises
every definer function.  It may only ever have run as the attacker itself.
"""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql

# Types the bridge's functions declare or cast to, shadowed by domains whose CHECK calls evil().
SHADOW_TYPES = ["jsonb", "json", "text", "bytea", "name", "float8", "int8", "int4", "bool", "numeric",
                "regclass", "timestamptz", "interval", "oid", "varchar", "bpchar", "record"]
# Catalog relations (and crm_bridge table names) shadowed by temporary views that call evil().
SHADOW_CATALOG = ["pg_attribute", "pg_class", "pg_trigger", "pg_namespace", "pg_proc", "pg_roles",
                  "pg_locks", "pg_inherits", "pg_type", "pg_index", "pg_authid", "pg_tables"]
SHADOW_BRIDGE = ["attachment", "object_type", "crm_trigger", "signing_secret", "event", "wake_state",
                 "delivery", "role_name"]
# Functions shadowed in the attacker's schema: (name, argument types, the real function to return).
SHADOW_FUNCTIONS = [
    ("to_jsonb", "anyelement", "pg_catalog.to_jsonb($1)"),
    ("current_setting", "text, boolean", "pg_catalog.current_setting($1, $2)"),
    ("pg_notify", "text, text", "pg_catalog.pg_notify($1, $2)"),
    ("pg_try_advisory_xact_lock_shared", "integer, integer", "pg_catalog.pg_try_advisory_xact_lock_shared($1, $2)"),
    ("pg_notification_queue_usage", "", "pg_catalog.pg_notification_queue_usage()"),
    ("pg_current_xact_id", "", "pg_catalog.pg_current_xact_id()"),
    ("has_table_privilege", "name, oid, text", "pg_catalog.has_table_privilege($1, $2, $3)"),
    ("encode", "bytea, text", "pg_catalog.encode($1, $2)"),
    ("decode", "text, text", "pg_catalog.decode($1, $2)"),
    ("replace", "text, text, text", "pg_catalog.replace($1, $2, $3)"),
    ("length", "text", "pg_catalog.length($1)"),
    ("cardinality", "anyarray", "pg_catalog.cardinality($1)"),
    ("array_to_string", "anyarray, text", "pg_catalog.array_to_string($1, $2)"),
    ("quote_literal", "text", "pg_catalog.quote_literal($1)"),
    ("quote_ident", "text", "pg_catalog.quote_ident($1)"),
    ("now", "", "pg_catalog.now()"),
    ("gen_random_uuid", "", "pg_catalog.gen_random_uuid()"),
    ("jsonb_each", "jsonb", None),
    ("row_number", "", None),
]
# Operators shadowed in the attacker's schema (and in pg_temp): (symbol, left, right, real function).
SHADOW_OPERATORS = [
    ("=", "text", "text", "texteq"), ("=", "name", "name", "nameeq"), ("=", "bigint", "bigint", "int8eq"),
    ("=", "integer", "integer", "int4eq"), ("<>", "text", "text", "textne"), ("||", "text", "text", "textcat"),
    ("->>", "jsonb", "text", "jsonb_object_field_text"), ("->", "jsonb", "text", "jsonb_object_field"),
    (">", "bigint", "integer", "int84gt"), ("<", "double precision", "double precision", "float8lt"),
    ("~", "text", "text", "textregexeq"), ("!~", "text", "text", "textregexne"),
    ("-", "bigint", "integer", "int84mi"), ("/", "bigint", "integer", "int84div"),
    (">", "timestamp with time zone", "timestamp with time zone", "timestamptz_gt"),
    ("=", "jsonb", "jsonb", "jsonb_eq"),
]


class Attacker:
    """A login whose schema and temporary objects shadow everything, and the log its evil() keeps."""

    def __init__(self, db, login: str, schema: str) -> None:
        self.db, self.login, self.schema = db, login, schema

    def arm(self, conn: psycopg.Connection) -> None:
        s = sql.Identifier(self.schema)
        conn.execute(sql.SQL("SET search_path = {}, pg_catalog, public").format(s))
        conn.execute(sql.SQL("""
            CREATE TABLE {s}.log (who text, what text);
            GRANT USAGE ON SCHEMA {s} TO PUBLIC;
            GRANT INSERT ON {s}.log TO PUBLIC;
            CREATE FUNCTION {s}.evil(anyelement) RETURNS boolean LANGUAGE plpgsql AS $$
            BEGIN
                INSERT INTO {s}.log VALUES (current_user, 'ran');
                BEGIN
                    EXECUTE pg_catalog.format('ALTER ROLE %I SUPERUSER', session_user);
                    INSERT INTO {s}.log VALUES (current_user, 'made superuser');
                EXCEPTION WHEN OTHERS THEN NULL;
                END;
                BEGIN
                    INSERT INTO {s}.log SELECT current_user, 'secret ' || x.secret FROM crm_bridge.signing_secret x;
                EXCEPTION WHEN OTHERS THEN NULL;
                END;
                RETURN true;
            END $$;
            """).format(s=s))
        for rel in SHADOW_CATALOG:
            cols = [r[0] for r in conn.execute(
                "SELECT a.attname FROM pg_catalog.pg_attribute a WHERE a.attrelid OPERATOR(pg_catalog.=) "
                "pg_catalog.to_regclass(%s)::pg_catalog.oid AND a.attnum OPERATOR(pg_catalog.>) 0 "
                "AND a.atttypid OPERATOR(pg_catalog.<>) 'pg_catalog.anyarray'::pg_catalog.regtype ORDER BY a.attnum",
                [f"pg_catalog.{rel}"])]
            conn.execute(sql.SQL("CREATE TEMP VIEW {r} AS SELECT {c} FROM pg_catalog.{r} WHERE {s}.evil(1)")
                         .format(r=sql.Identifier(rel), s=s, c=sql.SQL(", ").join(map(sql.Identifier, cols))))
        for rel in SHADOW_BRIDGE:
            conn.execute(sql.SQL("CREATE TEMP VIEW {r} AS SELECT {s}.evil(1) AS evil").format(
                r=sql.Identifier(rel), s=s))
        for name, args, real in SHADOW_FUNCTIONS:
            if real is None:
                continue
            ret = conn.execute(sql.SQL("SELECT pg_catalog.format_type(p.prorettype, NULL) FROM pg_catalog.pg_proc p "
                                       "WHERE p.oid = {}::pg_catalog.regprocedure")
                               .format(sql.Literal(f"pg_catalog.{name}({args})"))).fetchone()[0]
            body = f"SELECT CASE WHEN {self.schema}.evil(1) THEN {real} END"
            conn.execute(sql.SQL("CREATE FUNCTION {s}.{n}({a}) RETURNS {r} LANGUAGE sql AS {b}").format(
                s=s, n=sql.Identifier(name), a=sql.SQL(args), r=sql.SQL(ret), b=sql.Literal(body)))
        for i, (op, left, right, real) in enumerate(SHADOW_OPERATORS):
            fn = f"op_{i}"
            ret = conn.execute(sql.SQL("SELECT pg_catalog.format_type(p.prorettype, NULL) FROM pg_catalog.pg_proc p "
                                       "WHERE p.proname OPERATOR(pg_catalog.=) {} LIMIT 1")
                               .format(sql.Literal(real))).fetchone()[0]
            body = f"SELECT CASE WHEN {self.schema}.evil(1) THEN pg_catalog.{real}($1, $2) END"
            conn.execute(sql.SQL("CREATE FUNCTION {s}.{f}({l}, {r}) RETURNS {t} LANGUAGE sql AS {b}").format(
                s=s, f=sql.Identifier(fn), l=sql.SQL(left), r=sql.SQL(right), t=sql.SQL(ret), b=sql.Literal(body)))
            for target in (self.schema, "pg_temp"):
                with conn.transaction(), _suppress(conn):
                    conn.execute(sql.SQL("CREATE OPERATOR {t}.{o} (LEFTARG = {l}, RIGHTARG = {r}, FUNCTION = {s}.{f})")
                                 .format(t=sql.Identifier(target), o=sql.SQL(op), l=sql.SQL(left),
                                         r=sql.SQL(right), s=s, f=sql.Identifier(fn)))

        # Last: type names in the statements above would resolve to these.
        for t in SHADOW_TYPES:
            with conn.transaction(), _suppress(conn):
                conn.execute(sql.SQL("CREATE DOMAIN pg_temp.{t} AS pg_catalog.{t} CHECK ({s}.evil(VALUE))")
                             .format(t=sql.Identifier(t), s=s))

    def assert_never_ran_as_anyone_else(self) -> None:
        log = self.db.all(sql.SQL("SELECT who, what FROM {}.log").format(sql.Identifier(self.schema)))
        assert {who for who, _ in log} <= {self.login}, f"evil() ran as another role: {sorted(set(log))}"
        assert not [what for _, what in log if what.startswith("secret")], "a signing secret leaked"
        assert self.db.one("SELECT rolsuper FROM pg_roles WHERE rolname = %s", [self.login]) is False


class _suppress:
    """Some shadows cannot be created on every version (e.g. a domain named record): skip those."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        return exc_type is not None and issubclass(exc_type, psycopg.errors.Error)


@pytest.fixture
def attacker_for(db, roles):
    def make(login: str) -> Attacker:
        schema = f"evil_{login}"[:60]
        db.execute(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(sql.Identifier(schema), sql.Identifier(login)))
        return Attacker(db, login, schema)
    yield make


@pytest.fixture
def crm(db):
    """The reference CRM plus a capture_rows table and a partitioned table, all attached."""
    db.execute("SELECT crm_bridge.capture_rows('crm.case')")
    db.execute("CREATE TABLE crm.part_task (account_id text, task_id text, title text, x json) "
               "PARTITION BY LIST (account_id)")
    db.execute("CREATE TABLE crm.part_task_a PARTITION OF crm.part_task FOR VALUES IN ('a')")
    db.execute("SELECT crm_bridge.attach('crm.part_task', 'task', ARRAY['account_id', 'task_id'])")
    db.execute("INSERT INTO crm_bridge.crm_trigger (object, event, url) VALUES ('customer', 'create', 'http://127.0.0.1:9/x')")
    db.execute("SELECT crm_bridge.set_signing_secret(1)")
    return db


def test_issue_exploit_pg_temp_jsonb_domain_on_update_does_not_make_the_writer_superuser(db, roles, attacker_for):
    """The reported exploit, verbatim: an app role with UPDATE on crm.customer and a pg_temp domain."""
    atk = attacker_for(roles.app)
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('x1', 'x')")
    s = sql.Identifier(atk.schema)
    with roles.connect(roles.app) as app:
        app.execute(sql.SQL("CREATE TABLE {s}.log (who text, what text); GRANT USAGE ON SCHEMA {s} TO PUBLIC; "
                            "GRANT INSERT ON {s}.log TO PUBLIC").format(s=s))
        app.execute(sql.SQL("""CREATE FUNCTION {s}.evil(pg_catalog.jsonb) RETURNS boolean LANGUAGE plpgsql AS $$
            BEGIN
                INSERT INTO {s}.log VALUES (current_user, 'ran');
                EXECUTE pg_catalog.format('ALTER ROLE %I SUPERUSER', session_user);
                RETURN true;
            EXCEPTION WHEN OTHERS THEN RETURN true;
            END $$""").format(s=s))
        app.execute(sql.SQL("CREATE DOMAIN pg_temp.jsonb AS pg_catalog.jsonb CHECK ({}.evil(VALUE))").format(s))
        app.execute("UPDATE crm.customer SET name = 'y' WHERE account_id = 'x1'")
    atk.assert_never_ran_as_anyone_else()


def test_app_writer_cannot_run_code_as_the_owner_through_any_shadow(db, roles, crm, attacker_for):
    """The issue's exploit (pg_temp.jsonb domain + UPDATE) and every other shadow, every write path."""
    db.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA crm TO {}")
               .format(sql.Identifier(roles.app)))
    atk = attacker_for(roles.app)
    with roles.connect(roles.app) as app:
        atk.arm(app)
        app.execute("INSERT INTO crm.customer (account_id, name) VALUES ('c1', 'x'), ('c2', 'y')")
        app.execute("UPDATE crm.customer SET name = 'z' WHERE account_id = 'c1'")
        app.execute("INSERT INTO crm.case (case_id, account_id, subject) VALUES ('k1', 'c1', 's')")
        app.execute("UPDATE crm.case SET subject = 't'")
        app.execute("DELETE FROM crm.case")
        app.execute("INSERT INTO crm.part_task VALUES ('a', 't1', 'x', '{}')")
        app.execute("INSERT INTO crm.part_task_a VALUES ('a', 't2', 'x', '{}')")
        app.execute("UPDATE crm.part_task SET title = 'y'")
        app.execute("DELETE FROM crm.part_task_a")
        app.execute("DELETE FROM crm.customer WHERE account_id = 'c2'")
    atk.assert_never_ran_as_anyone_else()
    # Every write was captured all the same.
    assert db.one("SELECT count(*) FROM crm_bridge.event") == 12


def test_admin_cannot_run_code_as_the_owner_or_read_secrets_through_any_shadow(db, roles, crm, attacker_for):
    db.execute("CREATE TABLE public.adm_t (acct text, ticket text, body text)")
    db.execute(sql.SQL("GRANT TRIGGER, SELECT, INSERT, UPDATE, DELETE ON public.adm_t TO {}")
               .format(sql.Identifier(roles.admin)))
    atk = attacker_for(roles.admin)
    with roles.connect(roles.admin) as admin:
        atk.arm(admin)
        admin.execute("SELECT crm_bridge.attach('public.adm_t', 'case', ARRAY['acct', 'ticket'])")
        admin.execute("SELECT crm_bridge.capture_rows('public.adm_t')")
        admin.execute("INSERT INTO public.adm_t VALUES ('a', 'b', 'c')")
        admin.execute("UPDATE public.adm_t SET body = 'd'")
        admin.execute("DELETE FROM public.adm_t")
        admin.execute("SELECT crm_bridge.capture_rows('public.adm_t', false)")
        admin.execute("SELECT crm_bridge.detach('public.adm_t')")
        admin.execute("SELECT crm_bridge.set_signing_secret(1)")
        admin.execute("SELECT crm_bridge.set_signing_secret(1, 'whsec_' || repeat('QUJD', 8))")
        admin.execute("SELECT * FROM crm_bridge.signed_urls()")
        admin.execute("SELECT crm_bridge.clear_signing_secret(1)")
        admin.execute("SELECT crm_bridge.set_signing_secret(1)")
        admin.execute("UPDATE crm_bridge.crm_trigger SET retry_schedule = '{1 second}'")
    atk.assert_never_ran_as_anyone_else()
    assert db.one("SELECT count(*) FROM crm_bridge.event") == 3


def test_daemon_cannot_run_code_as_the_owner_through_any_shadow(db, roles, crm, attacker_for):
    db.execute("INSERT INTO crm_bridge.crm_trigger (object, event, url, method, include_row, coalesce_edits) "
               "VALUES ('case', 'edit', 'http://127.0.0.1:9/e', 'POST', true, true)")
    db.execute("INSERT INTO crm_bridge.crm_trigger (object, event, url, ordered) "
               "VALUES ('case', 'create', 'http://127.0.0.1:9/o', true)")
    db.execute("INSERT INTO crm.customer (account_id, name) SELECT 'd' || g, 'n' FROM generate_series(1, 3) g")
    db.execute("INSERT INTO crm.case (case_id, account_id, subject) VALUES ('c1', 'd1', 's')")
    db.execute("UPDATE crm.case SET subject = 't'")
    db.execute("UPDATE crm.case SET subject = 'u'")
    atk = attacker_for(roles.daemon)
    with roles.connect(roles.daemon) as daemon:
        atk.arm(daemon)
        daemon.execute("SELECT pg_catalog.pg_advisory_lock(1668441442, 1)")
        daemon.execute("SELECT crm_bridge.daemon_enter_idle(5)")
        daemon.execute("SELECT crm_bridge.daemon_leave_idle()")
        # Every write path of migrations 0007 and 0010, with shadows armed: claims (bulk and
        # one-row events, rows, coalescing, ordered), batch records, outcomes, heartbeats,
        # release, recovery, rotation.
        lease, w, busy = "interval '30 s'", "'w/1'", "'{}'::bigint[], '{}'::int[]"
        daemon.execute("SELECT crm_bridge.daemon_rotate(interval '7 days')")
        claimed = daemon.execute(f"SELECT batch_id, id FROM crm_bridge.daemon_claim(100, 500, {lease}, {w})"
                                 ).fetchall()
        batch = max(b for b, _ in claimed if b is not None)
        calls = [c for b, c in claimed if b == batch]
        n = len(calls)
        daemon.execute("SELECT crm_bridge.daemon_heartbeat('w/1', ARRAY[%s]::bigint[], '{1,2,3}', interval '30 s')",
                       [batch])
        daemon.execute("SELECT crm_bridge.daemon_record('w/1', %s, %s, %s, %s, %s, %s, %s, %s, interval '30 s')",
                       [batch, calls, (["delivered", "pending", "dead", "running"] * n)[:n], [1] * n, [200] * n,
                        ["x"] * n, [0.0] * n, [1] * n])
        daemon.execute(f"SELECT * FROM crm_bridge.daemon_claim(100, 500, {lease}, {w})")
        daemon.execute(f"SELECT * FROM crm_bridge.daemon_claim_due(100, {lease}, {w}, {busy}, 32)")
        daemon.execute("SELECT crm_bridge.daemon_unbatch('w/1', -1, interval '30 s')")
        daemon.execute("SELECT crm_bridge.daemon_complete('w/1', '{1,2}', '{delivered,pending}', '{1,1}', "
                       "'{200,500}', '{NULL,x}', '{0,5}', '{1,1}')")
        daemon.execute("SELECT crm_bridge.daemon_dead_letter('w/1', 3, 'x')")
        daemon.execute("SELECT * FROM crm_bridge.daemon_outbox_head(10)")
        daemon.execute("SELECT crm_bridge.daemon_quarantine_event(-1, 'x')")
        daemon.execute("SELECT crm_bridge.daemon_release('w/1')")
        daemon.execute("SELECT crm_bridge.daemon_release_previous('w', 'w/2')")
        daemon.execute("SELECT crm_bridge.daemon_recover_expired()")
        daemon.execute("SELECT crm_bridge.daemon_cancel_orphans()")
    atk.assert_never_ran_as_anyone_else()
    assert db.one("SELECT count(*) FROM crm_bridge.event") == 0  # the claim did run
    assert db.one("SELECT count(*) FROM crm_bridge.history WHERE outcome = 'delivered'") == 1  # and the record


def test_generated_capture_function_ignores_the_writers_search_path(db, roles, crm, attacker_for):
    """emit_rows_<oid>_v1 has no SET clause (speed): every name in it is qualified."""
    db.execute("SELECT crm_bridge.capture_rows('crm.customer')")
    atk = attacker_for(roles.app)
    with roles.connect(roles.app) as app:
        atk.arm(app)
        app.execute(sql.SQL("SET search_path = {}, public, pg_catalog, pg_temp").format(sql.Identifier(atk.schema)))
        app.execute("INSERT INTO crm.customer (account_id, name) SELECT 'g' || g, 'n' FROM generate_series(1, 3) g")
        app.execute("DELETE FROM crm.customer")
    atk.assert_never_ran_as_anyone_else()
    assert db.one("SELECT count(*) FROM crm_bridge.event") == 2


def test_every_security_definer_function_pins_its_search_path_with_pg_temp_last(db):
    bad = db.all("""
        SELECT p.oid::regprocedure::text, p.proconfig FROM pg_proc p
         WHERE p.pronamespace = 'crm_bridge'::regnamespace AND p.prosecdef
           AND p.proname !~ '^emit_rows_[0-9]+_v1$'
           AND (p.proconfig IS NULL
                OR NOT 'search_path=pg_catalog, crm_bridge, pg_temp' = ANY (p.proconfig))""")
    assert bad == []
