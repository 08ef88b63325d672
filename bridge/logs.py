"""Logging: one event per line, level-filtered, credentials masked, optional JSON.

Under systemd, when stderr *is* the journal (``$JOURNAL_STREAM`` names stderr's device and
inode), lines carry no timestamp (journald adds its own) but a ``<N>`` syslog priority prefix,
so that ``journalctl -p warning`` filters by level.  Everywhere else lines start with a timestamp.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import TextIO

from .redact import scrub

# sd-daemon(3) priority prefixes, read by journald (SyslogLevelPrefix=yes, the default).
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _one_line(text: str) -> str:
    # A receiver's error body ends up in messages: it must not be able to forge log lines.
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _priority(record: logging.LogRecord) -> str:
    level = max((lv for lv in _PRIORITY if lv <= record.levelno), default=logging.DEBUG)
    return f"<{_PRIORITY[level]}>"


class OneLineFormatter(logging.Formatter):
    """Text: one line per event (tracebacks folded with \\n), credentials masked."""

    def __init__(self, fmt: str, *, journal: bool = False) -> None:
        super().__init__(fmt)
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        line = _one_line(scrub(super().format(record)))
        return _priority(record) + line if self.journal else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (and exc), credentials masked."""

    def __init__(self, *, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"), "level": record.levelname,
               "logger": record.name, "msg": scrub(record.getMessage())}
        if record.exc_info:
            out["exc"] = scrub(self.formatException(record.exc_info))
        line = json.dumps(out, ensure_ascii=False)
        return _priority(record) + line if self.journal else line


def stderr_is_journal(stream: TextIO | None = None) -> bool:
    """True when ``stream`` (default stderr) is connected to journald (systemd.exec(5): JOURNAL_STREAM)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat((stream or sys.stderr).fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def make_formatter(fmt: str = "text", *, journal: bool = False) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter(journal=journal)
    if journal:
        return OneLineFormatter("%(levelname)s %(name)s: %(message)s", journal=True)
    return OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


def configure(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(fmt, journal=stderr_is_journal(sys.stderr)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx/aiohttp log every request at INFO: far too chatty for a daemon.
    for noisy in ("httpx", "httpcore", "aiohttp.access", "psycopg.pool"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
