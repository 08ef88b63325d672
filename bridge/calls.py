"""The shape of one call: method, URL, headers and body, configured per URL in crm_trigger.

* GET (the default, the query strings of the README's first table): ``<url>?AccountID=…``, empty body.
* POST: the configured URL as is, JSON body ``{"object","event","ids":{…},"occurred_at","event_id"}``.
* Batched POST (``batch_max`` > 1): up to batch_max calls in one request, the body a JSON array of
  their single-call bodies, one signature and one key per batch (batch_key).

Every call carries ``Idempotency-Key`` and ``webhook-id`` (both the call id: one per record and
URL, kept by retries and replays) so that a receiver can drop the duplicates at-least-once
delivery may produce.  URLs with a signing secret also get
Standard Webhooks' ``webhook-timestamp`` and ``webhook-signature`` (``v1,`` + base64 HMAC-SHA256
of ``id.timestamp.body``).  Static headers come from ``crm_trigger.headers``; the database
validates them, and they are checked again here because validation can be switched off.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC
from urllib.parse import unquote, urlsplit

import httpx

from .models import Delivery
from .redact import SECRET_PARAMS, path_secrets
from .urls import MissingId, query_prefix, query_string

METHODS = ("GET", "POST")
# Headers crm-bridge sets itself or that would break the request framing.
RESERVED_HEADERS = frozenset({
    "host", "content-length", "content-type", "transfer-encoding", "connection", "keep-alive", "te",
    "trailer", "upgrade", "expect", "proxy-authorization", "proxy-connection",
    "idempotency-key", "webhook-id", "webhook-timestamp", "webhook-signature",
})
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}")
_VALUE = re.compile(r"[\x20-\x7e]{0,4000}")
MIN_SECRET_LEN = 4


class CallConfigError(ValueError):
    """The URL's configuration cannot make a valid request (only when DB validation was bypassed)."""


@dataclass(frozen=True, slots=True)
class Call:
    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes
    static_header_names: tuple[str, ...] = ()   # not forwarded to another origin (http.send)


def _parse_headers(raw: object, trigger_id: int | None) -> object:
    """``crm_trigger.headers`` as the daemon receives it (text) parsed, per delivery: JSON a parser
    cannot take (nested thousands deep, a number of thousands of digits) makes this URL's calls
    dead letters, never the daemon's fetch fail."""
    if not isinstance(raw, str | bytes):
        return raw  # already parsed (or None)
    try:
        return json.loads(raw)
    except Exception as exc:
        raise CallConfigError(f"crm_trigger {trigger_id}: headers cannot be read as JSON "
                              f"({type(exc).__name__}); set them again as a JSON object of "
                              '{"Name": "value"}') from None


def static_headers(raw: object, trigger_id: int | None) -> list[tuple[str, str]]:
    """``crm_trigger.headers`` as a list; messages name the header but never print its value."""
    raw = _parse_headers(raw, trigger_id)
    if raw is None:
        return []
    where = f"crm_trigger {trigger_id}"
    if not isinstance(raw, dict):
        raise CallConfigError(f"{where}: headers must be a JSON object, got {type(raw).__name__}")
    out = []
    for name, value in raw.items():
        if not isinstance(name, str) or not _TOKEN.fullmatch(name):
            raise CallConfigError(f"{where}: {json.dumps(str(name)[:100])} is not a valid HTTP header name")
        if name.lower() in RESERVED_HEADERS:
            raise CallConfigError(f"{where}: header {name!r} is set by crm-bridge itself")
        if not isinstance(value, str) or not _VALUE.fullmatch(value):
            raise CallConfigError(f"{where}: header {name!r} must be printable ASCII text")
        out.append((name, value))
    return out


def url_secrets(url: str) -> list[str]:
    """Credentials a URL carries: the userinfo password (or a token used as user name), the
    values of secret-looking query parameters and the token-looking path segments that
    redact_url masks (a receiver may quote the path alone), raw and percent-decoded."""
    found: list[str] = []
    try:
        parts = urlsplit(url)
    except ValueError:
        return found
    if "@" in parts.netloc:
        userinfo = parts.netloc.rpartition("@")[0]
        user, colon, password = userinfo.partition(":")
        found.append(password if colon else user)
    for pair in parts.query.split("&"):
        name, eq, value = pair.partition("=")
        if eq and SECRET_PARAMS.match(name):
            found.append(value)
    found += path_secrets(url)
    return [s for v in found for s in {v, unquote(v)} if len(s) >= MIN_SECRET_LEN]


def _secrets(d: Delivery) -> tuple[str, ...]:
    out = url_secrets(d.url or "")
    try:
        headers = _parse_headers(d.headers, d.trigger_id)
    except CallConfigError:
        headers = None  # the plan refuses them with that reason; nothing is sent
    if isinstance(headers, dict):
        out += [v for v in headers.values() if isinstance(v, str) and len(v) >= MIN_SECRET_LEN]
    if d.signing_secret:
        out += [d.signing_secret, d.signing_secret.removeprefix("whsec_")]
    return tuple(out)


def call_secrets(d: Delivery) -> tuple[str, ...]:
    """Every configured value that must never appear in an error message or a log line."""
    try:
        return plan_for(d).secrets
    except Exception:  # a row no plan can be made from (a bug, odd data): what can be found
        try:
            return _secrets(d)
        except Exception:
            return ()


def _signing_key(secret: str) -> bytes:
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        raise CallConfigError("the signing secret is not valid base64 (set it again with "
                              "crm_bridge.set_signing_secret)") from None
    if not key:
        raise CallConfigError("the signing secret is empty")
    return key


def _signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode("ascii")


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks v1 signature of ``msg_id.timestamp.body`` with a ``whsec_`` secret."""
    return _signature(_signing_key(secret), msg_id, timestamp, body)


# -- per-URL plans ---------------------------------------------------------------------------------
# Query parameter names that need no percent-encoding: a GET URL is then the parsed base URL plus a
# query string httpx would take as it is (UrlPlan.target), without parsing the whole URL per call.
_PLAIN_PARAM = re.compile(r"[A-Za-z0-9._~-]+")
MAX_PLANS = 10_000
# httpx refuses longer URLs ("URL too long"); such a call keeps being parsed whole, and refused.
_MAX_URL_LENGTH = getattr(getattr(httpx, "_urlparse", None), "MAX_URL_LENGTH", 65_536)


@dataclass(frozen=True, slots=True)
class UrlPlan:
    """What every call of one URL configuration has in common, prepared once (plan_for) rather
    than per call: the method, the URL the IDs are appended to (parsed once), the validated static
    headers, the decoded signing key and the values to scrub from error texts."""

    fingerprint: tuple[object, ...]   # the row's configuration this plan was made from
    method: str
    prefix: str                        # GET: the URL and the "?" or "&" to append the IDs to; POST: the URL
    id_params: tuple[str, ...]
    headers: tuple[tuple[str, str], ...]  # static headers (and Content-Type for POST)
    static_header_names: tuple[str, ...]
    secrets: tuple[str, ...] = field(repr=False)
    key: bytes | None = field(default=None, repr=False)
    error: str | None = None           # the configuration cannot make a request (CallConfigError)
    key_error: str | None = None       # the signing secret is unusable (raised after the IDs' checks)
    base: httpx.URL | None = None      # ``prefix`` parsed, when the fast path is exact for this URL

    def target(self, url: str, query: str) -> httpx.URL | str:
        """The request URL: ``url`` (= prefix + query) parsed, from ``base`` without re-parsing."""
        base = self.base
        if base is None or len(url) > _MAX_URL_LENGTH:
            return url
        if self.method != "GET":
            return base
        ref = base._uri_reference
        out = httpx.URL.__new__(httpx.URL)
        out._uri_reference = ref._replace(query=(ref.query or "") + query)
        return out


def _parsed_base(method: str, prefix: str, id_params: tuple[str, ...]) -> httpx.URL | None:
    """``prefix`` as an httpx.URL when appending a query to it is exactly what parsing the whole
    URL gives (checked once here on a sample); None: parse every call's URL (odd URLs, odd names)."""
    try:
        base = httpx.URL(prefix)
        if method != "GET":
            return base
        if not all(_PLAIN_PARAM.fullmatch(p) for p in id_params) or not isinstance(
                getattr(base, "_uri_reference", None), tuple):
            return None
        sample = "&".join(f"{p}=a%20b-{i}" for i, p in enumerate(id_params or ("x",)))
        plan_url = httpx.URL.__new__(httpx.URL)
        plan_url._uri_reference = base._uri_reference._replace(query=(base._uri_reference.query or "") + sample)
        whole = httpx.URL(prefix + sample)
        if plan_url != whole or str(plan_url) != str(whole) or plan_url.raw_path != whole.raw_path:
            return None
    except Exception:  # an invalid URL: every call reports it (deliver.attempt)
        return None
    return base


def _make_plan(d: Delivery, fingerprint: tuple[object, ...]) -> UrlPlan:
    assert d.url is not None
    secrets = _secrets(d)
    method = (d.method or "GET").upper()
    id_params = tuple(d.id_params)
    if method not in METHODS:
        return UrlPlan(fingerprint, method, d.url, id_params, (), (), secrets,
                       error=f"crm_trigger {d.trigger_id}: method {method[:20]!r} is not GET or POST")
    try:
        headers = static_headers(d.headers, d.trigger_id)
    except CallConfigError as exc:
        return UrlPlan(fingerprint, method, d.url, id_params, (), (), secrets, error=str(exc))
    configured = tuple(name for name, _ in headers)
    authority = d.url.partition("://")[2].split("/", 1)[0].split("?", 1)[0]
    if "@" in authority and any(n.lower() == "authorization" for n, _ in headers):
        return UrlPlan(fingerprint, method, d.url, id_params, (), (), secrets,
                       error=f"crm_trigger {d.trigger_id}: the URL has credentials and headers set "
                             "Authorization: use one or the other")
    if method == "GET":
        prefix = query_prefix(d.url)
    else:
        prefix = d.url
        headers.append(("Content-Type", "application/json"))
    key = key_error = None
    if d.signing_secret:
        try:
            key = _signing_key(d.signing_secret)
        except CallConfigError as exc:
            key_error = str(exc)
    return UrlPlan(fingerprint, method, prefix, id_params, tuple(headers), configured, secrets, key, None,
                   key_error, _parsed_base(method, prefix, id_params))


_plans: dict[int | None, UrlPlan] = {}


def plan_for(d: Delivery) -> UrlPlan:
    """The plan for ``d``'s URL, made when its configuration (URL, method, headers, signing secret,
    ID names) differs from the one the cached plan was made from: a change in crm_trigger takes
    effect with the next call that carries it."""
    headers = d.headers
    fingerprint = (d.url, d.method, headers, d.signing_secret, tuple(d.id_params))
    plan = _plans.get(d.trigger_id)
    if plan is not None and plan.fingerprint == fingerprint:
        return plan
    plan = _make_plan(d, fingerprint)
    if headers is None or isinstance(headers, str | bytes):  # a parsed (mutable) value: not cached
        if len(_plans) >= MAX_PLANS:
            _plans.clear()
        _plans[d.trigger_id] = plan
    return plan


# A JSON string (PostgreSQL escapes '"', '\\' and control characters in it) or JSON whitespace.
_JSON_STRING_OR_BLANK = re.compile(r'("[^"\\]*(?:\\.[^"\\]*)*")|[ \t\n\r]+', re.DOTALL)
# The body's own members: a row must not repeat them (a receiver would read one or the other).
ENVELOPE = ("object", "event", "ids", "occurred_at", "event_id")


def compact_json(text: str) -> str:
    """JSON text without the blanks between tokens (PostgreSQL writes ``{"a": 1, "b": 2}``), in one
    linear pass that never parses: nesting depth and number sizes do not matter."""
    return _JSON_STRING_OR_BLANK.sub(lambda m: m.group(1) or "", text)


def _top_level_keys(compact: str) -> list[str]:
    """The member names of a compact JSON object (as they are written, escapes included)."""
    keys, depth = [], 0
    for m in re.finditer(r'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\]]', compact):
        tok = m.group(0)
        if tok[0] in "{[":
            depth += 1
        elif tok[0] in "}]":
            depth -= 1
        elif depth == 1 and compact.startswith(":", m.end()):
            keys.append(tok[1:-1])
    return keys


def row_members(d: Delivery) -> str:
    """The captured row's members (``"new":{…}`` / ``"old":{…}`` / both) as JSON text, spliced into
    the body as PostgreSQL wrote them: never parsed, so no depth, number size or precision is lost
    or can fail.  Empty when the row is absent or empty."""
    raw = d.row
    if raw is None:
        return ""
    if not isinstance(raw, str):  # a parsed row (older callers, tests)
        if not isinstance(raw, dict):
            raise CallConfigError(f"delivery {d.id}: the captured row is not a JSON object")
        raw = json.dumps(raw, ensure_ascii=False, separators=(",", ":"))
    text = compact_json(raw)
    if text in ("null", "{}"):
        return ""
    if not (text.startswith("{") and text.endswith("}")):
        raise CallConfigError(f"delivery {d.id}: the captured row is not a JSON object "
                              "(the row column was changed by hand?)")
    clash = sorted(set(_top_level_keys(text)) & set(ENVELOPE))
    if clash:
        raise CallConfigError(f"delivery {d.id}: the captured row repeats the body's own "
                              f"member {clash[0]!r} (the row column was changed by hand?)")
    return text[1:-1]


def json_body(d: Delivery) -> bytes:
    query_string(d.id_params, d.ids)  # the same NULL-ID check as GET
    occurred = d.event_created_at.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    doc = {"object": d.object, "event": d.event, "ids": dict(zip(d.id_params, d.ids, strict=True)),
           "occurred_at": occurred, "event_id": d.event_id}
    envelope = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
    members = row_members(d)  # include_row: the captured row(s), {"new": …} / {"old": …} / both
    if members:
        envelope = f"{envelope[:-1]},{members}}}"
    return envelope.encode()


def make_call(plan: UrlPlan, d: Delivery, *, now: float | None = None) -> tuple[Call, str]:
    """The request for one attempt with ``plan`` (plan_for(d)), and its query string (GET).
    Raises MissingId or CallConfigError (both permanent)."""
    if plan.error is not None:
        raise CallConfigError(plan.error)
    if plan.method == "GET":
        query = query_string(plan.id_params, d.ids)
        url, body = plan.prefix + query, b""
    else:
        query, url, body = "", plan.prefix, json_body(d)
    # The call id: one per record and URL, the same on every retry, lease recovery and replay.
    # (Not the event id: all records of one bulk statement share their event.)
    return Call(plan.method, url, _headers(plan, str(d.id), body, now), body, plan.static_header_names), query


def _headers(plan: UrlPlan, msg_id: str, body: bytes, now: float | None) -> list[tuple[str, str]]:
    """The plan's static headers, the call's (or batch's) key and, for a signing URL, the signature."""
    headers = [*plan.headers, ("Idempotency-Key", msg_id), ("webhook-id", msg_id)]
    if plan.key_error is not None:
        raise CallConfigError(plan.key_error)
    if plan.key is not None:
        ts = int(time.time() if now is None else now)
        headers += [("webhook-timestamp", str(ts)), ("webhook-signature", _signature(plan.key, msg_id, ts, body))]
    return headers


# -- batched calls (crm_trigger.batch_max, migration 0013) -------------------------------------------
# The most calls one request carries, whatever the configuration says (the database refuses more).
MAX_BATCH = 1000


def batch_limit(d: Delivery) -> int:
    """How many calls of ``d``'s URL one request may carry: batch_max for a POST URL (bounded
    here too: validation can be switched off), else 1."""
    size = d.batch_max
    if not isinstance(size, int) or size <= 1 or (d.method or "GET").upper() != "POST":
        return 1
    return min(size, MAX_BATCH)


def batch_key(call_ids: Sequence[int]) -> str:
    """The Idempotency-Key / webhook-id of a batch: ``batch_<lowest call id>_<count>_<16 hex of
    SHA-256 over the sorted call ids>``.  A function of the set of calls only, so a retry of the
    same calls has the same key and any other set of calls another one (the lowest id and the
    count alone would give two different sets the same key, and a receiver that drops repeated
    keys would drop the second)."""
    ordered = sorted(call_ids)
    digest = hashlib.sha256(",".join(map(str, ordered)).encode()).hexdigest()[:16]
    return f"batch_{ordered[0]}_{len(ordered)}_{digest}"


def make_batch_call(plan: UrlPlan, ds: Sequence[Delivery], bodies: Sequence[bytes], *,
                    now: float | None = None) -> Call:
    """One POST for the calls ``ds`` of one URL: the body is the JSON array of their single-call
    bodies (``bodies``, json_body of each, in order), signed once over the whole body under the
    batch's key (batch_key).  Raises CallConfigError (permanent)."""
    if plan.error is not None:
        raise CallConfigError(plan.error)
    if plan.method != "POST":
        raise CallConfigError("batched calls need method = 'POST'")
    body = b"[" + b",".join(bodies) + b"]"
    return Call(plan.method, plan.prefix, _headers(plan, batch_key([d.id for d in ds]), body, now), body,
                plan.static_header_names)


# The largest answer body read for a list of failed events (a batch of 1,000 ids is ~20 kB).
MAX_ANSWER = 1 << 20


def failed_in_answer(content: bytes) -> frozenset[int] | None:
    """The event ids a receiver's 2xx answer to a batch lists as failed: a JSON object with a
    list ``"failed"`` of event ids (numbers, or strings of digits).  None when the answer says
    nothing of the kind (then the 2xx acknowledges every call).  Never raises."""
    if not content or len(content) > MAX_ANSWER or b'"failed"' not in content:
        return None
    try:
        doc = json.loads(content)
    except Exception:  # not JSON, too deep, ...: a plain acknowledgement
        return None
    failed = doc.get("failed") if isinstance(doc, dict) else None
    if not isinstance(failed, list):
        return None
    out: set[int] = set()
    for item in failed:
        if isinstance(item, int) and not isinstance(item, bool):
            out.add(item)
        elif isinstance(item, str) and item.isascii() and item.isdigit() and len(item) < 20:
            out.add(int(item))
    return frozenset(out)


def build_call(d: Delivery, *, now: float | None = None) -> Call:
    """The request for one attempt.  Raises MissingId or CallConfigError (both permanent)."""
    assert d.url is not None
    return make_call(plan_for(d), d, now=now)[0]


__all__ = ["Call", "CallConfigError", "MissingId", "UrlPlan", "batch_key", "batch_limit", "build_call",
           "call_secrets", "failed_in_answer", "json_body", "make_batch_call", "make_call", "plan_for", "sign",
           "static_headers"]
