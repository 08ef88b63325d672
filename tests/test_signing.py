"""Standard Webhooks signing, opt-in per URL, verified with the reference `standardwebhooks`
package exactly as a receiver would; secrets are never logged or stored in error texts."""

from __future__ import annotations

import base64
import json
import os

import psycopg
import pytest
from fixtures.factories import make_delivery
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from bridge.calls import sign
from bridge.devtools.receiver import Rule


def verify(secret: str, call, *, json_body: bool = False):
    return Webhook(secret).verify(call.body, call.headers, json_parse=json_body)


def test_signed_get_verifies_with_the_reference_library(db, receiver, daemon):
    tid = db.add_url("customer", "create", receiver.url("/signed"))
    secret = db.one("SELECT crm_bridge.set_signing_secret(%s)", [tid])
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-s', 'x')")
    [call] = receiver.wait_for(1)
    verify(secret, call)
    assert call.headers["webhook-id"] == db.one("SELECT id::text FROM crm_bridge.delivery")
    assert call.headers["webhook-signature"].startswith("v1,")


def test_signed_post_verifies_and_returns_the_json_document(db, receiver, daemon):
    tid = db.add_url("case", "create", receiver.url("/signed-post"), method="POST")
    secret = db.one("SELECT crm_bridge.set_signing_secret(%s)", [tid])
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-p', 'x')")
    db.execute("INSERT INTO crm.case (case_id, account_id, subject) VALUES ('case-p', 'acc-p', 'y')")
    [call] = receiver.wait_for(1, "/signed-post")
    doc = verify(secret, call, json_body=True)
    assert doc["ids"] == {"AccountID": "acc-p", "CaseID": "case-p"}


def test_a_signature_does_not_verify_with_another_secret_or_a_changed_body(db, receiver, daemon):
    tid = db.add_url("customer", "create", receiver.url("/signed"), method="POST")
    secret = db.one("SELECT crm_bridge.set_signing_secret(%s)", [tid])
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-t', 'x')")
    [call] = receiver.wait_for(1)
    other = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(call.body, call.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(call.body.replace(b"acc-t", b"acc-u"), call.headers)


def test_every_retry_is_signed_afresh_with_the_same_message_id(db, receiver, daemon):
    receiver.answer("/flaky", Rule(status=503, times=1))
    tid = db.add_url("customer", "create", receiver.url("/flaky"))
    secret = db.one("SELECT crm_bridge.set_signing_secret(%s)", [tid])
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-r', 'x')")
    receiver.wait_for(1)
    first, second = receiver.attempts
    for call in (first, second):
        verify(secret, call)
    assert first.headers["webhook-id"] == second.headers["webhook-id"]


def test_a_rotated_signing_secret_signs_the_very_next_call_and_clearing_it_stops_signing(db, receiver, daemon):
    # The daemon prepares a URL's signing key once (calls.plan_for); a new secret must not wait
    # for a restart or a cache expiry.
    tid = db.add_url("customer", "create", receiver.url("/rotated"))
    first = db.one("SELECT crm_bridge.set_signing_secret(%s)", [tid])
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-1', 'x')")
    verify(first, receiver.wait_for(1)[0])
    second = db.one("SELECT crm_bridge.set_signing_secret(%s)", [tid])
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-2', 'x')")
    call = receiver.wait_for(2)[1]
    verify(second, call)
    with pytest.raises(WebhookVerificationError):
        verify(first, call)
    db.one("SELECT crm_bridge.clear_signing_secret(%s)", [tid])
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-3', 'x')")
    call = receiver.wait_for(3)[2]
    assert "webhook-signature" not in call.headers and "webhook-timestamp" not in call.headers
    assert call.query == "AccountID=acc-3"


def test_unsigned_urls_carry_no_signature(db, receiver, daemon):
    db.add_url("customer", "create", receiver.url("/plain"))
    signed = db.add_url("customer", "create", receiver.url("/signed"))
    db.one("SELECT crm_bridge.set_signing_secret(%s)", [signed])
    assert db.one("SELECT crm_bridge.clear_signing_secret(%s)", [signed]) is True
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-u', 'x')")
    calls = receiver.wait_for(2)
    for call in calls:
        assert "webhook-signature" not in call.headers and "webhook-timestamp" not in call.headers


def test_a_given_secret_is_used_as_is(db, receiver, daemon):
    secret = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    tid = db.add_url("customer", "create", receiver.url("/given"))
    assert db.one("SELECT crm_bridge.set_signing_secret(%s, %s)", [tid, secret]) == secret
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-g', 'x')")
    verify(secret, receiver.wait_for(1)[0])


@pytest.mark.parametrize("bad", ["hunter2-not-a-secret", "whsec_short", "whsec_!!!!notbase64!!!!!!!!!!!!!!!!!!!!"])
def test_malformed_secrets_are_rejected_without_echoing_them(db, bad):
    tid = db.add_url("customer", "create", "http://127.0.0.1:9/x")
    with pytest.raises(psycopg.errors.InvalidParameterValue) as exc:
        db.execute("SELECT crm_bridge.set_signing_secret(%s, %s)", [tid, bad])
    assert "signing secret" in str(exc.value) and bad not in str(exc.value)


def test_every_configuration_change_of_a_url_makes_a_new_plan_and_an_unchanged_one_reuses_it():
    """Without a daemon: calls.plan_for keys its cache by URL id and checks the row's whole
    configuration, so each of these changes is in the very next call."""
    from datetime import UTC, datetime

    from bridge.calls import build_call, plan_for

    first, second = ("whsec_" + base64.b64encode(os.urandom(24)).decode() for _ in range(2))

    def delivery(**config):
        return make_delivery(**{"ids": ["acc 1"], "event_created_at": datetime(2026, 1, 2, tzinfo=UTC),
                                "trigger_id": 424242, "url": "https://crm.example/a", **config})

    def header(call, name: str) -> str | None:
        return dict(call.headers).get(name)

    assert build_call(delivery()).url == "https://crm.example/a?AccountID=acc%201"
    assert plan_for(delivery()) is plan_for(delivery())   # fresh but equal rows: one plan
    assert build_call(delivery(url="https://crm.example/b?x=1")).url == "https://crm.example/b?x=1&AccountID=acc%201"
    assert build_call(delivery(id_params=["CustomerID"])).url == "https://crm.example/a?CustomerID=acc%201"
    assert header(build_call(delivery(headers='{"X-A": "1"}')), "X-A") == "1"
    assert header(build_call(delivery(headers='{"X-A": "2"}')), "X-A") == "2"
    assert header(build_call(delivery()), "X-A") is None
    for secret in (first, second):
        call = build_call(delivery(signing_secret=secret))
        Webhook(secret).verify(call.body, dict(call.headers), json_parse=False)
        with pytest.raises(WebhookVerificationError):
            Webhook(second if secret == first else first).verify(call.body, dict(call.headers), json_parse=False)
    assert header(build_call(delivery()), "webhook-signature") is None
    post = build_call(delivery(method="POST"))
    assert (post.method, post.url, json.loads(post.body)["ids"]) == ("POST", "https://crm.example/a",
                                                                      {"AccountID": "acc 1"})
    with pytest.raises(ValueError, match="not valid base64"):
        build_call(delivery(signing_secret="whsec_!!!not base64!!!"))
    assert build_call(delivery()).method == "GET"          # a broken configuration does not stick


def test_sign_matches_the_reference_implementation():
    from datetime import UTC, datetime

    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = json.dumps({"a": "ü"}, ensure_ascii=False)
    expected = Webhook(secret).sign("msg_1", datetime.fromtimestamp(1_700_000_000, UTC), body)
    assert sign(secret, "msg_1", 1_700_000_000, body.encode()) == expected


def test_the_secret_never_reaches_logs_or_recorded_errors(db, receiver, daemon_factory):
    d = daemon_factory(env={"CRM_BRIDGE_LOG_LEVEL": "DEBUG"})
    tid = db.add_url("customer", "create", receiver.url("/echo"))
    secret = db.one("SELECT crm_bridge.set_signing_secret(%s)", [tid])
    key = secret.removeprefix("whsec_")
    # A receiver that echoes everything it was sent (and, for good measure, the secret) in its error body.
    receiver.answer("/echo", Rule(status=500, body=f"bad signature; expected key {secret} / {key}"))
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-l', 'x')")
    db.wait_until("SELECT status FROM crm_bridge.delivery", expect="dead")
    recorded = db.all("SELECT last_error FROM crm_bridge.delivery UNION ALL SELECT error FROM crm_bridge.attempt")
    assert len(recorded) == 4
    for (text,) in recorded:
        assert "HTTP 500" in text and key not in text
    d.stop()
    assert "delivery 1 (customer/create) is dead" in d.log
    assert key not in d.log


def test_signing_headers_are_not_forwarded_to_another_origin(db, receiver, daemon_factory):
    """Issue 10, item 13: a signed call redirected to another origin must not hand it a signature it
    could replay to the real receiver.  The event id headers stay (they authenticate nothing)."""
    from bridge.devtools.receiver import Receiver

    daemon_factory(env={"CRM_BRIDGE_REDIRECT_ALLOW_CIDRS": "127.0.0.0/8"})  # loopback: allowed for redirects
    with Receiver() as other:  # another port: another origin
        receiver.answer("/moved", Rule(status=307, headers={"Location": other.url("/elsewhere")}))
        receiver.answer("/hop", Rule(status=307, headers={"Location": "/landing"}))
        away_id = db.add_url("customer", "create", receiver.url("/moved"), follow_redirects=True, method="POST")
        home_id = db.add_url("customer", "create", receiver.url("/hop"), follow_redirects=True, method="POST")
        away_secret = db.one("SELECT crm_bridge.set_signing_secret(%s)", [away_id])
        home_secret = db.one("SELECT crm_bridge.set_signing_secret(%s)", [home_id])
        db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-r', 'x')")
        [away] = other.wait_for(1)
        [home] = receiver.wait_for(1, "/landing")
    [signed] = [c for c in receiver.attempts if c.path == "/moved"]
    verify(away_secret, signed)                                # the first hop was signed...
    lowered = {k.lower() for k in away.headers}
    assert not lowered & {"webhook-signature", "webhook-timestamp"}, away.headers   # ...the other origin gets none
    assert away.headers["webhook-id"] == away.headers["Idempotency-Key"] == signed.headers["webhook-id"]
    with pytest.raises(WebhookVerificationError):
        verify(away_secret, away)
    verify(home_secret, home)                                  # the same origin still gets a valid signature
