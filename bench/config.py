"""How big each measurement is: the full run (about ten minutes) and --quick (CI, under a minute)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    write_seconds: int            # one pgbench run, 8 writers
    write_rounds: int             # rounds over all variants (order rotated every round)
    scale_seconds: int            # one pgbench run, 1 writer, N rows per transaction
    scale_rounds: int
    rows_per_tx: tuple[int, ...]
    bulk_rows: int                # the single large INSERT statement
    bulk_reps: int
    latency_rates: tuple[int, ...]
    latency_seconds: float        # per rate, after a warm-up
    latency_warmup: float
    raw_requests: int             # per raw-client run
    backlog_events: int           # written while the daemon is down, then drained
    drain_limit: float            # seconds a backlog drain may take before it is cut (and measured)
    fanout_events: int
    fanout_urls: tuple[int, ...]
    fanout_limit: float
    idle_seconds: float


FULL = Sizes(
    write_seconds=2, write_rounds=5, scale_seconds=2, scale_rounds=3, rows_per_tx=(1, 10, 100, 1000),
    bulk_rows=10_000, bulk_reps=5, latency_rates=(50, 200, 1000), latency_seconds=10.0,
    latency_warmup=1.0, raw_requests=20_000, backlog_events=100_000, drain_limit=90.0, fanout_events=2_000,
    fanout_urls=(1, 4, 16), fanout_limit=30.0,
    idle_seconds=10.0,
)

QUICK = Sizes(
    write_seconds=1, write_rounds=1, scale_seconds=1, scale_rounds=1, rows_per_tx=(1, 100),
    bulk_rows=2_000, bulk_reps=1, latency_rates=(50, 200), latency_seconds=1.5,
    latency_warmup=0.3, raw_requests=1_000, backlog_events=1_000, drain_limit=5.0, fanout_events=200,
    fanout_urls=(1, 4), fanout_limit=4.0,
    idle_seconds=2.0,
)
