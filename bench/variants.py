"""The capture variants compared side by side on crm.case, and switching between them."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from .sqlq import BQ, queries


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    attach: str | None        # name of the attach_* query in bench.sql; None: no trigger
    daemon: bool = False      # the real daemon runs (and delivers) during the measurement


NONE = Variant("none", "no trigger", None)
BRIDGE = Variant("bridge", "bridge, daemon delivering", "attach_bridge", daemon=True)
BRIDGE_STOPPED = Variant("bridge_stopped", "bridge, trigger alone (no daemon)", "attach_bridge")
HASURA = Variant("hasura", "Hasura-style JSON log", "attach_hasura")
PGQ = Variant("pgq", "PgQ pgq.logutriga", "attach_pgq")


def use(conn: psycopg.Connection, variant: Variant) -> None:
    """Leave exactly ``variant``'s capture trigger on crm.case (autocommit connection)."""
    conn.execute(BQ.detach_all)
    if variant.attach is not None:
        conn.execute(queries()[variant.attach])
