"""Database roles: the admin and daemon group roles that `crm-bridge migrate --roles` sets up.

The grants live in SQL (``crm_bridge.apply_grants``, migration 0003) so that a DBA can apply them
from psql as well; this module only decides when to call it.
"""

from __future__ import annotations

import psycopg

DEFAULT_ADMIN_ROLE = "crm_bridge_admin"
DEFAULT_DAEMON_ROLE = "crm_bridge_daemon"


def recorded_roles(conn: psycopg.Connection) -> tuple[str, str] | None:
    """The (admin, daemon) role names apply_grants() last set up, or None."""
    exists = conn.execute("SELECT to_regclass('crm_bridge.role_name') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return None
    rows = dict(conn.execute("SELECT kind, role FROM crm_bridge.role_name").fetchall())
    if "admin" in rows and "daemon" in rows:
        return str(rows["admin"]), str(rows["daemon"])
    return None


def apply_grants(conn: psycopg.Connection, admin: str, daemon: str) -> None:
    """Create the NOLOGIN group roles if missing and (re)grant their privileges (idempotent)."""
    with conn.transaction():
        conn.execute("SELECT crm_bridge.apply_grants(%s, %s)", (admin, daemon))


def after_migrate(conn: psycopg.Connection, *, requested: tuple[str, str] | None) -> tuple[str, str] | None:
    """Apply the requested roles, else re-apply recorded ones (new objects need their grants)."""
    roles = requested or recorded_roles(conn)
    if roles is not None:
        apply_grants(conn, *roles)
    return roles
