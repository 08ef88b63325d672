"""Schema migrations: which versions a database has and applying the missing ones.

It opens no connection of its own: callers (the CLI, the demo, the tests) hand it one.  The SQL
it runs is in ``sql/queries.sql``; the migrations themselves are ``sql/migrations/NNNN_name.sql``.
"""

from __future__ import annotations

import logging

import psycopg

from .sqlfiles import Q, migrations, reference_crm

log = logging.getLogger("crm_bridge.migrate")

# Serialises concurrent `crm-bridge migrate` runs ('crmb', 0).
MIGRATE_LOCK = (1668441442, 0)


def relation_exists(conn: psycopg.Connection, name: str) -> bool:
    """Whether the table or view ``name`` exists (crm_bridge may be absent or older than it)."""
    row = conn.execute(Q.relation_exists, {"name": name}).fetchone()
    return bool(row and row[0])


def applied_versions(conn: psycopg.Connection) -> set[int]:
    if not relation_exists(conn, "crm_bridge.schema_version"):
        return set()
    return {int(r[0]) for r in conn.execute(Q.schema_versions)}


def installed_version(conn: psycopg.Connection) -> int:
    """The highest applied migration (0 when crm_bridge is not installed)."""
    return max(applied_versions(conn), default=0)


def latest_version() -> int:
    return migrations()[-1].version


def migrate(conn: psycopg.Connection, *, reference: bool = False, up_to: int | None = None) -> list[str]:
    """Apply the missing migrations (all, or those numbered up to ``up_to``) and the reference CRM
    in one transaction; return what was done."""
    done: list[str] = []
    with conn.transaction():
        key, sub = MIGRATE_LOCK
        conn.execute(Q.migrate_lock, {"key": key, "sub": sub})
        conn.execute(Q.schema_bootstrap)
        applied = applied_versions(conn)
        for m in migrations():
            if m.version in applied or (up_to is not None and m.version > up_to):
                continue
            log.info("applying migration %04d_%s", m.version, m.name)
            conn.execute(m.text())
            conn.execute(Q.schema_version_record, {"version": m.version, "name": m.name})
            done.append(f"{m.version:04d}_{m.name}")
        if reference:
            conn.execute(reference_crm())
            done.append("reference CRM (schema crm)")
    return done
