"""Tables stay bounded (goal 8): events delivered with a short retention, every crm_bridge
relation's size and dead tuples after vs. before, round over round.

The daemon runs with a retention of ``retention_window`` seconds (its own settings,
``retention_days`` and ``retention_interval``, through its environment).  A warm-up round brings
the tables to their working size ("before"): it writes at least ``retention_warmup`` events and goes
on for at least ``retention_warmup_naptimes`` autovacuum_naptimes, because a table that is
deleted from (the outbox) grows until autovacuum's next visit makes its free space reusable, so its
working size is what arrives between two visits at the writers' rate; then each measured round writes its events with
8 writers while the daemon delivers, waits until every call arrived, waits out the retention
window, then waits for autovacuum's next pass over every relation that holds more dead tuples than
autovacuum's threshold for it (at
most one autovacuum_naptime and a bit; the dead tuples seen before that pass are reported too:
between two passes a queue table holds what was deleted since the last one), and reads
pg_total_relation_size and pg_stat_user_tables for every table and partition in schema
crm_bridge, whatever the engine has (a table's dead tuples and vacuums include its TOAST
table's).  A relation is flagged when it grew to more than
1.5x its size before, or grew from one round to the next (beyond a small slack: a page here and
there is not growth).
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass

import psycopg

from . import variants as V
from .context import Ctx
from .drain import BACKLOG_WRITERS, await_calls
from .report import Table
from .sqlq import BQ

FLAT = 1.5                   # goal: after ≤ 1.5 x before
ROUND_GROWTH = 1.1           # round over round: more than this is growth...
SLACK_BYTES = 1 << 20        # ...and more than this many bytes
SLACK_DEAD = 10_000          # dead tuples: the same, in tuples


@dataclass(frozen=True)
class Rel:
    bytes: int
    live: int
    dead: int
    vacuums: int
    due: bool = False          # more dead tuples than autovacuum's threshold: its next round visits it


def sizes(ctx: Ctx) -> dict[str, Rel]:
    return {str(name): Rel(int(b), int(live), int(dead), int(vac), bool(due))
            for name, b, live, dead, vac, due in ctx.conn.execute(BQ.relation_sizes).fetchall()}


def naptime(ctx: Ctx) -> float:
    row = ctx.conn.execute(BQ.autovacuum_naptime).fetchone()
    return float(row[0]) if row else 60.0


def grew(before: int, after: int, factor: float, slack: int) -> bool:
    return after > before * factor and after - before > slack


def growth(seen: list[Rel | None]) -> list[str]:
    """Why a relation's series (before, after round 1, 2...) is not flat: above FLAT x before, or
    above ROUND_GROWTH x the previous round, in size or in dead tuples."""
    out = []
    before = seen[0] or Rel(0, 0, 0, 0)
    for i, (prev, now) in enumerate(itertools.pairwise(seen), start=1):
        if now is None:
            continue
        if grew(before.bytes, now.bytes, FLAT, SLACK_BYTES) or grew(before.dead, now.dead, FLAT, SLACK_DEAD):
            out.append(f"> {FLAT:g}x before after round {i}")
        if i > 1 and prev is not None and (grew(prev.bytes, now.bytes, ROUND_GROWTH, SLACK_BYTES)
                                           or grew(prev.dead, now.dead, ROUND_GROWTH, SLACK_DEAD)):
            out.append(f"grew in round {i}")
    return out


def vacuumed(ctx: Ctx, at_end: dict[str, Rel], limit: float) -> tuple[dict[str, Rel], float]:
    """Sizes once every relation that autovacuum was due to visit in ``at_end`` (more dead tuples
    than its threshold, in the table or its TOAST table) has been vacuumed since (or ``limit``
    seconds passed); and the seconds waited.  Read before that visit, a table that is deleted from
    shows what it held since the previous one, not what it keeps (a run of 2026-12-02 read the
    outbox at 34.7 MB with 8,694 dead tuples a few seconds before the visit that brought it back
    to 8.6 MB, as in the round before)."""
    t0 = time.monotonic()
    while True:
        now = sizes(ctx)
        waiting = [n for n, r in at_end.items()
                   if r.due and n in now and now[n].vacuums <= r.vacuums and now[n].due]
        if not waiting or time.monotonic() - t0 > limit:
            return now, time.monotonic() - t0
        time.sleep(1.0)


class OutboxFill(threading.Thread):
    """Samples the outbox every 0.5 s while a round runs, on its own connection: the most tuples it
    held at once (live + dead: a table that is deleted from reuses the space of dead tuples only
    after (auto)vacuum's next visit) and its largest size.  What limits goal 8 for the outbox:
    its size follows that peak, whatever the engine does with the rows."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.done = threading.Event()
        self.tuples = 0
        self.bytes = 0
        self.vacuums_first: int | None = None   # the table's (auto)vacuum count at the first sample
        self.vacuums_last = 0

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while True:
                row = conn.execute(BQ.outbox_fill).fetchone()
                if row:
                    self.bytes = max(self.bytes, int(row[0]))
                    self.tuples = max(self.tuples, int(row[1]))
                    self.vacuums_last = int(row[2])
                    if self.vacuums_first is None:
                        self.vacuums_first = self.vacuums_last
                if self.done.wait(0.5):
                    return

    @property
    def passes(self) -> int:
        """(Auto)vacuum passes over the outbox while sampled."""
        return self.vacuums_last - (self.vacuums_first or 0) if self.vacuums_first is not None else 0

    def stop(self) -> None:
        self.done.set()
        self.join(10)


def _mb(b: int) -> str:
    return f"{b / 1048576:.2f} MB"


def retention(ctx: Ctx) -> None:
    s = ctx.sizes
    env = {"CRM_BRIDGE_RETENTION_DAYS": repr(s.retention_window / 86400),
           "CRM_BRIDGE_RETENTION_INTERVAL": repr(s.retention_interval)}
    rounds = [("warm-up", s.retention_warmup)] + [(f"round {i + 1}", s.retention_round)
                                                  for i in range(s.retention_rounds)]
    ctx.log(f"bounded tables: {' + '.join(f'{n:,}' for _, n in rounds)} events, retention "
            f"{s.retention_window:g} s (pass every {s.retention_interval:g} s)")
    ctx.set_urls(["/retention"])
    ctx.reset(V.BRIDGE)
    snaps: list[dict[str, Rel]] = []
    peaks: list[int] = []       # dead tuples in all crm_bridge before autovacuum's pass
    waits: list[float] = []
    statuses: list[str] = []
    cut: list[str] = []
    warmup_written = 0
    fills: list[OutboxFill] = []
    with ctx.daemon(env):
        for label, events in rounds:
            fills.append(OutboxFill(ctx.db.dsn))
            fills[-1].start()
            ctx.rx.reset()
            t0 = time.time()
            written = 0
            # The warm-up goes on until it has lasted retention_warmup_naptimes autovacuum_naptimes.
            min_seconds = s.retention_warmup_naptimes * naptime(ctx) if label == "warm-up" else 0.0
            while not written or time.time() - t0 < min_seconds:
                written += ctx.writers.run(BQ.insert_one, BACKLOG_WRITERS,
                                           transactions=max(1, events // BACKLOG_WRITERS)).transactions
            if label == "warm-up":
                warmup_written = written
            got = await_calls(ctx, written, t0, s.retention_limit)
            statuses.append(f"{label}: {got.received:,} delivered in {got.seconds:.0f} s"
                            + ("" if got.complete else f" (cut, {written:,} written)"))
            if not got.complete:
                cut.append(label)
            ctx.log(f"    {statuses[-1]}; waiting {s.retention_window + s.retention_settle:g} s for retention")
            time.sleep(s.retention_window + s.retention_settle)
            at_end = sizes(ctx)
            peaks.append(sum(r.dead for r in at_end.values()))
            # (--quick: at most retention_limit, a few seconds: it proves the harness, not the goal)
            snap, waited = vacuumed(ctx, at_end, min(naptime(ctx) + s.retention_settle, s.retention_limit))
            fills[-1].stop()
            waits.append(waited)
            snaps.append(snap)
    fill_peaks = " → ".join(f"{f.tuples:,}" for f in fills)
    names = sorted(set().union(*snaps))
    series = {name: [snap.get(name) for snap in snaps] for name in names}
    series["all crm_bridge"] = [Rel(sum(r.bytes for r in snap.values()), sum(r.live for r in snap.values()),
                                    sum(r.dead for r in snap.values()), 0) for snap in snaps]
    flagged: list[str] = []
    t = Table(f"Bounded tables: every crm_bridge relation after each round (retention {s.retention_window:g} s)",
              ["relation", "before (after warm-up)", *(f"after round {i}" for i in range(1, len(snaps))),
               "last ÷ before", "dead tuples (before → rounds)", "vacuums", "flag"])
    for name, seen in series.items():
        flags = growth(seen)
        if flags:
            flagged.append(name)
        flags += (["new"] if seen[0] is None else []) + (["gone"] if seen[-1] is None else [])
        first, last = seen[0], seen[-1]
        t.rows.append([name, *("—" if a is None else _mb(a.bytes) for a in seen),
                       f"{last.bytes / first.bytes:.2f}" if first and last and first.bytes else "n/a",
                       " → ".join("—" if a is None else f"{a.dead:,}" for a in seen),
                       " → ".join("—" if a is None else str(a.vacuums) for a in seen) if name in names else "",
                       "; ".join(flags)])
    totals = series["all crm_bridge"]
    t.notes += [
        f"Daemon settings: retention_days = {s.retention_window:g} s / 86,400, retention_interval = "
        f"{s.retention_interval:g} s; after each round the bench waits {s.retention_window + s.retention_settle:g} s "
        "(the window, the width of the partition holding the round's last rows, a pass), then for "
        "autovacuum's next pass over every relation holding more dead "
        "tuples than autovacuum's threshold for it (its reloptions, else the server's settings; table or TOAST) "
        f"(waited: {', '.join(f'{w:.0f} s' for w in waits)}), then reads sizes.",
        "Dead tuples in all crm_bridge before that autovacuum pass (before → rounds): "
        + " → ".join(f"{p:,}" for p in peaks) + f"; autovacuum_naptime {naptime(ctx):g} s.",
        f"Before = after a warm-up of at least {s.retention_warmup:,} events and "
        f"{s.retention_warmup_naptimes:g} autovacuum_naptime(s) of writing: a table deleted from grows until "
        "autovacuum's next visit frees its space for reuse, so its working size is what the writers add "
        "between two visits; from there it must stay flat.",
        "What the outbox's size follows (event, sampled every 0.5 s during each round): the most tuples it "
        "held at once, live (not yet claimed) + dead (claimed, space not yet reusable): "
        + fill_peaks + "; its largest size: "
        + " → ".join(_mb(f.bytes) for f in fills) + "; autovacuum passes over it seen: "
        + " → ".join(str(f.passes) for f in fills)
        + ". A table that is deleted from reuses a dead tuple's space only after autovacuum's next visit, "
        "so it grows to hold what the writers add between two visits.",
        f"Events written by {BACKLOG_WRITERS} pgbench clients (1-row transactions) while the daemon delivers; "
        + "; ".join(statuses) + ".",
        f"Flag: size (with indexes and TOAST) or dead tuples above {FLAT:g}x before, or above {ROUND_GROWTH:g}x "
        f"the previous round, by more than {SLACK_BYTES >> 20} MB / {SLACK_DEAD:,} tuples; 'new': a relation "
        "created since (e.g. a partition).",
    ]
    ctx.report.tables.append(t)
    delivered = s.retention_round * s.retention_rounds
    ctx.report.set("8", (f"{totals[-1].bytes / totals[0].bytes:.2f}x before in all; "
                         if totals[0] and totals[-1] and totals[0].bytes else "")
                   + (f"grew: {', '.join(flagged)}" if flagged else "no relation grew"),
                   not flagged and not cut, f"{delivered:,} events in {s.retention_rounds} rounds after a "
                                            f"{warmup_written:,}-event warm-up"
                   + (f"; NOT all delivered: {', '.join(cut)}" if cut else "")
                   + "; the outbox's size follows the most tuples it held between two autovacuum visits: "
                   + fill_peaks + " (warm-up → rounds)")
