"""The retry policy's verdicts (pure functions: no I/O)."""

from __future__ import annotations

import email.utils
from datetime import UTC, datetime, timedelta

import pytest
from fixtures.factories import make_delivery

from bridge.deliver import RetryPolicy, _retry_after
from bridge.models import Delivery
from bridge.settings import DEFAULT_RETRY_SCHEDULE, Settings


def delivery(attempts: int = 0, **kw) -> Delivery:
    return make_delivery(**{"object": "case", "ids": ["a", "c"], "event_created_at": datetime.now(UTC),
                            "attempts": attempts, "url": "http://127.0.0.1/x", "id_params": ["AccountID", "CaseID"],
                            **kw})


def judge(policy: RetryPolicy, d: Delivery, status: int | None, retry_after: str | None = None):
    return policy.judge(d, status=status, error=None if status else "ConnectError", retry_after=retry_after,
                        duration_ms=1)


def test_default_schedule_is_standard_webhooks():
    s = Settings()
    assert s.retry_schedule == DEFAULT_RETRY_SCHEDULE == (5, 300, 1800, 7200, 18000, 36000, 36000)
    assert s.max_attempts == 8 and s.timeout == 15.0


@pytest.mark.parametrize(("status", "verdict"), [
    (200, "delivered"), (204, "delivered"), (301, "pending"), (400, "dead"), (401, "dead"), (404, "dead"),
    (408, "pending"), (410, "dead"), (425, "pending"), (429, "pending"), (500, "pending"), (502, "pending"),
    (503, "pending"), (None, "pending"),
])
def test_which_answers_are_permanent(status, verdict):
    assert judge(RetryPolicy(Settings()), delivery(), status).status == verdict


def test_backoff_follows_the_schedule_with_bounded_jitter():
    policy = RetryPolicy(Settings(retry_jitter=0.2))
    for attempt, base in enumerate(DEFAULT_RETRY_SCHEDULE, start=1):
        delays = [policy.backoff(delivery(), attempt) for _ in range(50)]
        assert all(0.8 * base <= d <= 1.2 * base for d in delays)
        assert len(set(delays)) > 1  # jitter spreads retries of a burst


def test_attempts_are_bounded_then_dead():
    policy = RetryPolicy(Settings(max_attempts=3))
    assert judge(policy, delivery(attempts=1), 500).status == "pending"
    out = judge(policy, delivery(attempts=2), 500)
    assert out.status == "dead" and out.error.startswith("gave up after 3 attempts")


def test_per_url_schedule_and_max_attempts_override_the_defaults():
    policy = RetryPolicy(Settings(retry_jitter=0))
    d = delivery(attempts=0, retry_schedule=[7.0], max_attempts=2)
    assert judge(policy, d, 500).delay == 7
    assert judge(policy, delivery(attempts=1, max_attempts=2), 500).status == "dead"


def test_retry_after_seconds_and_http_date_are_honoured_and_capped():
    policy = RetryPolicy(Settings(retry_jitter=0, retry_after_cap=600))
    assert judge(policy, delivery(), 503, "120").delay == 120
    assert judge(policy, delivery(), 429, "99999").delay == 600
    when = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=90), usegmt=True)
    assert 85 <= judge(policy, delivery(), 429, when).delay <= 90
    assert judge(policy, delivery(), 503, "soon").delay == 5  # unparsable: the schedule applies
    assert _retry_after(None, 10) is None
