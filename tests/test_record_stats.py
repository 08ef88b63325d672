"""What recording a batch makes of each URL's statistics and circuit breaker (daemon_record ->
note_url_stats_v1), for batches that mix delivered and failed calls of several URLs.  Migration
0024 passes a URL's delivered calls to the statistics once; the outcome must be the same."""

from __future__ import annotations

import pytest


def _claim_batch(db, n_events: int) -> tuple[int, dict[int, list[int]]]:
    db.execute("SELECT crm_bridge.daemon_rotate(interval '7 days')")
    for n in range(n_events):
        db.execute("INSERT INTO crm.customer (account_id, name) VALUES (%s, 'n')", [f"acc{n}"])
    rows = db.all("SELECT batch_id, id, trigger_id FROM crm_bridge.daemon_claim(128, 1000, '1 min', 'w') "
                  "WHERE id IS NOT NULL ORDER BY id")
    (batch,) = {b for b, _, _ in rows}
    calls: dict[int, list[int]] = {}
    for _, call, tid in rows:
        calls.setdefault(tid, []).append(call)
    return batch, calls


def _record(db, batch: int, outcomes: list[tuple[int, str, int, int | None, str | None]]) -> int:
    ids, statuses, attempted, http, errors = (list(x) for x in zip(*outcomes, strict=True))
    n = len(ids)
    return db.one("SELECT crm_bridge.daemon_record('w', %s, %s, %s, %s, %s, %s, %s, %s, interval '1 min')",
                  [batch, ids, statuses, attempted, http, errors, [0.0] * n, [5] * n])


def _stat(db, tid: int) -> tuple:
    return db.all("SELECT last_success_at IS NOT NULL, last_failure_at IS NOT NULL, last_failure_status, "
                  "last_failure_error, breaker_failures, breaker_state FROM crm_bridge.url_stat WHERE trigger_id = %s",
                  [tid])[0]


def test_delivered_and_failed_calls_of_several_urls_in_one_batch(db):
    a = db.add_url("customer", "create", "http://127.0.0.1:9/a")
    b = db.add_url("customer", "create", "http://127.0.0.1:9/b", breaker_threshold=3)
    batch, calls = _claim_batch(db, 4)
    out = [(c, "delivered", 1, 200, None) for c in calls[a]]
    b1, b2, b3, b4 = calls[b]
    out += [(b1, "pending", 1, 503, "HTTP 503"), (b2, "delivered", 1, 204, None),
            (b3, "dead", 1, None, "connection refused"), (b4, "waiting", 0, None, None)]
    assert _record(db, batch, out) == 8
    assert _stat(db, a) == (True, False, None, None, 0, "closed")
    # b answered once: its run of failures is over; its last failure is the first of the batch
    assert _stat(db, b) == (True, True, 503, "HTTP 503", 0, "closed")
    assert db.one("SELECT count(*) FROM crm_bridge.history WHERE outcome = 'delivered'") == 5
    assert db.all("SELECT status, count(*) FROM crm_bridge.queue GROUP BY 1 ORDER BY 1") == [
        ("dead", 1), ("pending", 2)]


def test_failures_only_open_the_breaker_and_a_later_success_closes_it(db):
    a = db.add_url("customer", "create", "http://127.0.0.1:9/a")
    b = db.add_url("customer", "create", "http://127.0.0.1:9/b", breaker_threshold=3)
    batch, calls = _claim_batch(db, 3)
    out = [(c, "delivered", 1, 200, None) for c in calls[a]]
    out += [(c, "pending", 1, 500 + n, f"HTTP {500 + n}") for n, c in enumerate(calls[b])]
    assert _record(db, batch, out) == 6
    assert _stat(db, b) == (False, True, 500, "HTTP 500", 3, "open")
    assert _stat(db, a) == (True, False, None, None, 0, "closed")
    # the queued calls come back through claim_due; a delivered one closes the breaker
    db.execute("UPDATE crm_bridge.url_stat SET breaker_state = 'half_open' WHERE trigger_id = %s", [b])
    call = calls[b][0]
    db.execute("UPDATE crm_bridge.queue SET status = 'in_flight', worker = 'w', "
               "lease_until = now() + interval '1 min' WHERE id = %s", [call])
    assert db.one("SELECT crm_bridge.daemon_complete('w', %s, '{delivered}', '{1}', '{200}', '{NULL}', '{0}', '{5}')",
                  [[call]]) == 1
    assert _stat(db, b) == (True, True, 500, "HTTP 500", 0, "closed")


@pytest.mark.parametrize("bad", [["delivered", None], ["delivered", "sent"]])
def test_an_unknown_or_missing_status_is_refused_and_records_nothing(db, bad):
    a = db.add_url("customer", "create", "http://127.0.0.1:9/a")
    batch, calls = _claim_batch(db, 2)
    out = [(c, s, 1, 200, None) for c, s in zip(calls[a], bad, strict=True)]
    with pytest.raises(Exception, match="a status must be one of delivered, pending, dead, running, waiting"):
        _record(db, batch, out)
    assert db.one("SELECT count(*) FROM crm_bridge.batch WHERE id = %s", [batch]) == 1
    assert db.one("SELECT count(*) FROM crm_bridge.history") == 0
