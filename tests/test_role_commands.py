"""Each CLI command and the daemon's status/metrics, run as the login that would really run it
(issue 10.10, 14.5): admin replays/purges/retries, monitor and admin read `status`, the daemon
reads the status views for its STATUS= line and gauges."""

from __future__ import annotations

import json
import subprocess
import sys

import psycopg
import pytest
from psycopg import errors
from test_metrics import FAST_STATUS, metrics_url, scrape_until

from bridge.devtools.receiver import Rule


def cli(dsn: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    # --dsn after the command on purpose: global options are accepted anywhere.
    return subprocess.run([sys.executable, "-m", "bridge.cli", *args, "--dsn", dsn],
                          capture_output=True, text=True, timeout=60, input=stdin)


@pytest.fixture
def dead_and_pending(db, receiver, daemon_factory, roles):
    """As the daemon login: 2 dead letters on /dead, one delivery pending for an hour on /later."""
    receiver.answer("/dead", Rule(status=404))
    receiver.answer("/later", Rule(status=503, times=1))
    dead = db.add_url("customer", "create", receiver.url("/dead"))
    later = db.add_url("case", "create", receiver.url("/later"), retry_schedule=["1 hour"])
    d = daemon_factory(target_dsn=roles.dsn(roles.daemon))
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('a1', 'x'), ('a2', 'y')")
    db.execute("INSERT INTO crm.case (case_id, account_id, subject) VALUES ('c1', 'a1', 's')")
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'dead'", expect=2)
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'pending' AND attempts = 1", expect=1)
    return {"dead": dead, "later": later, "daemon": d}


def test_status_as_the_monitor_and_the_admin_login_exits_1_on_dead_letters(db, roles, dead_and_pending):
    for login in (roles.monitor, roles.admin):
        proc = cli(roles.dsn(login), "status", "--json")
        assert proc.returncode == 1, proc.stderr
        assert json.loads(proc.stdout)["summary"]["dead"] == 2
        assert "2 dead letter(s)" in proc.stderr
    text = cli(roles.dsn(roles.monitor), "status")
    assert text.returncode == 1 and "deliveries: 1 pending (1 retrying)" in text.stdout


def test_status_exit_codes(db, roles, receiver, daemon_factory, empty_dsn):
    db.add_url("customer", "create", receiver.url("/ok"))
    assert cli(roles.dsn(roles.monitor), "status").returncode == 0          # nothing waiting
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('a1', 'x')")
    db.execute("UPDATE crm_bridge.event SET created_at = now() - interval '1 hour'")
    stale = cli(roles.dsn(roles.monitor), "status", "--max-age", "600")
    assert stale.returncode == 1 and "oldest undelivered change is" in stale.stderr
    assert "no daemon is connected" in stale.stderr
    assert cli(roles.dsn(roles.monitor), "status", "--max-age", "7200").returncode == 0
    assert cli(empty_dsn, "status").returncode == 2                           # not installed
    down = cli("host=127.0.0.1 port=1 dbname=x user=y connect_timeout=2", "status")
    assert down.returncode == 2 and "cannot connect" in down.stderr
    denied = cli(roles.dsn(roles.app), "status")                              # no crm-bridge role
    assert denied.returncode == 2 and "crm_bridge_monitor" in denied.stderr


def test_replay_and_purge_as_the_admin_login(db, roles, receiver, dead_and_pending):
    admin = roles.dsn(roles.admin)
    dry = cli(admin, "replay", "--url", str(dead_and_pending["dead"]), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "2 dead letter(s) would be replayed" in dry.stdout
    assert "AccountID=a1" in dry.stdout and "['" not in dry.stdout          # a table, not Python lists
    assert db.one("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'dead'") == 2
    receiver.answer("/dead", Rule(status=200))
    done = cli(admin, "replay", "--url", receiver.url("/dead"), "--id",
               str(db.one("SELECT min(id) FROM crm_bridge.delivery WHERE status = 'dead'")))
    assert done.returncode == 0 and "replayed 1 dead letter(s)" in done.stdout, done
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'delivered'", expect=1)
    purged = cli(admin, "purge", "--url", str(dead_and_pending["dead"]))
    assert purged.returncode == 0 and "purged 1 dead letter(s)" in purged.stdout, purged
    assert db.one("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'dead'") == 0



def test_retry_now_dry_run_lists_the_pending_call_as_the_admin_login(db, roles, dead_and_pending):
    dry = cli(roles.dsn(roles.admin), "retry-now", "--url", str(dead_and_pending["later"]), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "1 pending deliveries would be made due now:" in dry.stdout
    assert "DUE" in dry.stdout and "AccountID=a1&CaseID=c1" in dry.stdout and "HTTP 503" in dry.stdout
    assert "AccountID=a2" not in dry.stdout                                 # dead letters are not listed

def test_replay_without_a_filter_needs_all(db, roles, dead_and_pending):
    admin = roles.dsn(roles.admin)
    refused = cli(admin, "replay", stdin="y\n")          # stdin is not a terminal: no question, no replay
    assert refused.returncode == 2 and "--all" in refused.stderr
    assert db.one("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'dead'") == 2
    refused = cli(admin, "purge")
    assert refused.returncode == 2 and db.one("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'dead'") == 2
    assert cli(admin, "replay", "--dry-run").returncode == 0
    done = cli(admin, "replay", "--all")
    assert done.returncode == 0 and "replayed 2 dead letter(s)" in done.stdout


def test_replay_that_matches_nothing_says_why(db, roles, dead_and_pending):
    admin = roles.dsn(roles.admin)
    later = db.one("SELECT id FROM crm_bridge.delivery WHERE status = 'pending'")
    proc = cli(admin, "replay", "--url", str(dead_and_pending["later"]))
    assert proc.returncode == 0 and "no dead letter(s) match" in proc.stdout
    assert f"delivery {later} (case/create AccountID=a1&CaseID=c1) is pending until " in proc.stdout
    assert "not dead" in proc.stdout and "HTTP 503" in proc.stdout
    typo = cli(admin, "replay", "--url", "http://127.0.0.1:1/nope?token=s3cret")
    assert "no configured URL is exactly http://127.0.0.1:1/nope?token=***" in typo.stdout
    assert f"#{dead_and_pending['dead']} customer/create" in typo.stdout and "s3cret" not in typo.stdout
    missing = cli(admin, "replay", "--url", "999999")
    assert "there is no configured URL with id 999999" in missing.stdout
    dead_id = db.one("SELECT min(id) FROM crm_bridge.delivery WHERE status = 'dead'")
    wrong = cli(admin, "retry-now", "--id", str(dead_id))
    assert f"delivery {dead_id} " in wrong.stdout and "is dead, not pending: use `crm-bridge replay`" in wrong.stdout


def test_retry_now_as_the_admin_login_sends_a_queued_retry_at_once(db, roles, receiver, dead_and_pending):
    admin = roles.dsn(roles.admin)
    assert cli(admin, "retry-now").returncode == 2                  # no filter: --all required
    dry = cli(admin, "retry-now", "--url", str(dead_and_pending["later"]), "--dry-run")
    assert dry.returncode == 0 and "1 pending deliveries would be made due now" in dry.stdout, dry
    proc = cli(admin, "retry-now", "--url", str(dead_and_pending["later"]), "--record", "a1,c1")
    assert proc.returncode == 0 and "made due now 1 pending deliveries" in proc.stdout, proc
    receiver.wait_for(1, "/later")
    db.wait_until("SELECT status FROM crm_bridge.delivery WHERE trigger_id = %s", [dead_and_pending["later"]],
                  expect="delivered")
    with roles.connect(roles.monitor) as mon, pytest.raises(errors.InsufficientPrivilege):
        mon.execute("SELECT crm_bridge.retry_now()")


def test_daemon_login_reads_the_status_views_for_its_gauges(db, roles, receiver, daemon_factory):
    receiver.answer("/bad", Rule(status=404))
    bad = db.add_url("customer", "create", receiver.url("/bad"))
    d = daemon_factory("--metrics-addr", "127.0.0.1:0", env=FAST_STATUS, target_dsn=roles.dsn(roles.daemon))
    url = metrics_url(d)
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('a1', 'x')")
    samples = scrape_until(url, lambda s: s.get(("crm_bridge_dead_letters", ()), 0) == 1
                           and s.get(("crm_bridge_url_dead_letters", (("trigger_id", str(bad)),)), 0) == 1)
    assert samples[("crm_bridge_daemons", ())] == 1
    assert "permission denied" not in d.log and "status views" not in d.log


def test_monitor_reads_views_only(db, roles):
    tid = db.add_url("customer", "create", "http://127.0.0.1:9/h", headers=psycopg.types.json.Jsonb({"X-Key": "k"}))
    db.execute("SELECT crm_bridge.set_signing_secret(%s)", [tid])
    with roles.connect(roles.monitor) as mon:
        for view in ("summary", "backlog", "url_queue", "url_status", "dead_letter"):
            mon.execute(f"SELECT * FROM crm_bridge.{view}").fetchall()
        for query in ("SELECT * FROM crm_bridge.crm_trigger", "SELECT headers FROM crm_bridge.crm_trigger",
                      "SELECT * FROM crm_bridge.signing_secret", "SELECT * FROM crm_bridge.delivery",
                      "SELECT crm_bridge.replay()", "SELECT crm_bridge.signed_urls()",
                      "UPDATE crm_bridge.crm_trigger SET paused = true"):
            with pytest.raises(errors.InsufficientPrivilege):
                mon.execute(query)


def test_apply_grants_gives_the_daemon_every_daemon_function_and_nothing_else(db, roles):
    db.execute("CREATE FUNCTION crm_bridge.daemon_probe(integer) RETURNS integer LANGUAGE sql AS 'SELECT $1'")
    db.execute("CREATE FUNCTION crm_bridge.not_daemon_probe() RETURNS integer LANGUAGE sql AS 'SELECT 1'")
    db.execute("SELECT crm_bridge.apply_grants(%s, %s, %s)", [roles.admin_group, roles.daemon_group,
                                                             roles.monitor_group])
    def can(role: str, fn: str) -> bool:
        return db.one("SELECT has_function_privilege(%s, %s, 'EXECUTE')", [role, fn])
    assert can(roles.daemon, "crm_bridge.daemon_probe(integer)")
    assert not can(roles.admin, "crm_bridge.daemon_probe(integer)")
    assert not can(roles.monitor, "crm_bridge.daemon_probe(integer)")
    assert not can(roles.daemon, "crm_bridge.not_daemon_probe()")
    assert not can("public", "crm_bridge.daemon_probe(integer)")
    # Re-applying takes away what was granted by hand beyond the design.
    db.execute(psycopg.sql.SQL("GRANT SELECT ON crm_bridge.signing_secret TO {}").format(
        psycopg.sql.Identifier(roles.monitor_group)))
    db.execute("SELECT crm_bridge.apply_grants(%s, %s, %s)", [roles.admin_group, roles.daemon_group,
                                                             roles.monitor_group])
    assert db.one("SELECT has_table_privilege(%s, 'crm_bridge.signing_secret', 'SELECT')", [roles.monitor]) is False
