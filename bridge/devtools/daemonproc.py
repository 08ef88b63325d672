"""The one way the demo, the tests and the bench start the real daemon: `crm-bridge run` in a
subprocess (``python -m bridge.cli --dsn DSN run ARGS``), its output in a log file.

Readiness is the daemon's own "ready: listening" log line, polled until a deadline; stopping is
SIGTERM (the daemon drains and exits 0), then SIGKILL once the wait is over.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

READY = "ready: listening"


class DaemonStuck(TimeoutError):
    """The daemon did not exit within the wait after SIGTERM (it has been killed since)."""


def terminate(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM, wait up to ``timeout``, then SIGKILL.  Returns the exit code (negative: a signal)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


class DaemonProcess:
    """`crm-bridge run` on ``dsn`` in a subprocess.

    ``env`` is the daemon's whole environment (default: this process's); ``args`` go after
    ``run``; ``cwd`` is the tree whose ``bridge/`` runs; the log file is made in ``log_dir``
    (default: the system's temporary directory).  ``raise_if_stuck``: `stop()` raises DaemonStuck
    when SIGTERM was not enough (tests want that; the bench only wants the process gone).
    """

    raise_if_stuck = True

    def __init__(self, dsn: str, *, args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 cwd: Path | None = None, log_dir: Path | None = None) -> None:
        self.dsn = dsn
        self.args = list(args)
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        fd, name = tempfile.mkstemp(prefix="crm-bridge-daemon-", suffix=".log", dir=log_dir)
        os.close(fd)
        self.log_path = Path(name)
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_at = 0.0          # time.time() when the "ready" line was seen (within 20 ms)
        self._offset = 0             # where this start's output begins in the log file

    # -- starting ---------------------------------------------------------------------------
    def command(self) -> list[str]:
        return [sys.executable, "-m", "bridge.cli", "--dsn", self.dsn, "run", *self.args]

    def spawn(self) -> DaemonProcess:
        """Start the process without waiting for it (several daemons start side by side)."""
        self._offset = self.log_path.stat().st_size
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.command(), cwd=self.cwd, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float = 30.0) -> DaemonProcess:
        """Wait for the "ready" line: from then on the daemon works (rates are counted from
        ``ready_at``)."""
        self.wait_log(READY, timeout)
        self.ready_at = time.time()
        return self

    def start(self, timeout: float = 30.0, *, wait_ready: bool = True) -> DaemonProcess:
        """Spawn and (unless ``wait_ready`` is false) wait until ready; a daemon that does not
        get ready is killed before the error is raised."""
        self.spawn()
        if wait_ready:
            try:
                self.wait_ready(timeout)
            except BaseException:
                self.kill()
                raise
        return self

    # -- watching ---------------------------------------------------------------------------
    @property
    def log(self) -> str:
        """The whole log file (every start of this handle)."""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.splitlines()[-lines:])
        return ""

    def wait_log(self, text: str, timeout: float = 20.0) -> None:
        """Poll until this start's output holds ``text``; raise if the daemon exits or the
        deadline passes first."""
        deadline = time.monotonic() + timeout
        while text not in self.log[self._offset:]:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode} ({self.log_path}):\n"
                                   f"{self.log_tail(60)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"daemon did not log {text!r} within {timeout:g} s ({self.log_path}):\n"
                                   f"{self.log_tail(60)}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- stopping ---------------------------------------------------------------------------
    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait; returns the exit code (None if never started).  Past ``timeout`` the
        daemon is killed (and DaemonStuck raised when ``raise_if_stuck``)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                if self.raise_if_stuck:
                    raise DaemonStuck(f"daemon did not exit within {timeout:g} s of SIGTERM; killed") from None
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
