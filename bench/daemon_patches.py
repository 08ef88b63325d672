"""Prototype changes to the daemon, measured beside the real one (the bench never edits bridge/).

``python -m bench.daemon_patches --patch NAME[,NAME] -- <crm-bridge arguments>`` applies the
named patches to ``bridge.dispatch.Daemon`` and then runs the unchanged ``crm-bridge`` CLI.

``wakefix`` — pending deliveries wait for the 2 s fallback poll.  Once a URL has more queued
deliveries than its max_in_flight, the rest are ``pending`` and only ``claim_due`` starts them.
The daemon runs claim_due when ``_next_due`` has passed, and a finished delivery resets
``_next_due`` only if its URL was *full* at that moment.  So (a) when several deliveries of a
URL finish before the main loop claims again, only the first one triggers a claim, and (b)
``_drain_once`` sets ``_next_due = now + poll`` *after* awaiting claim_due, overwriting a reset
made during the await.  Either way the daemon goes idle with slots free and due deliveries
pending, and waits for the poll: the backlog drains in bursts of ~16 every 2 s.  The patch
remembers which URLs may still have due deliveries (a claim filled all their free slots), wakes
the main loop whenever one of their deliveries finishes, and decides the poll deadline before
the await.

``rawsend`` — send with aiohttp directly instead of through httpx.AsyncClient.  The daemon's
transport already is aiohttp (bridge/http.py); the httpx layer on top builds Request/Response
objects, merges headers and re-parses the URL for every call: as raw clients on this machine,
httpx-on-aiohttp makes about a third of plain aiohttp's requests/s at the same concurrency.
Same session (so the same address policy and connection pool), same timeouts, same judgement
of the outcome (RetryPolicy.judge).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import aiohttp
import anyio
import httpx
from anyio.abc import TaskGroup
from psycopg.rows import dict_row
from yarl import URL

from bridge import cli
from bridge import dispatch as dispatch_module
from bridge.deliver import Delivery, Outcome, RetryPolicy
from bridge.dispatch import Daemon
from bridge.http import BridgeTransport, _ip_literal
from bridge.settings import Settings
from bridge.sqlfiles import Q
from bridge.urls import MissingId, call_url

_original_spawn = Daemon._spawn
_original_deliver = Daemon._deliver


def _maybe_pending(self: Daemon) -> set[int]:
    """URLs (crm_trigger ids) that may have due pending deliveries."""
    found: set[int] | None = getattr(self, "_bench_maybe_pending", None)
    if found is None:
        found = set()
        self._bench_maybe_pending = found  # type: ignore[attr-defined]
    return found


def _free(self: Daemon, tid: int) -> int:
    limit = self._url_limit.get(tid, self.s.max_in_flight_per_url)
    return max(limit - self._url_held.get(tid, 0), 0)


def _spawn(self: Daemon, tg: TaskGroup, rows: list[dict[str, Any]]) -> int:
    for row in rows:
        if row["status"] == "pending" and row["trigger_id"] is not None:
            _maybe_pending(self).add(row["trigger_id"])
    return _original_spawn(self, tg, rows)


async def _deliver(self: Daemon, d: Delivery) -> None:
    await _original_deliver(self, d)
    if d.trigger_id in _maybe_pending(self) and _free(self, d.trigger_id) > 0:
        self._next_due = 0.0
        self._wake.set()


async def _drain_once(self: Daemon, tg: TaskGroup) -> bool:
    """bridge.dispatch.Daemon._drain_once; the CHANGED lines are the patch."""
    assert self._pool is not None
    room = self._max_held() - self._held
    if room <= 0:
        return True
    busy_ids, busy_free = self._busy_arrays()
    params = {"batch": min(self.s.batch_size, room), "lease": timedelta(seconds=self.s.lease),
              "worker": self.s.worker_id, "busy_ids": busy_ids, "busy_free": busy_free,
              "default_limit": self.s.max_in_flight_per_url}
    async with self._pool.connection() as conn:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(Q.dispatch_events, params)
        rows = await cur.fetchall()
        events = len({r["event_id"] for r in rows})
        pending = self._spawn(tg, rows)
        due = []
        if pending or time.monotonic() >= self._next_due:
            busy_ids, busy_free = self._busy_arrays()
            asked = dict(zip(busy_ids, busy_free, strict=True))
            params.update(busy_ids=busy_ids, busy_free=busy_free,
                          batch=max(min(self.s.batch_size, self._max_held() - self._held), 0))
            # CHANGED: decided before the await, so that a reset by _deliver during it survives.
            self._next_due = time.monotonic() + self.s.poll_interval
            if params["batch"]:
                await cur.execute(Q.claim_due, params)
                due = await cur.fetchall()
                self._spawn(tg, due)
                # CHANGED: a URL whose claim did not fill its free slots has nothing more due.
                if len(due) < params["batch"]:
                    got: dict[int, int] = {}
                    for r in due:
                        got[r["trigger_id"]] = got.get(r["trigger_id"], 0) + 1
                    for tid in list(_maybe_pending(self)):
                        if got.get(tid, 0) < asked.get(tid, self.s.max_in_flight_per_url):
                            _maybe_pending(self).discard(tid)
    return bool(events or due)


def _wakefix() -> None:
    Daemon._spawn = _spawn  # type: ignore[method-assign]
    Daemon._deliver = _deliver  # type: ignore[method-assign]
    Daemon._drain_once = _drain_once  # type: ignore[method-assign]


async def _attempt_raw(client: httpx.AsyncClient, policy: RetryPolicy, d: Delivery, settings: Settings) -> Outcome:
    """bridge.deliver.attempt on the transport's aiohttp session, without the httpx layer."""
    assert d.url is not None
    try:
        url = call_url(d.url, d.id_params, d.ids)
    except MissingId as exc:
        return Outcome("dead", error=str(exc))
    transport = client._transport
    assert isinstance(transport, BridgeTransport)
    timeout = d.timeout_ms / 1000.0 if d.timeout_ms else settings.timeout
    started = time.monotonic()
    status: int | None = None
    error: str | None = None
    retry_after: str | None = None
    try:
        target = URL(url, encoded=True)
        if target.host and (literal := _ip_literal(target.host)) is not None:
            transport._policy.check(target.host, literal)
        with anyio.fail_after(timeout):
            async with transport._get_session().get(
                    target, headers={"User-Agent": "crm-bridge/0.1"}, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(sock_connect=timeout, sock_read=timeout)) as resp:
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
                if status >= 300:
                    snippet = (await resp.content.read(200)).decode("utf-8", "replace").strip()
                    error = f"HTTP {status}" + (f": {snippet}" if snippet else "")
    except TimeoutError:
        error = f"timed out after {timeout:g} s"
    except (aiohttp.ClientError, httpx.HTTPError, OSError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    duration_ms = int((time.monotonic() - started) * 1000)
    return policy.judge(d, status=status, error=error, retry_after=retry_after, duration_ms=duration_ms)


def _rawsend() -> None:
    dispatch_module.attempt = _attempt_raw  # type: ignore[assignment]


PATCHES: dict[str, Callable[[], None]] = {"wakefix": _wakefix, "rawsend": _rawsend}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="crm-bridge with prototype patches applied")
    p.add_argument("--patch", required=True, help=f"comma-separated: {', '.join(PATCHES)}")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="-- then the crm-bridge arguments")
    args = p.parse_args(argv)
    for name in filter(None, args.patch.split(",")):
        if name not in PATCHES:
            p.error(f"unknown patch {name!r} (expected: {', '.join(PATCHES)})")
        PATCHES[name]()
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    return cli.main(rest)


if __name__ == "__main__":
    sys.exit(main())
