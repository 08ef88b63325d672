"""Credentials in URLs and header values never reach logs or recorded errors."""

from __future__ import annotations

import socket

from hypothesis import given
from hypothesis import strategies as st
from psycopg.types.json import Jsonb

from bridge.receiver import Rule
from bridge.redact import redact_url, scrub

PW, TOKEN, HEADER, BASIC = "pw-S3cret-99", "tok-S3cret-77", "hdr-S3cret-55", "bearer-S3cret-33"
SECRETS = (PW, TOKEN, HEADER, BASIC)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_secrets_never_reach_recorded_errors_or_the_log(db, receiver, daemon_factory):
    d = daemon_factory(env={"CRM_BRIDGE_LOG_LEVEL": "DEBUG"})
    headers = Jsonb({"X-Api-Key": HEADER})
    bearer = Jsonb({"X-Api-Key": HEADER, "Authorization": f"Bearer {BASIC}"})
    # A receiver that echoes the credentials it was sent into its error answer...
    receiver.answer("/echo", Rule(status=500, body=f"denied for user:{PW} token={TOKEN} key={HEADER} "
                                                   f"auth=Bearer {BASIC}"))
    db.add_url("customer", "create", receiver.url("/echo").replace("http://", f"http://user:{PW}@")
               + f"?token={TOKEN}", headers=headers)
    # ...a refused connection, whose error names the URL...
    db.add_url("customer", "create", f"http://user:{PW}@127.0.0.1:{closed_port()}/down?token={TOKEN}",
               headers=headers)
    # ...and a redirect pointing at a URL with credentials.
    receiver.answer("/moved", Rule(status=302, headers={"Location": f"http://user:{PW}@127.0.0.1:1/x?token={TOKEN}"}))
    db.add_url("customer", "create", receiver.url("/moved"), headers=bearer)
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-1', 'x')")
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'dead'", expect=3)
    texts = [t for (t,) in db.all("SELECT last_error FROM crm_bridge.delivery "
                                  "UNION ALL SELECT error FROM crm_bridge.attempt")]
    assert len(texts) == 12 and all(texts)  # 3 dead deliveries, 3 failed attempts each
    assert any("HTTP 500" in t for t in texts) and any("HTTP 302" in t for t in texts)
    assert any("ConnectError" in t for t in texts)
    d.stop()
    for secret in SECRETS:
        assert not [t for t in texts if secret in t], secret
        assert secret not in d.log, secret
    # The calls themselves did carry the credentials.
    assert receiver.attempts[0].headers["X-Api-Key"] == HEADER


@given(user=st.from_regex(r"[a-z]{1,8}", fullmatch=True), password=st.from_regex(r"PW[A-Za-z0-9._~!$&'()*+,;=-]{4,20}",
                                                                              fullmatch=True))
def test_redact_url_and_scrub_hide_any_password(user, password):
    url = f"https://{user}:{password}@crm.example/p?a=1"
    assert password not in redact_url(url)
    assert redact_url(url).startswith(f"https://{user}:***@crm.example/p")
    assert password not in scrub(f"error while calling {url}: refused")


def test_scrub_masks_credential_shapes_without_knowing_them():
    text = ("GET https://bob:hunter2@h/x?api_key=k1&x=1 Authorization: Bearer eyJabc.def "
            "secret whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw token https://tok3n@h/")
    out = scrub(text)
    for leaked in ("hunter2", "k1&", "eyJabc", "MfKQ9r8", "tok3n"):
        assert leaked not in out
    assert "x=1" in out and "https://bob:***@h/x" in out
