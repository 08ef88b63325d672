"""`crm-bridge demo`: a throwaway PostgreSQL, the reference CRM, a receiver on 127.0.0.1, the real
daemon, and a short day in a contact centre — printing every call as the receiver saw it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from .db import migrate
from .pgserver import PostgresNotFound, TempPostgres
from .receiver import Receiver

PAIRS = [("customer", "create"), ("customer", "edit"), ("customer", "delete"),
         ("case", "create"), ("case", "edit"), ("case", "delete"),
         ("followup", "create"), ("followup", "delete"),
         ("task", "create"), ("task", "edit"), ("task", "delete")]

STORY: list[tuple[str, str, int]] = [
    # (what happens, SQL, calls expected)
    ("A new customer calls in",
     "INSERT INTO crm.customer (account_id, name, email) VALUES ('ACC-1001', 'Ada Lovelace', 'ada@example.org')", 1),
    ("The agent opens a case for her",
     "INSERT INTO crm.case (case_id, account_id, subject, priority) "
     "VALUES ('CASE-501', 'ACC-1001', 'Invoice shows wrong address', 'high')", 1),
    ("...adds a follow-up note",
     "INSERT INTO crm.followup (followup_id, case_id, account_id, author, body) "
     "VALUES ('FU-9001', 'CASE-501', 'ACC-1001', 'agent.kim', 'Asked for the invoice number')", 1),
    ("...and a task to call back",
     "INSERT INTO crm.task (task_id, account_id, title, assignee) "
     "VALUES ('TASK-77', 'ACC-1001', 'Call Ada back', 'agent.kim')", 1),
    ("The customer's e-mail address changes",
     "UPDATE crm.customer SET email = 'ada@analytical.engine' WHERE account_id = 'ACC-1001'", 1),
    ("Someone saves the customer without changing anything (no call)",
     "UPDATE crm.customer SET email = email WHERE account_id = 'ACC-1001'", 0),
    ("The case moves to pending",
     "UPDATE crm.case SET status = 'pending' WHERE case_id = 'CASE-501'", 1),
    ("The call-back is done",
     "UPDATE crm.task SET done = true WHERE task_id = 'TASK-77'", 1),
    ("A note entered by mistake is removed",
     "DELETE FROM crm.followup WHERE followup_id = 'FU-9001'", 1),
    ("The task list is cleaned up",
     "DELETE FROM crm.task WHERE task_id = 'TASK-77'", 1),
    ("The case is deleted",
     "DELETE FROM crm.case WHERE case_id = 'CASE-501'", 1),
    ("The customer asks to be forgotten",
     "DELETE FROM crm.customer WHERE account_id = 'ACC-1001'", 1),
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
    daemon: subprocess.Popen[bytes] | None = None
    log_path = Path(tempfile.mkstemp(prefix="crm-bridge-demo-", suffix=".log")[1])
    try:
        with cluster, Receiver() as rx:
            dsn = cluster.dsn()
            with psycopg.connect(dsn, autocommit=True) as conn:
                done = migrate(conn, reference=True)
                _say(f"2. crm-bridge migrate --reference-crm: {', '.join(done)}")
                for obj, event in PAIRS:
                    conn.execute("INSERT INTO crm_bridge.crm_trigger (object, event, url) VALUES (%s, %s, %s)",
                                 (obj, event, rx.url(f"/sync/{obj}/{event}")))
                _say(f"3. receiver listening on {rx.url('/')}; configured {len(PAIRS)} URLs, e.g.")
                _say(f"   INSERT INTO crm_bridge.crm_trigger (object, event, url) "
                     f"VALUES ('case', 'create', '{rx.url('/sync/case/create')}');")
                env = {**os.environ, "CRM_BRIDGE_DSN": dsn, "CRM_BRIDGE_LOG_LEVEL": "INFO"}
                with log_path.open("wb") as log:
                    daemon = subprocess.Popen([sys.executable, "-m", "bridge.cli", "run"], env=env,
                                              stdout=log, stderr=subprocess.STDOUT)
                _wait_for_log(log_path, "ready: listening", daemon)
                _say(f"4. crm-bridge run started (pid {daemon.pid}); now the CRM application writes:\n")
                seen = 0
                for what, query, expect in STORY:
                    _say(f"   {what}")
                    _say(f"     SQL> {query}")
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
                while conn.execute("SELECT count(*) FROM crm_bridge.delivery WHERE status = 'in_flight'"
                                   ).fetchone()[0] and time.monotonic() < deadline:
                    time.sleep(0.02)  # outcomes are recorded in batches, a moment after the call
                rows = conn.execute("SELECT status, count(*) FROM crm_bridge.delivery GROUP BY 1 ORDER BY 1")
                summary = ", ".join(f"{n} {status}" for status, n in rows.fetchall())
                _say(f"5. deliveries recorded in crm_bridge.delivery: {summary}")
            daemon.send_signal(signal.SIGTERM)
            rc = daemon.wait(30)
            _say(f"6. daemon stopped on SIGTERM (exit code {rc}); removing the throwaway cluster")
        return 0 if rc == 0 else 1
    except Exception as exc:
        print(f"crm-bridge demo failed: {exc}", file=sys.stderr)
        if log_path.exists():
            print(log_path.read_text(errors="replace")[-4000:], file=sys.stderr)
        return 1
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
        log_path.unlink(missing_ok=True)


def _wait_for_log(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with code {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the daemon did not become ready within {timeout:g} s")
        time.sleep(0.05)
