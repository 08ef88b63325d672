"""One HTTP attempt for one delivery (or one batch of a URL's deliveries), and the retry policy
that judges its outcome."""

from __future__ import annotations

import email.utils
import logging
import random
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import httpx

from .aio import deadline
from .calls import (
    MAX_ANSWER,
    Call,
    CallConfigError,
    UrlPlan,
    call_secrets,
    failed_in_answer,
    json_body,
    make_batch_call,
    make_call,
    plan_for,
)
from .http import READ_ANSWER, AddressRefused, send, unfollowed_redirect
from .models import Delivery, Outcome
from .redact import clean_text, describe_exception, redact_url
from .settings import Settings
from .urls import MissingId

log = logging.getLogger("crm_bridge.deliver")

# 4xx that are worth retrying: timeout, too early, rate limited.  Every other 4xx is permanent.
RETRYABLE_4XX = frozenset({408, 425, 429})
MAX_ERROR_LEN = 500
# The longest wait before a retry, whatever the configuration says (crm_bridge.max_retry_delay()).
MAX_RETRY_DELAY = 7 * 86400.0


def _retry_after(value: str | None, cap: float) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date), capped; None if absent/invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), cap)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return min(max((when - datetime.now(UTC)).total_seconds(), 0.0), cap)


class RetryPolicy:
    """Judges one attempt's answer (judge): delivered on a 2xx; a dead letter on a permanent 4xx
    (all but RETRYABLE_4XX) or when the URL's max_attempts are used up; else pending again after
    the URL's retry schedule (with +-retry_jitter, at most MAX_RETRY_DELAY), or after the
    receiver's Retry-After on a 429/503 (capped by retry_after_cap).  Per-URL values come from
    the claimed row, the rest from ``settings`` (Settings.url_*)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def backoff(self, d: Delivery, attempt: int) -> float:
        """Delay before attempt ``attempt + 1`` after ``attempt`` failures, with jitter."""
        schedule = self.settings.url_retry_schedule(d)
        base = schedule[min(attempt - 1, len(schedule) - 1)]
        jitter = self.settings.retry_jitter
        if jitter:
            base *= random.uniform(1 - jitter, 1 + jitter)
        return min(max(base, 0.0), MAX_RETRY_DELAY)

    def max_attempts(self, d: Delivery) -> int:
        return self.settings.url_max_attempts(d)

    def judge(self, d: Delivery, *, status: int | None, error: str | None,
              retry_after: str | None, duration_ms: int) -> Outcome:
        attempt = d.attempts + 1
        if status is not None and 200 <= status < 300:
            return Outcome("delivered", http_status=status, duration_ms=duration_ms)
        permanent = status is not None and 400 <= status < 500 and status not in RETRYABLE_4XX
        err = (error or f"HTTP {status}")[:MAX_ERROR_LEN]
        if permanent:
            return Outcome("dead", http_status=status, error=f"permanent failure: {err}", duration_ms=duration_ms)
        if attempt >= self.max_attempts(d):
            return Outcome("dead", http_status=status, error=f"gave up after {attempt} attempts: {err}",
                           duration_ms=duration_ms)
        delay = self.backoff(d, attempt)
        hinted = _retry_after(retry_after, self.settings.retry_after_cap) if status in (429, 503) else None
        if hinted is not None:
            delay = min(hinted, MAX_RETRY_DELAY)
        return Outcome("pending", http_status=status, error=err, delay=delay, duration_ms=duration_ms)


_timeouts: dict[float, dict[str, float | None]] = {}


def _timeout_extension(seconds: float) -> dict[str, float | None]:
    """httpx's per-request timeout extension for ``seconds``, made once per value (never mutated)."""
    ext = _timeouts.get(seconds)
    if ext is None:
        if len(_timeouts) >= 1000:
            _timeouts.clear()
        ext = _timeouts[seconds] = httpx.Timeout(seconds).as_dict()
    return ext


async def attempt(client: httpx.AsyncClient, policy: RetryPolicy, d: Delivery, settings: Settings) -> Outcome:
    """Make one call and judge it.  Never raises (except cancellation).

    Error texts are scrubbed of every configured secret (URL credentials, header values, the
    signing secret, token-looking path segments) before they reach the delivery row, the attempt
    history or a log line, and made storable and printable: whatever a receiver put in its body,
    headers or reason phrase (NUL, escape sequences, a megabyte) ends up as at most
    MAX_ERROR_LEN characters with control characters escaped (redact.clean_text).
    """
    outcome = await _attempt(client, policy, d, settings)
    if outcome.error is not None:
        outcome.error = clean_text(outcome.error, limit=MAX_ERROR_LEN)
    return outcome


def _dead(error: str, secrets: Sequence[str]) -> Outcome:
    """A call that cannot be made (a permanent failure, before anything was sent)."""
    return Outcome("dead", error=clean_text(error, secrets, MAX_ERROR_LEN))


def _unbuildable(d: Delivery, exc: Exception, secrets: Sequence[str]) -> Outcome:
    assert d.url is not None
    return _dead(f"cannot build the request for {redact_url(d.url)}: {describe_exception(exc)}", secrets)


async def _attempt(client: httpx.AsyncClient, policy: RetryPolicy, d: Delivery, settings: Settings) -> Outcome:
    assert d.url is not None
    # What every call of this URL shares is prepared once per configuration (calls.plan_for); the
    # secrets to scrub are only used when something went wrong.
    try:
        plan = plan_for(d)
    except Exception as exc:  # an odd row or a bug: one dead delivery, never a dead daemon
        return _unbuildable(d, exc, call_secrets(d))
    secrets = plan.secrets
    try:
        call, query = make_call(plan, d)
    except (MissingId, CallConfigError) as exc:
        return _dead(str(exc), secrets)
    except Exception as exc:  # an odd URL or a bug: one dead delivery, never a dead daemon
        return _unbuildable(d, exc, secrets)
    ex = await _exchange(client, plan, call, query, d, settings)
    if isinstance(ex, Outcome):
        return ex
    if ex.refused:
        # The policy will refuse the next attempt too: a dead letter now, not seven more tries.
        return Outcome("dead", error=f"permanent failure: {ex.error}", duration_ms=ex.duration_ms)
    return policy.judge(d, status=ex.status, error=ex.error, retry_after=ex.retry_after, duration_ms=ex.duration_ms)


@dataclass(slots=True)
class _Exchange:
    """What one request got: the status (None: no answer), an error text, Retry-After, the time
    it took, whether the address policy refused it, and the answer's body (2xx only)."""

    status: int | None
    error: str | None
    retry_after: str | None
    duration_ms: int
    refused: bool
    content: bytes = b""


async def _exchange(client: httpx.AsyncClient, plan: UrlPlan, call: Call, query: str, d: Delivery,
                    settings: Settings, *, read_answer: int = 0) -> _Exchange | Outcome:
    """Send ``call`` (built for ``d``'s URL) and read the answer (of a 2xx, at most
    ``read_answer`` bytes).  An Outcome when the request cannot even be built (a dead letter).
    Never raises (except cancellation)."""
    assert d.url is not None
    secrets = plan.secrets
    timeout = settings.url_timeout(d)
    follow = settings.url_follow_redirects(d)
    started = time.monotonic()
    status: int | None = None
    error: str | None = None
    retry_after: str | None = None
    refused = False
    content = b""
    try:
        request = client.build_request(call.method, plan.target(call.url, query), headers=call.headers,
                                       content=call.body or None,
                                       extensions={"timeout": _timeout_extension(timeout)} if not read_answer
                                       else {"timeout": _timeout_extension(timeout), READ_ANSWER: read_answer})
    except (httpx.InvalidURL, ValueError) as exc:  # e.g. malformed punycode (idna.IDNAError)
        return _dead(f"invalid URL {redact_url(call.url)}: {exc}", secrets)
    try:
        # One deadline for the whole call, redirects and the error body included, without a timer
        # per call (bridge/aio.py; an anyio cancel scope per call costs three times as much
        # as asyncio.timeout, which costs ~15 µs per call: bench/profile_calls).
        async with deadline(timeout):
            resp, refusal = await send(client, request, follow=follow, private_headers=call.static_header_names)
        status = resp.status_code
        if 200 <= status < 300:
            content = resp.content
        if refusal:
            error = refusal
        elif status >= 300:
            retry_after = resp.headers.get("retry-after")
            error = unfollowed_redirect(resp, follow)
            if error is None:
                snippet = clean_text(resp.content.decode("utf-8", "replace").strip(), secrets, 300)
                error = f"HTTP {status}" + (f": {snippet}" if snippet else "")
    except TimeoutError:
        error = f"timed out after {timeout:g} s"
    except AddressRefused as exc:
        refused = True
        error = f"refused by the address policy, nothing was sent: {exc}"
    except httpx.HTTPError as exc:
        error = describe_exception(exc)
    except Exception as exc:  # a bug or an odd URL must not kill the daemon
        error = describe_exception(exc)
        log.error("unexpected error calling %s: %s", redact_url(call.url),
                  clean_text("".join(traceback.format_exception(exc)), secrets, 4000))
    duration_ms = int((time.monotonic() - started) * 1000)
    if error:
        error = error.replace(call.url, redact_url(call.url)).replace(d.url, redact_url(d.url))
        error = clean_text(error, secrets, 2 * MAX_ERROR_LEN)  # judge() adds a prefix; attempt() bounds it
    return _Exchange(status, error, retry_after, duration_ms, refused, content)


# -- batched calls (crm_trigger.batch_max) ---------------------------------------------------------
async def attempt_batch(client: httpx.AsyncClient, policy: RetryPolicy, ds: Sequence[Delivery],
                        settings: Settings) -> list[Outcome]:
    """Send the calls ``ds`` (one URL, the same attempt count) in one request and judge it: one
    outcome per call, in order.  Never raises (except cancellation).

    * a 2xx acknowledges every call, except those whose event id the answer lists in
      ``{"failed": [...]}`` (calls.failed_in_answer): they fail this attempt;
    * any other answer, a timeout or a connection error fails the attempt of every call;
    * failed calls are retried (each with its attempt count, max_attempts, dead letter) after ONE
      delay for the whole batch, so they come back due together and a retry of the same calls
      carries the same key;
    * a call whose own body cannot be built (a NULL ID, a broken row) is a dead letter alone.
    """
    outcomes = await _attempt_batch(client, policy, ds, settings)
    for o in outcomes:
        if o.error is not None:
            o.error = clean_text(o.error, limit=MAX_ERROR_LEN)
    return outcomes


async def _attempt_batch(client: httpx.AsyncClient, policy: RetryPolicy, ds: Sequence[Delivery],
                         settings: Settings) -> list[Outcome]:
    first = ds[0]
    assert first.url is not None
    try:
        plan = plan_for(first)
    except Exception as exc:
        dead = _unbuildable(first, exc, call_secrets(first))
        return [replace(dead) for _ in ds]
    secrets = plan.secrets
    out: list[Outcome | None] = [None] * len(ds)
    if plan.error is not None:
        return [_dead(plan.error, secrets) for _ in ds]
    members: list[int] = []
    bodies: list[bytes] = []
    for i, d in enumerate(ds):
        try:
            bodies.append(json_body(d))
        except (MissingId, CallConfigError) as exc:
            out[i] = _dead(str(exc), secrets)
            continue
        except Exception as exc:  # an odd row or a bug: one dead delivery
            out[i] = _unbuildable(d, exc, secrets)
            continue
        members.append(i)
    if members:
        sent = [ds[i] for i in members]
        for i, o in zip(members, await _send_batch(client, policy, plan, sent, bodies, settings), strict=True):
            out[i] = o
    return [o if o is not None else Outcome("dead", error="no outcome (a bug)") for o in out]


async def _send_batch(client: httpx.AsyncClient, policy: RetryPolicy, plan: UrlPlan, sent: list[Delivery],
                      bodies: list[bytes], settings: Settings) -> list[Outcome]:
    first = sent[0]
    try:
        call = make_batch_call(plan, sent, bodies)
    except CallConfigError as exc:
        return [_dead(str(exc), plan.secrets) for _ in sent]
    except Exception as exc:
        dead = _unbuildable(first, exc, plan.secrets)
        return [replace(dead) for _ in sent]
    ex = await _exchange(client, plan, call, "", first, settings, read_answer=MAX_ANSWER)
    if isinstance(ex, Outcome):
        return [replace(ex) for _ in sent]
    if ex.refused:
        return [Outcome("dead", error=f"permanent failure: {ex.error}", duration_ms=ex.duration_ms) for _ in sent]
    if ex.status is not None and 200 <= ex.status < 300:
        failed = failed_in_answer(ex.content) or frozenset()
        delivered = Outcome("delivered", http_status=ex.status, duration_ms=ex.duration_ms)
        if not failed or not any(d.event_id in failed for d in sent):
            return [replace(delivered) for _ in sent]
        # One judgement for every listed call: the same delay, so they come back together.
        listed = policy.judge(first, status=None, retry_after=None, duration_ms=ex.duration_ms,
                              error=f"HTTP {ex.status}: the receiver listed the event as failed")
        listed.http_status = ex.status
        return [replace(listed) if d.event_id in failed else replace(delivered) for d in sent]
    judged = policy.judge(first, status=ex.status, error=ex.error, retry_after=ex.retry_after,
                          duration_ms=ex.duration_ms)
    return [replace(judged) for _ in sent]
