"""Shared fixtures: one throwaway PostgreSQL per session, one database per test (from a template),
real HTTP receivers on 127.0.0.1, and the real `crm-bridge run` daemon as a subprocess.

Set CRM_BRIDGE_TEST_DSN to use an existing server instead (a superuser DSN; databases named
crm_bridge_test_* are created and dropped there).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pytest_postgresql.janitor import DatabaseJanitor

from bridge.db import _BOOTSTRAP, migrate
from bridge.pgserver import TempPostgres
from bridge.receiver import Receiver
from bridge.sqlfiles import migrations, reference_crm

TEMPLATE = "crm_bridge_template"
_counter = itertools.count()

# Fast settings for the daemon under test; individual tests override what they need.
FAST_ENV = {
    "CRM_BRIDGE_POLL_INTERVAL": "0.5",
    "CRM_BRIDGE_RETRY_SCHEDULE": "0.05,0.1,0.2",
    "CRM_BRIDGE_RETRY_JITTER": "0",
    "CRM_BRIDGE_MAX_ATTEMPTS": "3",
    "CRM_BRIDGE_LEASE": "3",
    "CRM_BRIDGE_GRACE": "5",
    "CRM_BRIDGE_TIMEOUT": "5",
    "CRM_BRIDGE_LOG_LEVEL": "INFO",
}


class Server:
    """Where the test databases live: host/port/user plus a way to restart (own cluster only)."""

    def __init__(self, dsn: str, cluster: TempPostgres | None) -> None:
        self.dsn = dsn
        self.cluster = cluster
        info = conninfo_to_dict(dsn)
        self.host = info.get("host", "127.0.0.1")
        self.port = int(info.get("port", 5432))
        self.user = info.get("user", "postgres")
        self.password = info.get("password")

    def dsn_for(self, dbname: str) -> str:
        return make_conninfo(self.dsn, dbname=dbname)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    external = os.environ.get("CRM_BRIDGE_TEST_DSN")
    if external:
        yield Server(external, None)
        return
    with TempPostgres() as cluster:
        yield Server(cluster.dsn(), cluster)


@pytest.fixture(scope="session")
def template_db(pg_server: Server) -> str:
    """A database with crm_bridge and the reference CRM installed, cloned for every test."""
    janitor = DatabaseJanitor(user=pg_server.user, host=pg_server.host, port=pg_server.port,
                              password=pg_server.password, dbname=TEMPLATE, as_template=True)
    janitor.drop()
    janitor.init()
    with psycopg.connect(pg_server.dsn_for(TEMPLATE), autocommit=True) as conn:
        migrate(conn, reference=True)
    return TEMPLATE


@pytest.fixture
def dsn(pg_server: Server, template_db: str) -> Iterator[str]:
    """A fresh database (crm_bridge + reference CRM installed) for this test."""
    name = f"crm_bridge_test_{os.getpid()}_{next(_counter)}"
    janitor = DatabaseJanitor(user=pg_server.user, host=pg_server.host, port=pg_server.port,
                              password=pg_server.password, dbname=name, template_dbname=template_db)
    janitor.init()
    try:
        yield pg_server.dsn_for(name)
    finally:
        janitor.drop()


@pytest.fixture
def empty_dsn(pg_server: Server) -> Iterator[str]:
    """A fresh database with nothing installed."""
    name = f"crm_bridge_empty_{os.getpid()}_{next(_counter)}"
    janitor = DatabaseJanitor(user=pg_server.user, host=pg_server.host, port=pg_server.port,
                              password=pg_server.password, dbname=name)
    janitor.init()
    try:
        yield pg_server.dsn_for(name)
    finally:
        janitor.drop()


def install_schema_up_to(conn: psycopg.Connection, version: int) -> None:
    """crm_bridge as an older release left it: migrations 1..version, recorded, and the reference
    CRM attached by that release's attach().  For upgrade tests; runs in the caller's transaction."""
    conn.execute(_BOOTSTRAP)
    for m in migrations():
        if m.version <= version:
            conn.execute(m.text())
            conn.execute("INSERT INTO crm_bridge.schema_version (version, name) VALUES (%s, %s)", (m.version, m.name))
    conn.execute(reference_crm())


class DB:
    """A small autocommit helper for arranging and inspecting a test database."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn = psycopg.connect(dsn, autocommit=True)

    def execute(self, query: Any, params: Any = None) -> psycopg.Cursor:
        return self.conn.execute(query, params)

    def all(self, query: Any, params: Any = None) -> list[tuple]:
        return self.conn.execute(query, params).fetchall()

    def one(self, query: Any, params: Any = None) -> Any:
        row = self.conn.execute(query, params).fetchone()
        return None if row is None else row[0]

    def add_url(self, obj: str, event: str, url: str, **cols: Any) -> int:
        names = ["object", "event", "url", *cols]
        placeholders = ", ".join(["%s"] * len(names))
        q = psycopg.sql.SQL("INSERT INTO crm_bridge.crm_trigger ({}) VALUES ({}) RETURNING id").format(
            psycopg.sql.SQL(", ").join(map(psycopg.sql.Identifier, names)), psycopg.sql.SQL(placeholders))
        return int(self.one(q, [obj, event, url, *cols.values()]))

    def wait_until(self, query: Any, params: Any = None, *, expect: Any = True, timeout: float = 15) -> Any:
        """Poll ``query`` until its first column equals ``expect`` (or the deadline passes)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.one(query, params)
            if value == expect:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{query!r} returned {value!r}, expected {expect!r}")
            time.sleep(0.02)

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def db(dsn: str) -> Iterator[DB]:
    helper = DB(dsn)
    yield helper
    helper.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as rx:
        yield rx


class DaemonProcess:
    """`crm-bridge run` in a subprocess, its log in a file."""

    def __init__(self, dsn: str, env: dict[str, str], args: list[str]) -> None:
        self.dsn = dsn
        self.env = env
        self.args = args
        self.log_path = Path(tempfile.mkstemp(prefix="crm-bridge-daemon-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True) -> DaemonProcess:
        self._offset = self.log_path.stat().st_size
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bridge.cli", "--dsn", self.dsn, "run", *self.args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        if wait_ready:
            self.wait_log("ready: listening")
        return self

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log[self._offset:]:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"daemon did not log {text!r}:\n{self.log}")
            time.sleep(0.02)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture
def daemon_factory(dsn: str) -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def make(*args: str, env: dict[str, str] | None = None, start: bool = True,
             target_dsn: str | None = None) -> DaemonProcess:
        full_env = {**os.environ, **FAST_ENV, **(env or {})}
        full_env.pop("CRM_BRIDGE_DSN", None)
        d = DaemonProcess(target_dsn or dsn, full_env, list(args))
        started.append(d)
        if start:
            d.start()
        return d

    yield make
    for d in started:
        if d.running:
            d.kill()
        d.log_path.unlink(missing_ok=True)


@pytest.fixture
def daemon(daemon_factory: Callable[..., DaemonProcess]) -> DaemonProcess:
    """A running daemon on this test's database."""
    return daemon_factory()


# -- security: database roles ----------------------------------------------------------------
class Roles:
    """Login roles for one test: a CRM application role and members of the three crm-bridge groups."""

    def __init__(self, dsn: str, suffix: str) -> None:
        self.admin_group = f"crmb_admin_{suffix}"
        self.daemon_group = f"crmb_daemon_{suffix}"
        self.monitor_group = f"crmb_monitor_{suffix}"
        self.app = f"crm_app_{suffix}"
        self.admin = f"crmb_admin_login_{suffix}"
        self.daemon = f"crmb_daemon_login_{suffix}"
        self.monitor = f"crmb_monitor_login_{suffix}"
        self._dsn = dsn

    def dsn(self, role: str) -> str:
        return make_conninfo(self._dsn, user=role, password="test-only-password")

    def connect(self, role: str) -> psycopg.Connection:
        return psycopg.connect(self.dsn(role), autocommit=True)

    @property
    def all(self) -> list[str]:
        return [self.app, self.admin, self.daemon, self.monitor, self.admin_group, self.daemon_group,
                self.monitor_group]


@pytest.fixture
def roles(db: DB) -> Iterator[Roles]:
    """`migrate --roles` groups (unique names) plus LOGIN roles: app (CRM rights only), admin, daemon, monitor."""
    r = Roles(db.dsn, f"{os.getpid()}_{next(_counter)}")
    sql = psycopg.sql
    db.execute("SELECT crm_bridge.apply_grants(%s, %s, %s)", [r.admin_group, r.daemon_group, r.monitor_group])
    for login, group in ((r.app, None), (r.admin, r.admin_group), (r.daemon, r.daemon_group),
                         (r.monitor, r.monitor_group)):
        db.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'test-only-password'").format(sql.Identifier(login)))
        if group:
            db.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(group), sql.Identifier(login)))
    # The CRM application's own rights: its tables, nothing on crm_bridge.
    db.execute(sql.SQL("GRANT USAGE ON SCHEMA crm TO {0}; "
                       "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA crm TO {0}")
               .format(sql.Identifier(r.app)))
    yield r
    db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = ANY (%s)", [r.all])
    for role in r.all:
        db.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(role)))
    for role in r.all:
        db.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


# -- security: TLS and raw listeners ----------------------------------------------------------
class LoopbackCA:
    """A throwaway CA and server certificates for loopback IPs (files in a temp dir)."""

    def __init__(self, directory: Path) -> None:
        import datetime as dt

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        self._x509, self._hashes, self._ser, self._ec = x509, hashes, serialization, ec
        self._eku, self._oid, self._dt = ExtendedKeyUsageOID, NameOID, dt
        self.dir = directory
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "crm-bridge test CA")])
        now = dt.datetime.now(dt.UTC)
        ski = x509.SubjectKeyIdentifier.from_public_key(self._key.public_key())
        self._cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(self._key, hashes.SHA256()))
        self.ca_path = directory / "ca.pem"
        self.ca_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def server_context(self, ip: str = "127.0.0.1") -> ssl.SSLContext:
        """A server-side context whose certificate is valid for ``ip`` only."""
        import ipaddress

        x509, dt = self._x509, self._dt
        key = self._ec.generate_private_key(self._ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(self._oid.COMMON_NAME, ip)]))
            .issuer_name(self._cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([self._eku.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                           critical=False)
            .sign(self._key, self._hashes.SHA256()))
        cert_path, key_path = self.dir / f"server-{ip}.pem", self.dir / f"server-{ip}.key"
        cert_path.write_bytes(cert.public_bytes(self._ser.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(self._ser.Encoding.PEM, self._ser.PrivateFormat.PKCS8,
                                               self._ser.NoEncryption()))
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert_path, key_path)
        return ctx


@pytest.fixture(scope="session")
def loopback_ca(tmp_path_factory: pytest.TempPathFactory) -> LoopbackCA:
    return LoopbackCA(tmp_path_factory.mktemp("tls"))


class CountingListener:
    """A raw TCP listener on a loopback address that counts accepted connections and answers
    any request with 200: proof that a refused call never even connected."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"listener-{host}", daemon=True)
        self._thread.start()

    def url(self, path: str = "/x") -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{path}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.settimeout(2)
                data = b""
                with contextlib.suppress(OSError):
                    while b"\r\n\r\n" not in data and len(data) < 65536:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def listener_factory() -> Iterator[Callable[[str], CountingListener]]:
    made: list[CountingListener] = []

    def make(host: str = "127.0.0.1") -> CountingListener:
        lst = CountingListener(host)
        made.append(lst)
        return lst

    yield make
    for lst in made:
        lst.close()
