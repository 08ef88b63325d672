"""How big each measurement is: the full run (20-25 minutes) and --quick (CI, under a minute).

Every drain has a time limit: a daemon too slow for a size is cut and measured as its rate so
far, so the full run stays bounded whatever the engine does."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    # goals 4, 5: 8 writers, every capture variant
    write_seconds: int            # one pgbench run
    write_rounds: int             # rounds over all variants (order rotated every round)
    write_deliver_limit: float    # daemon delivering: seconds after the writers stop for the last calls
    # goals 6, 7: a latency run starts when the machine is quiet, or after this many seconds
    settle_limit: float
    # goal 6
    latency_seconds: float        # at 200 events/s, after a warm-up
    latency_warmup: float
    # goal 1
    raw_requests: int             # per raw-client run
    backlog_events: int           # 1-row events written while the daemon is down
    bulk_statements: int          # ... and this many statements of bulk_statement_rows rows
    bulk_statement_rows: int
    drain_limit: float            # seconds a backlog drain may take before it is cut (and measured)
    drain_rounds: int             # rounds of (raw clients, both drains); medians of the rounds
    # goals 2, 3
    million_rows: int             # the one large INSERT
    million_limit: float
    live_events: int              # live events written after it, one every live_interval s
    live_interval: float
    # goal 7
    livemax_seconds: float        # one step of the search, after a warm-up
    livemax_warmup: float
    livemax_steps: int
    livemax_fallback_rate: float  # start of the search when the drain phase did not run
    # goal 8
    retention_window: float       # the daemon's retention, seconds
    retention_interval: float     # the daemon's retention_interval, seconds
    retention_warmup: int         # events before "before" is read (at least; see the next)
    retention_warmup_naptimes: float  # ...and the warm-up lasts at least this many autovacuum_naptimes
    retention_round: int          # events per measured round
    retention_rounds: int
    # seconds after the window before sizes are read: the last rows of a round sit in a history
    # partition that ends up to a partition's width after the round (a quarter of the retention,
    # at least 10 s), and it goes at the first pass after its end + the window (passes every
    # retention_interval): 15 + 10 + 5 = 30 s at the full sizes, with no margin at a settle of 15
    # (a run read that partition, 3.6 MB, just before its pass and flagged it)
    retention_settle: float
    retention_limit: float        # seconds a round may take
    # goal 9
    scaleout_events: int
    scaleout_limit: float
    # issue 13.3: batched calls ÷ single calls
    batch_events: int
    batch_rounds: int             # rounds of (single, batched), order rotated every round
    batch_limit: float
    # no goal: idle daemon
    idle_seconds: float


FULL = Sizes(
    write_seconds=3, write_rounds=4, write_deliver_limit=60.0,
    settle_limit=30.0, latency_seconds=10.0, latency_warmup=1.0,
    raw_requests=20_000, backlog_events=100_000, bulk_statements=10, bulk_statement_rows=10_000, drain_limit=120.0,
    drain_rounds=2,
    million_rows=1_000_000, million_limit=120.0, live_events=10, live_interval=0.5,
    livemax_seconds=30.0, livemax_warmup=2.0, livemax_steps=5, livemax_fallback_rate=1000.0,
    retention_window=15.0, retention_interval=5.0, retention_warmup=100_000,
    retention_warmup_naptimes=1.25, retention_round=150_000,
    retention_rounds=2, retention_settle=25.0, retention_limit=200.0,
    scaleout_events=50_000, scaleout_limit=90.0,
    batch_events=50_000, batch_rounds=2, batch_limit=90.0,
    idle_seconds=10.0,
)

QUICK = Sizes(
    write_seconds=1, write_rounds=1, write_deliver_limit=5.0,
    settle_limit=2.0, latency_seconds=1.5, latency_warmup=0.3,
    raw_requests=1_000, backlog_events=1_000, bulk_statements=10, bulk_statement_rows=100, drain_limit=5.0,
    drain_rounds=1,
    million_rows=10_000, million_limit=4.0, live_events=3, live_interval=0.3,
    livemax_seconds=1.5, livemax_warmup=0.3, livemax_steps=2, livemax_fallback_rate=200.0,
    retention_window=1.0, retention_interval=1.0, retention_warmup=500,
    retention_warmup_naptimes=0.0, retention_round=1_000,
    retention_rounds=2, retention_settle=0.5, retention_limit=5.0,
    scaleout_events=1_000, scaleout_limit=5.0,
    batch_events=1_000, batch_rounds=1, batch_limit=5.0,
    idle_seconds=1.0,
)
