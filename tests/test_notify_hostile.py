"""NOTIFY payloads are hints from anyone: garbage, oversized and spoofed payloads send nothing
that is not backed by a row in crm_bridge.event."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from bridge.listen import valid_payload

SPOOFS = [
    "garbage \x01\x02 payload",
    "x" * 7999,                                                   # just under PostgreSQL's 8000-byte limit
    json.dumps({"id": 1, "object": "customer", "event": "create", "AccountID": "spoofed"}),
    json.dumps({"xid": 1, "AccountID": "spoofed"}),
    json.dumps({"xid": "1"}),
    json.dumps({"xid": 1.5}),
    json.dumps({"xid": 2 ** 70, "pad": "y" * 7900}),
    json.dumps([{"xid": 1}]),
    "{\"xid\": 1",
    json.dumps({"xid": 1}),                                       # well formed, but no event behind it
    "",
]


def test_spoofed_garbage_and_oversized_notifies_send_nothing(db, roles, receiver, daemon):
    db.add_url("customer", "create", receiver.url("/c"))
    # The CRM application role has no rights on crm_bridge, but anyone may NOTIFY any channel.
    with roles.connect(roles.app) as app:
        for payload in SPOOFS:
            app.execute("SELECT pg_notify('crm_bridge', %s)", [payload])
        for _ in range(200):                                       # a flood of well-formed wake-ups
            app.execute("""SELECT pg_notify('crm_bridge', '{"xid": 42}')""")
        # NOTIFYs are delivered in commit order: once the genuine event's call arrived, every
        # spoof before it has been seen and ignored.
        app.execute("INSERT INTO crm.customer (account_id, name) VALUES ('genuine', 'x')")
    receiver.wait_for(1)
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'delivered'", expect=1)
    assert [c.query for c in receiver.attempts] == ["AccountID=genuine"]
    assert db.one("SELECT count(*) FROM crm_bridge.delivery") == 1
    daemon.wait_log("ignoring malformed NOTIFY")
    assert daemon.running


def test_a_daemon_woken_by_spoofs_alone_creates_no_delivery(db, receiver, daemon):
    db.add_url("customer", "create", receiver.url("/c"))
    for payload in SPOOFS:
        db.execute("SELECT pg_notify('crm_bridge', %s)", [payload])
    daemon.wait_log("ignoring malformed NOTIFY")
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('only', 'x')")
    receiver.wait_for(1)
    assert db.one("SELECT count(*) FROM crm_bridge.delivery") == 1
    assert len(receiver.attempts) == 1


@given(st.one_of(
    st.text(max_size=300),
    st.dictionaries(st.text(max_size=10), st.one_of(st.integers(), st.text(), st.none(), st.floats()),
                    max_size=4).map(json.dumps),
))
def test_only_the_exact_wake_up_shape_is_accepted(payload):
    if valid_payload(payload):
        data = json.loads(payload)
        assert isinstance(data, dict) and list(data) == ["xid"] and type(data["xid"]) is int
