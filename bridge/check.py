"""`crm-bridge check`: is this installation able to work?  Settings, connection, schema version,
the DBA configuration and the URLs' host names -- each problem named with what to do about it.

Host names are only resolved (getaddrinfo), never connected to: the check must be safe to run
anywhere, and a receiver must not see a call it cannot tell from a real one.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import socket
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, fields
from urllib.parse import urlsplit

import psycopg
from psycopg.rows import dict_row

from .http import AddressRefused
from .migrate import applied_versions
from .redact import redact_url, safe_text
from .settings import Settings
from .sqlfiles import Q, migrations

DNS_TIMEOUT = 5.0
# CRM_BRIDGE_* variables that are not settings (tests, demo, embedded PostgreSQL).
NOT_SETTINGS = {"CRM_BRIDGE_CONFIG", "CRM_BRIDGE_TEST_DSN", "CRM_BRIDGE_PG_BINDIR", "CRM_BRIDGE_PG_USER"}


@dataclass
class Report:
    """Findings printed as they come: ``ok``, ``info``, ``warn`` or ``error`` (errors fail the check)."""

    out: Callable[[str], None] = print
    counts: dict[str, int] = field(default_factory=lambda: {"ok": 0, "info": 0, "warn": 0, "error": 0})

    def add(self, level: str, text: str) -> None:
        self.counts[level] += 1
        # Texts hold values from the database (URLs, table names): no control characters on the terminal.
        self.out(f"{level:<5}  {safe_text(text, 4000)}")

    @property
    def problems(self) -> int:
        return self.counts["error"]


def run_check(settings: Settings, *, env: Mapping[str, str] | None = None,
              out: Callable[[str], None] = print) -> int:
    """Run every check, print the findings; 0 when nothing is wrong, 1 when a problem was found.

    Invalid settings and an unreachable server raise (SettingsError, psycopg.OperationalError):
    the CLI turns those into exit codes 2 and 3.
    """
    env = os.environ if env is None else env
    report = Report(out)
    check_settings(settings, env, report)
    with psycopg.connect(settings.dsn, autocommit=True, connect_timeout=10,
                         application_name="crm-bridge check") as conn:
        info = conn.info
        report.add("ok", f"connected to PostgreSQL {_server_version(info.server_version)} "
                         f"(database {info.dbname}, user {info.user})")
        if check_schema(conn, report):
            check_config(conn, settings, report)
    if report.problems:
        out(f"crm-bridge check: {report.problems} problem{'s' if report.problems > 1 else ''} found")
        return 1
    warned = report.counts["warn"]
    out("crm-bridge check: no problems found" + (f" ({warned} warning{'s' if warned > 1 else ''})" if warned else ""))
    return 0


def _server_version(num: int) -> str:
    return f"{num // 10000}.{num % 10000}" if num >= 100000 else f"{num // 10000}.{num // 100 % 100}"


# -- settings -------------------------------------------------------------------------------------
def check_settings(settings: Settings, env: Mapping[str, str], report: Report) -> None:
    report.add("ok", "settings are valid")
    names = {f"CRM_BRIDGE_{f.name.upper()}" for f in fields(Settings)}
    for key in sorted(k for k in env if k.startswith("CRM_BRIDGE_")):
        if key in names or key in NOT_SETTINGS:
            continue
        close = difflib.get_close_matches(key, sorted(names), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        report.add("warn", f"environment variable {key} is not a crm-bridge setting and is ignored{hint}")
    if settings.metrics_addr:
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            report.add("error", f"metrics_addr is {settings.metrics_addr} but prometheus-client is not "
                                "installed (pip install prometheus-client)")


# -- schema ---------------------------------------------------------------------------------------
def check_schema(conn: psycopg.Connection, report: Report) -> bool:
    """False when crm_bridge is not installed at all (nothing else can be checked)."""
    applied = applied_versions(conn)
    known = migrations()
    latest = known[-1].version
    if not applied:
        report.add("error", f"schema crm_bridge is not installed in database {conn.info.dbname}: "
                            "run `crm-bridge migrate`")
        return False
    missing = [f"{m.version:04d}_{m.name}" for m in known if m.version not in applied]
    newer = sorted(v for v in applied if v > latest)
    if missing:
        report.add("error", f"schema crm_bridge is at version {max(applied)}; not applied: {', '.join(missing)}: "
                            "run `crm-bridge migrate`")
    elif newer:
        report.add("warn", f"schema crm_bridge is at version {max(applied)}, newer than this crm-bridge "
                           f"(knows up to {latest}): upgrade crm-bridge")
    else:
        report.add("ok", f"schema crm_bridge is at version {latest} (latest)")
    return True


# -- configuration --------------------------------------------------------------------------------
def check_config(conn: psycopg.Connection, settings: Settings, report: Report) -> None:
    cur = conn.cursor(row_factory=dict_row)
    urls = cur.execute(Q.check_urls).fetchall()
    enabled = [u for u in urls if u["enabled"]]
    if not urls:
        report.add("warn", "no URLs configured: nothing will be called "
                           "(INSERT INTO crm_bridge.crm_trigger (object, event, url) VALUES (...))")
    else:
        report.add("ok", f"{len(urls)} URL{'s' if len(urls) > 1 else ''} configured, {len(enabled)} enabled")
    for u in urls:
        label = f"URL #{u['id']} ({u['object']}/{u['event']}) {redact_url(u['url'])}"
        if not u["enabled"]:
            report.add("info", f"{label} is disabled: events are not queued for it")
        elif u["paused"]:
            report.add("info", f"{label} is paused: deliveries queue but are not sent")

    for row in cur.execute(Q.check_unattached).fetchall():
        cols = ", ".join(f"'<{p} column>'" for p in row["id_params"])
        report.add("error", f"object \"{row['object']}\" has {row['urls']} enabled URL{'s' if row['urls'] > 1 else ''} "
                            "but no table is attached, so nothing will call them: "
                            f"SELECT crm_bridge.attach('schema.table', '{row['object']}', ARRAY[{cols}])")
    for row in cur.execute(Q.check_attachments).fetchall():
        fix = {"missing": f"re-attach it with crm_bridge.attach('{row['table_name']}', '{row['object']}', ...)",
               "disabled": f"ALTER TABLE {row['table_name']} ENABLE TRIGGER {row['trigger_name']}",
               "replica-only": f"ALTER TABLE {row['table_name']} ENABLE TRIGGER {row['trigger_name']}"}
        report.add("error", f"table {row['table_name']} ({row['object']}): capture trigger {row['trigger_name']} "
                            f"is {row['problem']}, so its changes are not captured: {fix[row['problem']]}")
    why = {"old-comparison": "compares rows with an equality operator that some column types lack "
                             "(UPDATEs could fail)",
           "statement-level": "is statement-level on a partitioned table or partition "
                              "(statements aimed at a partition are not captured)"}
    for row in cur.execute(Q.check_capture_form).fetchall():
        kind = "edit" if row["problem"] == "old-comparison" else "capture"
        report.add("error", f"table {row['table_name']} ({row['object']}): {kind} trigger {row['trigger_name']} "
                            f"{why[row['problem']]}: re-attach it with {row['fix']}")
    for row in cur.execute(Q.check_capture_code).fetchall():
        if row["problem"] == "cast":
            report.add("warn", f"table {row['table_name']} ({row['object']}): {row['detail']}: that function runs "
                               "inside the capture of every write to the table (as crm_bridge_capture, which may "
                               "only add events); drop the cast or detach the table (docs/SECURITY.md)")
        else:
            report.add("error", f"{row['detail']}: re-attach the tables with crm_bridge.attach() (emit_v1: run its "
                                "definition from migration 0004 again) and find out who changed it")
    check_hosts(enabled, settings, report)


def check_hosts(urls: list[dict], settings: Settings, report: Report) -> None:
    """Resolve every enabled URL's host once and hold the addresses against the address policy."""
    policy = settings.address_policy()  # the daemon's own policy
    by_host: dict[tuple[str, int], list[dict]] = {}
    for u in urls:
        parts = urlsplit(u["url"])
        try:
            port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        except ValueError:
            report.add("error", f"URL #{u['id']} {redact_url(u['url'])}: invalid port")
            continue
        by_host.setdefault((parts.hostname or "", port), []).append(u)
    if not by_host:
        return
    pool = ThreadPoolExecutor(max_workers=min(16, len(by_host)), thread_name_prefix="check-dns")
    try:
        futures = {key: pool.submit(_resolve, *key) for key in by_host}
        bad = 0
        for (host, port), future in futures.items():
            ids = ", ".join(f"#{u['id']}" for u in by_host[(host, port)])
            try:
                addresses = future.result(timeout=DNS_TIMEOUT)
            except FutureTimeout:
                report.add("error", f"host {host} (URL {ids}): DNS lookup timed out after {DNS_TIMEOUT:g} s")
                bad += 1
                continue
            except OSError as exc:
                report.add("error", f"host {host} (URL {ids}) does not resolve: {exc.strerror or exc}")
                bad += 1
                continue
            try:
                for address in addresses:
                    policy.check(host, address)
            except AddressRefused as exc:
                report.add("error", f"URL {ids}: {exc} (settings deny_cidrs / allow_cidrs)")
                bad += 1
        if not bad:
            many = len(by_host) > 1
            report.add("ok", f"{len(by_host)} host{'s resolve' if many else ' resolves'} to allowed addresses")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _resolve(host: str, port: int) -> list[str]:
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})
