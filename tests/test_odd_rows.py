"""Whatever a CRM writer or a careless admin puts into a claimed row (a captured row psycopg could
not decode, headers that are not an object, a date Python cannot hold), the daemon stays up, the
other deliveries of the batch go out, and the odd one is either delivered as is or becomes a dead
letter with a reason (outside review, finding 3)."""

from __future__ import annotations

import json

import anyio
import psycopg
import pytest
from fixtures.factories import make_delivery
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb

from bridge.calls import CallConfigError, build_call, compact_json
from bridge.daemon import Daemon
from bridge.models import Delivery
from bridge.settings import Settings

DEEP = 3000
BIG = "1" + "0" * 5000


def odd_table(db, roles) -> None:
    db.execute("CREATE TABLE crm.t_deep (id int PRIMARY KEY, doc jsonb, amount numeric, note json)")
    db.execute("SELECT crm_bridge.attach('crm.t_deep', 'customer', ARRAY['id'])")
    db.execute("SELECT crm_bridge.capture_rows('crm.t_deep')")
    db.execute(psycopg.sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON crm.t_deep TO {}")
               .format(psycopg.sql.Identifier(roles.app)))


def compact(pg_text: str) -> str:
    """PostgreSQL's json text without the blanks between tokens (json_build_object writes
    '"new" : {...}'); strings are left alone."""
    return compact_json(pg_text)


def row_part(db, account: str) -> str:
    """The captured row as PostgreSQL stores it, in the body's compact form, without its '{'."""
    pg_text = db.one("SELECT row::text FROM crm_bridge.delivery WHERE ids = ARRAY[%s]", [account])
    return compact(pg_text)[1:]


def test_rows_psycopg_cannot_decode_are_sent_verbatim_and_stop_nothing(db, roles, receiver, daemon_factory):
    odd_table(db, roles)
    db.add_url("customer", "create", receiver.url("/rows"), method="POST", include_row=True)
    daemon = daemon_factory(target_dsn=roles.dsn(roles.daemon))
    with roles.connect(roles.app) as app:  # the CRM's own role: no rights on crm_bridge
        app.execute(
            "INSERT INTO crm.t_deep (id, doc, amount) VALUES (1, '{\"a\": 1}', 12.50), "
            "(12, (repeat('[', %(deep)s) || repeat(']', %(deep)s))::jsonb, NULL), (21, '{}', %(big)s::numeric), "
            "(2, '[\"x\"]', 7)", {"deep": DEEP, "big": BIG})
    got = {json.loads(c.body[: c.body.index(b',"new":')] + b"}")["ids"]["AccountID"]: c.body.decode()
           for c in receiver.wait_for(4, "/rows", timeout=30)}
    assert sorted(got) == ["1", "12", "2", "21"]
    for account, body in got.items():
        assert body.endswith(',"new":' + row_part(db, account)[len('"new":'):]), account
    # Exactly what PostgreSQL produced: the nesting and every digit, and 12.50 keeps its scale.
    assert got["12"].endswith(',"new":{"id":12,"doc":' + "[" * DEEP + "]" * DEEP + ',"amount":null,"note":null}}')
    assert got["21"].endswith(',"new":{"id":21,"doc":{},"amount":' + BIG + ',"note":null}}')
    assert got["1"].endswith(',"new":{"id":1,"doc":{"a":1},"amount":12.50,"note":null}}')
    assert json.loads(got["2"])["new"] == {"id": 2, "doc": ["x"], "note": None, "amount": 7}
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'delivered'", expect=4)
    assert daemon.running


def test_a_json_column_with_a_nul_escape(db, roles, receiver, daemon_factory):
    """json (unlike jsonb) accepts "\\u0000"; whether the capture takes it is another change's
    business: when it does, the daemon sends it or dead-letters it, and stays up."""
    odd_table(db, roles)
    db.add_url("customer", "create", receiver.url("/rows"), method="POST", include_row=True)
    daemon = daemon_factory(target_dsn=roles.dsn(roles.daemon))
    with roles.connect(roles.app) as app:
        try:
            app.execute("INSERT INTO crm.t_deep (id, note) VALUES (3, '{\"s\": \"a\\u0000b\"}'), (4, '{}')")
        except psycopg.Error:
            pytest.skip("the capture refuses a json value holding \\u0000 on this branch")
    receiver.wait_for(1, "/rows", timeout=30)
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status IN ('delivered', 'dead')", expect=2)
    assert daemon.running


def test_headers_an_admin_wrote_past_validation_make_one_dead_letter(db, receiver, daemon):
    """crm_trigger.headers nested deeper than any parser recurses, or holding a number Python
    refuses: that URL's calls are dead letters saying why; the other URLs' calls go out."""
    db.add_url("customer", "create", receiver.url("/fine"), method="POST", headers=Jsonb({"X-Ok": "1"}))
    db.execute("ALTER TABLE crm_bridge.crm_trigger DISABLE TRIGGER USER")
    try:
        deep = db.add_url("customer", "create", receiver.url("/deep"), method="POST",
                          headers=Jsonb({"X-A": "1"}))
        big = db.add_url("customer", "create", receiver.url("/big"))
        db.execute("UPDATE crm_bridge.crm_trigger SET headers = "
                   "(repeat('[', %(deep)s) || repeat(']', %(deep)s))::jsonb WHERE id = %(id)s",
                   {"deep": DEEP, "id": deep})
        db.execute("UPDATE crm_bridge.crm_trigger SET headers = jsonb_build_object('X-N', %s::numeric) "
                   "WHERE id = %s", [BIG, big])
    finally:
        db.execute("ALTER TABLE crm_bridge.crm_trigger ENABLE TRIGGER USER")
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('h1', 'x'), ('h2', 'y')")
    receiver.wait_for(2, "/fine", timeout=30)
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'dead'", expect=4)
    reasons = {r for (r,) in db.all("SELECT last_error FROM crm_bridge.delivery WHERE status = 'dead'")}
    assert all(f"crm_trigger {deep}" in r or f"crm_trigger {big}" in r for r in reasons), reasons
    assert all("headers" in r for r in reasons), reasons
    assert not receiver.received("/deep") and not receiver.received("/big")
    assert daemon.running


def test_a_claimed_row_python_cannot_hold_is_a_dead_letter_not_a_stall(db, receiver, daemon):
    """An admin's UPDATE on a waiting delivery (a date after year 9999): that delivery becomes a
    dead letter saying why; the deliveries claimed with it are sent."""
    tid = db.add_url("customer", "create", receiver.url("/later"), paused=True)
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('d1', 'x'), ('d2', 'y'), ('d3', 'z')")
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'pending'", expect=3)
    db.execute("UPDATE crm_bridge.delivery SET event_created_at = 'infinity' WHERE ids = '{d2}'")
    db.execute("UPDATE crm_bridge.crm_trigger SET paused = false WHERE id = %s", [tid])
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'delivered'", expect=2, timeout=30)
    db.wait_until("SELECT status FROM crm_bridge.delivery WHERE ids = '{d2}'", expect="dead")
    reason = db.one("SELECT last_error FROM crm_bridge.delivery WHERE ids = '{d2}'")
    assert "event_created_at" in reason, reason
    assert daemon.running


# -- the body, without a daemon ---------------------------------------------------------------------
NO_NUL = st.characters(codec="utf-8", exclude_categories=["Cs"], exclude_characters="\x00")
values = st.recursive(st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.text(NO_NUL, max_size=40),
                      lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(NO_NUL, max_size=8),
                                                                                   inner, max_size=4),
                      max_leaves=20)


def delivery(row: object) -> Delivery:
    return make_delivery(method="POST", row=row)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(new=st.dictionaries(st.text(NO_NUL, max_size=10), values, max_size=6), old=st.none() | values)
def test_the_spliced_row_is_byte_for_byte_the_body_parsing_it_gave(db, new, old):
    """For every row Python could parse, the body is what json.loads + json.dumps made of it before."""
    pg_text = db.one("SELECT (CASE WHEN %(old)s::jsonb IS NULL THEN jsonb_build_object('new', %(new)s::jsonb) "
                     "ELSE jsonb_build_object('old', %(old)s::jsonb, 'new', %(new)s::jsonb) END)::text",
                     {"new": Jsonb(new), "old": None if old is None else Jsonb(old)})
    d = delivery(pg_text)
    before = json.dumps({"object": "customer", "event": "edit", "ids": {"AccountID": "a"},
                         "occurred_at": "2026-01-02T03:04:05.678901Z", "event_id": 7, **json.loads(pg_text)},
                        ensure_ascii=False, separators=(",", ":")).encode()
    assert build_call(d).body == before


def test_a_row_changed_by_hand_into_something_else_is_refused_with_a_reason():
    for row, why in (('[1, 2]', "not a JSON object"), ('"x"', "not a JSON object"),
                     ('{"new": {}, "event_id": 9}', "repeats the body's own member 'event_id'")):
        with pytest.raises(CallConfigError, match=why):
            build_call(delivery(row))
    for empty in ("{}", "null", None):
        assert json.loads(build_call(delivery(empty)).body)["event_id"] == 7
    # A nested member named like the envelope is the row's business.
    assert json.loads(build_call(delivery('{"new": {"event_id": 9}}')).body)["new"] == {"event_id": 9}


def test_an_unexpected_error_in_the_main_loop_is_logged_scrubbed_and_retried(caplog, monkeypatch):
    daemon = Daemon(Settings())
    calls: list[int] = []
    pauses: list[float] = []

    async def step(tg) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("odd data; dsn host=db password=hunter2-secret")
        daemon.stop()

    async def pause(seconds: float) -> None:
        pauses.append(seconds)

    monkeypatch.setattr(daemon, "_step", step)
    monkeypatch.setattr(daemon, "_sleep_or_stop", pause)
    anyio.run(daemon._main_loop, None)
    assert len(calls) == 2 and pauses == [2.0]  # backed off, then went on
    text = caplog.text
    assert "unexpected error in the main loop" in text and "RuntimeError" in text
    assert "hunter2" not in text


def test_cancellation_still_ends_the_main_loop(monkeypatch):
    daemon = Daemon(Settings())

    async def step(tg) -> None:
        raise anyio.get_cancelled_exc_class()()

    monkeypatch.setattr(daemon, "_step", step)
    with pytest.raises(BaseException) as caught:
        anyio.run(daemon._main_loop, None)
    assert not isinstance(caught.value, Exception)
