"""Database roles: the admin, daemon and monitor group roles that `crm-bridge migrate --roles` sets up.

The grants live in SQL (``crm_bridge.apply_grants``, migration 0006) so that a DBA can apply them
from psql as well; this module only decides when to call it.  After every `crm-bridge migrate`
the recorded roles are granted again, so objects added by a migration get their grants.
"""

from __future__ import annotations

from typing import NamedTuple

import psycopg

from .migrate import relation_exists
from .sqlfiles import Q

DEFAULT_ADMIN_ROLE = "crm_bridge_admin"
DEFAULT_DAEMON_ROLE = "crm_bridge_daemon"
DEFAULT_MONITOR_ROLE = "crm_bridge_monitor"


class RoleNames(NamedTuple):
    admin: str = DEFAULT_ADMIN_ROLE
    daemon: str = DEFAULT_DAEMON_ROLE
    monitor: str = DEFAULT_MONITOR_ROLE


def recorded_roles(conn: psycopg.Connection) -> RoleNames | None:
    """The roles apply_grants() last set up, or None.  A database set up before the monitor role
    existed (schema version < 6) gets the default monitor role name."""
    if not relation_exists(conn, "crm_bridge.role_name"):
        return None
    rows = dict(conn.execute(Q.role_names).fetchall())
    if "admin" in rows and "daemon" in rows:
        return RoleNames(str(rows["admin"]), str(rows["daemon"]), str(rows.get("monitor", DEFAULT_MONITOR_ROLE)))
    return None


def apply_grants(conn: psycopg.Connection, roles: RoleNames) -> None:
    """Create the NOLOGIN group roles if missing and (re)grant their privileges (idempotent)."""
    with conn.transaction():
        conn.execute(Q.role_grants, roles._asdict())


def after_migrate(conn: psycopg.Connection, *, requested: RoleNames | None) -> RoleNames | None:
    """Apply the requested roles, else re-apply recorded ones (new objects need their grants)."""
    roles = requested or recorded_roles(conn)
    if roles is not None:
        apply_grants(conn, roles)
    return roles
