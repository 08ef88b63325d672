"""The ``crm-bridge`` command."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

import anyio
import psycopg

from .settings import Settings, SettingsError, db_error_text

log = logging.getLogger("crm_bridge")


def resolve_dsn(flag: str | None) -> str:
    """--dsn, else CRM_BRIDGE_DSN, else '' (libpq then uses the PG* variables)."""
    return flag or os.environ.get("CRM_BRIDGE_DSN", "")


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    from .logs import configure

    configure(level, fmt)


# -- commands ---------------------------------------------------------------------------------
def cmd_migrate(args: argparse.Namespace) -> int:
    from .db import installed_version, latest_version, migrate
    from .roles import after_migrate

    with psycopg.connect(resolve_dsn(args.dsn), autocommit=True) as conn:
        before = installed_version(conn)
        done = migrate(conn, reference=args.reference_crm)
        roles = after_migrate(conn, requested=(args.admin_role, args.daemon_role) if args.roles else None)
    if done:
        for item in done:
            print(f"applied {item}")
    else:
        print(f"crm_bridge schema is up to date (version {before})")
    print(f"schema version {latest_version()}")
    if roles is not None:
        print(f"roles: admin {roles[0]}, daemon {roles[1]} (NOLOGIN; GRANT them to login roles)")
    return 0


def _settings_from(args: argparse.Namespace) -> Settings:
    flags = {k: getattr(args, k) for k in ("config", "worker_id", "log_level", "log_format",
                                           "metrics_addr", "poll_interval", "concurrency",
                                           "batch_size", "lease", "grace", "timeout")
             if getattr(args, k, None) is not None}
    settings = Settings.load(flags)
    settings.dsn = resolve_dsn(args.dsn) or settings.dsn
    return settings


def cmd_run(args: argparse.Namespace) -> int:
    from .dispatch import Daemon
    from .service import Service

    settings = _settings_from(args)
    setup_logging(settings.log_level, settings.log_format)
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

    with service.serving(daemon):
        anyio.run(main)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo()


def cmd_replay(args: argparse.Namespace) -> int:
    from .deadletters import run

    return run(args, resolve_dsn(args.dsn), "replay")


def cmd_purge(args: argparse.Namespace) -> int:
    from .deadletters import run

    return run(args, resolve_dsn(args.dsn), "purge")



def cmd_check(args: argparse.Namespace) -> int:
    from .check import run_check

    return run_check(_settings_from(args))


def cmd_status(args: argparse.Namespace) -> int:
    from .status import StatusError, gather, render_json, render_text

    settings = _settings_from(args)
    with psycopg.connect(settings.dsn, connect_timeout=10, application_name="crm-bridge status") as conn:
        try:
            data = gather(conn)
        except StatusError as exc:
            print(f"crm-bridge: {exc}", file=sys.stderr)
            return 1
    print(render_json(data) if args.json else render_text(data))
    return 0



COMMANDS = {"migrate": cmd_migrate, "run": cmd_run, "demo": cmd_demo, "replay": cmd_replay, "purge": cmd_purge,
            "check": cmd_check, "status": cmd_status}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crm-bridge", description=__doc__)
    p.add_argument("--dsn", help="PostgreSQL connection string (default: $CRM_BRIDGE_DSN, then PG* variables)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("migrate", help="install or upgrade the crm_bridge schema (idempotent)")
    m.add_argument("--reference-crm", action="store_true",
                   help="also create the reference CRM schema `crm` with the triggers attached")
    m.add_argument("--roles", action="store_true",
                   help="create (NOLOGIN) and grant the admin and daemon group roles; see docs/SECURITY.md")
    m.add_argument("--admin-role", dest="admin_role", default="crm_bridge_admin",
                   help="name of the role that edits configuration (default crm_bridge_admin)")
    m.add_argument("--daemon-role", dest="daemon_role", default="crm_bridge_daemon",
                   help="name of the role `crm-bridge run` connects as (default crm_bridge_daemon)")

    r = sub.add_parser("run", help="run the daemon (LISTEN, claim, call URLs)")
    r.add_argument("--config", help="TOML settings file (default: $CRM_BRIDGE_CONFIG)")
    r.add_argument("--worker-id", dest="worker_id", help="name of this daemon in leases (default host:pid)")
    r.add_argument("--log-level", dest="log_level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    r.add_argument("--log-format", dest="log_format", choices=["text", "json"])
    r.add_argument("--metrics-addr", dest="metrics_addr", help="serve Prometheus metrics on HOST:PORT")
    r.add_argument("--poll-interval", dest="poll_interval", type=float, help="fallback poll, seconds")
    r.add_argument("--concurrency", type=int, help="deliveries held at once, all URLs together")
    r.add_argument("--batch-size", dest="batch_size", type=int, help="events claimed per query")
    r.add_argument("--lease", type=float, help="seconds a claim lives without a heartbeat")
    r.add_argument("--grace", type=float, help="seconds to finish in-flight deliveries on SIGTERM")
    r.add_argument("--timeout", type=float, help="default per-attempt HTTP timeout, seconds")

    sub.add_parser("demo", help="throwaway PostgreSQL + receiver + daemon: watch the calls happen")

    c = sub.add_parser("check", help="check settings, connection, schema version, URLs and attached tables",
                       description="Exit status: 0 no problems, 1 problems found, 2 invalid settings, "
                                   "3 cannot connect, 4 database error.")
    c.add_argument("--config", help="TOML settings file (default: $CRM_BRIDGE_CONFIG)")

    st = sub.add_parser("status", help="backlog, per-URL pending/retrying/in-flight/dead, last success/failure")
    st.add_argument("--config", help="TOML settings file (default: $CRM_BRIDGE_CONFIG)")
    st.add_argument("--json", action="store_true", help="machine-readable output")

    from .deadletters import add_filter_args

    rp = sub.add_parser("replay", help="queue dead letters again (filters combine with AND)")
    add_filter_args(rp)
    pg = sub.add_parser("purge", help="delete dead letters (filters combine with AND)")
    add_filter_args(pg)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "run":
        setup_logging(os.environ.get("CRM_BRIDGE_LOG_LEVEL", "WARNING"))
    try:
        return COMMANDS[args.command](args)
    except SettingsError as exc:
        print(f"crm-bridge: invalid settings: {db_error_text(exc)}", file=sys.stderr)
        return 2
    except psycopg.OperationalError as exc:
        print(f"crm-bridge: cannot connect to PostgreSQL: {db_error_text(exc)}", file=sys.stderr)
        return 3
    except psycopg.Error as exc:
        print(f"crm-bridge: database error: {db_error_text(exc)}", file=sys.stderr)
        return 4


if __name__ == "__main__":
    sys.exit(main())
