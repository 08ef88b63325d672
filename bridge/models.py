"""The types the delivery engine passes between its modules: a claimed call (Delivery) and what
one attempt at it came to (Outcome).

The bottom layer: it imports no other bridge module, so calls.py (the request), deliver.py (the
attempt) and daemon.py (claim -> send -> record) can all use it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

# crm_trigger's defaults for the circuit breaker (migration 0015): a claimed row carries the URL's
# own values; these stand in only for a row that has none (written by hand, an older query).
DEFAULT_BREAKER_THRESHOLD = 5
DEFAULT_BREAKER_COOLDOWN = 30.0


@dataclass(slots=True)
class Delivery:
    """A claimed call (see sql/queries.sql: claim / claim_due)."""

    id: int
    event_id: int
    object: str
    event: str
    ids: list[str | None]
    event_created_at: datetime
    status: str
    attempts: int
    trigger_id: int | None
    url: str | None
    timeout_ms: int | None
    max_attempts: int | None
    retry_schedule: list[float] | None      # seconds, capped by the database (retry_seconds)
    max_in_flight: int | None
    id_params: list[str]
    ordered: bool = False
    # Per-URL call shape (migration 0003); defaults keep rows from older queries loadable.
    method: str | None = None
    # crm_trigger.headers as JSON text ({"Name": "value"}), parsed per call (calls.static_headers).
    headers: Any = None
    follow_redirects: bool | None = None
    signing_secret: str | None = field(default=None, repr=False)
    # {"new"/"old": captured row} as PostgreSQL's JSON text, for include_row URLs: never parsed,
    # spliced into the POST body as is (calls.row_members).
    row: Any = field(default=None, repr=False)
    # Calls per request for a POST URL (migration 0013); NULL or 1: one call per request.
    batch_max: int | None = None
    # Receiver protection (migration 0015): the URL's rate limit (enforced by the database, see
    # daemon_claim_due) and its circuit breaker's settings (the daemon's own copy of the breaker
    # stops sending the calls it holds after breaker_threshold failures in a row).
    max_per_second: float | None = None
    breaker_threshold: int | None = None
    breaker_cooldown: float | None = None
    # Not columns: handed out by daemon_claim_due (the database decided it may be sent now), and
    # when (time.monotonic()).
    granted: bool = False
    granted_at: float = 0.0

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Delivery:
        """A claimed row as a Delivery; raises ValueError (or TypeError) for a row the daemon cannot
        work with, which then becomes a dead letter with that reason (daemon.Daemon._spawn)."""
        d = cls(**row)
        if not isinstance(d.id, int) or not isinstance(d.trigger_id, int):
            raise ValueError("the claimed row has no delivery id or URL id")
        if not isinstance(d.event_created_at, datetime):
            raise ValueError("its event_created_at is outside the years the daemon can handle (2 to 9998); "
                             "was it changed by hand?")
        return d

    @property
    def breaker(self) -> tuple[int, float]:
        """The URL's circuit breaker: (failures in a row that open it, 0: off; seconds it stays open)."""
        threshold = DEFAULT_BREAKER_THRESHOLD if self.breaker_threshold is None else self.breaker_threshold
        return threshold, self.breaker_cooldown or DEFAULT_BREAKER_COOLDOWN


@dataclass(slots=True)
class Outcome:
    """What happened; ``status`` is the delivery's next state."""

    status: str                 # delivered | pending | dead
    attempted: int = 1          # 0 when handed back without an attempt
    http_status: int | None = None
    error: str | None = None
    delay: float = 0.0          # seconds until the next attempt (status pending)
    duration_ms: int = 0

    @property
    def receiver_down(self) -> bool:
        """A connection failure, a timeout or a 5xx: what the circuit breaker counts."""
        return bool(self.attempted) and self.status != "delivered" and (
            self.http_status is None or self.http_status >= 500)
