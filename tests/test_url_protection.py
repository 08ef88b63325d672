"""Protecting receivers (issue 13, items 1 and 2; migration 0015): a rate limit and max_in_flight
per URL that hold for all daemons together, and a circuit breaker per URL shared by all daemons."""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import sys
import time
from datetime import timedelta

import psycopg
import pytest
from test_metrics import FAST_STATUS, metrics_url, scrape_until

from bridge.daemon import rate_bucket
from bridge.devtools.receiver import Receiver, Rule


def cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge.cli", "--dsn", dsn, *args], capture_output=True,
                          text=True, timeout=60)


def most_in_one_second(times: list[float]) -> tuple[int, float]:
    """The most calls that arrived within any one-second window [t, t + 1), and where it starts."""
    times = sorted(times)
    best, start, j = 0, times[0] if times else 0.0, 0
    for i, t in enumerate(times):
        while times[j] <= t - 1.0:
            j += 1
        if i - j + 1 > best:
            best, start = i - j + 1, times[j]
    return best, start


def test_the_bucket_keeps_every_second_within_the_limit(db):
    """docs/DESIGN.md: a bucket of b calls refilled at just under floor(r) + 1 - b per second never
    hands out more than r calls in a second, a full bucket at the start included."""
    for rate in (0.2, 1, 1.5, 5, 10, 11, 20, 50, 333.3, 10000):
        size, refill = db.all("SELECT crm_bridge.rate_burst(%s), crm_bridge.rate_refill(%s)", [rate, rate])[0]
        assert (size, refill) == pytest.approx(rate_bucket(rate))
        assert size >= 1 and 0 < refill <= rate
        assert math.floor(size + refill) <= max(rate, 1), rate
        if rate >= 10:
            assert refill >= 0.85 * rate, rate


# -- configuration ------------------------------------------------------------------------------
@pytest.mark.parametrize(("column", "value", "message"), [
    ("max_per_second", 0, "max_per_second must be between 0.01 and 10000 calls per second"),
    ("max_per_second", -5, "max_per_second must be between 0.01 and 10000"),
    ("max_per_second", 1e9, "(got 1000000000)"),
    ("breaker_threshold", -1, "breaker_threshold must be between 1 and 10000 failures in a row, or 0"),
    ("breaker_threshold", None, "breaker_threshold must be between 1 and 10000"),
    ("breaker_cooldown", "0 seconds", "breaker_cooldown must be between 1 second and 1 day (got 00:00:00)"),
    ("breaker_cooldown", "2 days", "breaker_cooldown must be between 1 second and 1 day"),
])
def test_the_settings_are_checked_with_a_message_that_names_them(db, column, value, message):
    with pytest.raises(psycopg.errors.CheckViolation, match=re.escape(message)):
        db.add_url("customer", "create", "http://127.0.0.1:9/x", **{column: value})
    tid = db.add_url("customer", "create", "http://127.0.0.1:9/y", max_per_second=0.5, breaker_threshold=0,
                     breaker_cooldown="5 minutes")
    with pytest.raises(psycopg.errors.CheckViolation, match=re.escape(message)):
        db.execute(f"UPDATE crm_bridge.crm_trigger SET {column} = %s WHERE id = %s", [value, tid])


def test_defaults_the_breaker_is_on_and_nothing_is_limited(db):
    tid = db.add_url("customer", "create", "http://127.0.0.1:9/x")
    assert db.all("SELECT max_per_second, max_in_flight, breaker_threshold, breaker_cooldown "
                  "FROM crm_bridge.crm_trigger WHERE id = %s", [tid]) == [(None, None, 5, timedelta(seconds=30))]
    assert db.one("SELECT breaker FROM crm_bridge.url_status WHERE id = %s", [tid]) == "closed"


# -- rate limit and max_in_flight across daemons ------------------------------------------------------
def _rate_limit_run(db, receiver, daemon_factory, *, rate: float, events: int, daemons: int) -> dict:
    db.add_url("customer", "create", receiver.url("/limited"), max_per_second=rate)
    db.add_url("customer", "create", receiver.url("/free"))
    db.execute("INSERT INTO crm.customer (account_id, name) SELECT 'r-' || g, 'x' FROM generate_series(1, %s) g",
               [events])
    procs = [daemon_factory(start=False) for _ in range(daemons)]
    for p in procs:
        p.start(wait_ready=False)
    got = receiver.wait_for(events, "/limited", timeout=events / rate * 3 + 30)
    receiver.wait_for(events, "/free", timeout=30)
    times = sorted(c.at for c in got)
    worst, at = most_in_one_second(times)
    # windows [t, t + 1) starting at each call: how many hold more than the limit
    over = sum(1 for i, t in enumerate(times) if sum(1 for u in times[i:i + int(rate) + 2] if u < t + 1) > rate)
    after_first, _ = most_in_one_second([t for t in times if t >= times[0] + 1.0])
    free = sorted(c.at for c in receiver.received("/free"))
    db.wait_until("SELECT count(*) FROM crm_bridge.history WHERE outcome = 'delivered'", expect=2 * events,
                  timeout=30)
    assert db.one("SELECT count(DISTINCT call_id) FROM crm_bridge.history WHERE outcome = 'delivered'") == 2 * events
    workers = db.one("SELECT count(DISTINCT worker) FROM crm_bridge.history WHERE outcome = 'delivered' "
                     "AND trigger_id = (SELECT id FROM crm_bridge.crm_trigger WHERE url LIKE '%%/limited')")
    return {"worst": worst, "worst_at": at - times[0], "after_first": after_first, "drain": times[-1] - times[0],
            "free_drain": free[-1] - free[0], "workers": workers, "over": over, "windows": len(times)}


def _check_rate(r: dict, rate: float, events: int) -> None:
    burst, refill = rate_bucket(rate)
    # The daemons are handed at most `rate` calls in any one-second window.  What the receiver
    # counts may show the bucket's burst on top (docs/DESIGN.md) when a daemon is starved of CPU
    # between being handed calls and sending them (this machine is shared) ...
    assert r["after_first"] <= rate + burst, r
    # ... and twice that in the first second: the daemons start together, and the calls handed
    # out before a daemon's first connections are open arrive together with the next ones (CI
    # saw 35 calls in [0.29 s, 1.29 s) at 30/s with three daemons).
    assert r["worst"] <= rate + 2 * burst, r
    assert r["over"] <= 0.02 * r["windows"], r     # and only rarely at all
    # The drain takes the time the limit implies: never faster (the first second may hold the
    # bucket's burst on top of the refill); slower only by scheduling (generous bound).
    assert r["drain"] >= (events - rate) / rate, r
    assert r["drain"] <= events / refill * 1.5 + 3, r


@pytest.mark.timing
def test_a_rate_limit_holds_for_three_daemons_together(db, receiver, daemon_factory):
    rate, events = 30.0, 200
    r = _rate_limit_run(db, receiver, daemon_factory, rate=rate, events=events, daemons=3)
    print(f"rate limit {rate}/s, {events} events, 3 daemons: {r}")
    _check_rate(r, rate, events)
    # The URL without a limit was not held back by it.
    assert r["free_drain"] < events / rate / 2, r


@pytest.mark.slow
@pytest.mark.timing
def test_a_rate_limit_of_50_per_second_holds_for_a_2000_event_backlog_and_three_daemons(db, receiver, daemon_factory):
    rate, events = 50.0, 2000
    r = _rate_limit_run(db, receiver, daemon_factory, rate=rate, events=events, daemons=3)
    print(f"rate limit {rate}/s, {events} events, 3 daemons: {r}")
    _check_rate(r, rate, events)          # 39 s <= drain <= 68 s (2000 / 46 = 43.5 s expected)


def test_max_in_flight_holds_for_all_daemons_together(db, receiver, daemon_factory):
    receiver.answer("/two", Rule(delay=0.15))
    db.add_url("customer", "create", receiver.url("/two"), max_in_flight=2)
    for _ in range(3):
        daemon_factory()
    db.execute("INSERT INTO crm.customer (account_id, name) SELECT 'm-' || g, 'x' FROM generate_series(1, 40) g")
    receiver.wait_for(40, "/two", timeout=60)
    assert receiver.max_concurrent("/two") == 2
    db.wait_until("SELECT count(*) FROM crm_bridge.history WHERE outcome = 'delivered'", expect=40)
    assert db.one("SELECT count(DISTINCT worker) FROM crm_bridge.history WHERE outcome = 'delivered'") >= 2


def test_a_limited_ordered_url_keeps_the_order_of_each_record(db, receiver, daemon_factory):
    db.add_url("customer", "edit", receiver.url("/ord"), ordered=True, max_per_second=200, max_in_flight=4)
    db.execute("INSERT INTO crm.customer (account_id, name) SELECT 'o-' || g, 'v0' FROM generate_series(1, 5) g")
    for v in range(1, 6):
        db.execute("UPDATE crm.customer SET name = %s", [f"v{v}"])
    daemon_factory()
    daemon_factory()
    got = receiver.wait_for(25, "/ord", timeout=30)
    per_record: dict[str, list[int]] = {}
    for c in got:
        msg_id = next(v for k, v in c.headers.items() if k.lower() == "webhook-id")
        per_record.setdefault(c.query, []).append(msg_id)
    assert len(per_record) == 5 and all(len(v) == 5 for v in per_record.values())
    ids = {q: [int(e) for e in re.findall(r"\d+", " ".join(v))] for q, v in per_record.items()}
    assert all(v == sorted(v) for v in ids.values()), ids


# -- circuit breaker ------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _breaker_run(db, receiver_url: str, daemon_factory, *, down, up, events: int = 200, threshold: int = 3,
                 cooldown: float = 1.0, daemons: int = 2) -> dict:
    tid = db.add_url("customer", "create", receiver_url, breaker_threshold=threshold,
                     breaker_cooldown=f"{cooldown} seconds", max_attempts=100, retry_schedule=["1 second"])
    procs = [daemon_factory("--metrics-addr", "127.0.0.1:0",
                            env={**FAST_STATUS, "CRM_BRIDGE_MAX_IN_FLIGHT_PER_URL": "4"}) for _ in range(daemons)]
    went_down = time.monotonic()
    down()
    db.execute("INSERT INTO crm.customer (account_id, name) SELECT 'b-' || g, 'x' FROM generate_series(1, %s) g",
               [events])
    failed = "SELECT count(*) FROM crm_bridge.history WHERE outcome = 'failed'"
    # Down: the breaker opens, and after each cool-down one probe fails and opens it again.  Wait
    # for three probes (the outage lasts as long as that takes: a few cool-downs).
    db.wait_until("SELECT breaker <> 'closed' FROM crm_bridge.url_status WHERE id = %s", [tid], timeout=20)
    url = metrics_url(procs[0])
    scrape_until(url, lambda s: s.get(("crm_bridge_url_breaker_open", (("trigger_id", str(tid)),))) == 1.0)
    status = cli(db.dsn, "status", "--json")
    assert status.returncode == 1 and "circuit breaker open for URL" in status.stderr, status.stderr
    row = next(u for u in json.loads(status.stdout)["urls"] if u["id"] == tid)
    assert row["breaker"] in ("open", "half_open") and row["breaker_since"]
    assert re.search(rf"^\s+{tid}\s+customer/create\s+active\s+(open|half-open) ", cli(db.dsn, "status").stdout,
                     re.M)
    opened = db.one(failed)
    deadline = time.monotonic() + 60
    while db.one(failed) < opened + 3:
        assert time.monotonic() < deadline, db.one(failed)
        time.sleep(0.05)
    while_down = db.one(failed)
    assert db.one("SELECT count(*) FROM crm_bridge.history WHERE outcome = 'delivered'") == 0
    up()
    recovered = time.monotonic()
    down_for = recovered - went_down
    db.wait_until("SELECT count(*) FROM crm_bridge.history WHERE outcome = 'delivered'", expect=events, timeout=60)
    drained = time.monotonic() - recovered
    db.wait_until("SELECT breaker FROM crm_bridge.url_status WHERE id = %s", [tid], expect="closed")
    scrape_until(url, lambda s: s.get(("crm_bridge_url_breaker_open", (("trigger_id", str(tid)),))) == 0.0)
    assert db.one("SELECT count(*) FROM crm_bridge.queue") == 0                  # nothing lost, nothing dead
    assert db.one("SELECT count(DISTINCT call_id) FROM crm_bridge.history WHERE outcome = 'delivered'") == events
    logs = "".join(p.log for p in procs)
    return {"tid": tid, "failed_while_down": while_down, "failed_when_opened": opened, "drain_after_up": drained,
            "down_for": down_for, "logs": logs, "failed_total": db.one(failed),
            "opened_lines": len(re.findall(rf"circuit breaker: URL {tid} is open", logs)),
            "half_open_lines": len(re.findall(rf"circuit breaker: URL {tid} is half open", logs)),
            "closed_lines": len(re.findall(rf"circuit breaker: URL {tid} is closed", logs))}


def _check_breaker(r: dict, *, events: int = 200, threshold: int = 3, daemons: int = 2, per_url: int = 4) -> None:
    # Before it opened: at most the run of failures and the calls already under way, per daemon.
    assert r["failed_when_opened"] <= daemons * (threshold + per_url), r["failed_when_opened"]
    # While open: one probe per cool-down (the loop waited for three).
    assert r["failed_while_down"] <= r["failed_when_opened"] + 4, r["failed_while_down"]
    assert r["failed_while_down"] < events / 4
    # Said once per transition, not per delivery: every open line is a transition (the first, and
    # one per failed probe), and it closed once.
    assert r["closed_lines"] == 1, r["logs"]
    assert 1 <= r["opened_lines"] <= r["half_open_lines"] + 1, r["logs"]
    assert r["half_open_lines"] >= 3


def test_the_breaker_stops_calls_to_a_receiver_that_answers_503_and_the_backlog_flows_when_it_is_back(
        db, receiver, daemon_factory):
    r = _breaker_run(db, receiver.url("/down"), daemon_factory,
                     down=lambda: receiver.answer("/down", Rule(status=503)), up=receiver.clear_rules)
    print({k: v for k, v in r.items() if k != "logs"})
    _check_breaker(r)
    assert r["drain_after_up"] < 15


def test_the_breaker_stops_calls_to_a_receiver_that_refuses_connections(db, daemon_factory):
    port = _free_port()
    back = Receiver(port=port)
    try:
        r = _breaker_run(db, f"http://127.0.0.1:{port}/gone", daemon_factory, down=lambda: None, up=back.start)
        print({k: v for k, v in r.items() if k != "logs"})
        _check_breaker(r)
        assert len(back.received("/gone")) >= 200
    finally:
        back.stop()


def test_a_breaker_set_to_0_never_opens(db, receiver, daemon):
    receiver.answer("/flaky", Rule(status=503, times=8))
    tid = db.add_url("customer", "create", receiver.url("/flaky"), breaker_threshold=0, max_attempts=20,
                     retry_schedule=["0 seconds"])
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('z1', 'x')")
    receiver.wait_for(1, "/flaky", timeout=20)
    db.wait_until("SELECT count(*) FROM crm_bridge.history WHERE outcome = 'delivered'", expect=1)
    assert db.one("SELECT breaker FROM crm_bridge.url_status WHERE id = %s", [tid]) == "closed"
    assert db.one("SELECT count(*) FROM crm_bridge.history WHERE outcome = 'failed'") == 8
    assert "circuit breaker" not in daemon.log


def test_switching_the_breaker_off_closes_an_open_one(db, receiver, daemon_factory):
    tid = db.add_url("customer", "create", receiver.url("/off"), breaker_cooldown="1 hour")
    db.execute("INSERT INTO crm_bridge.url_stat (trigger_id, breaker_state, breaker_since, breaker_failures) "
               "VALUES (%s, 'open', now(), 5)", [tid])
    assert db.one("SELECT breaker FROM crm_bridge.url_status WHERE id = %s", [tid]) == "open"
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('o1', 'x')")
    # The daemon starts after the breaker was opened by hand (a claim running at that moment
    # could have taken the call just before, as it can when a breaker opens by itself).
    daemon = daemon_factory()
    try:
        db.wait_until("SELECT count(*) FROM crm_bridge.queue WHERE status = 'pending'", expect=1)  # it waits
    except TimeoutError as exc:
        raise AssertionError(f"{db.all('SELECT id, status, attempts, last_error FROM crm_bridge.delivery')} "
                             f"{db.all('SELECT * FROM crm_bridge.url_stat')}\n{daemon.log[-3000:]}") from exc
    assert receiver.received("/off") == []
    db.execute("UPDATE crm_bridge.crm_trigger SET breaker_threshold = 0 WHERE id = %s", [tid])
    assert db.one("SELECT breaker FROM crm_bridge.url_status WHERE id = %s", [tid]) == "closed"
    receiver.wait_for(1, "/off", timeout=15)
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('o2', 'x')")
    receiver.wait_for(2, "/off", timeout=15)
    db.wait_until("SELECT count(*) FROM crm_bridge.history WHERE outcome = 'delivered'", expect=2)


def test_a_probe_lost_with_its_daemon_is_sent_again_by_another(db, receiver, daemon_factory):
    receiver.answer("/p", Rule(status=503))
    tid = db.add_url("customer", "create", receiver.url("/p"), breaker_threshold=2, breaker_cooldown="1 second",
                     max_attempts=100, retry_schedule=["1 second"])
    first = daemon_factory(env={"CRM_BRIDGE_LEASE": "2", "CRM_BRIDGE_TIMEOUT": "60"})
    db.execute("INSERT INTO crm.customer (account_id, name) SELECT 'p-' || g, 'x' FROM generate_series(1, 20) g")
    db.wait_until("SELECT breaker FROM crm_bridge.url_status WHERE id = %s", [tid], expect="open")
    receiver.answer("/p", Rule(delay=60))          # the probe hangs ...
    db.wait_until("SELECT breaker FROM crm_bridge.url_status WHERE id = %s", [tid], expect="half_open")
    db.wait_until("SELECT count(*) FROM crm_bridge.queue WHERE status = 'in_flight'", expect=1)
    first.kill()                                   # ... and its daemon dies
    receiver.clear_rules()
    daemon_factory(env={"CRM_BRIDGE_LEASE": "2"})
    # The lease expires, the probe is pending again, another daemon sends it: closed, all delivered.
    db.wait_until("SELECT count(*) FROM crm_bridge.history WHERE outcome = 'delivered'", expect=20, timeout=30)
    assert db.one("SELECT breaker FROM crm_bridge.url_status WHERE id = %s", [tid]) == "closed"
