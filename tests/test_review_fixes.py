"""Outside review after the issue-10 fixes, findings 4-7, tested as the roles that really run things.

4. The admin cannot write crm_bridge.attachment (attach/detach/capture_rows write it as the
   owner), and migration 0004 re-attaches only tables that carry the bridge's capture triggers:
   a forged attachment row no longer makes `migrate` capture a table nobody attached.
5. No role gets EXECUTE on a trigger function (emit_v1, ...): the admin cannot CREATE TRIGGER with
   emit_v1 on a table of its own and forge events.
6. Changing a URL's origin (scheme, host, port) removes its signing secret.
7. The status views show URLs redacted (crm_bridge.redact_url, the rule of bridge/redact.py).
"""

from __future__ import annotations

import os

import psycopg
import pytest
from fixtures.databases import install_schema_up_to
from psycopg import errors, sql
from psycopg.conninfo import make_conninfo

from bridge.migrate import migrate
from bridge.redact import redact_url

# -- finding 4: attachment rows and the 0004 re-attach loop -------------------------------------


@pytest.mark.parametrize("query", [
    # by OID: casting a number to regclass needs no privilege on the table's schema
    "INSERT INTO crm_bridge.attachment (table_name, object, id_columns, capture_rows) "
    "VALUES (%(oid)s::oid::regclass, 'customer', '{id}', true)",
    "DELETE FROM crm_bridge.attachment",
    "UPDATE crm_bridge.attachment SET capture_rows = true",
])
def test_admin_cannot_write_attachment_rows(db, roles, query):
    db.execute("CREATE SCHEMA hr; CREATE TABLE hr.salary (id int, amount numeric)")
    oid = db.one("SELECT 'hr.salary'::regclass::oid")
    with roles.connect(roles.admin) as admin, pytest.raises(errors.InsufficientPrivilege,
                                                           match="permission denied for table attachment"):
        admin.execute(query, {"oid": oid})
    assert db.one("SELECT count(*) FROM crm_bridge.attachment WHERE table_name = 'hr.salary'::regclass") == 0


def test_admin_still_attaches_and_detaches_through_the_functions(db, roles):
    db.execute("CREATE TABLE public.note (account_id text, body text)")
    db.execute(sql.SQL("GRANT TRIGGER ON public.note TO {}").format(sql.Identifier(roles.admin)))
    with roles.connect(roles.admin) as admin:
        admin.execute("SELECT crm_bridge.attach('public.note', 'customer', ARRAY['account_id'])")
        admin.execute("SELECT crm_bridge.capture_rows('public.note')")
        assert admin.execute("SELECT capture_rows FROM crm_bridge.attachment "
                             "WHERE table_name = 'public.note'::regclass").fetchone() == (True,)
        assert admin.execute("SELECT crm_bridge.detach('public.note')").fetchone() == (True,)
    assert db.one("SELECT count(*) FROM crm_bridge.attachment WHERE table_name = 'public.note'::regclass") == 0


def test_migration_0004_does_not_reattach_a_table_without_the_bridge_triggers(empty_dsn):
    """At schema version 3 the admin could INSERT attachment rows: one for a table without any
    trigger, one for a table whose triggers only look like the bridge's.  `migrate` must install
    capture on neither (WARNING naming each), and still re-attach the genuinely attached tables."""
    suffix = f"{os.getpid()}"
    admin_group, daemon_group, admin = f"rf_admin_g{suffix}", f"rf_daemon_g{suffix}", f"rf_admin{suffix}"
    warnings: list[str] = []
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.add_notice_handler(lambda d: warnings.append(f"{d.severity_nonlocalized}: {d.message_primary}"))
        try:
            with conn.transaction():
                install_schema_up_to(conn, 3)
                conn.execute("SELECT crm_bridge.apply_grants(%s, %s)", [admin_group, daemon_group])
                conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'test-only-password' IN ROLE {}")
                             .format(sql.Identifier(admin), sql.Identifier(admin_group)))
                conn.execute("CREATE SCHEMA hr; CREATE TABLE hr.salary (id int, amount numeric); "
                             "CREATE TABLE hr.bonus (id int, amount numeric); "
                             "CREATE FUNCTION hr.noop() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NULL; END'; "
                             "CREATE TRIGGER crm_bridge_emit_create AFTER INSERT ON hr.bonus "
                             "FOR EACH ROW EXECUTE FUNCTION hr.noop()")
            as_admin = make_conninfo(empty_dsn, user=admin, password="test-only-password")
            with psycopg.connect(as_admin, autocommit=True) as adm:
                for table in ("hr.salary", "hr.bonus"):   # no USAGE on hr needed: the OID is a number
                    oid = conn.execute("SELECT %s::regclass::oid", [table]).fetchone()[0]
                    adm.execute("INSERT INTO crm_bridge.attachment (table_name, object, id_columns, capture_rows) "
                                "VALUES (%s::oid::regclass, 'customer', '{id}', true)", [oid])
            migrate(conn)
            captured = conn.execute("""
                SELECT t.tgrelid::regclass::text FROM pg_trigger t
                 WHERE t.tgrelid IN ('hr.salary'::regclass, 'hr.bonus'::regclass)
                   AND t.tgfoid IN (SELECT p.oid FROM pg_proc p WHERE p.pronamespace = 'crm_bridge'::regnamespace)
                """).fetchall()
            assert captured == []
            conn.execute("INSERT INTO hr.salary VALUES (1, 100000); INSERT INTO hr.bonus VALUES (1, 5)")
            assert conn.execute("SELECT count(*) FROM crm_bridge.event").fetchone() == (0,)
            for table in ("hr.salary", "hr.bonus"):
                assert any(w.startswith("WARNING") and table in w and "not re-attached" in w
                           for w in warnings), warnings
            # The reference CRM, attached by the old attach(), is upgraded as before.
            assert conn.execute("""SELECT a.table_name::text FROM crm_bridge.attachment a
                                     JOIN pg_trigger t ON t.tgrelid = a.table_name AND t.tgname = 'crm_bridge_emit_edit'
                                    WHERE pg_get_triggerdef(t.oid) !~ '[*]='""").fetchall() == []
            assert conn.execute("""SELECT count(*) FROM crm_bridge.attachment a
                                    WHERE a.table_name::text LIKE 'crm.%'
                                      AND EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = a.table_name
                                                     AND t.tgname LIKE 'crm_bridge_emit_%')""").fetchone() == (4,)
            conn.execute("INSERT INTO crm.customer (account_id, name) VALUES ('m1', 'x')")
            assert conn.execute("SELECT object, event FROM crm_bridge.event").fetchall() == [("customer", "create")]
        finally:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", [admin])
            for role in (admin, admin_group, daemon_group):
                conn.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(role)))
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


# -- finding 5: no EXECUTE on trigger functions ---------------------------------------------------
@pytest.mark.parametrize("function", [
    "crm_bridge.emit_v1('customer', 'account_id', '+rows')",
    "crm_bridge.emit_v1('customer', 'account_id')",
    "crm_bridge.crm_trigger_validate_v1()",
    "crm_bridge.crm_trigger_validate_call_v1()",
])
def test_admin_cannot_create_a_trigger_with_a_bridge_trigger_function(db, roles, function):
    with roles.connect(roles.admin) as admin:
        admin.execute("CREATE TEMP TABLE forge (account_id text, is_admin bool)")
        with pytest.raises(errors.InsufficientPrivilege, match="permission denied"):
            admin.execute(f"CREATE TRIGGER f AFTER INSERT ON forge FOR EACH ROW EXECUTE FUNCTION {function}")
        admin.execute("INSERT INTO forge VALUES ('ACME-1', true)")
    assert db.one("SELECT count(*) FROM crm_bridge.event") == 0


def test_no_bridge_role_may_execute_any_trigger_function(db, roles):
    db.execute("CREATE TABLE crm.note (account_id text, body text)")
    db.execute("SELECT crm_bridge.attach('crm.note', 'customer', ARRAY['account_id'])")  # a generated function
    db.execute("SELECT crm_bridge.apply_grants(%s, %s, %s)", [roles.admin_group, roles.daemon_group,
                                                             roles.monitor_group])
    granted = db.all("""SELECT r.role, p.oid::regprocedure::text FROM pg_proc p,
                               unnest(%s::name[]) AS r(role)
                         WHERE p.pronamespace = 'crm_bridge'::regnamespace
                           AND p.prorettype = 'pg_catalog.trigger'::regtype
                           AND has_function_privilege(r.role, p.oid, 'EXECUTE')""",
                     [[roles.admin, roles.daemon, roles.monitor, roles.app]])
    assert granted == []
    assert db.one("SELECT count(*) FROM pg_proc WHERE pronamespace = 'crm_bridge'::regnamespace "
                  "AND prorettype = 'pg_catalog.trigger'::regtype") >= 4


# -- finding 6: a URL's signing secret goes with its origin ----------------------------------------
SIGNED = "http://127.0.0.1:18931/hooks/a?x=1"


@pytest.mark.parametrize("new_url", [
    "http://127.0.0.1:18932/evil/",                 # port
    "http://127.0.0.2:18931/hooks/a?x=1",           # host
    "https://127.0.0.1:18931/hooks/a?x=1",          # scheme
    "http://127.0.0.1:18931@127.0.0.9/hooks/a",     # the old host:port as userinfo of another host
    "http://127.0.0.1/hooks/a",                     # port dropped (80 is not 18931)
    "http://localhost:18931/hooks/a",               # another spelling is another host
    "http://[::1]:18931/hooks/a",
])
def test_changing_the_url_origin_removes_the_signing_secret(db, roles, new_url):
    tid = db.add_url("customer", "create", SIGNED)
    notices: list[str] = []
    with roles.connect(roles.admin) as admin:
        admin.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        admin.execute("SELECT crm_bridge.set_signing_secret(%s)", [tid])
        admin.execute("UPDATE crm_bridge.crm_trigger SET url = %s WHERE id = %s", [new_url, tid])
        assert admin.execute("SELECT count(*) FROM crm_bridge.signed_urls() WHERE trigger_id = %s",
                             [tid]).fetchone() == (0,)
        with pytest.raises(errors.InsufficientPrivilege):
            admin.execute("INSERT INTO crm_bridge.signing_secret (trigger_id, secret) VALUES (%s, %s)",
                          [tid, "whsec_" + "A" * 32])
    assert db.one("SELECT count(*) FROM crm_bridge.signing_secret WHERE trigger_id = %s", [tid]) == 0
    assert any("signing secret" in n and "removed" in n and f"set_signing_secret({tid})" in n for n in notices), notices


@pytest.mark.parametrize(("old", "new"), [
    (SIGNED, "http://127.0.0.1:18931/other/path"),
    (SIGNED, "http://127.0.0.1:18931/hooks/a?x=2"),
    (SIGNED, "HTTP://127.0.0.1:18931/hooks/b"),
    ("http://Hooks.Example.com/a", "http://hooks.example.COM:80/b"),
    ("https://hooks.example.com:443/a", "https://hooks.example.com/b"),
    ("http://[::1]:8080/a", "http://[::1]:08080/b"),
])
def test_a_same_origin_url_change_keeps_the_signing_secret(db, roles, old, new):
    tid = db.add_url("customer", "create", old)
    with roles.connect(roles.admin) as admin:
        admin.execute("SELECT crm_bridge.set_signing_secret(%s)", [tid])
        admin.execute("UPDATE crm_bridge.crm_trigger SET url = %s WHERE id = %s", [new, tid])
        admin.execute("UPDATE crm_bridge.crm_trigger SET paused = true WHERE id = %s", [tid])
        assert admin.execute("SELECT count(*) FROM crm_bridge.signed_urls() WHERE trigger_id = %s",
                             [tid]).fetchone() == (1,)


# -- finding 7: the status views show redacted URLs ------------------------------------------------
SECRET_URLS = {
    "userinfo": ("https://bot:S3cretPass@127.0.0.1:9/hook", "S3cretPass"),
    "query": ("http://127.0.0.1:9/hook?a=1&access_token=T0kVal9x&b=2", "T0kVal9x"),
    "slack": ("https://hooks.slack.com/services/T0AAAAAAA/B0BBBBBBB/xoxbSecretPathToken", "xoxbSecretPathToken"),
    "slack_short": ("https://hooks.slack.com/services/T0AAAAAAA/B0BBBBBBB/short", "B0BBBBBBB"),
    "path_token": ("http://127.0.0.1:9/hooks/a8F3kQ9zP2mX7vL1/run", "a8F3kQ9zP2mX7vL1"),
    "lone_user": ("http://ghp0123456789abcdef@127.0.0.1:9/x", "ghp0123456789abcdef"),
}


def test_monitor_sees_no_credentials_in_the_status_views(db, roles):
    ids = {name: db.add_url("customer", "create", url) for name, (url, _) in SECRET_URLS.items()}
    gone = db.add_url("case", "create", "https://u:GoneSecret@127.0.0.1:9/x?sig=GoneSig")
    for tid in [*ids.values(), gone]:
        db.execute("""INSERT INTO crm_bridge.delivery (event_id, object, event, ids, event_created_at, trigger_id,
                                                       url, record_key, status, attempts, finished_at)
                      SELECT 1, t.object, t.event, '{a1}', now(), t.id, t.url, md5('a1'), 'dead', 3, now()
                        FROM crm_bridge.crm_trigger t WHERE t.id = %s""", [tid])
    db.execute("DELETE FROM crm_bridge.crm_trigger WHERE id = %s", [gone])   # dead_letter falls back to delivery.url
    with roles.connect(roles.monitor) as mon:
        shown = {view: [r[0] for r in mon.execute(f"SELECT url FROM crm_bridge.{view}").fetchall()]
                 for view in ("url_queue", "url_status", "dead_letter")}
    assert len(shown["url_queue"]) == len(shown["url_status"]) == len(SECRET_URLS)
    assert len(shown["dead_letter"]) == len(SECRET_URLS) + 1
    for view, urls in shown.items():
        text = "\n".join(urls)
        for _, secret in SECRET_URLS.values():
            assert secret not in text, (view, secret, urls)
        assert "GoneSecret" not in text and "GoneSig" not in text
        assert "https://bot:***@127.0.0.1:9/hook" in urls
        assert "https://hooks.slack.com/services/***" in urls
        assert "http://127.0.0.1:9/hooks/***/run" in urls
        assert "http://127.0.0.1:9/hook?a=1&access_token=***&b=2" in urls
    assert "https://u:***@127.0.0.1:9/x?sig=***" in shown["dead_letter"]


def test_status_views_keep_their_columns(db):
    for view in ("url_queue", "url_status", "dead_letter"):
        cols = db.all("SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
                      "WHERE attrelid = %s::regclass AND attnum > 0 ORDER BY attnum", [f"crm_bridge.{view}"])
        assert ("url", "text") in cols
    assert [c for (c,) in db.all("SELECT attname FROM pg_attribute WHERE attrelid = 'crm_bridge.url_queue'::regclass "
                                 "AND attnum > 0 ORDER BY attnum")] == [
        "id", "object", "event", "url", "enabled", "paused", "state", "pending", "retrying", "in_flight", "dead",
        "oldest_pending_at", "oldest_pending_age", "last_dead_at",
        "breaker", "breaker_since"]                      # migration 0015: added at the end


AGREE = [
    "http://127.0.0.1:9/h",
    "https://example.com",
    "https://example.com/",
    "http://u:p@example.com/x",
    "http://u@example.com/x",
    "http://u:@example.com/x",
    "http://:p@example.com/x",
    "HTTPS://Example.COM:8443/A/B?c=d",
    "https://example.com/a?token=abc&x=1&Api_Key=zz&postcode=123&code=9&secret&=v&&",
    "https://example.com/a?x=1?y=token=2",
    "https://example.com/a?",
    "https://example.com/ABCDEFGHIJKLMNOPQR/abcdefghijklmnopqr/0123456789012345678",
    "https://example.com/abcdefgh12345678/ABCDEFGH12345678/AbCdEfGhIjKlMnOp/abcDEF123",
    "https://example.com/customer-updates-and-more/v1/123e4567-e89b-12d3-a456-426614174000",
    "https://example.com//double//slash/",
    "https://hooks.slack.com/services/T0/B0/XXXX",
    "https://hooks.slack.com/services",
    "https://hooks.slack.com/services/",
    "https://HOOKS.SLACK.COM/services/T0/B0/XXXX?x=1",
    "https://discord.com/api/webhooks/123/abc",
    "https://ptb.discordapp.com/api/webhooks/123/abc",
    "https://acme.webhook.office.com/webhookb2/x/IncomingWebhook/y/z",
    "https://outlook.office365.com/webhook/abc",
    "https://outlook.office.com/webhook/abc",
    "https://hooks.zapier.com/hooks/catch/123/abc/",
    "https://maker.ifttt.com/trigger/ev/with/key/abcdef",
    "https://notslack.com/services/T0AAAAAAAAAAAAAAAAA/x",
    "https://hooks.slack.com.evil.example/services/T0/B0/XXXX",
    "https://user:pw@hooks.slack.com:443/services/T0/B0/X?token=1",
    "http://[::1]:8080/a/AbCdEfGhIjKlMnOpQ?key=1",
    "http://[fe80::1]/x",
    "http://127.0.0.1:9/bot123456:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw/sendMessage",
    "http://127.0.0.1:9/a%2Fb%3DcDEFGHIJKLMNOP",
]


def test_sql_redact_url_agrees_with_bridge_redact(db, roles):
    with roles.connect(roles.monitor) as mon:
        got = {u: mon.execute("SELECT crm_bridge.redact_url(%s)", [u]).fetchone()[0] for u in AGREE}
    assert {u: got[u] for u in AGREE if got[u] != redact_url(u)} == {}
    assert db.one("SELECT crm_bridge.redact_url(NULL)") is None
    assert db.one("SELECT provolatile FROM pg_proc WHERE oid = 'crm_bridge.redact_url(text)'::regprocedure") == "i"
