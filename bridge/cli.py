"""crm-bridge: PostgreSQL CRM changes -> HTTP calls.

Global options (--dsn, --config, --log-level, --log-format) may be given before or after the
command: `crm-bridge --dsn … status` and `crm-bridge status --dsn …` are the same.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import textwrap
from collections.abc import Sequence

import anyio
import psycopg
from psycopg.conninfo import conninfo_to_dict

from . import deadletters
from .aio import tune_gc
from .check import run_check
from .daemon import Daemon
from .devtools.demo import run_demo
from .logs import LEVELS, configure
from .migrate import installed_version, latest_version, migrate
from .redact import clean_text
from .roles import RoleNames, after_migrate
from .service import Service
from .settings import DEFAULT_CONFIG, Settings, SettingsError, db_error_text
from .status import StatusError, attention, gather, render_json, render_text

log = logging.getLogger("crm_bridge")

CONNECTION_HELP = """\
connection: --dsn, else $CRM_BRIDGE_DSN, else `dsn` in the config file (--config, $CRM_BRIDGE_CONFIG,
else {default_config} if it exists), else libpq's PG* variables (PGHOST, PGPORT, PGDATABASE,
PGUSER, PGPASSFILE, …) and defaults.  A DSN is a libpq connection string
('host=db.internal dbname=crm user=alice') or URI (postgresql://alice@db.internal/crm).
"""

STATUS_EXIT = """\
exit status: 0 all well; 1 attention needed (dead letters, a URL's circuit breaker open, or a
change waiting longer than --max-age to be delivered); 2 no answer (cannot connect, crm_bridge not installed or too old,
permission denied, invalid settings).
"""


# -- where the connection comes from ----------------------------------------------------------
def _dsn_source(settings: Settings, source: str | None) -> str:
    """Where Settings.load found the DSN (``source``), for messages."""
    if not settings.dsn or source is None:
        return "libpq's PG* variables and defaults; no --dsn, CRM_BRIDGE_DSN or dsn in a config file was set"
    if source.startswith("config file "):
        return f"dsn in {source}"
    return source.removeprefix("environment variable ")


def describe_target(dsn: str) -> str:
    """host/port/user/dbname the connection attempt used (never the password)."""
    try:
        given = {k: str(v) for k, v in conninfo_to_dict(dsn).items()}
    except psycopg.Error:
        return "an unparsable DSN"
    defaults = {o.keyword.decode(): (o.val or b"").decode() for o in psycopg.pq.Conninfo.get_defaults()}
    parts = []
    for key in ("host", "port", "user", "dbname"):
        value = given.get(key) or defaults.get(key) or ""
        if key == "host" and not value:
            value = given.get("hostaddr") or defaults.get("hostaddr") or "(the default unix socket)"
        if key == "dbname" and not value:
            value = given.get("user") or defaults.get("user") or ""
        if key == "port" and not value.isdigit():
            # A password pasted into the wrong field must not be echoed: a port is digits.
            value = "(not a number)"
        parts.append(f"{key}={value}")
    return clean_text(" ".join(parts), limit=500)


def _where(args: argparse.Namespace) -> str:
    dsn, source = getattr(args, "_dsn", None), getattr(args, "_dsn_source", None)
    if dsn is None or source is None:
        return "connected with the given settings"
    return f"connected as {describe_target(dsn)} (from {source})"


def _connect_error(args: argparse.Namespace, exc: psycopg.OperationalError) -> str:
    dsn = getattr(args, "_dsn", None)
    source = getattr(args, "_dsn_source", None)
    text = f"crm-bridge: cannot connect to PostgreSQL: {db_error_text(exc)}"
    if dsn is not None and source is not None:
        text += f"\n  tried {describe_target(dsn)} (from {source})"
        if source.startswith("libpq's"):
            text += ("\n  give the database with --dsn 'host=… dbname=… user=…', CRM_BRIDGE_DSN, "
                     "or PGHOST/PGDATABASE/PGUSER")
    return text


def _error_message(args: argparse.Namespace, exc: Exception, privilege_hint: str) -> str:
    """One wording for every command's settings and database errors: what went wrong, where, and
    what to do; never a password fragment (db_error_text)."""
    if isinstance(exc, SettingsError):
        return f"crm-bridge: invalid settings: {db_error_text(exc)}"
    if isinstance(exc, psycopg.OperationalError):
        return _connect_error(args, exc)
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return f"crm-bridge: {db_error_text(exc)}\n  {_where(args)}: {privilege_hint}"
    if isinstance(exc, (psycopg.errors.InvalidSchemaName, psycopg.errors.UndefinedTable,
                        psycopg.errors.UndefinedFunction)):
        return (f"crm-bridge: database error: {db_error_text(exc)}\n  {_where(args)}: is crm_bridge installed and "
                "up to date there? (`crm-bridge migrate`; `crm-bridge check` shows the version)")
    return f"crm-bridge: database error: {db_error_text(exc)}\n  {_where(args)}"


# -- commands ---------------------------------------------------------------------------------
def _settings_from(args: argparse.Namespace) -> Settings:
    """Every command's settings, the DSN included: flags > CRM_BRIDGE_* > the config file."""
    flags = {k: getattr(args, k) for k in ("dsn", "config", "worker_id", "log_level", "log_format",
                                           "metrics_addr", "poll_interval", "concurrency",
                                           "batch_size", "lease", "grace", "timeout")
             if getattr(args, k, None) not in (None, "")}   # empty: not given (as an empty CRM_BRIDGE_*)
    sources: dict[str, str] = {}
    settings = Settings.load(flags, sources=sources)
    args._dsn, args._dsn_source = settings.dsn, _dsn_source(settings, sources.get("dsn"))
    return settings


def cmd_migrate(args: argparse.Namespace) -> int:
    dsn = _settings_from(args).dsn
    requested = RoleNames(args.admin_role, args.daemon_role, args.monitor_role) if args.roles else None
    with psycopg.connect(dsn, autocommit=True) as conn:
        before = installed_version(conn)
        done = migrate(conn, reference=args.reference_crm)
        roles = after_migrate(conn, requested=requested)
    if done:
        for item in done:
            print(f"applied {item}")
    else:
        print(f"crm_bridge schema is up to date (version {before})")
    print(f"schema version {latest_version()}")
    if roles is not None:
        print(f"roles: admin {roles.admin}, daemon {roles.daemon}, monitor {roles.monitor} "
              "(NOLOGIN groups: GRANT them to login roles, see docs/OPERATIONS.md)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    settings = _settings_from(args)
    configure(settings.log_level, settings.log_format)
    # sd_notify (READY/WATCHDOG/STATUS/STOPPING) and the opt-in metrics: bridge/service.py
    service = Service(settings)
    daemon = Daemon(settings, on_ready=service.on_ready, on_outcome=service.on_outcome)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            async def on_signal() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        log.info("received %s: stopping (grace %g s)", signal.Signals(signum).name,
                                 settings.grace)
                        daemon.stop()
                        service.stopping()
                        return

            tg.start_soon(on_signal)
            tg.start_soon(service.run)
            log.info("crm-bridge daemon starting (worker %s)", settings.worker_id)
            await daemon.run()
            tg.cancel_scope.cancel()

    tune_gc()   # see bridge/aio.py: +9 % deliveries per CPU second
    with service.serving(daemon):
        anyio.run(main)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo()


def cmd_replay(args: argparse.Namespace) -> int:
    return deadletters.run(args, _settings_from(args).dsn, "replay")


def cmd_purge(args: argparse.Namespace) -> int:
    return deadletters.run(args, _settings_from(args).dsn, "purge")


def cmd_retry_now(args: argparse.Namespace) -> int:
    return deadletters.run(args, _settings_from(args).dsn, "retry-now")


def cmd_check(args: argparse.Namespace) -> int:
    return run_check(_settings_from(args))


def cmd_status(args: argparse.Namespace) -> int:
    try:
        settings = _settings_from(args)
        with psycopg.connect(settings.dsn, connect_timeout=10, application_name="crm-bridge status") as conn:
            data = gather(conn)
    except StatusError as exc:
        print(f"crm-bridge: {exc}\n  {_where(args)}", file=sys.stderr)
        return 2
    except (SettingsError, psycopg.Error) as exc:  # status's contract: 2 = no answer, whatever the cause
        print(_error_message(args, exc, "connect as a member of crm_bridge_monitor or crm_bridge_admin "
                                        "(see docs/OPERATIONS.md#roles)"), file=sys.stderr)
        return 2
    print(render_json(data) if args.json else render_text(data))
    problems = attention(data, args.max_age)
    for p in problems:
        print(f"crm-bridge status: attention: {p}", file=sys.stderr)
    return 1 if problems else 0


COMMANDS = {"migrate": cmd_migrate, "run": cmd_run, "demo": cmd_demo, "replay": cmd_replay, "purge": cmd_purge,
            "retry-now": cmd_retry_now, "check": cmd_check, "status": cmd_status}


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=100)


def _global_options(p: argparse.ArgumentParser, *, top: bool) -> None:
    """The options every command takes, before or after the command name.  On the sub-parsers
    they default to SUPPRESS, so a value given before the command is not overwritten."""
    d = None if top else argparse.SUPPRESS
    g = p.add_argument_group("global options (before or after the command)")
    g.add_argument("--dsn", default=d, metavar="DSN",
                   help="PostgreSQL connection string or URI (default: $CRM_BRIDGE_DSN, then `dsn` in "
                        "the config file, then libpq's PG* variables)")
    g.add_argument("--config", default=d, metavar="FILE",
                   help=f"TOML settings file (default: $CRM_BRIDGE_CONFIG, else {DEFAULT_CONFIG} if it exists)")
    g.add_argument("--log-level", dest="log_level", default=d, type=str.upper, choices=LEVELS,
                   help="log level (default: INFO for run, WARNING for the other commands)")
    g.add_argument("--log-format", dest="log_format", default=d, choices=["text", "json"],
                   help="log line format (default: text)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crm-bridge", description=__doc__, formatter_class=_Formatter,
                                epilog=CONNECTION_HELP.format(default_config=DEFAULT_CONFIG)
                                + "\nSee `crm-bridge COMMAND --help`; docs/OPERATIONS.md and docs/DBA.md.")
    _global_options(p, top=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, description: str, epilog: str = "") -> argparse.ArgumentParser:
        text = (epilog + "\n" if epilog else "") + CONNECTION_HELP.format(default_config=DEFAULT_CONFIG)
        sp = sub.add_parser(name, help=help, description=textwrap.fill(description, 98),
                            formatter_class=_Formatter, epilog=text)
        _global_options(sp, top=False)
        return sp

    m = command("migrate", "install or upgrade the crm_bridge schema (idempotent)",
                "Install or upgrade the schema crm_bridge in one transaction (safe to run again; concurrent "
                "runs wait for each other).  Run it as the role that owns (or will own) crm_bridge.  After "
                "every run the group roles recorded by --roles get their grants again.")
    m.add_argument("--reference-crm", action="store_true",
                   help="also create the reference CRM schema `crm` with the triggers attached (for trials)")
    m.add_argument("--roles", action="store_true",
                   help="create (NOLOGIN, if missing) and grant the admin, daemon and monitor group roles; "
                        "see docs/OPERATIONS.md#roles")
    m.add_argument("--admin-role", dest="admin_role", default="crm_bridge_admin",
                   help="group role that edits the configuration (default: %(default)s)")
    m.add_argument("--daemon-role", dest="daemon_role", default="crm_bridge_daemon",
                   help="group role of the login `crm-bridge run` connects as (default: %(default)s)")
    m.add_argument("--monitor-role", dest="monitor_role", default="crm_bridge_monitor",
                   help="read-only group role for `crm-bridge status` and dashboards (default: %(default)s)")

    defaults = Settings()
    r = command("run", "run the daemon (LISTEN, claim, call URLs)",
                "Run the daemon: wait for captured changes, call the configured URLs, retry, dead-letter.  "
                "SIGTERM/SIGINT: stop claiming, finish in-flight calls for --grace seconds, exit 0.  "
                "Every option is also an environment variable CRM_BRIDGE_<NAME> and a key of the config "
                "file; flags win over the environment, which wins over the file.")
    r.add_argument("--worker-id", dest="worker_id", help="name of this daemon in leases (default: host:pid)")
    r.add_argument("--metrics-addr", dest="metrics_addr", metavar="HOST:PORT",
                   help="serve Prometheus metrics on HOST:PORT, e.g. 127.0.0.1:9720 (default: off)")
    r.add_argument("--poll-interval", dest="poll_interval", type=float, metavar="SECONDS",
                   help=f"fallback poll when no NOTIFY arrives (default: {defaults.poll_interval:g})")
    r.add_argument("--concurrency", type=int, metavar="N",
                   help=f"deliveries held at once, all URLs together (default: {defaults.concurrency})")
    r.add_argument("--batch-size", dest="batch_size", type=int, metavar="N",
                   help=f"events claimed per query (default: {defaults.batch_size})")
    r.add_argument("--lease", type=float, metavar="SECONDS",
                   help=f"how long a claim lives without a heartbeat (default: {defaults.lease:g})")
    r.add_argument("--grace", type=float, metavar="SECONDS",
                   help=f"time for in-flight deliveries on SIGTERM (default: {defaults.grace:g})")
    r.add_argument("--timeout", type=float, metavar="SECONDS",
                   help=f"per-attempt HTTP timeout unless the URL sets timeout_ms (default: {defaults.timeout:g})")

    command("demo", "throwaway PostgreSQL + receiver + daemon: watch the calls happen",
            "Start a throwaway PostgreSQL with the reference CRM, a receiver on 127.0.0.1 and the daemon, "
            "write a few CRM rows and print every call the receiver gets.  Touches no existing database.")

    command("check", "check settings, connection, schema version, URLs and attached tables",
            "Check everything the daemon depends on, without calling any URL: settings, the connection, "
            "the schema version, each URL's host (resolved against the address policy), objects with URLs "
            "but no attached table, capture triggers dropped or disabled.  Run it as the daemon's login.",
            "exit status: 0 no problems (warnings allowed), 1 problems found, 2 invalid settings, "
            "3 cannot connect, 4 database error.")

    st = command("status", "backlog, per-URL pending/retrying/in-flight/dead, last success/failure",
                 "Show the outbox, the queue per URL, dead letters and the last success and failure per URL "
                 "(the numbers of the crm_bridge.summary/backlog/url_status views).  Runs as a member of "
                 "crm_bridge_monitor or crm_bridge_admin.", STATUS_EXIT)
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--max-age", dest="max_age", type=float, default=300.0, metavar="SECONDS",
                    help="exit 1 when a change has waited longer than this to be delivered (default: %(default)g)")

    rp = command("replay", "queue dead letters again (filters combine with AND)",
                 "Queue matching dead letters again (attempts restart at 0).  Filters combine with AND; "
                 "without any filter, --all is required (on a terminal you are asked instead).  With "
                 "--delivered: send again everything one URL was delivered since a time (--url, --since, "
                 "optional --until), e.g. after its receiver lost data.  With --record NAME=ID …: the calls of one "
                 "record (its dead letters; with --delivered also its delivered calls), in call order.  Runs as a "
                 "member of crm_bridge_admin.")
    deadletters.add_filter_args(rp, delivered=True)
    pg = command("purge", "delete dead letters (filters combine with AND)",
                 "Delete matching dead letters and their attempt history.  Filters combine with AND; without "
                 "any filter, --all is required (on a terminal you are asked instead).  Runs as a member of "
                 "crm_bridge_admin.")
    deadletters.add_filter_args(pg)
    rn = command("retry-now", "send queued (pending) deliveries now instead of after their backoff",
                 "Make matching pending deliveries due now, e.g. after a receiver is back: a daemon sends them "
                 "within its poll interval.  Filters combine with AND; without any filter, --all is required "
                 "(on a terminal you are asked instead).  Deliveries of paused or disabled URLs stay held "
                 "until the URL is resumed.  Runs as a member of crm_bridge_admin.")
    deadletters.add_retry_args(rn)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "run":
        configure(args.log_level or os.environ.get("CRM_BRIDGE_LOG_LEVEL", "WARNING"), args.log_format or "text")
    try:
        return COMMANDS[args.command](args)
    except (SettingsError, psycopg.Error) as exc:
        print(_error_message(args, exc, "see docs/OPERATIONS.md#roles for the role that runs each command"),
              file=sys.stderr)
        return 2 if isinstance(exc, SettingsError) else 3 if isinstance(exc, psycopg.OperationalError) else 4


if __name__ == "__main__":
    sys.exit(main())
