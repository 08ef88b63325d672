"""Connections and schema migrations."""

from __future__ import annotations

import logging

import psycopg

from .sqlfiles import migrations, reference_crm

log = logging.getLogger("crm_bridge.db")

# Serialises concurrent `crm-bridge migrate` runs ('crmb', 0).
MIGRATE_LOCK = (1668441442, 0)

_BOOTSTRAP = """
CREATE SCHEMA IF NOT EXISTS crm_bridge;
CREATE TABLE IF NOT EXISTS crm_bridge.schema_version (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""


def applied_versions(conn: psycopg.Connection) -> set[int]:
    exists = conn.execute("SELECT to_regclass('crm_bridge.schema_version') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return set()
    return {int(r[0]) for r in conn.execute("SELECT version FROM crm_bridge.schema_version")}


def installed_version(conn: psycopg.Connection) -> int:
    """The highest applied migration (0 when crm_bridge is not installed)."""
    return max(applied_versions(conn), default=0)


def latest_version() -> int:
    return migrations()[-1].version


def migrate(conn: psycopg.Connection, *, reference: bool = False) -> list[str]:
    """Apply the missing migrations (and the reference CRM) in one transaction; return what was done."""
    done: list[str] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", MIGRATE_LOCK)
        conn.execute(_BOOTSTRAP)
        applied = applied_versions(conn)
        for m in migrations():
            if m.version in applied:
                continue
            log.info("applying migration %04d_%s", m.version, m.name)
            conn.execute(m.text())
            conn.execute("INSERT INTO crm_bridge.schema_version (version, name) VALUES (%s, %s)",
                         (m.version, m.name))
            done.append(f"{m.version:04d}_{m.name}")
        if reference:
            conn.execute(reference_crm())
            done.append("reference CRM (schema crm)")
    return done
