"""`crm-bridge demo`: a throwaway PostgreSQL, the reference CRM, a receiver on 127.0.0.1, the real
daemon, and a short day in a contact centre — printing every call as the receiver saw it."""

from __future__ import annotations

import functools
import os
import sys
import time

import psycopg

from ..migrate import migrate
from ..sqlfiles import Queries, split_named, sql_dir
from .daemonproc import DaemonProcess
from .pgserver import PostgresNotFound, TempPostgres
from .receiver import Receiver

# The demo's statements, named: sql/demo.sql.
DQ = Queries(functools.cache(lambda: split_named((sql_dir() / "demo.sql").read_text())), "sql/demo.sql")

PAIRS = [("customer", "create"), ("customer", "edit"), ("customer", "delete"),
         ("case", "create"), ("case", "edit"), ("case", "delete"),
         ("followup", "create"), ("followup", "delete"),
         ("task", "create"), ("task", "edit"), ("task", "delete")]

STORY: list[tuple[str, str, int]] = [
    # (what happens, query in sql/demo.sql, calls expected)
    ("A new customer calls in", "new_customer", 1),
    ("The agent opens a case for her", "new_case", 1),
    ("...adds a follow-up note", "new_followup", 1),
    ("...and a task to call back", "new_task", 1),
    ("The customer's e-mail address changes", "customer_email_changes", 1),
    ("Someone saves the customer without changing anything (no call)", "customer_saved_unchanged", 0),
    ("The case moves to pending", "case_pending", 1),
    ("The call-back is done", "task_done", 1),
    ("A note entered by mistake is removed", "followup_removed", 1),
    ("The task list is cleaned up", "task_removed", 1),
    ("The case is deleted", "case_removed", 1),
    ("The customer asks to be forgotten", "customer_removed", 1),
]


def _say(text: str = "") -> None:
    print(text, flush=True)


def run_demo() -> int:
    try:
        cluster = TempPostgres()
    except PostgresNotFound as exc:
        print(f"crm-bridge demo: {exc}", file=sys.stderr)
        return 1
    _say(f"1. starting a throwaway PostgreSQL from {cluster.bindir}"
         + (f" (as user {cluster.run_as}: PostgreSQL refuses to run as root)" if cluster.run_as else ""))
    daemon: DaemonProcess | None = None
    try:
        with cluster, Receiver() as rx:
            dsn = cluster.dsn()
            with psycopg.connect(dsn, autocommit=True) as conn:
                done = migrate(conn, reference=True)
                _say(f"2. crm-bridge migrate --reference-crm: {', '.join(done)}")
                for obj, event in PAIRS:
                    conn.execute(DQ.add_url, {"object": obj, "event": event, "url": rx.url(f"/sync/{obj}/{event}")})
                _say(f"3. receiver listening on {rx.url('/')}; configured {len(PAIRS)} URLs, e.g.")
                _say(f"   INSERT INTO crm_bridge.crm_trigger (object, event, url) "
                     f"VALUES ('case', 'create', '{rx.url('/sync/case/create')}');")
                daemon = DaemonProcess(dsn, env={**os.environ, "CRM_BRIDGE_LOG_LEVEL": "INFO"}).start()
                _say(f"4. crm-bridge run started (pid {daemon.pid}); now the CRM application writes:\n")
                seen = 0
                for what, name, expect in STORY:
                    query = getattr(DQ, name)
                    _say(f"   {what}")
                    _say(f"     SQL> {query.rstrip(';')}")
                    started = time.time()
                    conn.execute(query)
                    seen += expect
                    calls = rx.wait_for(seen, timeout=15) if expect else rx.received()
                    for call in calls[seen - expect:seen]:
                        _say(f"     <- {call.method} {call.target}   "
                             f"({(call.at - started) * 1000:.1f} ms after the write)")
                    if not expect:
                        _say("     (no call: nothing changed)")
                _say("")
                deadline = time.monotonic() + 10
                while conn.execute(DQ.in_flight_count).fetchone()[0] and time.monotonic() < deadline:
                    time.sleep(0.02)  # outcomes are recorded in batches, a moment after the call
                rows = conn.execute(DQ.status_counts)
                summary = ", ".join(f"{n} {status}" for status, n in rows.fetchall())
                _say(f"5. deliveries recorded in crm_bridge.delivery: {summary}")
            rc = daemon.stop(30)
            _say(f"6. daemon stopped on SIGTERM (exit code {rc}); removing the throwaway cluster")
        return 0 if rc == 0 else 1
    except Exception as exc:
        print(f"crm-bridge demo failed: {exc}", file=sys.stderr)
        if daemon is not None:
            print(daemon.log[-4000:], file=sys.stderr)
        return 1
    finally:
        if daemon is not None:
            daemon.kill()
            daemon.log_path.unlink(missing_ok=True)
