"""Credentials in URLs and header values never reach logs or recorded errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg.types.json import Jsonb

from bridge.devtools.receiver import Rule
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


# -- issue 10, item 14: tokens in URL paths, DSN errors, tracebacks -------------------------------
TOK = "Zx81kQ2mP0aLr7TbW9eYc3Hd"          # looks like a Slack webhook token (24 letters and digits)


@pytest.mark.parametrize(("url", "shown"), [
    (f"https://hooks.slack.com/services/T0001/B0002/{TOK}", "https://hooks.slack.com/services/***"),
    ("https://discord.com/api/webhooks/123456789012345678/q7Rk2-Lm9Xw_Pz4Tn8Vb1Cy6Hd3Fj5Gs0Ka?wait=true",
     "https://discord.com/api/***?wait=true"),
    ("https://discordapp.com/api/webhooks/1/abc", "https://discordapp.com/api/***"),
    ("https://contoso.webhook.office.com/webhookb2/0f1e2d3c-aaaa-bbbb-cccc-123456789abc@9a8b7c6d-1111-2222-3333-"
     "444455556666/IncomingWebhook/abcdef0123456789abcdef0123456789/aaaabbbb-cccc-dddd-eeee-ffff00001111",
     "https://contoso.webhook.office.com/webhookb2/***"),
    ("https://outlook.office.com/webhook/abc/IncomingWebhook/def/ghi", "https://outlook.office.com/webhook/***"),
    ("https://hooks.zapier.com/hooks/catch/123456/abcdef/", "https://hooks.zapier.com/hooks/***"),
    ("https://maker.ifttt.com/trigger/crm_event/with/key/dQw4w9WgXcQ", "https://maker.ifttt.com/trigger/***"),
    # Anywhere else: every path segment that looks like a token (16+ characters mixing two of
    # lower case, upper case, digits) is masked; the rest of the path stays readable.
    ("https://crm.example:8443/hooks/a1B2c3D4e5F6g7H8i9J0/notify", "https://crm.example:8443/hooks/***/notify"),
    ("https://api.telegram.org/bot123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw/sendMessage",
     "https://api.telegram.org/***/sendMessage"),
    ("http://127.0.0.1:8080/hook/0f1e2d3c-aaaa-bbbb-cccc-123456789abc", "http://127.0.0.1:8080/hook/***"),
    ("https://crm.example/api/v1/customer-updates", "https://crm.example/api/v1/customer-updates"),
    ("https://crm.example/orders/12345678901234567890?AccountID=acc-1",
     "https://crm.example/orders/12345678901234567890?AccountID=acc-1"),
    ("https://f.azurewebsites.net/api/hook?code=abcDEF123==&x=1", "https://f.azurewebsites.net/api/hook?code=***&x=1"),
    ("/relative/a1B2c3D4e5F6g7H8i9J0?token=abc", "/relative/***?token=***"),
])
def test_tokens_in_url_paths_are_redacted(url, shown):
    assert redact_url(url) == shown
    if "://" in url:  # free text: absolute URLs are recognised (a relative one is a redirect's Location)
        assert scrub(f"calling {url} failed") == f"calling {shown} failed"


def _cli(dsn: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CRM_BRIDGE_", "PG"))}
    return subprocess.run([sys.executable, "-m", "bridge.cli", "--dsn", dsn, *args], capture_output=True,
                          text=True, timeout=60, env={**base, **(env or {})})


def test_webhook_tokens_in_url_paths_reach_no_output(db, receiver, daemon_factory):
    path = f"/services/T0001/B0002/{TOK}"
    # The receiver echoes the path (and the token alone) into its error answer.
    receiver.answer(path, Rule(status=500, body=f"no such hook {path} ({TOK})"))
    tid = db.add_url("customer", "create", receiver.url(path))
    off = db.add_url("customer", "create", f"https://hooks.slack.com/services/T0/B0/{TOK[::-1]}", enabled=False)
    d = daemon_factory("--metrics-addr", "127.0.0.1:0", env={"CRM_BRIDGE_LOG_LEVEL": "DEBUG",
                                                              "CRM_BRIDGE_STATUS_INTERVAL": "0.2"})
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-1', 'x')")
    db.wait_until("SELECT status FROM crm_bridge.delivery WHERE trigger_id = %s", [tid], expect="dead")
    texts = [t for (t,) in db.all("SELECT last_error FROM crm_bridge.delivery "
                                  "UNION ALL SELECT error FROM crm_bridge.attempt")]
    assert len(texts) == 4 and all("HTTP 500" in t for t in texts)
    import re
    import urllib.request

    d.wait_log("serving Prometheus metrics on ")
    metrics_url = re.search(r"serving Prometheus metrics on (http://\S+/metrics)", d.log).group(1)
    deadline = time.monotonic() + 15
    while True:
        with urllib.request.urlopen(metrics_url, timeout=5) as resp:
            metrics = resp.read().decode()
        if "crm_bridge_url_info{" in metrics or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert f'url="{receiver.url("/services/T0001/B0002/***")}"' in metrics, metrics
    assert d.stop() == 0
    status, status_json, check = _cli(db.dsn, "status"), _cli(db.dsn, "status", "--json"), _cli(db.dsn, "check")
    # exit 1: a dead letter needs attention (docs/OPERATIONS.md); what matters here is the text
    assert status.returncode == 1 and status_json.returncode == 1, status.stderr + status_json.stderr
    assert "https://hooks.slack.com/services/***" in status.stdout
    urls = {u["id"]: u["url"] for u in json.loads(status_json.stdout)["urls"]}
    assert urls == {tid: receiver.url("/services/T0001/B0002/***"), off: "https://hooks.slack.com/services/***"}
    assert "https://hooks.slack.com/services/*** is disabled" in check.stdout
    outputs = {"recorded errors": "\n".join(texts), "daemon log": d.log, "metrics": metrics,
               "status": status.stdout + status.stderr, "status --json": status_json.stdout,
               "check": check.stdout + check.stderr}
    for name, text in outputs.items():
        assert TOK not in text and TOK[::-1] not in text, name


@pytest.mark.parametrize("dsn", [
    "host=127.0.0.1 port=1 user=bob password=S3cret-Pw S3cret-Tail",  # libpq: missing "=" after "S3cret-Tail"
    "host=127.0.0.1 port=1 user=bob S3cret-Pw",                        # the password without its keyword
    "host=127.0.0.1 password='S3cret-Pw",                              # unterminated quoted string
    "postgresql://bob:S3cret-Pw@[::1/db",                              # broken URI, echoed whole
    "postgresql://bob:S3cret-Pw@127.0.0.1:1/db?sslmode=S3cret-Pw",     # invalid sslmode value
    "host=127.0.0.1 port=S3cret-Pw",                                   # invalid integer value
])
@pytest.mark.parametrize("command", ["status", "check", "migrate", "replay"])
def test_connection_string_errors_never_echo_password_fragments(dsn, command):
    proc = _cli(dsn, command, *(["--dry-run"] if command == "replay" else []))
    assert proc.returncode != 0
    assert "S3cret" not in proc.stdout + proc.stderr, proc.stderr
    assert "crm-bridge: " in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_uncaught_exceptions_are_scrubbed_before_they_are_printed(tmp_path):
    """A traceback nobody caught (main thread or another thread) goes through the same scrubbing."""
    script = tmp_path / "boom.py"
    script.write_text(
        "import sys, threading\n"
        "import bridge.cli as cli\n"
        f"SECRET = 'https://hooks.slack.com/services/T0/B0/{TOK} password=S3cret-Pw \\x1b[2J'\n"
        "def boom(args):\n"
        "    t = threading.Thread(target=lambda: (_ for _ in ()).throw(RuntimeError('thread ' + SECRET)))\n"
        "    t.start(); t.join()\n"
        "    raise RuntimeError('main ' + SECRET)\n"
        "cli.COMMANDS['status'] = boom\n"
        "sys.exit(cli.main(['status']))\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                          cwd=os.getcwd())
    assert proc.returncode != 0
    err = proc.stderr
    assert "RuntimeError: main https://hooks.slack.com/services/***" in err, err
    assert "RuntimeError: thread https://hooks.slack.com/services/***" in err, err
    assert TOK not in err and "S3cret" not in err and "\x1b" not in err, err


def test_the_daemon_log_never_echoes_password_fragments_of_a_bad_connection_string(daemon_factory):
    bad = "host=127.0.0.1 port=1 user=bob password=S3cret-Pw S3cret-Tail"
    d = daemon_factory(target_dsn=bad, start=False).start(wait_ready=False)
    d.wait_log("connection info string")     # psycopg's pool logs each failed attempt
    d.kill()
    assert 'missing "=" after "***" in connection info string' in d.log
    assert "S3cret" not in d.log
