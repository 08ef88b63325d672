"""`crm-bridge status` and the crm_bridge views it reads: same numbers, credentials masked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bridge.devtools.receiver import Rule
from bridge.migrate import latest_version


def cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge.cli", "--dsn", dsn, *args],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def busy_queue(db, receiver, daemon_factory):
    """One delivered, one dead (a token in its URL), one pending on a paused URL (user:password
    in its URL), one disabled URL, and three events left in the outbox after the daemon stopped."""
    receiver.answer("/bad", Rule(status=500))
    ids = {
        "ok": db.add_url("customer", "create", receiver.url("/ok")),
        "bad": db.add_url("customer", "create", receiver.url("/bad?token=s3cret")),
        "paused": db.add_url("case", "create", receiver.url("/paused").replace("http://", "http://bob:hunter2@"),
                             paused=True),
        "disabled": db.add_url("task", "edit", receiver.url("/off"), enabled=False),
    }
    daemon = daemon_factory()
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-1', 'Ann')")
    db.execute("INSERT INTO crm.case (case_id, account_id, subject) VALUES ('case-1', 'acc-1', 'x')")
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'dead'", expect=1)
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'delivered'", expect=1)
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'pending'", expect=1)
    assert daemon.stop() == 0
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-2', 'Bob')")
    db.execute("INSERT INTO crm.task (task_id, account_id, title) VALUES ('t-1', 'acc-1', 'a'), ('t-2', 'acc-1', 'b')")
    return ids


def test_status_json_reports_backlog_queue_and_last_outcomes_per_url(db, busy_queue):
    proc = cli(db.dsn, "status", "--json")
    assert proc.returncode == 1, proc.stderr        # a dead letter: attention needed
    assert "1 dead letter(s)" in proc.stderr
    assert "hunter2" not in proc.stdout and "s3cret" not in proc.stdout
    data = json.loads(proc.stdout)
    s = data["summary"]
    assert (s["backlog"], s["pending"], s["retrying"], s["in_flight"], s["dead"]) == (3, 1, 0, 0, 1)
    assert s["daemons"] == 0 and s["active_urls"] == 2
    # The paused URL's pending delivery is the operator's choice: the outbox is what is oldest.
    assert s["oldest_pending_age"] == pytest.approx(s["oldest_event_age"])
    assert [(b["object"], b["event"], b["events"]) for b in data["backlog"]] == [
        ("customer", "create", 1), ("task", "create", 2)]
    urls = {u["id"]: u for u in data["urls"]}
    ok, bad = urls[busy_queue["ok"]], urls[busy_queue["bad"]]
    paused, disabled = urls[busy_queue["paused"]], urls[busy_queue["disabled"]]
    assert (ok["state"], ok["dead"], ok["pending"]) == ("active", 0, 0)
    assert ok["last_success_at"] is not None and ok["last_failure_at"] is None
    assert bad["dead"] == 1 and bad["last_success_at"] is None
    assert bad["last_failure_status"] == 500 and bad["last_failure_at"] is not None
    assert bad["url"].endswith("/bad?token=***")
    assert paused["url"].startswith("http://bob:***@127.0.0.1:")
    assert (paused["state"], paused["pending"], paused["retrying"]) == ("paused", 1, 0)
    assert paused["oldest_pending_age"] > 0
    assert disabled["state"] == "disabled"


def test_status_numbers_are_the_views_numbers(db, busy_queue):
    data = json.loads(cli(db.dsn, "status", "--json").stdout)
    row = db.all("SELECT backlog, pending, retrying, in_flight, dead, daemons FROM crm_bridge.summary")[0]
    s = data["summary"]
    assert row == (s["backlog"], s["pending"], s["retrying"], s["in_flight"], s["dead"], s["daemons"])
    per_url = db.all("SELECT id, pending, retrying, in_flight, dead FROM crm_bridge.url_queue ORDER BY id")
    assert per_url == [(u["id"], u["pending"], u["retrying"], u["in_flight"], u["dead"]) for u in data["urls"]]
    [(ids, attempts, last_status)] = db.all(
        "SELECT ids, attempts, last_status FROM crm_bridge.dead_letter")
    assert (ids, attempts, last_status) == ("AccountID=acc-1", 3, 500)


def test_status_table_for_people(db, busy_queue):
    proc = cli(db.dsn, "status")
    assert proc.returncode == 1, proc.stderr        # a dead letter: attention needed
    out = proc.stdout
    assert "hunter2" not in out and "s3cret" not in out
    assert "outbox: 3 events waiting" in out
    assert "deliveries: 1 pending (0 retrying), 0 in flight, 1 dead" in out
    lines = out.splitlines()
    header = next(line for line in lines if "OBJECT/EVENT" in line)
    assert header.split() == ["ID", "OBJECT/EVENT", "STATE", "BREAKER", "PENDING", "RETRYING", "IN-FLIGHT", "DEAD",
                              "OLDEST", "LAST", "SUCCESS", "LAST", "FAILURE", "URL"]
    bad = next(line for line in lines if line.split()[:1] == [str(busy_queue["bad"])])
    assert "customer/create" in bad and "(HTTP 500)" in bad and "token=***" in bad
    paused = next(line for line in lines if line.split()[:1] == [str(busy_queue["paused"])])
    assert paused.split()[1:5] == ["case/create", "paused", "closed", "1"] and "bob:***@" in paused
    assert f"#{busy_queue['bad']} " in out.split("last failure per URL:")[1]


def test_status_on_a_database_without_crm_bridge_says_run_migrate(empty_dsn):
    proc = cli(empty_dsn, "status")
    assert proc.returncode == 2
    assert "crm_bridge is not installed in database" in proc.stderr
    assert "run `crm-bridge migrate`" in proc.stderr


def test_status_before_the_views_migration_says_run_migrate(db):
    db.execute("DROP VIEW crm_bridge.dead_letter, crm_bridge.summary, crm_bridge.url_status, "
               "crm_bridge.url_queue, crm_bridge.backlog")
    db.execute("DELETE FROM crm_bridge.schema_version WHERE version = 2")
    proc = cli(db.dsn, "status")
    assert proc.returncode == 2
    assert f"schema version {latest_version()} has no status views" in proc.stderr
    assert "crm-bridge migrate" in proc.stderr


def test_raw_text_from_the_database_is_printed_safely(db, busy_queue):
    """Issue 10, item 5: a DBA (or an old row) may have stored escape sequences; status and check must
    not pass them to the terminal."""
    for table, column in (("delivery", "last_error"), ("url_stat", "last_failure_error")):
        db.execute(f"UPDATE crm_bridge.{table} SET {column} = e'evil \\x1b[2J\\x1b]0;title\\x07 \\u009b31m end' "
                   f"WHERE {column} IS NOT NULL")
    with db.conn.transaction():
        db.execute("SET LOCAL session_replication_role = replica")   # validation off, as a superuser can
        db.execute("UPDATE crm_bridge.crm_trigger SET url = url || e'\\x1b[31m' WHERE id = %s", [busy_queue["paused"]])
    outputs = [cli(db.dsn, "status"), cli(db.dsn, "status", "--json"), cli(db.dsn, "check")]
    for proc in outputs:
        assert "\x1b" not in proc.stdout + proc.stderr and "\x9b" not in proc.stdout + proc.stderr, proc.stdout
    assert "evil \\x1b[2J\\x1b]0;title\\x07 \\x9b31m end" in outputs[0].stdout
    assert json.loads(outputs[1].stdout)["urls"][1]["last_failure_error"].startswith("evil \\x1b[2J")
    assert "\\x1b[31m" in outputs[0].stdout and "/paused\\x1b[31m is paused" in outputs[2].stdout


def test_replay_and_retry_now_print_database_text_safely(db, busy_queue):
    """Issue 10, item 5: the dry-run tables and the "why nothing matched" lines print error texts,
    record IDs and worker names from the database: none may carry an escape sequence."""
    db.execute("UPDATE crm_bridge.delivery SET last_error = e'evil \\x1b[2J end', ids = e'{\"acc\\x1b]0;t\\x07\"}' "
               "WHERE status IN ('dead', 'pending')")
    outputs = [cli(db.dsn, "replay", "--dry-run", "--all"), cli(db.dsn, "retry-now", "--dry-run", "--all"),
               cli(db.dsn, "replay", "--dry-run", "--url", str(busy_queue["paused"]))]
    for proc in outputs:
        assert "\x1b" not in proc.stdout + proc.stderr and "\x07" not in proc.stdout + proc.stderr, proc.stdout
    assert "\\x1b[2J" in outputs[0].stdout
