"""The core pipeline end to end: CRM write -> trigger -> outbox -> daemon -> HTTP call."""

from __future__ import annotations

import psycopg
import pytest

from bridge.devtools.receiver import Rule

# (object, event, SQL to run after the fixtures below exist, the exact query string expected)
SEED_CASES = [
    ("customer", "create", "INSERT INTO crm.customer (account_id, name) VALUES ('acc-new', 'New')",
     "AccountID=acc-new"),
    ("customer", "edit", "UPDATE crm.customer SET name = 'Renamed' WHERE account_id = 'acc-1'",
     "AccountID=acc-1"),
    ("customer", "delete", "DELETE FROM crm.customer WHERE account_id = 'acc-2'",
     "AccountID=acc-2"),
    ("case", "create",
     "INSERT INTO crm.case (case_id, account_id, subject) VALUES ('case-new', 'acc-1', 'Broken')",
     "AccountID=acc-1&CaseID=case-new"),
    ("case", "edit", "UPDATE crm.case SET status = 'pending' WHERE case_id = 'case-1'",
     "AccountID=acc-1&CaseID=case-1"),
    ("case", "delete", "DELETE FROM crm.case WHERE case_id = 'case-1'",
     "AccountID=acc-1&CaseID=case-1"),
    ("followup", "create",
     "INSERT INTO crm.followup (followup_id, case_id, account_id, author, body) "
     "VALUES ('fu-new', 'case-1', 'acc-1', 'agent', 'Called back')",
     "AccountID=acc-1&CaseID=case-1&FollowupID=fu-new"),
    ("followup", "delete", "DELETE FROM crm.followup WHERE followup_id = 'fu-1'",
     "AccountID=acc-1&CaseID=case-1&FollowupID=fu-1"),
    ("task", "create",
     "INSERT INTO crm.task (task_id, account_id, title) VALUES ('task-new', 'acc-1', 'Call back')",
     "AccountID=acc-1&TaskID=task-new"),
    ("task", "edit", "UPDATE crm.task SET done = true WHERE task_id = 'task-1'",
     "AccountID=acc-1&TaskID=task-1"),
    ("task", "delete", "DELETE FROM crm.task WHERE task_id = 'task-1'",
     "AccountID=acc-1&TaskID=task-1"),
]

FIXTURE_ROWS = [
    "INSERT INTO crm.customer (account_id, name) VALUES ('acc-1', 'Ann'), ('acc-2', 'Bob')",
    "INSERT INTO crm.case (case_id, account_id, subject) VALUES ('case-1', 'acc-1', 'Printer')",
    "INSERT INTO crm.followup (followup_id, case_id, account_id, author, body) "
    "VALUES ('fu-1', 'case-1', 'acc-1', 'agent', 'Asked for model')",
    "INSERT INTO crm.task (task_id, account_id, title) VALUES ('task-1', 'acc-1', 'Send form')",
]


def seed_rows(db) -> None:
    for q in FIXTURE_ROWS:
        db.execute(q)
    db.execute("DELETE FROM crm_bridge.event")  # the fixture rows' own events are not under test


@pytest.mark.parametrize(("obj", "event", "write", "query"), SEED_CASES,
                         ids=[f"{o}-{e}" for o, e, _, _ in SEED_CASES])
def test_each_object_event_calls_url_with_exact_seed_query(db, receiver, daemon, obj, event, write, query):
    seed_rows(db)
    db.add_url(obj, event, receiver.url(f"/{obj}/{event}"))
    db.execute(write)
    [call] = receiver.wait_for(1, f"/{obj}/{event}")
    assert call.method == "GET"
    assert call.target == f"/{obj}/{event}?{query}"
    db.wait_until("SELECT status FROM crm_bridge.delivery WHERE url LIKE '%%' || %s",
                  (f"/{obj}/{event}",), expect="delivered")


def test_all_eleven_pairs_in_one_run_each_call_once(db, receiver, daemon):
    seed_rows(db)
    for obj, event, _, _ in SEED_CASES:
        db.add_url(obj, event, receiver.url(f"/{obj}/{event}"))
    by_event = {"create": 0, "edit": 1, "delete": 2}
    for _, _, write, _ in sorted(SEED_CASES, key=lambda c: by_event[c[1]]):
        db.execute(write)
    # Deleting case-1 cascades to the follow-up created on it: a real deletion, reported as such.
    expected = [f"/{o}/{e}?{q}" for o, e, _, q in SEED_CASES]
    expected.append("/followup/delete?AccountID=acc-1&CaseID=case-1&FollowupID=fu-new")
    receiver.wait_for(len(expected))
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'delivered'", expect=len(expected))
    assert sorted(c.target for c in receiver.attempts) == sorted(expected)


def test_followup_edit_is_rejected_as_config_and_never_fires(db, receiver, daemon):
    with pytest.raises(psycopg.errors.CheckViolation,
                       match='event "edit" is not allowed for object "followup"'):
        db.add_url("followup", "edit", receiver.url("/fu-edit"))
    seed_rows(db)
    db.add_url("followup", "delete", receiver.url("/fu-delete"))
    db.execute("UPDATE crm.followup SET body = 'changed' WHERE followup_id = 'fu-1'")
    assert db.one("SELECT count(*) FROM crm_bridge.event") == 0  # no trigger for UPDATE at all
    db.execute("DELETE FROM crm.followup WHERE followup_id = 'fu-1'")
    receiver.wait_for(1, "/fu-delete")
    assert [c.path for c in receiver.attempts] == ["/fu-delete"]


def test_several_urls_for_one_event_are_all_called(db, receiver, daemon):
    for name in ("crm-a", "crm-b", "crm-c"):
        db.add_url("customer", "create", receiver.url(f"/{name}"))
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-9', 'Cy')")
    calls = receiver.wait_for(3)
    assert sorted(c.target for c in calls) == [f"/crm-{x}?AccountID=acc-9" for x in "abc"]


def test_url_with_a_query_string_gets_ampersand(db, receiver, daemon):
    seed_rows(db)
    db.add_url("task", "create", receiver.url("/sync?token=abc&src=crm"))
    db.add_url("task", "create", receiver.url("/bare?"))
    db.execute("INSERT INTO crm.task (task_id, account_id, title) VALUES ('t-7', 'acc-1', 'Ring')")
    calls = receiver.wait_for(2)
    assert sorted(c.target for c in calls) == [
        "/bare?AccountID=acc-1&TaskID=t-7",
        "/sync?token=abc&src=crm&AccountID=acc-1&TaskID=t-7",
    ]


def test_ids_are_percent_encoded(db, receiver, daemon):
    db.add_url("customer", "create", receiver.url("/c"))
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES (%s, 'Odd')", ["a b&c=d/é#?+%"])
    [call] = receiver.wait_for(1)
    assert call.target == "/c?AccountID=a%20b%26c%3Dd%2F%C3%A9%23%3F%2B%25"


def test_attach_on_table_with_other_column_names(db, receiver, daemon):
    db.execute("CREATE SCHEMA helpdesk")
    db.execute("CREATE TABLE helpdesk.tickets (acct_no int, ticket_no bigint, title text, "
               "PRIMARY KEY (acct_no, ticket_no))")
    db.execute("SELECT crm_bridge.attach('helpdesk.tickets', 'case', ARRAY['acct_no', 'ticket_no'])")
    db.add_url("case", "create", receiver.url("/t-create"))
    db.add_url("case", "edit", receiver.url("/t-edit"))
    db.add_url("case", "delete", receiver.url("/t-delete"))
    db.execute("INSERT INTO helpdesk.tickets VALUES (42, 7001, 'VPN down')")
    db.execute("UPDATE helpdesk.tickets SET title = 'VPN flaky' WHERE ticket_no = 7001")
    db.execute("DELETE FROM helpdesk.tickets WHERE ticket_no = 7001")
    calls = receiver.wait_for(3)
    assert sorted(c.target for c in calls) == [
        "/t-create?AccountID=42&CaseID=7001",
        "/t-delete?AccountID=42&CaseID=7001",
        "/t-edit?AccountID=42&CaseID=7001",
    ]
    assert db.one("SELECT crm_bridge.detach('helpdesk.tickets')") is True
    db.execute("INSERT INTO helpdesk.tickets VALUES (42, 7002, 'after detach')")
    assert db.one("SELECT count(*) FROM crm_bridge.event") == 0


@pytest.mark.parametrize(("args", "message"), [
    ("'helpdesk.t', 'cases', ARRAY['a', 'b']", 'unknown CRM object "cases" (expected one of: case, customer'),
    ("'helpdesk.t', 'case', ARRAY['a']", 'object "case" needs 2 ID columns, for AccountID, CaseID'),
    ("'helpdesk.t', 'case', ARRAY['a', 'nope']", 'table helpdesk.t has no column "nope"'),
])
def test_attach_rejects_bad_arguments_with_a_clear_message(db, args, message):
    db.execute("CREATE SCHEMA helpdesk")
    db.execute("CREATE TABLE helpdesk.t (a int, b int)")
    with pytest.raises(psycopg.Error) as exc:
        db.execute(f"SELECT crm_bridge.attach({args})")
    assert message in str(exc.value)


def test_events_written_while_daemon_is_down_are_delivered_at_start(db, receiver, daemon_factory):
    db.add_url("customer", "create", receiver.url("/backlog"))
    for i in range(50):
        db.execute("INSERT INTO crm.customer (account_id, name) VALUES (%s, 'x')", [f"acc-{i}"])
    assert db.one("SELECT count(*) FROM crm_bridge.event") == 50
    daemon_factory()
    calls = receiver.wait_for(50)
    assert sorted(c.query for c in calls) == sorted(f"AccountID=acc-{i}" for i in range(50))


def test_rolled_back_write_sends_nothing(db, receiver, daemon):
    db.add_url("customer", "create", receiver.url("/c"))
    with psycopg.connect(db.dsn) as conn:
        conn.execute("INSERT INTO crm.customer (account_id, name) VALUES ('ghost', 'x')")
        conn.rollback()
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('real', 'x')")
    receiver.wait_for(1)
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'delivered'", expect=1)
    assert [c.query for c in receiver.attempts] == ["AccountID=real"]


def test_config_changes_take_effect_without_restart(db, receiver, daemon):
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('before', 'x')")
    db.wait_until("SELECT status FROM crm_bridge.delivery", expect="unrouted")
    tid = db.add_url("customer", "edit", receiver.url("/live"))
    db.execute("UPDATE crm.customer SET name = 'y' WHERE account_id = 'before'")
    receiver.wait_for(1, "/live")
    db.execute("UPDATE crm_bridge.crm_trigger SET url = %s WHERE id = %s", [receiver.url("/moved"), tid])
    db.execute("UPDATE crm.customer SET name = 'z' WHERE account_id = 'before'")
    receiver.wait_for(1, "/moved")
    db.execute("UPDATE crm_bridge.crm_trigger SET enabled = false WHERE id = %s", [tid])
    db.execute("UPDATE crm.customer SET name = 'w' WHERE account_id = 'before'")
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'unrouted'", expect=2)
    assert [c.path for c in receiver.attempts] == ["/live", "/moved"]


def test_event_with_no_url_is_marked_unrouted_not_retried(db, receiver, daemon):
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('lonely', 'x')")
    db.wait_until("SELECT status FROM crm_bridge.delivery WHERE ids = ARRAY['lonely']", expect="unrouted")
    assert db.one("SELECT count(*) FROM crm_bridge.event") == 0
    assert db.one("SELECT finished_at IS NOT NULL FROM crm_bridge.delivery") is True


def test_noop_update_fires_nothing(db, receiver, daemon):
    db.add_url("customer", "edit", receiver.url("/edit"))
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('same', 'x')")
    db.execute("UPDATE crm.customer SET name = name WHERE account_id = 'same'")
    db.execute("UPDATE crm.customer SET name = 'changed' WHERE account_id = 'same'")
    receiver.wait_for(1, "/edit")
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'delivered'", expect=1)
    assert len(receiver.attempts) == 1


def test_forged_notify_sends_nothing(db, receiver, daemon):
    db.add_url("customer", "create", receiver.url("/c"))
    db.execute("""SELECT pg_notify('crm_bridge', '{"xid": 1}')""")
    db.execute("""SELECT pg_notify('crm_bridge',
                  '{"id":1,"object":"customer","event":"create","AccountID":"forged"}')""")
    db.execute("SELECT pg_notify('crm_bridge', 'garbage \x01 payload')")
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('genuine', 'x')")
    receiver.wait_for(1)
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'delivered'", expect=1)
    assert [c.query for c in receiver.attempts] == ["AccountID=genuine"]
    daemon.wait_log("ignoring malformed NOTIFY")


def test_receiver_500_is_retried_then_given_up(db, receiver, daemon):
    receiver.answer("/broken", Rule(status=500))
    db.add_url("customer", "create", receiver.url("/broken"))
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-500', 'x')")
    db.wait_until("SELECT status FROM crm_bridge.delivery", expect="dead")
    assert len(receiver.attempts) == 3  # FAST_ENV: max 3 attempts
    status, attempts, last_status, error = db.all(
        "SELECT status, attempts, last_status, last_error FROM crm_bridge.delivery")[0]
    assert (status, attempts, last_status) == ("dead", 3, 500)
    assert "gave up after 3 attempts" in error
    assert db.one("SELECT count(*) FROM crm_bridge.attempt") == 3


def test_receiver_recovering_after_failures_gets_the_call(db, receiver, daemon):
    receiver.answer("/flaky", Rule(status=503, times=2))
    db.add_url("customer", "create", receiver.url("/flaky"))
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-f', 'x')")
    receiver.wait_for(1, "/flaky")
    db.wait_until("SELECT status FROM crm_bridge.delivery", expect="delivered")
    assert len(receiver.attempts) == 3
    assert db.one("SELECT attempts FROM crm_bridge.delivery") == 3


def test_null_id_is_recorded_as_an_error_and_the_write_succeeds(db, receiver, daemon):
    db.execute("CREATE TABLE public.loose (acct text, n int)")
    db.execute("SELECT crm_bridge.attach('public.loose', 'customer', ARRAY['acct'])")
    db.add_url("customer", "create", receiver.url("/loose"))
    db.execute("INSERT INTO public.loose VALUES (NULL, 1)")
    db.wait_until("SELECT status FROM crm_bridge.delivery", expect="dead")
    assert "AccountID is NULL" in db.one("SELECT last_error FROM crm_bridge.delivery")
    assert receiver.attempts == []


def test_sigterm_stops_the_daemon_cleanly(daemon):
    assert daemon.stop() == 0
    assert "stopped:" in daemon.log


def test_bulk_statements_are_captured_once_and_fan_out_per_record(db, receiver, daemon):
    db.add_url("customer", "create", receiver.url("/bulk-create"))
    db.add_url("customer", "delete", receiver.url("/bulk-delete"))
    n = 3000
    db.execute("INSERT INTO crm.customer (account_id, name) SELECT 'b' || g, 'x' FROM generate_series(1, %s) g", [n])
    calls = receiver.wait_for(n, "/bulk-create", timeout=60)
    assert sorted(c.query for c in calls) == sorted(f"AccountID=b{i}" for i in range(1, n + 1))
    db.execute("DELETE FROM crm.customer WHERE account_id IN ('b1', 'b2', 'b3')")
    deleted = receiver.wait_for(3, "/bulk-delete")
    assert sorted(c.query for c in deleted) == ["AccountID=b1", "AccountID=b2", "AccountID=b3"]


def test_renamed_id_column_never_fails_the_write(db, receiver, daemon):
    db.execute("CREATE TABLE public.acct (acct text, note text)")
    db.execute("SELECT crm_bridge.attach('public.acct', 'customer', ARRAY['acct'])")
    db.add_url("customer", "create", receiver.url("/acct"))
    db.execute("ALTER TABLE public.acct RENAME COLUMN acct TO account")
    db.execute("INSERT INTO public.acct VALUES ('x1', 'still works')")  # must not raise
    db.wait_until("SELECT status FROM crm_bridge.delivery", expect="dead")
    assert "AccountID is NULL" in db.one("SELECT last_error FROM crm_bridge.delivery")


def test_generic_row_trigger_emit_v1_can_be_attached_by_hand(db, receiver, daemon):
    """crm_bridge.emit_v1 is the generic FOR EACH ROW function (object, then ID columns)."""
    db.execute("CREATE TABLE public.todo (acc text, tid text, title text)")
    db.execute("CREATE TRIGGER todo_capture AFTER INSERT OR UPDATE OR DELETE ON public.todo FOR EACH ROW "
               "EXECUTE FUNCTION crm_bridge.emit_v1('task', 'acc', 'tid')")
    for event in ("create", "edit", "delete"):
        db.add_url("task", event, receiver.url(f"/todo-{event}"))
    db.execute("INSERT INTO public.todo VALUES ('a1', 't1', 'first')")
    db.execute("UPDATE public.todo SET title = 'second'")
    db.execute("DELETE FROM public.todo")
    calls = receiver.wait_for(3)
    assert sorted(c.target for c in calls) == ["/todo-create?AccountID=a1&TaskID=t1",
                                               "/todo-delete?AccountID=a1&TaskID=t1",
                                               "/todo-edit?AccountID=a1&TaskID=t1"]
