"""Prometheus metrics and the orchestrator probes, served only when ``--metrics-addr HOST:PORT``
is given: ``/metrics``, ``/healthz`` (liveness) and ``/readyz`` (readiness); what the probes decide
is Service.health / Service.readiness (bridge/service.py).

Two kinds of numbers:

* counted by this daemon as it works: deliveries by outcome and URL, call durations, end-to-end
  latency, database errors and reconnects;
* read from the database every ``status_interval`` (the views of sql/migrations/0002_views.sql,
  shared by every daemon): backlog, pending/retrying/in-flight deliveries, dead letters, oldest
  pending age, per URL.  Several daemons export the same values: aggregate those with max(), not sum().

The URL label is the ``crm_trigger`` id (never the URL, which may carry credentials);
``crm_bridge_url_info`` maps it to object, event and the redacted URL (redact.redact_url: no
credentials, no token-looking path segments; control characters escaped).  At most
``MAX_URL_LABELS`` ids get their own series; beyond that they share ``trigger_id="other"``.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import urlsplit

from .daemon import Daemon
from .models import Delivery, Outcome
from .redact import redact_url, safe_text
from .settings import SettingsError, parse_host_port

log = logging.getLogger("crm_bridge.metrics")

MAX_URL_LABELS = 500
OUTCOME_LABEL = {"delivered": "delivered", "pending": "retry", "dead": "dead"}
# One HTTP call: loopback receivers answer in ~1 ms, the default timeout is 15 s.
ATTEMPT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30, 60)
# CRM commit -> 2xx, retries included: milliseconds when healthy, hours after an outage.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 7200, 36000)


@dataclass(frozen=True)
class Snapshot:
    """The database's view of the queue at one moment (rows of status_summary / metrics_urls;
    probe_state: the schema version and the NOTIFY queue's usage)."""

    summary: dict[str, Any]
    urls: list[dict[str, Any]] = field(default_factory=list)
    taken: float = field(default_factory=time.monotonic)
    schema_version: int | None = None
    notify_queue_usage: float | None = None


class Probes(Protocol):
    """What /healthz and /readyz answer: (ok, a one-line reason)."""

    def health(self) -> tuple[bool, str]: ...

    def readiness(self) -> tuple[bool, str]: ...


class Metrics:
    def __init__(self) -> None:
        try:
            import prometheus_client as prom
        except ImportError:
            raise SettingsError("--metrics-addr needs the prometheus-client package "
                                "(pip install prometheus-client)") from None
        self._prom = prom
        prom.disable_created_metrics()  # *_created series double the series count for no use here
        self.registry = prom.CollectorRegistry()
        self.deliveries = prom.Counter(
            "crm_bridge_deliveries", "Delivery attempts finished by this daemon, by URL (crm_trigger id) and "
            "outcome: delivered (2xx), retry (failed, will be retried), dead (given up)",
            ["trigger_id", "outcome"], registry=self.registry)
        self.attempt_seconds = prom.Histogram(
            "crm_bridge_attempt_duration_seconds", "Duration of one HTTP call, by outcome",
            ["outcome"], buckets=ATTEMPT_BUCKETS, registry=self.registry)
        self.latency = prom.Histogram(
            "crm_bridge_delivery_latency_seconds", "From the CRM change (event created) to the 2xx answer",
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.snapshot: Snapshot | None = None
        self.daemon: Daemon | None = None
        self._labels: set[str] = set()
        self._lock = threading.Lock()
        self._server: Any = None
        self.registry.register(_StateCollector(self))

    def observe(self, d: Delivery, outcome: Outcome) -> None:
        """Count one finished attempt (called by the daemon, in its event loop)."""
        label = OUTCOME_LABEL.get(outcome.status)
        if label is None or not outcome.attempted:
            return
        self.deliveries.labels(self._url_label(d.trigger_id), label).inc()
        self.attempt_seconds.labels(label).observe(outcome.duration_ms / 1000.0)
        if label == "delivered":
            self.latency.observe(max(0.0, time.time() - d.event_created_at.timestamp()))

    def _url_label(self, trigger_id: int | None) -> str:
        label = str(trigger_id)
        with self._lock:
            if label in self._labels:
                return label
            if len(self._labels) < MAX_URL_LABELS:
                self._labels.add(label)
                return label
        return "other"

    def serve(self, addr: str, probes: Probes | None = None) -> tuple[str, int]:
        """Start the HTTP endpoint (a daemon thread); returns the bound host and port."""
        host, port = parse_host_port(addr)
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
            server_class = type("_Server", (_Server,), {"address_family": family})
            self._server = server_class((host, port), _Handler)
        except OSError as exc:
            raise SettingsError(f"metrics_addr {addr}: cannot listen: {exc.strerror or exc}") from None
        self._server.metrics, self._server.probes = self, probes
        threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True).start()
        bound = self._server.server_address
        return str(bound[0]), int(bound[1])

    def exposition(self, accept: str) -> tuple[bytes, str]:
        encoder, content_type = self._prom.exposition.choose_encoder(accept)
        return encoder(self.registry), content_type

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    metrics: Metrics
    probes: Probes | None


class _Handler(BaseHTTPRequestHandler):
    """/metrics (Prometheus text), /healthz and /readyz (200 or 503, one line of text)."""

    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        probes = self.server.probes
        if path in ("/metrics", "/"):
            body, content_type = self.server.metrics.exposition(self.headers.get("Accept", ""))
            self._answer(200, body, content_type)
        elif path in ("/healthz", "/readyz") and probes is not None:
            try:
                ok, text = probes.health() if path == "/healthz" else probes.readiness()
            except Exception as exc:  # a probe that cannot decide says so instead of hanging up
                log.exception("%s failed", path)
                ok, text = False, f"probe failed: {type(exc).__name__}"
            self._answer(200 if ok else 503, (safe_text(text, 1000) + "\n").encode(), "text/plain; charset=utf-8")
        else:
            self._answer(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain; charset=utf-8")

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes and probes every few seconds would drown the log


class _StateCollector:
    """Gauges computed at scrape time from the daemon's counters and the last database snapshot."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def describe(self) -> list[Any]:
        return []  # the series depend on the configuration: let the registry collect at scrape time

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        daemon, snap = self.m.daemon, self.m.snapshot
        if daemon is not None:
            yield GaugeMetricFamily("crm_bridge_up", "1 while the daemon reaches its database",
                                    value=1.0 if daemon.healthy else 0.0)
            yield GaugeMetricFamily("crm_bridge_held_deliveries", "Calls this daemon is making right now",
                                    value=daemon.held)
            yield CounterMetricFamily("crm_bridge_db_reconnects", "Times the daemon reconnected to PostgreSQL",
                                      value=max(daemon.stats.reconnects - 1, 0))
            yield CounterMetricFamily("crm_bridge_db_errors", "Database errors seen by the main loop",
                                      value=daemon.stats.db_errors)
        if snap is None:
            return
        s = snap.summary
        yield GaugeMetricFamily("crm_bridge_status_age_seconds", "Seconds since the database values were read",
                                value=time.monotonic() - snap.taken)
        for name, key, text in (
            ("crm_bridge_backlog_events", "backlog", "Events in the outbox not yet dispatched"),
            ("crm_bridge_oldest_event_age_seconds", "oldest_event_age", "Age of the oldest outbox event"),
            ("crm_bridge_oldest_pending_age_seconds", "oldest_pending_age",
             "Age of the oldest change not yet delivered to an active URL (outbox or pending)"),
            ("crm_bridge_pending_deliveries", "pending", "Deliveries waiting for an attempt"),
            ("crm_bridge_retrying_deliveries", "retrying", "Pending deliveries that failed at least once"),
            ("crm_bridge_in_flight_deliveries", "in_flight", "Deliveries being called by some daemon"),
            ("crm_bridge_dead_letters", "dead", "Deliveries given up (until replayed or purged)"),
            ("crm_bridge_daemons", "daemons", "Daemons connected to the database"),
        ):
            yield GaugeMetricFamily(name, text, value=float(s.get(key) or 0.0))
        if snap.notify_queue_usage is not None:
            yield GaugeMetricFamily("crm_bridge_notify_queue_usage_ratio",
                                    "pg_notification_queue_usage(): fraction of the server's NOTIFY queue in use "
                                    "(at 1 every NOTIFY fails: writers' commits error)",
                                    value=float(snap.notify_queue_usage))
        if snap.schema_version is not None:
            yield GaugeMetricFamily("crm_bridge_schema_version", "Version of the crm_bridge schema in the database",
                                    value=float(snap.schema_version))
        per_url = {
            "pending": GaugeMetricFamily("crm_bridge_url_pending_deliveries", "Pending deliveries per URL",
                                         labels=["trigger_id"]),
            "retrying": GaugeMetricFamily("crm_bridge_url_retrying_deliveries", "Retrying deliveries per URL",
                                          labels=["trigger_id"]),
            "in_flight": GaugeMetricFamily("crm_bridge_url_in_flight_deliveries", "In-flight deliveries per URL",
                                           labels=["trigger_id"]),
            "dead": GaugeMetricFamily("crm_bridge_url_dead_letters", "Dead letters per URL", labels=["trigger_id"]),
        }
        breaker = GaugeMetricFamily("crm_bridge_url_breaker_open",
                                    "1 while the URL's circuit breaker is open or half open (no calls but a "
                                    "probe), 0 when closed", labels=["trigger_id"])
        info = GaugeMetricFamily("crm_bridge_url_info", "Configured URLs (crm_trigger), URL redacted",
                                 labels=["trigger_id", "object", "event", "url", "state"])
        for row in snap.urls[:MAX_URL_LABELS]:
            tid = str(row["id"])
            for key, family in per_url.items():
                family.add_metric([tid], float(row[key]))
            breaker.add_metric([tid], 0.0 if row.get("breaker", "closed") == "closed" else 1.0)
            info.add_metric([tid, *(safe_text(str(v), 2000) for v in (row["object"], row["event"],
                                                                       redact_url(row["url"]), row["state"]))], 1.0)
        yield from per_url.values()
        yield breaker
        yield info
