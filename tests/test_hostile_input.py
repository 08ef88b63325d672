"""Hostile input, property-based: whatever URL a DBA (or an attacker with config access) types,
the database either rejects it with a message, or the daemon can build a well-formed request
from it; any ID value gives a correctly encoded call, GET or POST."""

from __future__ import annotations

import json
import re
from urllib.parse import parse_qsl, urlsplit

import anyio
import httpx
import psycopg
from fixtures.factories import make_delivery
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from yarl import URL

from bridge.calls import build_call, make_call, plan_for
from bridge.deliver import RetryPolicy, attempt
from bridge.devtools.receiver import Rule
from bridge.http import make_client
from bridge.models import Delivery
from bridge.settings import Settings
from bridge.urls import call_url

NO_NUL = st.characters(codec="utf-8", exclude_categories=["Cs"], exclude_characters="\x00")
odd_text = st.text(NO_NUL, max_size=12)

schemes = st.sampled_from(["http://", "https://", "HTTPS://", "hTtP://", "ftp://", "", "http:/", "http:///",
                           "javascript:", " https://"])
userinfo = st.one_of(st.just(""), st.just("u:p@"), st.just("@"), odd_text.map(lambda s: s + "@"))
hosts = st.one_of(
    st.sampled_from(["127.0.0.1", "[::1]", "localhost", "crm.example", "[::ffff:127.0.0.1]", "[:::]", "[1::2::3]",
                     "xn--bcher-kva.example", "bücher.example", "[fe80::1%25eth0]", "", "a..b", "-", "1.2.3.4.5",
                     "256.1.1.1", "[127.0.0.1]", "h_o_s_t", "%41.example", "xn--.example"]),
    odd_text,
)
ports = st.one_of(st.just(""), st.integers(-5, 100_000).map(lambda p: f":{p}"), odd_text.map(lambda s: ":" + s))
rests = st.one_of(st.just(""), st.just("/p?x=1"), st.just("/%zz"), st.just("/a%2"), st.just("?"), st.just("/#f"),
                  st.text(NO_NUL, max_size=30))
odd_urls = st.one_of(st.builds(lambda *p: "".join(p), schemes, userinfo, hosts, ports, rests),
                     st.text(NO_NUL, max_size=60))


def delivery(url: str, ids: list[str | None], *, method: str = "GET") -> Delivery:
    return make_delivery(object="case", ids=ids, url=url, id_params=["AccountID", "CaseID"][: len(ids)],
                         method=method)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(url=odd_urls)
def test_an_odd_url_is_rejected_with_a_message_or_makes_a_well_formed_request(db, url):
    try:
        with db.conn.transaction(force_rollback=True):
            stored = db.one("INSERT INTO crm_bridge.crm_trigger (object, event, url) VALUES ('case', 'edit', %s) "
                            "RETURNING url", [url])
    except (psycopg.errors.CheckViolation, psycopg.errors.NotNullViolation) as exc:
        assert exc.diag.message_primary
        return
    try:
        well_formed_requests(stored)
    except ValueError:
        # The one known gap: malformed punycode labels (checking punycode in SQL is not worth
        # it); attempt() records them as a dead "invalid URL" delivery (test below).
        assert "xn--" in stored.lower()


def well_formed_requests(stored: str) -> None:
    parsed = httpx.URL(stored)
    assert parsed.scheme in ("http", "https") and parsed.host
    assert parsed.port is None or 1 <= parsed.port <= 65535
    for method in ("GET", "POST"):
        call = build_call(delivery(stored, ["a&b", "c d"], method=method))
        request = httpx.Request(call.method, call.url, headers=call.headers, content=call.body or None)
        URL(str(request.url), encoded=True).with_user(None)  # what the transport hands to aiohttp
        if method == "GET":
            assert request.url.raw_path.endswith(b"AccountID=a%26b&CaseID=c%20d")


ids = st.one_of(st.none(), st.text(NO_NUL, max_size=300), st.text(st.sampled_from("&=#?%+/ é\t"), max_size=20),
                st.text(max_size=5000).filter(lambda s: "\x00" not in s))


@given(st.lists(ids, min_size=2, max_size=2))
def test_any_ids_give_a_byte_exact_get_target_or_a_clear_null_error(values):
    d = delivery("https://crm.example/hook?src=crm", values)
    if None in values:
        try:
            build_call(d)
        except ValueError as exc:
            assert "is NULL in the captured row" in str(exc)
            return
        raise AssertionError("a NULL ID must not produce a call")
    call = build_call(d)
    assert call.url == call_url(d.url or "", d.id_params, values)
    request = httpx.Request(call.method, call.url)
    assert request.url.raw_path.decode() == "/hook?" + urlsplit(call.url).query  # nothing re-encoded
    assert parse_qsl(urlsplit(call.url).query, keep_blank_values=True)[1:] == list(zip(d.id_params, values,
                                                                                          strict=True))


names = st.one_of(st.sampled_from(["AccountID", "CaseID", "id"]), st.text(NO_NUL, min_size=1, max_size=8))


@settings(max_examples=300, deadline=None)
@given(url=odd_urls, params=st.lists(names, min_size=1, max_size=2), values=st.lists(ids, min_size=2, max_size=2))
@example(url="http://xn--.example", params=["AccountID"], values=["", None])
def test_the_request_url_made_from_the_url_plan_is_the_one_httpx_parses_from_the_whole_url(url, params, values):
    """The daemon appends each call's query to the URL parsed once per configuration
    (calls.UrlPlan.target) instead of parsing every call's URL: for any URL, ID names and values,
    the result is what parsing the whole URL gives, or the whole URL is parsed (and refused) as before."""
    d = delivery(url, values[: len(params)])
    d.id_params = params
    try:
        plan = plan_for(d)
        call, query = make_call(plan, d)
    except ValueError:
        return
    target = plan.target(call.url, query)
    try:
        whole = httpx.URL(call.url)
    except Exception:
        assert target == call.url  # not pre-parsed: build_request refuses it with today's message
        return
    if isinstance(target, str):
        return
    assert str(target) == str(whole)
    # raw_host: .host decodes IDNA and raises for a host like xn--.example (hypothesis found it)
    assert target.raw_path == whole.raw_path and target.raw_host == whole.raw_host and target.port == whole.port
    assert target.userinfo == whole.userinfo and target.scheme == whole.scheme


def test_a_url_too_long_for_httpx_is_still_refused_as_it_was():
    d = delivery("http://127.0.0.1:9/h", ["é" * 12_000, "b"])
    plan = plan_for(d)
    call, query = make_call(plan, d)
    assert plan.target(call.url, query) == call.url     # parsed whole, so httpx refuses it ("URL too long")


@given(st.lists(st.text(NO_NUL, max_size=500), min_size=2, max_size=2))
def test_any_ids_round_trip_through_the_post_body(values):
    call = build_call(delivery("https://crm.example/hook", values, method="POST"))
    doc = json.loads(call.body)
    assert doc["ids"] == dict(zip(["AccountID", "CaseID"], values, strict=True))
    assert call.url == "https://crm.example/hook"
    assert doc["occurred_at"] == "2026-01-02T03:04:05.678901Z" and doc["event_id"] == 7


def test_an_unbuildable_url_is_a_dead_delivery_with_a_clear_error():
    async def run() -> None:
        async with make_client() as client:
            settings = Settings()
            outcome = await attempt(client, RetryPolicy(settings), delivery("http://xn--.example/h", ["a", "c"]),
                                    settings)
        assert outcome.status == "dead"
        assert outcome.error is not None and outcome.error.startswith("invalid URL http://xn--.example/h?AccountID=a")

    anyio.run(run)


# -- issue 10, item 5 (text): whatever a receiver answers is stored and shown safely --------------
CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def test_a_receiver_answering_nul_escape_sequences_and_a_huge_body_is_recorded_sanitized(db, receiver, daemon):
    body = "boom\x00 \x1b[2J\x1b]0;owned\x07 \x9b31m\r\nFAKE LOG LINE " + "x" * 1_000_000
    receiver.answer("/nul", Rule(status=500, body=body))
    # An escape sequence in a header: the connection fails (aiohttp refuses it), the text stays clean.
    receiver.answer("/moved", Rule(status=302, headers={"Location": "/next\x1b[2J"}))
    bad = db.add_url("customer", "create", receiver.url("/nul"))
    moved = db.add_url("customer", "create", receiver.url("/moved"))
    good = db.add_url("customer", "create", receiver.url("/ok"))
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-1', 'x')")
    for tid in (bad, moved):
        db.wait_until("SELECT status FROM crm_bridge.delivery WHERE trigger_id = %s", [tid], expect="dead", timeout=30)
    assert db.one("SELECT attempts FROM crm_bridge.delivery WHERE trigger_id = %s", [bad]) == 3  # FAST_ENV
    db.wait_until("SELECT status FROM crm_bridge.delivery WHERE trigger_id = %s", [good], expect="delivered")
    texts = [t for (t,) in db.all("SELECT last_error FROM crm_bridge.delivery WHERE last_error IS NOT NULL "
                                  "UNION ALL SELECT error FROM crm_bridge.attempt")]
    assert len(texts) == 8, texts
    for text in texts:
        assert not CONTROL.search(text), repr(text)
        assert len(text) <= 500
    last = db.one("SELECT last_error FROM crm_bridge.delivery WHERE trigger_id = %s", [bad])
    assert last.startswith("gave up after 3 attempts: HTTP 500: boom\\x00 \\x1b[2J\\x1b]0;owned\\x07 \\x9b31m"), last
    # The daemon is still up and delivering.
    assert daemon.running
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-2', 'y')")
    db.wait_until("SELECT count(*) FROM crm_bridge.delivery WHERE trigger_id = %s AND status = 'delivered'",
                  [good], expect=2)
    assert "\x1b" not in daemon.log and "\x00" not in daemon.log
    assert "\nFAKE LOG LINE" not in daemon.log


@settings(max_examples=300, deadline=None)
@given(text=st.text(), limit=st.integers(1, 600))
def test_safe_text_is_storable_printable_and_bounded(text, limit):
    from bridge.redact import safe_text

    out = safe_text(text, limit)
    assert len(out) <= limit
    assert not CONTROL.search(out) and "\x00" not in out
    out.encode("utf-8")                                       # no lone surrogates: PostgreSQL can store it
    if len(text) <= limit and text.isprintable():
        assert out == text
