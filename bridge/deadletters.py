"""`crm-bridge replay` and `crm-bridge purge`: dead letters, by URL, object, time range or ids."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import Any

import psycopg

from .redact import redact_url
from .sqlfiles import Q

BATCH = 1000


def add_filter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trigger-id", type=int, help="only dead letters of this crm_trigger row")
    p.add_argument("--url", help="only dead letters for this URL (as configured)")
    p.add_argument("--object", choices=["customer", "case", "followup", "task"], help="only this CRM object")
    p.add_argument("--since", type=_timestamp, help="changes made at or after this time (ISO 8601)")
    p.add_argument("--until", type=_timestamp, help="changes made before this time (ISO 8601)")
    p.add_argument("--id", dest="ids", type=_ids, action="append", metavar="ID[,ID…]",
                   help="only these delivery ids (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="show what would be done, change nothing")


def _timestamp(value: str) -> datetime:
    try:
        ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid timestamp {value!r} (use ISO 8601, e.g. 2026-11-25T10:00:00Z)") from None
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def _ids(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid delivery id list {value!r} (expected e.g. 12,13)") from None


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    ids = [i for chunk in args.ids for i in chunk] if args.ids else None
    return {"trigger_id": args.trigger_id, "url": args.url, "object": args.object,
            "since": args.since, "until": args.until, "ids": ids}


def run(args: argparse.Namespace, dsn: str, action: str) -> int:
    """Replay or purge, in batches, printing progress; --dry-run only counts and shows a sample."""
    filters = _filters(args)
    verb = {"replay": "replayed", "purge": "purged"}[action]
    with psycopg.connect(dsn, autocommit=True) as conn:
        total = conn.execute(Q.dead_letter_count, filters).fetchone()[0]  # type: ignore[index]
        if args.dry_run:
            print(f"{total} dead letter(s) would be {verb}")
            for row in conn.execute(Q.dead_letter_sample, {**filters, "limit": 20}):
                did, obj, event, ids, url, attempts, last_status, last_error, _ = row
                print(f"  #{did} {obj}/{event} {ids} -> {redact_url(url or '(url deleted)')} "
                      f"after {attempts} attempt(s): {last_error or last_status}")
            if total > 20:
                print(f"  … and {total - 20} more")
            return 0
        done = 0
        query = Q.replay_batch if action == "replay" else Q.purge_batch
        while True:
            n = conn.execute(query, {**filters, "limit": BATCH}).fetchone()[0]  # type: ignore[index]
            done += n
            if total > BATCH:
                print(f"\r{verb} {done}/{total}", end="", file=sys.stderr, flush=True)
            if n < BATCH:
                break
        if total > BATCH:
            print(file=sys.stderr)
    print(f"{verb} {done} dead letter(s)")
    if action == "replay" and done < total:
        print(f"({total - done} skipped: their URL was deleted from crm_trigger)")
    return 0
