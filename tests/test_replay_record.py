"""Replay by record (issue 13, item 4): `crm-bridge replay --record AccountID=… --record CaseID=…`
and crm_bridge.replay_record, as the admin role, against the real daemon and a real receiver."""

from __future__ import annotations

import subprocess
import sys

import psycopg
import pytest

from bridge.devtools.receiver import Rule

C1 = ("--record", "AccountID=acc-1", "--record", "CaseID=c-1")
C1_SQL = '{"AccountID": "acc-1", "CaseID": "c-1"}'


def cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge.cli", "--dsn", dsn, *args], capture_output=True,
                          text=True, timeout=60)


def dead_of(db, case_id: str) -> list[int]:
    return [r[0] for r in db.all("SELECT id FROM crm_bridge.queue WHERE status = 'dead' AND ids[2] = %s ORDER BY id",
                                 [case_id])]


@pytest.fixture
def record_history(db, receiver, daemon_factory, roles):
    """As the daemon login: case c-1 created and edited three times, each call dead on the ordered
    URL /case (404); its create also delivered to /ok.  Case c-2: one dead call on /case."""
    receiver.answer("/case", Rule(status=404))
    case_create = db.add_url("case", "create", receiver.url("/case"), ordered=True)
    case_edit = db.add_url("case", "edit", receiver.url("/case"), ordered=True)
    ok = db.add_url("case", "create", receiver.url("/ok"))
    daemon_factory(target_dsn=roles.dsn(roles.daemon))
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-1', 'x')")
    db.execute("INSERT INTO crm.case (case_id, account_id, subject) VALUES ('c-1', 'acc-1', 'one')")
    db.wait_until("SELECT count(*) FROM crm_bridge.queue WHERE status = 'dead'", expect=1)
    for n, subject in enumerate(("two", "three", "four"), start=2):   # one at a time: no edit coalesces
        db.execute("UPDATE crm.case SET subject = %s WHERE case_id = 'c-1'", [subject])
        db.wait_until("SELECT count(*) FROM crm_bridge.queue WHERE status = 'dead'", expect=n)
    db.execute("INSERT INTO crm.case (case_id, account_id, subject) VALUES ('c-2', 'acc-1', 'other')")
    db.wait_until("SELECT count(*) FROM crm_bridge.queue WHERE status = 'dead'", expect=5)
    receiver.wait_for(2, "/ok")
    db.wait_until("SELECT count(*) FROM crm_bridge.history WHERE outcome = 'delivered'", expect=2)
    return {"case_create": case_create, "case_edit": case_edit, "ok": ok}


def test_replay_record_dry_run_lists_the_dead_calls_in_order_and_changes_nothing(db, roles, record_history):
    dead = dead_of(db, "c-1")
    assert len(dead) == 4
    dry = cli(roles.dsn(roles.admin), "replay", *C1, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert lines[0].split() == ["CALL", "OBJECT/EVENT", "WAS", "AT", "URL"]
    listed = [int(line.split()[0]) for line in lines[1:5]]
    assert listed == dead                                  # call order
    assert [line.split()[1] for line in lines[1:5]] == ["case/create", "case/edit", "case/edit", "case/edit"]
    assert all(line.rstrip().endswith("dry run") for line in lines[1:5])
    assert lines[-1] == "4 call(s) of case AccountID=acc-1&CaseID=c-1 would be queued again, in call order (4 dead)"
    assert dead_of(db, "c-1") == dead and len(dead_of(db, "c-2")) == 1


def test_replay_record_sends_the_dead_calls_of_one_record_in_order(db, roles, receiver, record_history):
    dead = dead_of(db, "c-1")
    receiver.answer("/case", Rule(status=200))             # the receiver is fixed
    done = cli(roles.dsn(roles.admin), "replay", *C1)
    assert done.returncode == 0, done.stderr
    assert "queued 4 call(s) of case AccountID=acc-1&CaseID=c-1 again, in call order (4 dead)" in done.stdout
    calls = receiver.wait_for(4, "/case", timeout=30)
    assert [c.query for c in calls] == ["AccountID=acc-1&CaseID=c-1"] * 4
    # webhook-id is the call id: the original calls, and the ordered URL's edits (one crm_trigger
    # row) arrived one at a time in commit order
    got = [int(c.headers["webhook-id"]) for c in calls]
    assert sorted(got) == dead
    assert [i for i in got if i != dead[0]] == dead[1:]
    db.wait_until("SELECT count(*) FROM crm_bridge.queue WHERE ids[2] = 'c-1'", expect=0)
    assert len(dead_of(db, "c-2")) == 1                    # another record: untouched


def test_replay_record_delivered_sends_again_what_the_record_was_delivered(db, roles, receiver, record_history):
    ok = record_history["ok"]
    first = receiver.received("/ok")
    c1_first = [c for c in first if c.query.endswith("CaseID=c-1")]
    assert len(c1_first) == 1
    dry = cli(roles.dsn(roles.admin), "replay", *C1, "--delivered", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[-1] == ("5 call(s) of case AccountID=acc-1&CaseID=c-1 would be queued again, "
                                          "in call order (4 dead, 1 delivered)")
    listed = [int(line.split()[0]) for line in dry.stdout.splitlines()[1:6]]
    assert listed == sorted(listed)
    only_ok = cli(roles.dsn(roles.admin), "replay", *C1, "--delivered", "--url", str(ok))
    assert only_ok.returncode == 0, only_ok.stderr
    assert f"queued 1 call(s) of case AccountID=acc-1&CaseID=c-1 to URL #{ok} again" in only_ok.stdout
    again = receiver.wait_for(3, "/ok", timeout=30)[2]
    assert again.query == "AccountID=acc-1&CaseID=c-1"
    assert again.headers.get("webhook-id") == c1_first[0].headers.get("webhook-id")   # the original call's
    assert len(dead_of(db, "c-1")) == 4                    # --url: only that URL's calls


def test_replay_record_in_sql_as_the_admin_only(db, roles, record_history):
    dead = dead_of(db, "c-1")
    with roles.connect(roles.admin) as admin:
        rows = admin.execute("SELECT call_id, was, queued, note FROM crm_bridge.replay_record(%s, p_dry_run => true)",
                             [C1_SQL]).fetchall()
        assert rows == [(i, "dead", False, "dry run") for i in dead]
        rows = admin.execute("SELECT call_id, was, queued FROM crm_bridge.replay_record(%s, p_delivered => true)",
                             [C1_SQL]).fetchall()
        assert [r[1] for r in rows].count("delivered") == 1 and all(r[2] for r in rows)
        assert [r[0] for r in rows] == sorted(r[0] for r in rows)
    for login in (roles.monitor, roles.daemon, roles.app):
        with roles.connect(login) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM crm_bridge.replay_record(%s, p_dry_run => true)", [C1_SQL])


@pytest.mark.parametrize(("args", "message"), [
    (["--record", "AccountID=acc-1", "--record", "CaseId=c-1"],
     'unknown ID parameter "CaseId" (known: AccountID, CaseID, FollowupID, TaskID) (did you mean CaseID?'),
    (["--record", "CaseID=c-1"], "no CRM object is named by exactly CaseID (the ID parameters of each: "
                                 "case: AccountID, CaseID; customer: AccountID;"),
    (["--record", "CaseID=c-1", "--object", "case"], "a case is named by AccountID, CaseID; got CaseID (missing: "
                                                     "AccountID)"),
    (["--record", "AccountID=a", "--record", "AccountID=b"], "AccountID is given twice"),
    (["--record", "AccountID"], "invalid record ID 'AccountID' (expected NAME=ID"),
    ([*C1, "--since", "2026-01-01"], "only --object, --url, --delivered and --dry-run apply"),
    ([*C1, "--url", "77"], "no configured URL with id 77"),
])
def test_replay_record_refuses_bad_input_with_a_clear_message(db, roles, args, message):
    r = cli(roles.dsn(roles.admin), "replay", *args)
    assert r.returncode == 2 and message in r.stderr, (r.stdout, r.stderr)


def test_replay_record_without_matches_says_so(db, roles):
    r = cli(roles.dsn(roles.admin), "replay", "--record", "AccountID=nobody")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("no dead letters of the record AccountID=nobody (--delivered: also")
