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

``batchclaim`` — with ``wakefix``, a URL at its limit costs one claim_due round trip per
finished delivery.  This patch claims for a URL only once at least half of its slots are free.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from anyio.abc import TaskGroup
from psycopg.rows import dict_row

from bridge import cli
from bridge.deliver import Delivery
from bridge.dispatch import Daemon
from bridge.sqlfiles import Q

_original_spawn = Daemon._spawn
_original_deliver = Daemon._deliver
BATCH_CLAIMS = False     # set by the batchclaim patch


def _maybe_pending(self: Daemon) -> set[int]:
    """URLs (crm_trigger ids) that may have due pending deliveries."""
    found: set[int] | None = getattr(self, "_bench_maybe_pending", None)
    if found is None:
        found = set()
        self._bench_maybe_pending = found  # type: ignore[attr-defined]
    return found


def _free(self: Daemon, tid: int) -> int:
    limit = self._url_limit.get(tid, self.s.max_in_flight_per_url)
    free = max(limit - self._url_held.get(tid, 0), 0)
    if BATCH_CLAIMS and free * 2 < limit:
        return 0
    return free


def _busy_arrays(self: Daemon) -> tuple[list[int], list[int]]:
    ids, free = [], []
    for tid, held in self._url_held.items():
        if held:
            ids.append(tid)
            free.append(_free(self, tid))
    return ids, free


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
    Daemon._busy_arrays = _busy_arrays  # type: ignore[method-assign]
    Daemon._spawn = _spawn  # type: ignore[method-assign]
    Daemon._deliver = _deliver  # type: ignore[method-assign]
    Daemon._drain_once = _drain_once  # type: ignore[method-assign]


def _batchclaim() -> None:
    global BATCH_CLAIMS
    BATCH_CLAIMS = True


PATCHES: dict[str, Callable[[], None]] = {"wakefix": _wakefix, "batchclaim": _batchclaim}


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
