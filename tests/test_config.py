"""DBA configuration in plain SQL: the config table validates itself; migrate is idempotent."""

from __future__ import annotations

import subprocess
import sys

import psycopg
import pytest

from bridge.migrate import installed_version, latest_version, migrate
from bridge.sqlfiles import migrations


@pytest.mark.parametrize(("obj", "event", "url", "error", "message"), [
    ("cases", "create", "https://x.example/h", psycopg.errors.CheckViolation,
     'unknown CRM object "cases" (expected one of: case, customer, followup, task)'),
    ("followup", "edit", "https://x.example/h", psycopg.errors.CheckViolation,
     'event "edit" is not allowed for object "followup" (allowed: create, delete)'),
    ("case", "update", "https://x.example/h", psycopg.errors.CheckViolation,
     'event "update" is not allowed for object "case" (allowed: create, edit, delete)'),
    ("case", "create", "", psycopg.errors.CheckViolation, "url must not be empty"),
    ("case", "create", "   ", psycopg.errors.CheckViolation, "url must not be empty"),
    ("case", "create", "ftp://x.example/h", psycopg.errors.CheckViolation,
     'url "ftp://x.example/h" must start with http:// or https://'),
    ("case", "create", "x.example/h", psycopg.errors.CheckViolation, "must start with http:// or https://"),
    ("case", "create", "https:///nohost", psycopg.errors.CheckViolation, "has no valid host"),
    ("case", "create", "https://x.example/a b", psycopg.errors.CheckViolation, "white space"),
    ("case", "create", "https://x.example/h#frag", psycopg.errors.CheckViolation, "has a fragment"),
    ("case", "create", None, psycopg.errors.NotNullViolation, "object, event and url are required"),
])
def test_bad_config_rows_are_rejected_naming_the_problem(db, obj, event, url, error, message):
    with pytest.raises(error) as exc:
        db.execute("INSERT INTO crm_bridge.crm_trigger (object, event, url) VALUES (%s, %s, %s)",
                   [obj, event, url])
    assert message in str(exc.value)
    assert db.one("SELECT count(*) FROM crm_bridge.crm_trigger") == 0


def test_duplicate_url_for_same_object_event_is_rejected(db):
    first = db.add_url("case", "create", "https://x.example/h")
    with pytest.raises(psycopg.errors.UniqueViolation) as exc:
        db.add_url("case", "create", "https://x.example/h")
    assert f"duplicate URL for case/create: https://x.example/h is already configured (crm_trigger id {first})" \
        in str(exc.value)
    # The same URL for another event is fine.
    db.add_url("case", "edit", "https://x.example/h")


def test_updates_are_validated_too(db):
    tid = db.add_url("case", "create", "https://x.example/h")
    with pytest.raises(psycopg.errors.CheckViolation, match='event "edit" is not allowed for object "followup"'):
        db.execute("UPDATE crm_bridge.crm_trigger SET object = 'followup', event = 'edit' WHERE id = %s", [tid])


def test_valid_urls_are_accepted_and_trimmed(db):
    for url in ("http://127.0.0.1:8080/x", "https://[::1]:8443/hook?a=1", "https://user:pw@crm.example/h",
                "  https://padded.example/h  "):
        db.add_url("customer", "create", url)
    assert "https://padded.example/h" in [r[0] for r in db.all("SELECT url FROM crm_bridge.crm_trigger")]


def test_migrate_twice_is_a_noop_and_records_the_version(empty_dsn):
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert installed_version(conn) == 0
        assert migrate(conn, reference=True)[0] == "0001_core"
        assert installed_version(conn) == latest_version()
        assert migrate(conn) == []
        assert migrate(conn, reference=True) == ["reference CRM (schema crm)"]  # idempotent re-attach
        assert conn.execute("SELECT count(*) FROM crm_bridge.schema_version").fetchone()[0] == len(migrations())
        triggers = conn.execute("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'crm_bridge_emit%'").fetchone()[0]
        assert triggers == 11  # 4 tables x (create, delete) + 3 with edit (followup has none)


def test_migrate_command_from_the_console_script(empty_dsn):
    cmd = [sys.executable, "-m", "bridge.cli", "--dsn", empty_dsn, "migrate", "--reference-crm"]
    first = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "applied 0001_core" in first.stdout
    second = subprocess.run(cmd[:-1], capture_output=True, text=True, check=True)
    assert "up to date" in second.stdout


def test_migrate_against_unreachable_server_fails_with_a_clear_message():
    cmd = [sys.executable, "-m", "bridge.cli", "--dsn", "host=127.0.0.1 port=1 connect_timeout=2", "migrate"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 3
    assert "cannot connect to PostgreSQL" in proc.stderr
