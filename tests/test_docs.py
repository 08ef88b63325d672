"""The documented install and role steps work exactly as written (issue 14.2, 10.11).

Blocks marked ``<!-- doc-test: NAME -->`` in README.md, docs/OPERATIONS.md and docs/DBA.md are
run as written against a fresh database of the throwaway server: only the connection is
supplied, through libpq's PG* variables (the documented commands rely on them).  Then
`crm-bridge status`, `crm-bridge replay --dry-run` and the daemon with metrics run as the roles
those blocks created.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from test_faults import free_port
from test_metrics import scrape_until

ROOT = Path(__file__).resolve().parent.parent
DOC_ROLES = ["crm_bridge_run", "crm_bridge_monitoring", "alice",
             "crm_bridge_admin", "crm_bridge_daemon", "crm_bridge_monitor"]
MARK = re.compile(r"<!-- doc-test: (?P<name>[\w-]+) -->\s*\n```(?P<lang>\w+)\n(?P<body>.*?)\n```", re.S)


def doc_blocks(path: str) -> dict[str, tuple[str, str]]:
    return {m["name"]: (m["lang"], m["body"]) for m in MARK.finditer((ROOT / path).read_text())}


def test_marked_blocks_exist():
    assert set(doc_blocks("README.md")) == {"install"}
    assert set(doc_blocks("docs/OPERATIONS.md")) == {"operations-roles"}
    assert set(doc_blocks("docs/DBA.md")) == {"dba-roles"}
    for path in ("README.md", "docs/OPERATIONS.md", "docs/DBA.md", "docs/SECURITY.md",
                 "contrib/systemd/crm-bridge.env"):
        text = (ROOT / path).read_text()
        # one role design everywhere: no hand-written grants, no roles of earlier designs
        assert "ALTER DEFAULT PRIVILEGES" not in text.replace("no `ALTER DEFAULT PRIVILEGES`", ""), path
        assert not re.search(r"\bcrm_monitor\b|user=crm_bridge(\s|\"|')|user=crm_bridge_admin", text), path
        assert not re.search(r"GRANT (SELECT|INSERT|UPDATE|DELETE|USAGE)", text), path


def _doc_env(dsn: str) -> dict[str, str]:
    info = conninfo_to_dict(dsn)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "CRM_BRIDGE_"))}
    exe = Path(sys.executable).parent / "crm-bridge"
    assert exe.exists(), f"{exe} missing: run ./scripts/test (it installs the command)"
    from bridge.devtools.pgserver import find_bindir

    env.update(PGHOST=str(info["host"]), PGPORT=str(info["port"]), PGDATABASE=str(info["dbname"]),
               PGUSER=str(info["user"]), CRM_BRIDGE_CONFIG="", CRM_BRIDGE_STATUS_INTERVAL="0.2",
               PATH=f"{exe.parent}{os.pathsep}{find_bindir()}{os.pathsep}{env.get('PATH', '')}")
    if shutil.which("psql", path=env["PATH"]) is None:
        pytest.skip("psql is not installed (the documented steps use it)")
    return env


def _sh(script: str, env: dict[str, str], user: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**env, **({"PGUSER": user} if user else {})}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=env, capture_output=True, text=True,
                          timeout=120, cwd=tempfile.gettempdir())
    return proc


@pytest.fixture
def doc_db(pg_server, empty_dsn):
    if pg_server.cluster is None:
        pytest.skip("needs the throwaway server (trust authentication for the documented logins)")
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        taken = conn.execute("SELECT array_agg(rolname) FROM pg_roles WHERE rolname = ANY (%s)", [DOC_ROLES]).fetchone()
        assert taken == (None,), f"roles left over: {taken}"
    yield empty_dsn
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = ANY (%s)", [DOC_ROLES])
        for role in DOC_ROLES:
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role]).fetchone():
                conn.execute(psycopg.sql.SQL("DROP OWNED BY {} CASCADE").format(psycopg.sql.Identifier(role)))
                conn.execute(psycopg.sql.SQL("DROP ROLE {}").format(psycopg.sql.Identifier(role)))


def _run_documented(doc: str, dsn: str, env: dict[str, str]) -> None:
    blocks = doc_blocks(doc)
    for name, (lang, body) in blocks.items():
        if lang == "sh":
            proc = _sh(body, env)
            assert proc.returncode == 0, \
                f"{doc} block {name}:\n{body}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        else:
            assert lang == "sql"
            # DBA.md's block follows "after `crm-bridge migrate --roles`"
            assert _sh("crm-bridge migrate --roles", env).returncode == 0
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(body)


@pytest.mark.parametrize("doc", ["README.md", "docs/OPERATIONS.md", "docs/DBA.md"])
def test_documented_install_and_roles_work_as_written(doc, doc_db):
    env = _doc_env(doc_db)
    _run_documented(doc, doc_db, env)
    with psycopg.connect(doc_db, autocommit=True) as conn:
        logins = conn.execute("""
            SELECT r.rolname, r.rolcanlogin, array_agg(g.rolname ORDER BY g.rolname)
              FROM pg_roles r JOIN pg_auth_members m ON m.member = r.oid JOIN pg_roles g ON g.oid = m.roleid
             WHERE r.rolname = ANY (%s) GROUP BY 1, 2 ORDER BY 1""", [DOC_ROLES]).fetchall()
        assert logins == [("alice", True, ["crm_bridge_admin"]),
                          ("crm_bridge_monitoring", True, ["crm_bridge_monitor"]),
                          ("crm_bridge_run", True, ["crm_bridge_daemon"])]
        # 10.11: the documented set-up lets monitoring read no secret and no config header
        assert conn.execute("SELECT has_table_privilege('crm_bridge_monitoring', 'crm_bridge.signing_secret', "
                            "'SELECT'),"
                            " has_table_privilege('crm_bridge_monitoring', 'crm_bridge.crm_trigger', 'SELECT'),"
                            " has_table_privilege('crm_bridge_run', 'crm_bridge.crm_trigger', 'UPDATE'),"
                            " has_table_privilege('alice', 'crm_bridge.signing_secret', 'SELECT')"
                            ).fetchone() == (False, False, False, False)

    status = _sh("crm-bridge status", env, user="crm_bridge_monitoring")
    assert status.returncode == 0, status.stderr
    assert "no URLs configured" in status.stdout
    assert _sh("crm-bridge status --json", env, user="alice").returncode == 0
    dry = _sh("crm-bridge replay --dry-run", env, user="alice")
    assert dry.returncode == 0 and "no dead letter(s) match" in dry.stdout, dry.stderr
    denied = _sh("crm-bridge replay --dry-run", env, user="crm_bridge_monitoring")
    assert denied.returncode == 4 and "permission denied" in denied.stderr

    port = free_port()
    with tempfile.TemporaryFile("w+") as log:
        daemon = subprocess.Popen(["crm-bridge", "run", "--metrics-addr", f"127.0.0.1:{port}"],
                                  env={**env, "PGUSER": "crm_bridge_run"}, stdout=log, stderr=subprocess.STDOUT,
                                  cwd=tempfile.gettempdir())
        try:
            deadline = time.monotonic() + 30
            while "ready: listening" not in (text := (log.seek(0), log.read())[1]):
                assert daemon.poll() is None and time.monotonic() < deadline, text
                time.sleep(0.05)
            samples = scrape_until(f"http://127.0.0.1:{port}/metrics",
                                   lambda s: s.get(("crm_bridge_daemons", ()), 0) == 1)
            assert samples[("crm_bridge_up", ())] == 1 and samples[("crm_bridge_backlog_events", ())] == 0
        finally:
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(30) == 0
        log.seek(0)
        out = log.read()
    assert "permission denied" not in out and "status views" not in out, out
