"""One settings object: command-line flags > CRM_BRIDGE_* environment > TOML file > defaults,
and errors that say which value is wrong, where it came from and what was expected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bridge.settings import Settings, SettingsError, parse_host_port


@pytest.fixture
def toml(tmp_path: Path):
    def write(text: str) -> Path:
        path = tmp_path / "crm-bridge.toml"
        path.write_text(text)
        return path
    return write


def test_defaults_without_any_source():
    s = Settings.load(env={})
    assert (s.concurrency, s.poll_interval, s.timeout, s.max_attempts) == (1024, 2.0, 15.0, 8)
    assert s.metrics_addr == "" and s.log_format == "text"


def test_flags_beat_environment_beat_toml_beat_defaults(toml):
    path = toml("[crm_bridge]\nconcurrency = 10\npoll_interval = 3.0\nbatch_size = 7\n")
    env = {"CRM_BRIDGE_CONCURRENCY": "20", "CRM_BRIDGE_POLL_INTERVAL": "4"}
    s = Settings.load({"concurrency": 30, "config": str(path)}, env=env)
    assert s.concurrency == 30       # flag
    assert s.poll_interval == 4.0    # environment over file
    assert s.batch_size == 7         # file over default
    assert s.lease == 30.0           # default


def test_flags_given_as_none_do_not_override(toml):
    s = Settings.load({"concurrency": None}, env={"CRM_BRIDGE_CONCURRENCY": "20"})
    assert s.concurrency == 20


def test_config_file_from_environment_and_without_table(toml):
    path = toml('timeout = 2.5\nretry_schedule = [1, 2, 3]\ndeny_cidrs = ["10.0.0.0/8"]\n')
    s = Settings.load(env={"CRM_BRIDGE_CONFIG": str(path)})
    assert s.timeout == 2.5 and s.retry_schedule == (1.0, 2.0, 3.0) and s.deny_cidrs == ("10.0.0.0/8",)


def test_environment_lists_and_booleans():
    s = Settings.load(env={"CRM_BRIDGE_RETRY_SCHEDULE": "0.5, 1,2", "CRM_BRIDGE_FOLLOW_REDIRECTS": "yes",
                           "CRM_BRIDGE_METRICS_ADDR": "[::1]:9720"})
    assert s.retry_schedule == (0.5, 1.0, 2.0) and s.follow_redirects is True
    assert parse_host_port(s.metrics_addr) == ("::1", 9720)


@pytest.mark.parametrize(("env", "message"), [
    ({"CRM_BRIDGE_CONCURRENCY": "many"},
     "environment variable CRM_BRIDGE_CONCURRENCY: invalid value 'many' for concurrency (expected an integer)"),
    ({"CRM_BRIDGE_TIMEOUT": "15s"},
     "environment variable CRM_BRIDGE_TIMEOUT: invalid value '15s' for timeout (expected a number)"),
    ({"CRM_BRIDGE_FOLLOW_REDIRECTS": "maybe"},
     "environment variable CRM_BRIDGE_FOLLOW_REDIRECTS: invalid value 'maybe' for follow_redirects "
     "(expected true or false)"),
    ({"CRM_BRIDGE_RETRY_SCHEDULE": "5,x"},
     "invalid value '5,x' for retry_schedule (expected a comma-separated list of numbers)"),
    ({"CRM_BRIDGE_CONCURRENCY": "0"}, "concurrency must be > 0 (got 0)"),
    ({"CRM_BRIDGE_LOG_FORMAT": "xml"}, "log_format must be text or json (got 'xml')"),
    ({"CRM_BRIDGE_LOG_LEVEL": "chatty"}, "log_level must be DEBUG, INFO, WARNING or ERROR (got 'chatty')"),
    ({"CRM_BRIDGE_METRICS_ADDR": "9720"}, "metrics_addr must be HOST:PORT, e.g. 127.0.0.1:9720 (got '9720')"),
    ({"CRM_BRIDGE_METRICS_ADDR": "::1:9720"}, "write an IPv6 address in brackets, e.g. [::1]:9720"),
    ({"CRM_BRIDGE_METRICS_ADDR": "127.0.0.1:99999"}, "metrics_addr must be HOST:PORT"),
    ({"CRM_BRIDGE_DENY_CIDRS": "10.0.0.0/33"}, "deny_cidrs: invalid CIDR '10.0.0.0/33' in address policy"),
    ({"CRM_BRIDGE_STATUS_INTERVAL": "-1"}, "status_interval must be > 0"),
])
def test_bad_environment_values_are_named(env, message):
    with pytest.raises(SettingsError) as exc:
        Settings.load(env=env)
    assert message in str(exc.value)


def test_bad_flag_value_names_the_flag():
    with pytest.raises(SettingsError, match="--poll-interval: invalid value 'soon' for poll_interval"):
        Settings.load({"poll_interval": "soon"}, env={})


@pytest.mark.parametrize(("text", "message"), [
    ("[crm_bridge]\nconcurency = 4\n", "unknown setting(s): concurency"),
    ("[crm_bridge]\nconcurrency = \n", "config file"),
    ("[crm_bridge]\nconcurrency = 'lots'\n", "invalid value 'lots' for concurrency (expected an integer)"),
])
def test_bad_config_files_are_named(toml, text, message):
    path = toml(text)
    with pytest.raises(SettingsError) as exc:
        Settings.load(env={"CRM_BRIDGE_CONFIG": str(path)})
    assert message in str(exc.value) and str(path) in str(exc.value)


def test_missing_config_file():
    with pytest.raises(SettingsError, match=r"config file /nonexistent\.toml not found"):
        Settings.load({"config": "/nonexistent.toml"}, env={})


def test_run_with_invalid_settings_exits_2_before_connecting(toml):
    path = toml("[crm_bridge]\nbatch_size = -5\n")
    proc = subprocess.run([sys.executable, "-m", "bridge.cli", "--dsn", "host=127.0.0.1 port=1", "run",
                           "--config", str(path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "crm-bridge: invalid settings: batch_size must be > 0 (got -5)"
