"""Logging: one event per line, level-filtered, credentials masked, optional JSON.

Every line goes through redact.scrub (credentials) and redact.safe_text (no terminal escape
sequences or other control characters from receivers or the database), tracebacks included;
configure() also routes uncaught exceptions (main thread, other threads, unraisable ones)
through the same formatter instead of Python's raw printout.

Under systemd, when stderr *is* the journal (``$JOURNAL_STREAM`` names stderr's device and
inode), lines carry no timestamp (journald adds its own) but a ``<N>`` syslog priority prefix,
so that ``journalctl -p warning`` filters by level.  Everywhere else lines start with a timestamp.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from types import TracebackType
from typing import Any, TextIO

from .redact import safe_text, scrub

# sd-daemon(3) priority prefixes, read by journald (SyslogLevelPrefix=yes, the default).
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _one_line(text: str) -> str:
    # A receiver's error body ends up in messages: it must not be able to forge log lines or
    # send escape sequences to whoever reads the log on a terminal.
    return safe_text(text.replace("\r", "\\r").replace("\n", "\\n"))


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
               "logger": record.name, "msg": safe_text(scrub(record.getMessage()), keep="\t\n")}
        if record.exc_info:
            out["exc"] = safe_text(scrub(self.formatException(record.exc_info)), keep="\t\n")
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


_uncaught = logging.getLogger("crm_bridge.uncaught")


def _excepthook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    _uncaught.critical("uncaught exception", exc_info=(exc_type, exc, tb))


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    name = args.thread.name if args.thread is not None else "?"
    _uncaught.critical("uncaught exception in thread %s", name,
                       exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _unraisablehook(unraisable: Any) -> None:
    exc = unraisable.exc_value
    _uncaught.error("%s: %r", unraisable.err_msg or "exception ignored in", unraisable.object,
                    exc_info=(type(exc), exc, unraisable.exc_traceback) if exc is not None else None)


def configure(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(fmt, journal=stderr_is_journal(sys.stderr)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Tracebacks nobody caught go through the scrubbing formatter too (issue 10, item 14).
    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook
    sys.unraisablehook = _unraisablehook
    # httpx/aiohttp log every request at INFO: far too chatty for a daemon.
    for noisy in ("httpx", "httpcore", "aiohttp.access", "psycopg.pool"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
