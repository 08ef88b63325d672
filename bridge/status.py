"""`crm-bridge status`: the queue as the crm_bridge views see it -- a table for people, JSON for scripts.

All numbers come from the views of sql/migrations/0002_views.sql (summary, backlog,
url_status), read in one read-only snapshot, so they agree with each other and with psql.
URLs and error texts are shown with credentials masked, and every text read from the database is
passed through redact.safe_text: a row written by hand (or by an older crm-bridge) may hold
control characters or escape sequences, which must not reach the terminal.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from .migrate import installed_version, latest_version
from .redact import redact_url, safe_text, scrub
from .service import format_age
from .sqlfiles import Q

MAX_TEXT = 2000  # per value read from the database (a URL is at most 2000 characters)


class StatusError(RuntimeError):
    """The database cannot answer (crm_bridge missing or too old); the message says what to do."""


def gather(conn: psycopg.Connection) -> dict[str, Any]:
    """Read the status views in one consistent snapshot; URLs and errors redacted."""
    conn.autocommit = False
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    with conn.transaction():
        version = installed_version(conn)
        if version == 0:
            raise StatusError(f"crm_bridge is not installed in database {conn.info.dbname}: "
                              "run `crm-bridge migrate`")
        cur = conn.cursor(row_factory=dict_row)
        try:
            summary = cur.execute(Q.status_summary).fetchone()
        except psycopg.errors.UndefinedTable:
            raise StatusError(f"crm_bridge schema version {version} has no status views "
                              f"(version {latest_version()} has): run `crm-bridge migrate`") from None
        backlog = cur.execute(Q.status_backlog).fetchall()
        urls = cur.execute(Q.status_urls).fetchall()
    assert summary is not None
    for row in urls:
        row["url"] = redact_url(row["url"])
        row["last_failure_error"] = scrub(row["last_failure_error"]) if row["last_failure_error"] else None
    for row in (summary, *backlog, *urls):
        for key, value in row.items():
            if isinstance(value, str):
                row[key] = safe_text(value, MAX_TEXT)
    return {"database": safe_text(conn.info.dbname), "schema_version": version, "summary": summary,
            "backlog": backlog, "urls": urls}


def attention(data: dict[str, Any], max_age: float) -> list[str]:
    """What makes `crm-bridge status` exit 1: dead letters, or a change older than max_age undelivered."""
    s = data["summary"]
    problems = []
    if s["dead"]:
        problems.append(f"{s['dead']} dead letter(s): see `crm-bridge replay --dry-run`")
    broken = [u for u in data.get("urls", ()) if (u.get("breaker") or "closed") != "closed"]
    if broken:
        problems.append("circuit breaker open for URL " + ", ".join(f"#{u['id']}" for u in broken)
                        + ": its calls wait until the receiver answers again")
    age = s["oldest_pending_age"]
    if age is not None and age > max_age:
        problems.append(f"the oldest undelivered change is {format_age(age)} old (more than {format_age(max_age)})"
                        + ("; no daemon is connected" if not s["daemons"] else ""))
    return problems


# -- JSON ---------------------------------------------------------------------------------------
def render_json(data: dict[str, Any]) -> str:
    def default(value: Any) -> Any:
        if isinstance(value, datetime):
            return value.isoformat()
        raise TypeError(f"cannot encode {type(value).__name__}")

    return json.dumps(data, default=default, indent=2)


# -- text ---------------------------------------------------------------------------------------
def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: set[int]) -> list[str]:
    cells = [list(map(str, headers))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = []
    for r in cells:
        line = "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(r))
        out.append("  " + line.rstrip())
    return out


def render_text(data: dict[str, Any]) -> str:
    s = data["summary"]
    now: datetime = s["at"]

    def ago(when: datetime | None) -> str:
        return "-" if when is None else f"{format_age(max((now - when).total_seconds(), 0.0))} ago"

    lines = [
        f"crm-bridge status: database {data['database']}, schema version {data['schema_version']}, "
        f"{now.strftime('%Y-%m-%d %H:%M:%S %Z').strip()}",
        f"daemons connected: {s['daemons']}   active URLs: {s['active_urls']}",
        "",
        f"outbox: {s['backlog']} event{'' if s['backlog'] == 1 else 's'} waiting"
        + (f", oldest {format_age(s['oldest_event_age'])}" if s["backlog"] else ""),
    ]
    if data["backlog"]:
        lines += _table(["OBJECT", "EVENT", "EVENTS", "OLDEST"],
                        [(b["object"], b["event"], b["events"], format_age(b["oldest_age"])) for b in data["backlog"]],
                        right={2})
    lines += [
        f"deliveries: {s['pending']} pending ({s['retrying']} retrying), {s['in_flight']} in flight, "
        f"{s['dead']} dead; oldest pending {format_age(s['oldest_pending_age'])}",
        "",
    ]
    if not data["urls"]:
        lines.append("no URLs configured (INSERT INTO crm_bridge.crm_trigger ...; see docs/DBA.md)")
        return "\n".join(lines)
    rows = []
    for u in data["urls"]:
        failure = ago(u["last_failure_at"])
        if u["last_failure_at"] is not None and u["last_failure_status"] is not None:
            failure += f" (HTTP {u['last_failure_status']})"
        breaker = (u.get("breaker") or "closed").replace("_", "-")
        if breaker != "closed" and u.get("breaker_since") is not None:
            breaker += f" {format_age(max((now - u['breaker_since']).total_seconds(), 0.0))}"
        rows.append((u["id"], f"{u['object']}/{u['event']}", u["state"], breaker, u["pending"], u["retrying"],
                     u["in_flight"], u["dead"], format_age(u["oldest_pending_age"]), ago(u["last_success_at"]),
                     failure, u["url"]))
    lines += _table(["ID", "OBJECT/EVENT", "STATE", "BREAKER", "PENDING", "RETRYING", "IN-FLIGHT", "DEAD", "OLDEST",
                     "LAST SUCCESS", "LAST FAILURE", "URL"], rows, right={0, 4, 5, 6, 7})
    failing = [u for u in data["urls"] if u["last_failure_error"]]
    if failing:
        lines += ["", "last failure per URL:"]
        lines += [f"  #{u['id']} {ago(u['last_failure_at'])}: {' '.join(u['last_failure_error'].split())}"
                  for u in failing]
    return "\n".join(lines)
