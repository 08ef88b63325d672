"""Capture never fails a CRM write and never runs a name as code (issue 10, items 2, 3, 4, 7, 8).

* no table, schema or column name reaches generated source (a renamed table neither);
  names with control characters are refused;
* UPDATEs work whatever the column types, also after ALTER TABLE ADD COLUMN;
* partitioned tables: statements aimed at a partition (also one created after attach) are captured;
* a bulk statement becomes events of at most 1000 records each;
* absurd retry_schedule values are refused with a message naming the column and the range.
"""

from __future__ import annotations

import subprocess
import sys

import psycopg
import pytest
from fixtures.databases import install_schema_up_to
from psycopg import errors, sql

from bridge.migrate import migrate

EVIL_TABLE = "t\nDECLARE z bool := s.f();--"


@pytest.fixture
def tripwire(db):
    """s.f() records who called it: it must never run."""
    db.execute("CREATE SCHEMA s; CREATE TABLE s.ran (who name); "
               "CREATE FUNCTION s.f() RETURNS boolean LANGUAGE sql "
               "AS 'INSERT INTO s.ran VALUES (current_user) RETURNING true'")
    yield lambda: db.one("SELECT count(*) FROM s.ran")


def events(db) -> list[tuple]:
    return db.all("SELECT object, event, ids FROM crm_bridge.event ORDER BY id")


# -- item 2: identifier injection --------------------------------------------------------------
@pytest.mark.parametrize(("schema", "table", "what"), [
    ("public", EVIL_TABLE, "table name"),
    ("public", "tab\there", "table name"),
    ("public", "cr\rlf", "table name"),
    ("public", "bell\x07", "table name"),
    ("odd\nschema", "t", "schema name"),
])
def test_names_with_control_characters_are_refused_with_a_clear_error(db, tripwire, schema, table, what):
    db.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    db.execute(sql.SQL("CREATE TABLE {}.{} (acct text)").format(sql.Identifier(schema), sql.Identifier(table)))
    qualified = db.one("SELECT format('%%I.%%I', %s::text, %s::text)", [schema, table])
    with pytest.raises(errors.InvalidName, match=f"(?s)the {what} .* contains a control character"):
        db.execute("SELECT crm_bridge.attach(%s::regclass, 'customer', ARRAY['acct'])", [qualified])
    db.execute(sql.SQL("INSERT INTO {}.{} VALUES ('a')").format(sql.Identifier(schema), sql.Identifier(table)))
    assert tripwire() == 0
    assert events(db) == []


def test_column_names_with_control_characters_are_refused(db):
    db.execute('CREATE TABLE public.cols (acct text, "bad\ncol" text)')
    with pytest.raises(errors.InvalidName, match=r'column names with control characters .*"bad'):
        db.execute("SELECT crm_bridge.attach('public.cols', 'customer', ARRAY['acct'])")


def test_quotes_in_names_are_data_not_code(db):
    name = 'it\'s "quoted"'
    db.execute(sql.SQL('CREATE TABLE public.{} ("a""b" text, "x\'y" text, "c--" text)').format(sql.Identifier(name)))
    tbl = db.one("SELECT format('public.%%I', %s::text)", [name])
    db.execute("SELECT crm_bridge.attach(%s, 'case', ARRAY['a\"b', 'x''y'])", [tbl])
    db.execute("SELECT crm_bridge.capture_rows(%s)", [tbl])
    db.execute(f"""INSERT INTO {tbl} VALUES ('1', '2', '3')""")
    db.execute(f"""UPDATE {tbl} SET "c--" = '4'""")
    db.execute(f"""DELETE FROM {tbl}""")
    assert events(db) == [("case", "create", ["1", "2"]), ("case", "edit", ["1", "2"]),
                          ("case", "delete", ["1", "2"])]


def test_renaming_a_table_after_attach_cannot_inject_code(db, tripwire):
    db.execute("CREATE TABLE public.plain (acct text)")
    db.execute("SELECT crm_bridge.attach('public.plain', 'customer', ARRAY['acct'])")
    oid = db.one("SELECT 'public.plain'::regclass::oid")
    db.execute(sql.SQL("ALTER TABLE public.plain RENAME TO {}").format(sql.Identifier(EVIL_TABLE)))
    tbl = db.one("SELECT %s::oid::regclass::text", [oid])
    db.execute(f"INSERT INTO {tbl} VALUES ('a')")
    # Re-attaching (or switching capture_rows) under the new name is refused, not compiled.
    for call in ("SELECT crm_bridge.attach(%s::oid::regclass, 'customer', ARRAY['acct'])",
                 "SELECT crm_bridge.capture_rows(%s::oid::regclass)"):
        with pytest.raises(errors.InvalidName, match=r"(?s)the table name .* contains a control character"):
            db.execute(call, [oid])
    db.execute(f"INSERT INTO {tbl} VALUES ('b')")
    assert tripwire() == 0
    assert events(db) == [("customer", "create", ["a"]), ("customer", "create", ["b"])]


def test_generated_source_holds_no_name_of_the_table_or_schema(db):
    db.execute("CREATE SCHEMA zz_schema_name; CREATE TABLE zz_schema_name.zz_table_name (zz_id text)")
    db.execute("SELECT crm_bridge.attach('zz_schema_name.zz_table_name', 'customer', ARRAY['zz_id'])")
    src = db.one("SELECT prosrc FROM pg_proc "
                 "WHERE proname = crm_bridge.emit_rows_name_v1('zz_schema_name.zz_table_name')")
    assert "zz_schema_name" not in src and "zz_table_name" not in src
    assert "zz_id" in src  # the ID column, through %I / %L


# -- item 3: UPDATEs on any column type --------------------------------------------------------
def test_update_of_a_table_with_json_point_and_xml_columns_is_captured(db, roles):
    db.execute("CREATE TABLE crm.odd (acct text, j json, p point, x xml, b box)")
    db.execute(sql.SQL("GRANT ALL ON crm.odd TO {}").format(sql.Identifier(roles.app)))
    db.execute("SELECT crm_bridge.attach('crm.odd', 'customer', ARRAY['acct'])")
    with roles.connect(roles.app) as app:
        app.execute("""INSERT INTO crm.odd VALUES ('o1', '{"a": 1}', '(1,2)', NULL, '((0,0),(1,1))')""")
        app.execute("""UPDATE crm.odd SET j = '{"a": 2}'""")
        app.execute("UPDATE crm.odd SET p = '(3,4)'")
        app.execute("UPDATE crm.odd SET acct = acct")          # changes nothing: no event
    assert events(db) == [("customer", "create", ["o1"]), ("customer", "edit", ["o1"]),
                          ("customer", "edit", ["o1"])]


def test_update_works_after_a_column_without_equality_is_added(db, roles):
    db.execute("ALTER TABLE crm.customer ADD COLUMN extra json, ADD COLUMN where_ point")
    with roles.connect(roles.app) as app:
        app.execute("INSERT INTO crm.customer (account_id, name, extra) VALUES ('e1', 'x', '[1]')")
        app.execute("""UPDATE crm.customer SET extra = '[2]', where_ = '(1,1)'""")
        app.execute("UPDATE crm.customer SET name = name")
    assert db.all("SELECT event, changed FROM crm_bridge.event ORDER BY id") == [
        ("create", None), ("edit", ["extra", "where_"])]


def test_check_reports_an_edit_trigger_on_the_old_comparison(db):
    db.execute("DROP TRIGGER crm_bridge_emit_edit ON crm.task")
    db.execute("CREATE TRIGGER crm_bridge_emit_edit AFTER UPDATE ON crm.task FOR EACH ROW "
               "WHEN (OLD.* IS DISTINCT FROM NEW.*) "
               "EXECUTE FUNCTION crm_bridge.emit_v1('task', 'account_id', 'task_id')")
    proc = subprocess.run([sys.executable, "-m", "bridge.cli", "--dsn", db.dsn, "check"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert ("error  table crm.task (task): edit trigger crm_bridge_emit_edit compares rows with an equality "
            "operator that some column types lack (UPDATEs could fail): re-attach it with "
            "SELECT crm_bridge.attach('crm.task', 'task', ARRAY['account_id', 'task_id'])") in proc.stdout


def test_migration_0004_reattaches_tables_attached_before_it(empty_dsn):
    """Install 0001-0003 and the reference CRM (attached by the old attach()), then migrate."""
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        with conn.transaction():
            install_schema_up_to(conn, 3)
            conn.execute("ALTER TABLE crm.customer ADD COLUMN j json")
        migrate(conn)
        old = conn.execute("""SELECT a.table_name::text FROM crm_bridge.attachment a
                                JOIN pg_trigger t ON t.tgrelid = a.table_name AND t.tgname = 'crm_bridge_emit_edit'
                               WHERE pg_get_triggerdef(t.oid) !~ '[*]='""").fetchall()
        assert old == []
        assert conn.execute("SELECT count(*) FROM crm_bridge.attachment").fetchone() == (4,)
        conn.execute("""INSERT INTO crm.customer (account_id, name, j) VALUES ('m1', 'x', '{}')""")
        conn.execute("""UPDATE crm.customer SET j = '[]'""")
        assert conn.execute("SELECT event FROM crm_bridge.event ORDER BY id").fetchall() == [("create",), ("edit",)]


# -- item 4: partitioned tables ----------------------------------------------------------------
def test_partitioned_table_captures_statements_aimed_at_the_parent_or_any_partition(db, roles):
    db.execute("CREATE TABLE crm.ptask (account_id text, task_id text, title text, note json) "
               "PARTITION BY LIST (account_id)")
    db.execute("CREATE TABLE crm.ptask_a PARTITION OF crm.ptask FOR VALUES IN ('a')")
    db.execute("SELECT crm_bridge.attach('crm.ptask', 'task', ARRAY['account_id', 'task_id'])")
    db.execute("CREATE TABLE crm.ptask_b PARTITION OF crm.ptask FOR VALUES IN ('b')")   # after attach
    db.execute(sql.SQL("GRANT ALL ON crm.ptask, crm.ptask_a, crm.ptask_b TO {}").format(sql.Identifier(roles.app)))
    with roles.connect(roles.app) as app:
        app.execute("INSERT INTO crm.ptask VALUES ('a', '1', 'x'), ('b', '2', 'x')")
        app.execute("INSERT INTO crm.ptask_a VALUES ('a', '3', 'x')")
        app.execute("INSERT INTO crm.ptask_b VALUES ('b', '4', 'x')")
        app.execute("""UPDATE crm.ptask SET note = '{}' WHERE task_id = '1'""")
        app.execute("UPDATE crm.ptask_b SET title = 'y' WHERE task_id = '4'")
        app.execute("DELETE FROM crm.ptask_a WHERE task_id = '3'")
        app.execute("DELETE FROM crm.ptask_b WHERE task_id = '4'")
        app.execute("DELETE FROM crm.ptask WHERE task_id = '2'")
    assert sorted(events(db)) == sorted([
        ("task", "create", ["a", "1"]), ("task", "create", ["b", "2"]), ("task", "create", ["a", "3"]),
        ("task", "create", ["b", "4"]), ("task", "edit", ["a", "1"]), ("task", "edit", ["b", "4"]),
        ("task", "delete", ["a", "3"]), ("task", "delete", ["b", "4"]), ("task", "delete", ["b", "2"])])
    assert db.one("SELECT crm_bridge.detach('crm.ptask')") is True
    db.execute("INSERT INTO crm.ptask_a VALUES ('a', '5', 'x')")
    assert db.one("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'crm_bridge_emit_%%' "
                  "AND tgrelid IN ('crm.ptask_a'::regclass, 'crm.ptask_b'::regclass)") == 0


def test_a_partition_and_its_partitioned_table_are_not_both_attached(db):
    db.execute("CREATE TABLE public.pp (acct text) PARTITION BY LIST (acct)")
    db.execute("CREATE TABLE public.pp_x PARTITION OF public.pp FOR VALUES IN ('x')")
    db.execute("SELECT crm_bridge.attach('public.pp_x', 'customer', ARRAY['acct'])")
    with pytest.raises(errors.InvalidParameterValue,
                       match=r"attach either the partitioned table .* detach public\.pp_x"):
        db.execute("SELECT crm_bridge.attach('public.pp', 'customer', ARRAY['acct'])")
    # A partition attached on its own is captured whichever table the statement names.
    db.execute("INSERT INTO public.pp VALUES ('x')")
    db.execute("INSERT INTO public.pp_x VALUES ('x')")
    assert events(db) == [("customer", "create", ["x"]), ("customer", "create", ["x"])]


# -- item 7: bulk statements are chunked -------------------------------------------------------
@pytest.mark.slow
def test_a_250k_row_insert_with_capture_rows_commits_as_events_of_at_most_1000_records(db):
    n = 250_000
    db.execute("SELECT crm_bridge.capture_rows('crm.customer')")
    db.execute("INSERT INTO crm.customer (account_id, name) SELECT 'b' || g, 'n' || g FROM generate_series(1, %s) g",
               [n])
    counts = db.all("SELECT array_length(ids, 1), json_array_length(rows) FROM crm_bridge.event ORDER BY id")
    assert len(counts) == -(-n // 1000)
    assert all(ids == rows and ids <= 1000 for ids, rows in counts)
    assert sum(ids for ids, _ in counts) == n
    # ids and rows stay aligned record by record, and every record is there once.
    # (Each array and each JSON document is unnested once: indexing them per record re-reads a
    # 1000-record value per access, which made this check take minutes.)
    assert db.one("""SELECT count(*) FROM crm_bridge.event e,
                            LATERAL unnest(e.ids) WITH ORDINALITY AS i (id, k)
                            FULL JOIN LATERAL json_array_elements(e.rows) WITH ORDINALITY AS r (j, k) USING (k)
                      WHERE i.id IS DISTINCT FROM r.j -> 'new' ->> 'account_id'""") == 0
    assert db.one("SELECT count(DISTINCT i.id) FROM crm_bridge.event e, unnest(e.ids) i (id)") == n


def test_a_statement_of_2500_records_becomes_three_events_in_record_order(db):
    db.execute("INSERT INTO crm.customer (account_id, name) "
               "SELECT lpad(g::text, 5, '0'), 'n' FROM generate_series(1, 2500) g")
    rows = db.all("SELECT ids[1][1], ids[array_length(ids, 1)][1], array_length(ids, 1) "
                  "FROM crm_bridge.event ORDER BY id")
    assert rows == [("00001", "01000", 1000), ("01001", "02000", 1000), ("02001", "02500", 500)]
    db.execute("DELETE FROM crm.customer")
    assert db.all("SELECT event, array_length(ids, 1) FROM crm_bridge.event WHERE event = 'delete' ORDER BY id") == [
        ("delete", 1000), ("delete", 1000), ("delete", 500)]


# -- item 8 (database half): retry_schedule ranges ---------------------------------------------
RANGE = r"retry_schedule: every element must be an interval between 0 and 7 days "

@pytest.mark.parametrize(("schedule", "message"), [
    ("{100000000 years}", RANGE + r"\(got 100000000 years\)"),
    ("{1000000 years}", RANGE + r"\(got 1000000 years\)"),
    ("{1 second,8 days}", r"between 0 and 7 days \(got 8 days\)"),
    ("{-1 second}", r"between 0 and 7 days \(got -00:00:01\)"),
    ("{1 second,NULL}", r"between 0 and 7 days \(got NULL\)"),
    ("{}", r"retry_schedule has 0 elements: it must have 1 to 100"),
    ("{" + ",".join(["1 second"] * 101) + "}", r"retry_schedule has 101 elements: it must have 1 to 100"),
])
def test_absurd_retry_schedules_are_refused_naming_column_and_range(db, roles, schedule, message):
    with roles.connect(roles.admin) as admin:
        with pytest.raises(errors.CheckViolation, match=message):
            admin.execute("INSERT INTO crm_bridge.crm_trigger (object, event, url, retry_schedule) "
                          "VALUES ('customer', 'create', 'http://127.0.0.1:9/x', %s)", [schedule])
        tid = admin.execute("INSERT INTO crm_bridge.crm_trigger (object, event, url, retry_schedule) "
                            "VALUES ('customer', 'create', 'http://127.0.0.1:9/x', '{0,7 days}') "
                            "RETURNING id").fetchone()[0]
        with pytest.raises(errors.CheckViolation, match=message):
            admin.execute("UPDATE crm_bridge.crm_trigger SET retry_schedule = %s WHERE id = %s", [schedule, tid])


def test_a_sane_retry_schedule_is_accepted(db):
    db.add_url("customer", "create", "http://127.0.0.1:9/x", retry_schedule=["0 seconds", "30 seconds", "7 days"])
    assert isinstance(db.one("SELECT retry_schedule FROM crm_bridge.crm_trigger"), list)
