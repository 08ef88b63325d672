"""Prometheus metrics: scraped over HTTP on 127.0.0.1 from the real daemon."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from bridge.devtools.receiver import Rule

FAST_STATUS = {"CRM_BRIDGE_STATUS_INTERVAL": "0.2"}


def metrics_url(daemon) -> str:
    daemon.wait_log("serving Prometheus metrics on ")
    m = re.search(r"serving Prometheus metrics on (http://127\.0\.0\.1:\d+/metrics)", daemon.log)
    assert m, daemon.log
    return m.group(1)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} from one real scrape."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape_until(url: str, predicate: Callable[[dict], bool], timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if predicate(samples):
            return samples
        if time.monotonic() > deadline:
            raise TimeoutError("metrics never matched:\n" + "\n".join(f"{k} {v}" for k, v in sorted(samples.items())))
        time.sleep(0.05)


def test_metrics_endpoint_counts_deliveries_and_reports_the_queue(db, receiver, daemon_factory):
    receiver.answer("/bad", Rule(status=500))
    ok = db.add_url("customer", "create", receiver.url("/ok"))
    bad = db.add_url("customer", "create", receiver.url("/bad?token=s3cret"))
    daemon = daemon_factory("--metrics-addr", "127.0.0.1:0", env=FAST_STATUS)
    url = metrics_url(daemon)
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-1', 'Ann')")

    def delivered(s: dict) -> float:
        return s.get(("crm_bridge_deliveries_total", (("outcome", "delivered"), ("trigger_id", str(ok)))), 0)

    samples = scrape_until(url, lambda s: delivered(s) == 1
                           and s.get(("crm_bridge_dead_letters", ()), 0) == 1
                           and s.get(("crm_bridge_url_dead_letters", (("trigger_id", str(bad)),)), 0) == 1)
    by_outcome = {dict(labels)["outcome"]: v for (name, labels), v in samples.items()
                  if name == "crm_bridge_deliveries_total" and dict(labels)["trigger_id"] == str(bad)}
    assert by_outcome == {"retry": 2.0, "dead": 1.0}   # FAST_ENV: 3 attempts
    assert samples[("crm_bridge_delivery_latency_seconds_count", ())] == 1
    assert sum(v for (name, _), v in samples.items() if name == "crm_bridge_attempt_duration_seconds_count") == 4
    assert samples[("crm_bridge_backlog_events", ())] == 0
    assert samples[("crm_bridge_oldest_pending_age_seconds", ())] == 0
    assert samples[("crm_bridge_retrying_deliveries", ())] == 0
    assert samples[("crm_bridge_up", ())] == 1
    assert samples[("crm_bridge_daemons", ())] == 1
    assert samples[("crm_bridge_db_reconnects_total", ())] == 0
    info = [dict(labels) for (name, labels), _ in samples.items() if name == "crm_bridge_url_info"]
    assert {"trigger_id": str(bad), "object": "customer", "event": "create", "state": "active",
            "url": receiver.url("/bad?token=***")} in info
    assert not any("s3cret" in str(k) for k in samples)
    assert not any(name.endswith("_created") for name, _ in samples)


def test_backlog_and_oldest_pending_age_follow_the_outbox(db, receiver, daemon_factory):
    tid = db.add_url("customer", "create", receiver.url("/p"), paused=True)
    daemon = daemon_factory("--metrics-addr", "127.0.0.1:0", env=FAST_STATUS)
    url = metrics_url(daemon)
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('a', 'x'), ('b', 'y')")
    samples = scrape_until(url, lambda s: s.get(("crm_bridge_url_pending_deliveries", (("trigger_id", str(tid)),)))
                           == 2)
    assert samples[("crm_bridge_pending_deliveries", ())] == 2
    # Paused on purpose: held deliveries do not count as "oldest pending".
    assert samples[("crm_bridge_oldest_pending_age_seconds", ())] == 0
    db.execute("UPDATE crm_bridge.crm_trigger SET paused = false WHERE id = %s", [tid])
    receiver.wait_for(2)
    scrape_until(url, lambda s: s.get(("crm_bridge_pending_deliveries", ())) == 0)


def test_busy_metrics_port_is_a_clear_startup_error(dsn):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "bridge.cli", "--dsn", dsn, "run",
                               "--metrics-addr", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"metrics_addr 127.0.0.1:{port}: cannot listen: Address already in use" in proc.stderr


def test_metrics_without_prometheus_client_installed_is_a_clear_error(dsn):
    # The interpreter as it would be without the package: importing it fails.
    code = ("import sys; sys.modules['prometheus_client'] = None; from bridge.cli import main; "
            f"sys.exit(main(['--dsn', {dsn!r}, 'run', '--metrics-addr', '127.0.0.1:0']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--metrics-addr needs the prometheus-client package (pip install prometheus-client)" in proc.stderr
