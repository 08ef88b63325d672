"""`crm-bridge check`: every problem named with what to do, and a non-zero exit.

Host names used here are loopback or under the reserved .invalid TLD: the check only resolves
them, it never connects.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bridge.migrate import latest_version


def check(dsn: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CRM_BRIDGE_")}
    return subprocess.run([sys.executable, "-m", "bridge.cli", "--dsn", dsn, "check", *args],
                          capture_output=True, text=True, timeout=60, env={**full_env, **(env or {})})


def lines(proc: subprocess.CompletedProcess[str], level: str) -> list[str]:
    return [line.split(None, 1)[1] for line in proc.stdout.splitlines() if line.startswith(level + " ")]


def test_a_healthy_installation_passes(db, receiver):
    db.add_url("customer", "create", receiver.url("/a"))
    db.add_url("case", "edit", receiver.url("/b").replace("127.0.0.1", "localhost"))
    proc = check(db.dsn)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert lines(proc, "error") == []
    ok = lines(proc, "ok")
    assert "settings are valid" in ok
    assert any(line.startswith("connected to PostgreSQL") for line in ok)
    assert f"schema crm_bridge is at version {latest_version()} (latest)" in ok
    assert "2 URLs configured, 2 enabled" in ok
    assert "2 hosts resolve to allowed addresses" in ok
    assert proc.stdout.rstrip().endswith("crm-bridge check: no problems found")


def test_each_problem_is_reported_with_a_fix_and_the_check_fails(db, receiver):
    db.add_url("case", "create", "https://crm-sync.nowhere.invalid/hook")
    metadata = db.add_url("customer", "create", "http://169.254.169.254/latest/meta-data")
    paused = db.add_url("customer", "delete", receiver.url("/p"), paused=True)
    db.add_url("customer", "edit", "https://off.nowhere.invalid/h", enabled=False)  # off: not resolved
    db.execute("SELECT crm_bridge.detach('crm.task')")
    db.add_url("task", "create", receiver.url("/t"))
    db.execute("ALTER TABLE crm.case DISABLE TRIGGER crm_bridge_emit_edit")
    db.execute("DROP TRIGGER crm_bridge_emit_create ON crm.followup")

    proc = check(db.dsn)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = lines(proc, "error")
    assert len(errors) == 5, errors
    assert any("host crm-sync.nowhere.invalid (URL #1) does not resolve" in e for e in errors)
    assert any(e.startswith(f"URL #{metadata}: address 169.254.169.254") and "denied by the address policy" in e
               for e in errors)
    assert ('object "task" has 1 enabled URL but no table is attached, so nothing will call them: '
            "SELECT crm_bridge.attach('schema.table', 'task', ARRAY['<AccountID column>', '<TaskID column>'])"
            ) in errors
    assert ('table crm."case" (case): capture trigger crm_bridge_emit_edit is disabled, so its changes are '
            'not captured: ALTER TABLE crm."case" ENABLE TRIGGER crm_bridge_emit_edit') in errors
    assert any(e.startswith("table crm.followup (followup): capture trigger crm_bridge_emit_create is missing")
               for e in errors)
    info = lines(proc, "info")
    assert any(i.startswith(f"URL #{paused} (customer/delete)") and i.endswith("is paused: deliveries queue "
               "but are not sent") for i in info)
    assert any("https://off.nowhere.invalid/h is disabled" in i for i in info)
    assert not any("off.nowhere.invalid" in e for e in errors)
    assert proc.stdout.rstrip().endswith("crm-bridge check: 5 problems found")


def test_credentials_in_urls_are_masked(db):
    db.add_url("customer", "create", "https://bob:hunter2@sync.nowhere.invalid/h?api_key=s3cret", paused=True)
    proc = check(db.dsn)
    assert "hunter2" not in proc.stdout + proc.stderr and "s3cret" not in proc.stdout + proc.stderr
    assert "https://bob:***@sync.nowhere.invalid/h?api_key=***" in proc.stdout


def test_no_urls_is_a_warning_not_a_failure(db):
    proc = check(db.dsn)
    assert proc.returncode == 0
    assert any(w.startswith("no URLs configured: nothing will be called") for w in lines(proc, "warn"))
    assert "no problems found (1 warning)" in proc.stdout


def test_misspelt_environment_variable_is_pointed_out(db):
    proc = check(db.dsn, env={"CRM_BRIDGE_CONCURENCY": "4"})
    assert ("environment variable CRM_BRIDGE_CONCURENCY is not a crm-bridge setting and is ignored "
            "(did you mean CRM_BRIDGE_CONCURRENCY?)") in lines(proc, "warn")


def test_database_without_crm_bridge_says_run_migrate(empty_dsn):
    proc = check(empty_dsn)
    assert proc.returncode == 1
    assert any(e.startswith("schema crm_bridge is not installed in database") and e.endswith(
        "run `crm-bridge migrate`") for e in lines(proc, "error"))


def test_unapplied_migration_is_named(db):
    db.execute("DROP VIEW crm_bridge.dead_letter, crm_bridge.summary, crm_bridge.url_status, "
               "crm_bridge.url_queue, crm_bridge.backlog")
    db.execute("DELETE FROM crm_bridge.schema_version WHERE version = 2")
    proc = check(db.dsn)
    assert proc.returncode == 1
    assert (f"schema crm_bridge is at version {latest_version()}; not applied: 0002_views: "
            "run `crm-bridge migrate`" in lines(proc, "error"))


@pytest.mark.parametrize(("env", "message"), [
    ({"CRM_BRIDGE_CONCURRENCY": "many"},
     "environment variable CRM_BRIDGE_CONCURRENCY: invalid value 'many' for concurrency (expected an integer)"),
    ({"CRM_BRIDGE_METRICS_ADDR": "localhost"}, "metrics_addr must be HOST:PORT, e.g. 127.0.0.1:9720"),
    ({"CRM_BRIDGE_CONFIG": "/nonexistent/crm-bridge.toml"}, "config file /nonexistent/crm-bridge.toml not found"),
])
def test_invalid_settings_exit_2_with_the_reason(db, env, message):
    proc = check(db.dsn, env=env)
    assert proc.returncode == 2
    assert proc.stderr.startswith("crm-bridge: invalid settings: ")
    assert message in proc.stderr


def test_unreachable_server_exits_3():
    proc = check("host=127.0.0.1 port=1 dbname=x connect_timeout=2")
    assert proc.returncode == 3
    assert "cannot connect to PostgreSQL" in proc.stderr
