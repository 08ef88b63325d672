"""Access to the SQL that lives in ``sql/``: migrations and the named queries.

In a source checkout the files are read from the top-level ``sql/`` directory; a wheel carries
the same directory as ``bridge/sql``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def sql_dir() -> Path:
    for candidate in (_HERE / "sql", _HERE.parent / "sql"):
        if (candidate / "queries.sql").is_file():
            return candidate
    raise FileNotFoundError("crm-bridge SQL files not found (expected bridge/sql or ./sql)")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path

    def text(self) -> str:
        return self.path.read_text()


def migrations() -> list[Migration]:
    found = []
    for path in sorted((sql_dir() / "migrations").glob("*.sql")):
        m = re.fullmatch(r"(\d{4})_(\w+)\.sql", path.name)
        if not m:
            raise ValueError(f"migration file name {path.name!r} is not NNNN_name.sql")
        found.append(Migration(int(m.group(1)), m.group(2), path))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"two migrations share a number: {versions}")
    return found


def reference_crm() -> str:
    return (sql_dir() / "reference_crm.sql").read_text()


def split_named(text: str) -> dict[str, str]:
    """Split SQL text into ``{name: query}`` at its ``-- name: xxx`` headers (the one-line
    descriptions after a header are dropped with the header)."""
    parts = re.split(r"^-- name: (\w+)[^\n]*\n", text, flags=re.M)
    out: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = body.strip().splitlines()
        while lines and lines[0].startswith("--"):
            lines.pop(0)
        out[name] = "\n".join(lines).strip()
    return out


@functools.cache
def queries() -> dict[str, str]:
    """The daemon's and the CLI's queries, from ``queries.sql``."""
    return split_named((sql_dir() / "queries.sql").read_text())


class Queries:
    """Attribute access to named queries: ``Q.claim_due``."""

    def __init__(self, load: Callable[[], dict[str, str]] = queries, source: str = "sql/queries.sql") -> None:
        self._load = load
        self._source = source

    def __getattr__(self, name: str) -> str:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._load()[name]
        except KeyError:
            raise AttributeError(f"no query named {name!r} in {self._source}") from None


Q = Queries()
