"""Handles on the processes the bench starts: the receiver and the real `crm-bridge run` daemon.

Each is a context manager whose exit always ends the process (SIGTERM, then SIGKILL after a
bounded wait), so a failing or interrupted bench leaves nothing running.
"""

from __future__ import annotations

import http.client
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from bridge.devtools import daemonproc

from . import procstat

REPO = Path(__file__).resolve().parent.parent


class ReceiverProcess:
    """bench.rxserver in a subprocess on 127.0.0.1."""

    def __init__(self, workdir: Path) -> None:
        self.dump_path = workdir / "receiver.dump"
        self.log_path = workdir / "receiver.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, timeout: float = 15.0) -> ReceiverProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.rxserver", "--dump", str(self.dump_path)],
                cwd=REPO, stdout=subprocess.PIPE, stderr=log)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line.startswith("LISTENING "):
            self.stop()
            raise RuntimeError(f"bench receiver did not start: {line!r}; see {self.log_path}")
        self.port = int(line.split()[1])
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _control(self, action: str) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", f"/__bench/{action}")
            resp = conn.getresponse()
            body = resp.read().decode()
            if resp.status != 200:
                raise RuntimeError(f"bench receiver: /__bench/{action} answered {resp.status}")
            return body
        finally:
            conn.close()

    def count(self) -> int:
        return int(self._control("count"))

    def reset(self) -> None:
        self._control("reset")

    def records(self) -> list[tuple[float, str]]:
        """Every recorded request so far: (arrival time.time(), request target)."""
        self._control("dump")
        out = []
        with self.dump_path.open() as f:
            for line in f:
                at, _, target = line.rstrip("\n").partition(" ")
                out.append((float(at), target))
        return out

    def wait_count(self, n: int, timeout: float) -> int:
        """Poll until ``n`` requests arrived or ``timeout`` passed; return the count."""
        deadline = time.monotonic() + timeout
        while (got := self.count()) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return got

    def cpu_seconds(self) -> float | None:
        return procstat.cpu_seconds(self.pid)

    def stop(self) -> None:
        if self.proc is not None:
            daemonproc.terminate(self.proc, 10)
            if self.proc.stdout is not None:
                self.proc.stdout.close()

    def __enter__(self) -> ReceiverProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class DaemonProcess(daemonproc.DaemonProcess):
    """The real daemon (bridge.devtools.daemonproc) with production defaults: no CRM_BRIDGE_* of
    the caller's and no settings file (/etc/crm-bridge/crm-bridge.toml on a machine that has
    one); only what ``env`` sets.  Its log is in ``workdir``; ``source`` is the tree whose
    bridge/ runs (bench.profile_calls --compare)."""

    raise_if_stuck = False           # stop() on the way out ends the process, it does not fail

    def __init__(self, dsn: str, workdir: Path, env: dict[str, str] | None = None, *,
                 source: Path = REPO) -> None:
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("CRM_BRIDGE_")}
        super().__init__(dsn, cwd=source, log_dir=workdir,
                         env={**inherited, "CRM_BRIDGE_CONFIG": "", "CRM_BRIDGE_LOG_LEVEL": "INFO", **(env or {})})
        self.source = source

    def cpu_seconds(self) -> float | None:
        return procstat.cpu_seconds(self.pid)

    def peak_rss_mb(self) -> float | None:
        return procstat.vm_hwm_mb(self.pid)
