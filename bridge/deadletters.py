"""`crm-bridge replay`, `purge` and `retry-now`: dead letters and queued deliveries, by URL (its
crm_trigger id or the exact URL), object, record, time range or delivery ids.  `replay --record
AccountID=… [--record CaseID=…]`: the calls of one record (crm_bridge.replay_record).

When nothing matches, the commands say why (no such URL; the deliveries matched are pending, not
dead; …) instead of silently doing nothing.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from .redact import redact_url, safe_text, scrub
from .sqlfiles import Q
from .status import _table

BATCH = 1000
SAMPLE = 20
VERBS = {"replay": ("replayed", "replay", "dead letter(s)"), "purge": ("purged", "purge", "dead letter(s)"),
         "retry-now": ("made due now", "send now", "pending deliveries")}


def _url_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--url", metavar="ID|URL",
                   help=f"only {what} for this URL: its crm_trigger id (as in `crm-bridge status`) or the URL "
                        "exactly as configured")


def _common(p: argparse.ArgumentParser, what: str) -> None:
    _url_arg(p, what)
    p.add_argument("--object", choices=["customer", "case", "followup", "task"], help="only this CRM object")
    p.add_argument("--id", dest="ids", type=_ids, action="append", metavar="ID[,ID…]",
                   help="only these delivery ids (repeatable)")
    p.add_argument("--all", action="store_true", help=f"really all {what} (required when no filter is given)")
    p.add_argument("--dry-run", action="store_true", help="show what would be done, change nothing")


def add_filter_args(p: argparse.ArgumentParser, *, delivered: bool = False) -> None:
    """replay / purge: dead letters (replay: also --delivered)."""
    p.add_argument("--trigger-id", type=int, metavar="ID", help="only dead letters of this crm_trigger row")
    _common(p, "dead letters")
    p.add_argument("--since", type=_timestamp, help="changes made at or after this time (ISO 8601); with "
                                                   "--delivered: calls delivered at or after it")
    p.add_argument("--until", type=_timestamp, help="changes made before this time (ISO 8601); with "
                                                   "--delivered: calls delivered before it (default: now)")
    if delivered:
        p.add_argument("--delivered", action="store_true",
                       help="send again every call --url was delivered since --since (its receiver lost data); "
                            "within the retention period of the history.  With --record: that record's "
                            "delivered calls too")
        p.add_argument("--record", dest="record_params", type=_record_param, action="append", metavar="NAME=ID",
                       help="the calls of one record, named by its ID parameters as in the URLs called "
                            "(repeatable): --record AccountID=acc-1 --record CaseID=case-7 is a case; dead "
                            "letters, with --delivered also delivered calls; optional --url, --object")


def add_retry_args(p: argparse.ArgumentParser) -> None:
    """retry-now: pending deliveries."""
    _common(p, "pending deliveries")
    p.add_argument("--record", type=_record, metavar="ID[,ID…]",
                   help="only this record: its IDs in parameter order, e.g. --record acc-1,case-7 for a case")


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


def _record_param(value: str) -> tuple[str, str]:
    name, sep, ident = value.partition("=")
    if not sep or not name.strip() or not ident:
        raise argparse.ArgumentTypeError(
            f"invalid record ID {value!r} (expected NAME=ID with the URL's parameter name, e.g. AccountID=acc-1)")
    return name.strip(), ident


def _record(value: str) -> list[str]:
    parts = [v.strip() for v in value.split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"invalid record {value!r} (expected its IDs, e.g. acc-1,case-7)")
    return parts


class Refused(Exception):
    """The command cannot run as given; the message says what to do."""


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    ids = [i for chunk in args.ids for i in chunk] if args.ids else None
    trigger_id = getattr(args, "trigger_id", None)
    url = args.url
    if url is not None and url.strip().isdigit():
        if trigger_id is not None and trigger_id != int(url):
            raise Refused(f"--url {url} and --trigger-id {trigger_id} name different URLs")
        trigger_id, url = int(url), None
    return {"trigger_id": trigger_id, "url": url, "object": args.object,
            "since": getattr(args, "since", None), "until": getattr(args, "until", None), "ids": ids,
            "record": getattr(args, "record", None)}


def _has_filter(filters: dict[str, Any]) -> bool:
    return any(v is not None for v in filters.values())


def _confirm(question: str) -> bool:
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return False
    try:
        return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False


def _fmt_time(ts: datetime | None, now: datetime) -> str:
    if ts is None:
        return "-"
    ts = ts.astimezone(UTC)
    return ts.strftime("%H:%M:%S UTC") if ts.date() == now.astimezone(UTC).date() else ts.strftime("%Y-%m-%d %H:%M UTC")


def _unknown_urls(cur: psycopg.Cursor[dict[str, Any]], trigger_id: int | None, url: str | None) -> list[str]:
    """Why --url / --trigger-id name no configured URL (nothing when they do)."""
    lines: list[str] = []
    if trigger_id is not None and cur.execute(Q.trigger_by_id, {"id": trigger_id}).fetchone() is None:
        lines.append(f"there is no configured URL with id {trigger_id} (`crm-bridge status` lists them)")
    if url is not None and cur.execute(Q.trigger_by_url, {"url": url}).fetchone() is None:
        known = cur.execute(Q.trigger_list, {"limit": 10}).fetchall()
        lines.append(f"no configured URL is exactly {redact_url(url)}; give the URL's id or the URL "
                     "exactly as configured" + (":" if known else " (no URLs are configured)"))
        lines += [f"  #{k['id']} {k['object']}/{k['event']} {redact_url(k['url'])}" for k in known]
    return lines


def _url_id(cur: psycopg.Cursor[dict[str, Any]], filters: dict[str, Any]) -> int | None:
    """The crm_trigger id that --url / --trigger-id name (None: no URL given); Refused when none is
    configured."""
    unknown = _unknown_urls(cur, filters["trigger_id"], filters["url"])
    if unknown:
        raise Refused("\n  ".join(unknown))
    if filters["url"] is None:
        return filters["trigger_id"]
    return cur.execute(Q.trigger_by_url, {"url": filters["url"]}).fetchone()["id"]  # type: ignore[index]


def _sql_refusal(exc: psycopg.errors.InvalidParameterValue) -> str:
    """A refusal raised by a crm_bridge function: its message, and its hint in brackets."""
    diag = exc.diag
    return safe_text(diag.message_primary or str(exc)) + (f" ({safe_text(diag.message_hint)})" if diag.message_hint
                                                         else "")


def _why_nothing(conn: psycopg.Connection, filters: dict[str, Any], action: str) -> list[str]:
    """Reasons nothing matched: an unknown URL, or the matching deliveries are in another state."""
    cur = conn.cursor(row_factory=dict_row)
    lines = _unknown_urls(cur, filters["trigger_id"], filters["url"])
    wanted = "pending" if action == "retry-now" else "dead"
    rows = cur.execute(Q.delivery_explain, {**filters, "limit": 5}).fetchall()
    now = datetime.now(UTC)
    for r in rows:
        held = f" (its URL is {r['url_state']})" if r["url_state"] not in ("active", None) else ""
        if r["status"] == "pending" and action == "retry-now":
            state = f"is pending and already due{held}"
        elif r["status"] == "pending":
            state = f"is pending until {_fmt_time(r['next_attempt_at'], now)}{held}, not dead"
            if r["attempts"]:
                state += f" (attempt {r['attempts']} failed: {scrub(r['last_error'] or '')[:80]})"
        elif r["status"] == "dead" and action == "retry-now":
            state = "is dead, not pending: use `crm-bridge replay`"
        elif r["status"] == "in_flight":
            state = f"is being sent now by {r['worker']}, not {wanted}"
        else:
            state = f"is {r['status']}" + (f" since {_fmt_time(r['finished_at'], now)}" if r["finished_at"] else "") \
                + f", not {wanted}"
        lines.append(f"delivery {r['id']} ({r['object']}/{r['event']} {r['record']}) {state}")
    if not lines:
        lines.append("no delivery matches these filters at all")
    return lines


def _print_sample(conn: psycopg.Connection, filters: dict[str, Any], action: str, total: int) -> None:
    cur = conn.cursor(row_factory=dict_row)
    rows = cur.execute(Q.call_sample, {**filters, "dead": action != "retry-now", "limit": SAMPLE}).fetchall()
    now = datetime.now(UTC)
    table = []
    for r in rows:
        last = scrub(" ".join((r["last_error"] or (f"HTTP {r['last_status']}" if r["last_status"] else "")).split()))
        when = _fmt_time(r["next_attempt_at"] if action == "retry-now" else r["finished_at"], now)
        table.append((r["id"], f"{r['object']}/{r['event']}", r["record"], r["attempts"], when,
                      (last[:57] + "…") if len(last) > 58 else (last or "-"), redact_url(r["url"] or "(URL deleted)")))
    head = "DUE" if action == "retry-now" else "DIED"
    for line in _table(["ID", "OBJECT/EVENT", "RECORD", "ATTEMPTS", head, "LAST ERROR", "URL"], table, right={0, 3}):
        print(safe_text(line))  # error texts, IDs and worker names come from the database
    if total > SAMPLE:
        print(f"  … and {total - SAMPLE} more")


def run_delivered(args: argparse.Namespace, dsn: str) -> int:
    """replay --delivered: queue again what one URL was delivered since a time, in pages with
    progress; --dry-run only counts."""
    if args.url is None or args.since is None:
        print("crm-bridge replay --delivered: give the URL (--url ID|URL) and where to start (--since TIME)",
              file=sys.stderr)
        return 2
    if args.ids or args.object or args.trigger_id is not None or args.all:
        print("crm-bridge replay --delivered: only --url, --since, --until and --dry-run apply "
              "(it re-sends everything the URL was delivered in that time)", file=sys.stderr)
        return 2
    if args.until is not None and args.until <= args.since:
        print("crm-bridge replay --delivered: --until must be after --since", file=sys.stderr)
        return 2
    filters = _filters(args)    # --url given as an id becomes trigger_id
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.cursor(row_factory=dict_row)
        try:
            tid = _url_id(cur, filters)
        except Refused as exc:
            print(f"crm-bridge replay --delivered: {safe_text(str(exc), keep=chr(10))}", file=sys.stderr)
            return 2
        params = {"trigger_id": tid, "since": args.since, "until": args.until, "dry_run": True, "limit": None,
                  "after_at": None, "after_call": None}
        try:
            total = cur.execute(Q.replay_delivered, params).fetchone()["calls"]  # type: ignore[index]
        except psycopg.errors.InvalidParameterValue as exc:
            print(f"crm-bridge replay --delivered: {_sql_refusal(exc)}", file=sys.stderr)
            return 2
        span = f"since {args.since.isoformat()}" + (f" until {args.until.isoformat()}" if args.until else "")
        if args.dry_run or total == 0:
            print(f"{total} call(s) delivered to URL #{tid} {span} " + ("would be sent again" if total else "found"))
            return 0
        done, after_at, after_call = 0, None, None
        while True:
            row = cur.execute(Q.replay_delivered, {**params, "dry_run": False, "limit": BATCH, "after_at": after_at,
                                                   "after_call": after_call}).fetchone()
            assert row is not None
            done += row["calls"]
            after_at, after_call = row["last_at"], row["last_call"]
            print(f"\rqueued {done}/{total}", end="", file=sys.stderr, flush=True)
            if row["calls"] < BATCH:
                break
        print(file=sys.stderr)
    print(f"queued {done} call(s) delivered to URL #{tid} {span} again; a running daemon sends them "
          "(they keep their webhook-id)")
    return 0


def run_record(args: argparse.Namespace, dsn: str) -> int:
    """replay --record NAME=ID …: the dead (with --delivered, also the delivered) calls of one record,
    queued again in call order by crm_bridge.replay_record in one transaction; --dry-run lists them."""
    command = "crm-bridge replay --record"
    if args.ids or args.since or args.until or args.all:
        print(f"{command}: only --object, --url, --delivered and --dry-run apply (it replays the calls of "
              "one record)", file=sys.stderr)
        return 2
    record: dict[str, str] = {}
    for name, ident in args.record_params:
        if name in record:
            print(f"{command}: {safe_text(name)} is given twice", file=sys.stderr)
            return 2
        record[name] = ident
    shown = "&".join(f"{k}={v}" for k, v in record.items())
    try:
        filters = _filters(args)
        with psycopg.connect(dsn, autocommit=True) as conn:
            cur = conn.cursor(row_factory=dict_row)
            tid = _url_id(cur, filters)
            rows = cur.execute(Q.replay_record, {"record": Jsonb(record), "object": args.object,
                                                 "delivered": args.delivered, "dry_run": args.dry_run,
                                                 "trigger_id": tid}).fetchall()
    except Refused as exc:
        print(f"{command}: {safe_text(str(exc), keep=chr(10))}", file=sys.stderr)
        return 2
    except psycopg.errors.InvalidParameterValue as exc:
        print(f"{command}: {_sql_refusal(exc)}", file=sys.stderr)
        return 2
    what = "dead or delivered calls" if args.delivered else "dead letters"
    where = f" to URL #{tid}" if tid is not None else ""
    if not rows:
        print(safe_text(f"no {what} of the record {shown}{where}"
                        + ("" if args.delivered else " (--delivered: also the calls it was delivered, "
                           "as far back as the history is kept)")))
        return 0
    now = datetime.now(UTC)
    table = [(r["call_id"], f"{r['object']}/{r['event']}", r["was"], _fmt_time(r["at"], now),
              r["url"] or "(URL deleted)", r["note"] or "queued") for r in rows[:SAMPLE]]
    for line in _table(["CALL", "OBJECT/EVENT", "WAS", "AT", "URL", ""], table, right={0}):
        print(safe_text(line))   # URLs (redacted) come from the database
    if len(rows) > SAMPLE:
        print(f"  … and {len(rows) - SAMPLE} more")
    counts = ", ".join(f"{sum(r['was'] == w for r in rows)} {w}" for w in ("dead", "delivered")
                       if any(r["was"] == w for r in rows))
    label = safe_text(f"{rows[0]['object']} {shown}")
    if args.dry_run:
        ready = sum(r["note"] == "dry run" for r in rows)
        print(f"{ready} call(s) of {label}{where} would be queued again, in call order ({counts})")
    else:
        queued = sum(bool(r["queued"]) for r in rows)
        print(f"queued {queued} call(s) of {label}{where} again, in call order ({counts}); a running daemon "
              "sends them (they keep their webhook-id)")
    skipped = len(rows) - sum(bool(r["queued"]) or r["note"] == "dry run" for r in rows)
    if skipped:
        print(f"({skipped} skipped: see the last column)")
    return 0


def run(args: argparse.Namespace, dsn: str, action: str) -> int:
    """replay / purge / retry-now, in batches with progress; --dry-run counts and shows a sample."""
    if getattr(args, "record_params", None):
        return run_record(args, dsn)
    if getattr(args, "delivered", False):
        return run_delivered(args, dsn)
    done_verb, ask_verb, noun = VERBS[action]
    try:
        filters = _filters(args)
    except Refused as exc:
        print(f"crm-bridge {action}: {exc}", file=sys.stderr)
        return 2
    with psycopg.connect(dsn, autocommit=True) as conn:
        count_q = Q.pending_count if action == "retry-now" else Q.dead_letter_count
        total = conn.execute(count_q, filters).fetchone()[0]  # type: ignore[index]
        if total == 0:
            print(f"no {noun} match", end="")
            print(":" if _has_filter(filters) else ".")
            if _has_filter(filters):
                for line in _why_nothing(conn, filters, action):
                    print(f"  {safe_text(line)}")
            return 0
        if args.dry_run:
            print(f"{total} {noun} would be {done_verb}:")
            _print_sample(conn, filters, action, total)
            return 0
        if not _has_filter(filters) and not args.all \
                and not _confirm(f"{ask_verb.capitalize()} all {total} {noun}?"):
            print(f"crm-bridge {action}: no filter given: this would {ask_verb} all {total} {noun}. "
                  "Pass --all to mean that, or narrow it (--url, --object, --id, …; --dry-run shows them).",
                  file=sys.stderr)
            return 2
        done = 0
        if action == "retry-now":
            done = conn.execute(Q.retry_now, filters).fetchone()[0]  # type: ignore[index]
        else:
            query = Q.replay_batch if action == "replay" else Q.purge_batch
            while True:
                n = conn.execute(query, {**filters, "limit": BATCH}).fetchone()[0]  # type: ignore[index]
                done += n
                if total > BATCH:
                    print(f"\r{done_verb} {done}/{total}", end="", file=sys.stderr, flush=True)
                if n < BATCH:
                    break
            if total > BATCH:
                print(file=sys.stderr)
    print(f"{done_verb} {done} {noun}")
    if action == "replay" and done < total:
        print(f"({total - done} skipped: their URL was deleted from crm_trigger; purge them)")
    if action == "retry-now":
        print("a running daemon sends them within its poll interval; deliveries of paused or disabled URLs "
              "stay held until the URL is resumed")
    return 0
