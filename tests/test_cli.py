"""CLI habits (issue 14.4, 14.5, 14.7): global options anywhere, where the DSN came from, help
texts with defaults, the default settings file, no transport noise in errors, a debug line per
successful delivery."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bridge import settings as settings_mod
from bridge.settings import Settings, SettingsError


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "CRM_BRIDGE_"))}
    return subprocess.run([sys.executable, "-m", "bridge.cli", *args], capture_output=True, text=True,
                          timeout=60, env={**base, "CRM_BRIDGE_CONFIG": "", **(env or {})})


@pytest.mark.parametrize("before", [True, False])
def test_global_options_before_or_after_the_command(db, before):
    opts = ["--dsn", db.dsn, "--log-level", "debug"]
    args = [*opts, "status", "--json"] if before else ["status", "--json", *opts]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert '"schema_version"' in proc.stdout
    for cmd in (["check"], ["replay", "--dry-run"], ["migrate"]):
        proc = run_cli(*cmd, "--dsn", db.dsn)
        assert "unrecognized arguments" not in proc.stderr, (cmd, proc.stderr)


def test_without_a_dsn_the_error_says_where_it_looked(tmp_path):
    closed = "1"
    proc = run_cli("status", env={"PGHOST": "127.0.0.1", "PGPORT": closed, "PGDATABASE": "crm", "PGUSER": "someone"})
    assert proc.returncode == 2
    assert "tried host=127.0.0.1 port=1 user=someone dbname=crm" in proc.stderr
    assert "no --dsn, CRM_BRIDGE_DSN or dsn in a config file was set" in proc.stderr
    assert "--dsn" in proc.stderr and "CRM_BRIDGE_DSN" in proc.stderr
    proc = run_cli("replay", "--all", env={"CRM_BRIDGE_DSN": "host=127.0.0.1 port=1 dbname=x user=y password=S3cret"})
    assert proc.returncode == 3 and "(from CRM_BRIDGE_DSN)" in proc.stderr and "S3cret" not in proc.stderr
    toml = tmp_path / "c.toml"
    toml.write_text('dsn = "host=127.0.0.1 port=1 dbname=fromfile user=y"\n')
    proc = run_cli("migrate", "--config", str(toml))
    assert proc.returncode == 3 and f"(from dsn in config file {toml})" in proc.stderr
    assert "dbname=fromfile" in proc.stderr


@pytest.mark.parametrize("command", [["migrate"], ["replay", "--all", "--dry-run"], ["purge", "--all", "--dry-run"],
                                     ["retry-now", "--all", "--dry-run"], ["status"], ["check"]])
def test_every_command_connects_with_the_dsn_of_the_config_file(db, tmp_path, command):
    """The DSN is resolved in one place (Settings.load) for every command: a `dsn` in the TOML
    file is used, and an empty CRM_BRIDGE_DSN (a unit's `Environment=CRM_BRIDGE_DSN=`) does not
    hide it."""
    toml = tmp_path / "c.toml"
    toml.write_text(f"dsn = {db.dsn!r}\n".replace("'", '"'))
    # libpq's own defaults lead nowhere: only the file's DSN reaches the database.
    nowhere = {"PGHOST": "127.0.0.1", "PGPORT": "1"}
    for env in ({"CRM_BRIDGE_CONFIG": str(toml)}, {"CRM_BRIDGE_CONFIG": str(toml), "CRM_BRIDGE_DSN": ""}):
        proc = run_cli(*command, env={**nowhere, **env})
        assert proc.returncode in (0, 1), (command, env, proc.stderr)   # check/status: 1 = attention
        assert "cannot connect" not in proc.stderr, (command, env, proc.stderr)
    proc = run_cli(*command, "--dsn", "", env={**nowhere, "CRM_BRIDGE_CONFIG": str(toml)})
    assert "cannot connect" not in proc.stderr, (command, proc.stderr)


def test_help_texts():
    top = run_cli("--help").stdout
    assert "``" not in top and "before or after the command" in top
    for cmd in ("migrate", "run", "demo", "check", "status", "replay", "purge", "retry-now"):
        assert f"  {cmd}" in top
        text = run_cli(cmd, "--help").stdout
        # a description of its own (the line after the usage) and the global options
        assert text.split("\n\n")[1].strip() and "--dsn DSN" in text, cmd
    run = run_cli("run", "--help").stdout
    for default in ("(default: 2)", "(default: 1024)", "(default: 500)", "(default: 30)", "(default: 10)",
                    "(default: 15)", "(default: off)"):
        assert default in " ".join(run.split()), default
    assert "exit status: 0 all well; 1" in run_cli("status", "--help").stdout


def test_the_settings_file_is_read_from_the_documented_path_by_default(tmp_path, monkeypatch):
    default = tmp_path / "crm-bridge.toml"
    monkeypatch.setattr(settings_mod, "DEFAULT_CONFIG", default)
    assert Settings.load(env={}).concurrency == 1024                 # no file: defaults
    default.write_text("[crm_bridge]\nconcurrency = 7\n")
    assert Settings.load(env={}).concurrency == 7
    assert Settings.load(env={"CRM_BRIDGE_CONFIG": ""}).concurrency == 1024       # explicitly none
    other = tmp_path / "other.toml"
    other.write_text("concurrency = 9\n")
    assert Settings.load(env={"CRM_BRIDGE_CONFIG": str(other)}).concurrency == 9
    if os.geteuid() != 0:   # root reads anything
        default.chmod(0)
        with pytest.raises(SettingsError, match="not readable by this user"):
            Settings.load(env={})


def test_connect_errors_carry_no_transport_noise(db, daemon):
    db.add_url("customer", "create", "http://127.0.0.1:1/closed")
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('n1', 'x')")
    db.wait_until("SELECT count(*) > 0 FROM crm_bridge.attempt")
    error = db.one("SELECT error FROM crm_bridge.attempt ORDER BY at LIMIT 1")
    assert "cannot connect to 127.0.0.1:1: Connection refused" in error
    assert "ssl:default" not in error and "Connect call failed" not in error and "ClientConnectorError" not in error


def test_a_successful_delivery_logs_one_debug_line(db, receiver, daemon_factory):
    db.add_url("customer", "create", receiver.url("/ok"))
    d = daemon_factory(env={"CRM_BRIDGE_LOG_LEVEL": "DEBUG"})
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES ('d1', 'x')")
    receiver.wait_for(1, "/ok")
    d.wait_log("(customer/create) delivered in ")
