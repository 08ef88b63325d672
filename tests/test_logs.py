"""Logs: one event per line, level-filtered, journald-friendly, optional JSON, no credentials."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import time
from collections.abc import Iterator

import pytest

from bridge.logs import make_formatter

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def poke_until_logged(db, daemon, text: str, timeout: float = 20) -> None:
    """Send a malformed NOTIFY until the daemon (once listening) logs ``text``."""
    deadline = time.monotonic() + timeout
    while text not in daemon.log:
        assert time.monotonic() < deadline, daemon.log
        db.execute("SELECT pg_notify('crm_bridge', 'not json')")
        time.sleep(0.05)


def test_under_journald_lines_carry_priority_and_no_timestamp(db, daemon_factory):
    daemon = daemon_factory(start=False)
    st = os.stat(daemon.log_path)
    daemon.env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"   # stderr *is* this stream
    daemon.start()
    poke_until_logged(db, daemon, "ignoring malformed NOTIFY")
    assert daemon.stop() == 0
    lines = daemon.log.splitlines()
    assert "<6>INFO crm_bridge.daemon: ready: listening on channel crm_bridge" in "\n".join(lines)
    assert any(line.startswith("<4>WARNING crm_bridge.listen: ignoring malformed NOTIFY") for line in lines)
    assert all(re.match(r"^<[0-7]>[A-Z]+ ", line) for line in lines), lines


def test_journal_stream_of_another_file_keeps_timestamps(db, daemon_factory):
    daemon = daemon_factory(env={"JOURNAL_STREAM": "1:1"})   # set, but not our stderr
    assert daemon.stop() == 0
    lines = daemon.log.splitlines()
    assert lines and all(TIMESTAMP.match(line) for line in lines), lines


def test_json_format_is_one_object_per_line(db, daemon_factory):
    daemon = daemon_factory("--log-format", "json", start=False).start(wait_ready=False)
    daemon.wait_log('"msg": "ready: listening')
    poke_until_logged(db, daemon, "ignoring malformed NOTIFY")
    assert daemon.stop() == 0
    records = [json.loads(line) for line in daemon.log.splitlines()]
    assert {"ts", "level", "logger", "msg"} <= set(records[0])
    assert any(r["level"] == "WARNING" and r["logger"] == "crm_bridge.listen" for r in records)


def test_log_level_filters_lower_levels(db, daemon_factory):
    daemon = daemon_factory("--log-level", "WARNING", start=False).start(wait_ready=False)
    poke_until_logged(db, daemon, "ignoring malformed NOTIFY")
    assert daemon.stop() == 0
    assert "WARNING crm_bridge.listen" in daemon.log
    assert " INFO " not in daemon.log and "ready: listening" not in daemon.log


def test_credentials_in_urls_never_reach_the_daemon_log(db, receiver, daemon_factory):
    db.add_url("customer", "create", receiver.url("/c?token=s3cret").replace("http://", "http://bob:hunter2@"))
    daemon = daemon_factory("--log-level", "DEBUG")
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('acc-1', 'x')")
    db.wait_until("SELECT status IN ('delivered', 'dead') FROM crm_bridge.delivery")
    assert daemon.stop() == 0
    assert "hunter2" not in daemon.log and "s3cret" not in daemon.log


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO, list[logging.Handler]]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("crm_bridge.test_logs")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.handlers[:] = [handler]
    yield logger, stream, [handler]
    logger.handlers[:] = []


ERROR = "GET https://bob:hunter2@sync.example/h?api_key=s3cret\nAuthorization: Bearer t0k3n"


def _fail(logger: logging.Logger) -> None:
    try:
        raise RuntimeError(ERROR)
    except RuntimeError:
        logger.exception("call failed:\nheaders {'Authorization': 'Bearer t0k3n'} dsn password=pw123")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_formatters_mask_secrets_and_keep_one_event_per_line(capture, fmt):
    logger, stream, (handler,) = capture
    handler.setFormatter(make_formatter(fmt))
    _fail(logger)
    out = stream.getvalue()
    assert out.count("\n") == 1, out   # message newline and the traceback folded into one line
    for secret in ("hunter2", "s3cret", "t0k3n", "pw123"):
        assert secret not in out
    assert "https://bob:***@sync.example/h?api_key=***" in out
    if fmt == "json":
        record = json.loads(out)
        assert record["level"] == "ERROR" and "Traceback" in record["exc"]


def test_journal_formatter_prefixes_the_syslog_priority(capture):
    logger, stream, (handler,) = capture
    handler.setFormatter(make_formatter("text", journal=True))
    logger.debug("d")
    logger.info("i")
    logger.warning("w")
    logger.error("e")
    assert stream.getvalue().splitlines() == [
        "<7>DEBUG crm_bridge.test_logs: d", "<6>INFO crm_bridge.test_logs: i",
        "<4>WARNING crm_bridge.test_logs: w", "<3>ERROR crm_bridge.test_logs: e"]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_formatters_escape_control_characters(capture, fmt):
    """Issue 10, item 5: a receiver's text in a message must not reach a terminal as escape sequences."""
    logger, stream, (handler,) = capture
    handler.setFormatter(make_formatter(fmt))
    logger.warning("answer: %s", "boom\x00 \x1b[2J \x9b31m \u202eevil\u202c")
    out = stream.getvalue()
    for raw in ("\x00", "\x1b", "\x9b", "\u202e"):
        assert raw not in out
    text = json.loads(out)["msg"] if fmt == "json" else out
    assert "boom\\x00 \\x1b[2J \\x9b31m \\u202eevil\\u202c" in text
