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
    burn: float = 0.0         # share of one core a process of no database work keeps busy meanwhile


NONE = Variant("none", "no trigger", None)
BRIDGE = Variant("bridge", "bridge, daemon delivering", "attach_bridge", daemon=True)
BRIDGE_STOPPED = Variant("bridge_stopped", "bridge, trigger alone (no daemon)", "attach_bridge")
# Goal 4's control: the trigger alone while a process that does no database work keeps about as
# much of a core busy as the daemon does (~75 %): what the writers' own server processes cost more
# on a busier machine, apart from anything the daemon asks of the database.
BRIDGE_BUSY = Variant("bridge_busy", "bridge, trigger alone + a busy process", "attach_bridge", burn=0.75)
HASURA = Variant("hasura", "Hasura-style JSON log", "attach_hasura")
PGQ = Variant("pgq", "PgQ pgq.logutriga", "attach_pgq")
# Floors (goal 5): what any PL/pgSQL statement-level capture costs before logic of its own.
FLOOR_NOTHING = Variant("floor_nothing", "floor: empty statement trigger", "attach_floor_nothing")
FLOOR_HEAP = Variant("floor_heap", "floor: 1 row into an unindexed table", "attach_floor_heap")
FLOOR_OUTBOX = Variant("floor_outbox", "floor: 1 row into an id-keyed outbox", "attach_floor_outbox")
FLOORS = [FLOOR_NOTHING, FLOOR_HEAP, FLOOR_OUTBOX]
# The bench's own capture tables (variants.sql), emptied by every reset.
BENCH_LOGS = ["hasura_log", "floor_heap", "floor_outbox"]


def use(conn: psycopg.Connection, variant: Variant) -> None:
    """Leave exactly ``variant``'s capture trigger on crm.case (autocommit connection)."""
    conn.execute(BQ.detach_all)
    if variant.attach is not None:
        conn.execute(queries()[variant.attach])
