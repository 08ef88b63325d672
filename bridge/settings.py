"""The one settings object: command-line flags > environment (CRM_BRIDGE_*) > TOML file > defaults.

Every command builds its settings here (Settings.load), the connection string included; an empty
environment variable counts as not set.  Per-URL settings follow one rule, written once below
(Settings.url_*): the URL's own value in crm_trigger, else this daemon's default.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import httpx

from .http import DEFAULT_DENY, AddressPolicy, make_client, parse_networks, policy_from, ssl_context
from .logs import LEVELS
from .models import Delivery
from .redact import clean_text

# Standard Webhooks' schedule: after the first attempt, retry after 5 s, 5 min, 30 min, 2 h,
# 5 h, 10 h, 10 h (8 attempts in all).
DEFAULT_RETRY_SCHEDULE = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)

# Read when neither --config nor CRM_BRIDGE_CONFIG names a file and it exists (the path the
# systemd docs install it to).  CRM_BRIDGE_CONFIG= (empty) skips it.
DEFAULT_CONFIG = Path("/etc/crm-bridge/crm-bridge.toml")


class SettingsError(ValueError):
    pass


def _default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Settings:
    dsn: str = ""
    # delivery
    timeout: float = 15.0                 # seconds per attempt (per-URL: crm_trigger.timeout_ms)
    retry_schedule: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE
    max_attempts: int = 8                 # per-URL: crm_trigger.max_attempts
    retry_after_cap: float = 3600.0       # a Retry-After beyond this is cut to it
    retry_jitter: float = 0.2             # +-20 % on every backoff delay
    concurrency: int = 1024               # deliveries held at once, all URLs together
    max_in_flight_per_url: int = 32       # per-URL: crm_trigger.max_in_flight
    follow_redirects: bool = False
    ca_bundle: str = ""                   # extra CA file for internal CAs; system CAs otherwise
    deny_cidrs: tuple[str, ...] = DEFAULT_DENY
    allow_cidrs: tuple[str, ...] = ()
    # Non-public ranges (http.NON_PUBLIC: loopback, RFC 1918, 100.64/10, fc00::/7, ...) that a
    # redirect to another origin may lead to; by default such a redirect is refused.
    redirect_allow_cidrs: tuple[str, ...] = ()
    # queue
    batch_size: int = 500
    lease: float = 30.0                   # seconds a claim lives without a heartbeat
    poll_interval: float = 2.0            # fallback poll when no NOTIFY arrives
    grace: float = 10.0                   # seconds to finish in-flight deliveries on SIGTERM
    retention_days: float = 7.0           # history partitions are dropped this long after they end
    retention_interval: float = 60.0      # seconds between history rotations (at most 60)
    worker_id: str = field(default_factory=_default_worker_id)
    # operations
    log_level: str = "INFO"
    log_format: str = "text"              # text | json
    metrics_addr: str = ""                # HOST:PORT for Prometheus metrics; empty: off
    status_interval: float = 10.0         # seconds between STATUS=/metrics refreshes from the DB

    @property
    def heartbeat_interval(self) -> float:
        return max(self.lease / 3.0, 0.05)

    # -- per URL: the URL's own value (crm_trigger; NULL or 0: not set), else this default ----
    def url_timeout(self, d: Delivery) -> float:
        """Seconds one attempt may take (crm_trigger.timeout_ms, else ``timeout``)."""
        return d.timeout_ms / 1000.0 if d.timeout_ms else self.timeout

    def url_follow_redirects(self, d: Delivery) -> bool:
        return self.follow_redirects if d.follow_redirects is None else d.follow_redirects

    def url_max_attempts(self, d: Delivery) -> int:
        return d.max_attempts or self.max_attempts

    def url_retry_schedule(self, d: Delivery) -> Sequence[float]:
        return d.retry_schedule or self.retry_schedule

    def url_max_in_flight(self, d: Delivery) -> int:
        """Requests one URL may have running in this daemon (daemon_claim_due applies the same rule
        in SQL to the default it is given: coalesce(max_in_flight, default_limit))."""
        return d.max_in_flight or self.max_in_flight_per_url

    # -- what the daemon builds from them -------------------------------------------------
    def address_policy(self) -> AddressPolicy:
        """The daemon's address policy (also what `crm-bridge check` holds hosts against)."""
        return policy_from(self.deny_cidrs, self.allow_cidrs, self.redirect_allow_cidrs)

    def http_client(self) -> httpx.AsyncClient:
        """The client ``crm-bridge run`` uses."""
        return make_client(policy=self.address_policy(), verify=ssl_context(self.ca_bundle), timeout=self.timeout)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def load(cls, flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
             config_file: str | Path | None = None, *, sources: dict[str, str] | None = None) -> Settings:
        """The settings from ``flags``, ``env`` and the config file.  ``sources``, when given, is
        filled with where each value that was given came from ("--dsn", "environment variable
        CRM_BRIDGE_DSN", "config file PATH"), for messages."""
        env = os.environ if env is None else env
        flags = {k: v for k, v in (flags or {}).items() if v is not None}
        values: dict[str, Any] = {}
        origin: dict[str, str] = {}     # where each value came from, for error messages
        path = config_path(flags.pop("config", None) or config_file, env)
        if path:
            for name, value in _read_toml(Path(path)).items():
                values[name], origin[name] = value, f"config file {path}"
        known = {f.name for f in fields(cls)}
        for name in known:
            key = f"CRM_BRIDGE_{name.upper()}"
            if env.get(key):   # empty: not set (a unit's `Environment=CRM_BRIDGE_DSN=` keeps the file's)
                values[name], origin[name] = env[key], f"environment variable {key}"
        unknown = set(flags) - known
        if unknown:
            raise SettingsError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        for name, value in flags.items():
            values[name], origin[name] = value, f"--{name.replace('_', '-')}"
        settings = cls()
        for f in fields(cls):
            if f.name in values:
                setattr(settings, f.name, _coerce(f, values[f.name], origin[f.name]))
        if sources is not None:
            sources.update(origin)
        settings.validate()
        return settings

    def validate(self) -> None:
        positive = ("timeout", "concurrency", "max_in_flight_per_url", "batch_size", "lease",
                    "poll_interval", "max_attempts", "status_interval")
        for name in positive:
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be > 0 (got {getattr(self, name)})")
        if any(d < 0 for d in self.retry_schedule) or not self.retry_schedule:
            raise SettingsError("retry_schedule must be a non-empty list of delays >= 0 seconds")
        if not 0 <= self.retry_jitter < 1:
            raise SettingsError(f"retry_jitter must be in [0, 1) (got {self.retry_jitter})")
        if self.log_format not in ("text", "json"):
            raise SettingsError(f"log_format must be text or json (got {self.log_format!r})")
        if self.log_level.upper() not in LEVELS:
            raise SettingsError(f"log_level must be {', '.join(LEVELS[:-1])} or {LEVELS[-1]} (got {self.log_level!r})")
        if self.grace < 0 or self.retention_days <= 0:
            raise SettingsError("grace must be >= 0 and retention_days > 0")
        for name in ("deny_cidrs", "allow_cidrs", "redirect_allow_cidrs"):
            try:
                parse_networks(getattr(self, name))
            except ValueError as exc:
                raise SettingsError(f"{name}: {exc}") from None
        if self.ca_bundle:
            if not Path(self.ca_bundle).exists():
                raise SettingsError(f"ca_bundle {self.ca_bundle} not found (a PEM file or a directory of CAs)")
            try:
                ssl_context(self.ca_bundle)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise SettingsError(f"ca_bundle {self.ca_bundle} cannot be loaded: {exc}") from None
        if self.metrics_addr:
            parse_host_port(self.metrics_addr)


# Messages of libpq / psycopg about a connection string they cannot parse.
_CONNINFO_SYNTAX = ("connection info string", " in URI", "URI query parameter", "percent-encoded",
                    "invalid connection option", "invalid integer value", "invalid connection string")


def db_error_text(exc: BaseException) -> str:
    """A connection or database error for people: no password fragments (libpq quotes pieces of a
    connection string it cannot parse), no control characters, and what to do when the
    connection string itself is malformed."""
    text = clean_text(" ".join(str(exc).split()), limit=2000)
    if any(marker in text for marker in _CONNINFO_SYNTAX):
        text = (f"{text} (check the connection string given by --dsn, CRM_BRIDGE_DSN or the dsn setting: "
                "key=value pairs, with values that contain spaces quoted as password='a b', "
                "or a postgresql:// URI with special characters percent-encoded)")
    return text


def config_path(given: str | Path | None, env: Mapping[str, str] | None = None) -> str | Path | None:
    """The settings file to read: --config, else CRM_BRIDGE_CONFIG (empty: none), else DEFAULT_CONFIG
    if it exists."""
    env = os.environ if env is None else env
    if given:
        return given
    if "CRM_BRIDGE_CONFIG" in env:
        return env["CRM_BRIDGE_CONFIG"] or None
    return DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None


def parse_host_port(value: str) -> tuple[str, int]:
    """``127.0.0.1:9720``, ``[::1]:9720`` or ``:9720`` (all interfaces) -> (host, port)."""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise SettingsError(f"metrics_addr must be HOST:PORT, e.g. 127.0.0.1:9720 (got {value!r})")
    host = host.strip("[]")
    if ":" in host and not value.strip().startswith("["):
        raise SettingsError(f"metrics_addr: write an IPv6 address in brackets, e.g. [::1]:9720 (got {value!r})")
    return host or "0.0.0.0", int(port)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SettingsError(f"config file {path} not found") from None
    except PermissionError:
        raise SettingsError(f"config file {path} is not readable by this user: run as a user that may read it, "
                            "or set CRM_BRIDGE_CONFIG to another file (empty: no file)") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path}: {exc}") from None
    section = data.get("crm_bridge", data)
    known = {f.name for f in fields(Settings)}
    unknown = set(section) - known
    if unknown:
        raise SettingsError(f"config file {path}: unknown setting(s): {', '.join(sorted(unknown))}")
    return dict(section)


def _coerce(f: dataclasses.Field[Any], value: Any, origin: str = "") -> Any:
    """``value`` (text from the environment, a TOML value, a flag) as the field's declared type."""
    kind = typing.get_type_hints(Settings)[f.name]
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(value)
                return value.lower() in ("1", "true", "yes", "on")
            return bool(value)
        if typing.get_origin(kind) is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            items = [i.strip() if isinstance(i, str) else i for i in items]
            item = typing.get_args(kind)[0]
            return tuple(item(i) for i in items if i != "")
        return kind(value)
    except (TypeError, ValueError):
        where = f"{origin}: " if origin else ""
        raise SettingsError(f"{where}invalid value {value!r} for {f.name} (expected {_kind(kind)})") from None


def _kind(kind: Any) -> str:
    if kind is bool:
        return "true or false"
    if typing.get_origin(kind) is tuple:
        return "a comma-separated list" + (" of numbers" if typing.get_args(kind)[0] is float else "")
    return {float: "a number", int: "an integer"}.get(kind, "a string")
