"""The bench's SQL: named queries from ``bench.sql`` and the benchmark-only objects in ``variants.sql``."""

from __future__ import annotations

import functools
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent


@functools.cache
def queries() -> dict[str, str]:
    """``{name: query}`` from the ``-- name: xxx`` headers of bench.sql (leading comments dropped)."""
    text = (HERE / "bench.sql").read_text()
    parts = re.split(r"^-- name: (\w+)[^\n]*\n", text, flags=re.M)
    out: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = body.strip().splitlines()
        while lines and lines[0].startswith("--"):
            lines.pop(0)
        out[name] = "\n".join(lines).strip()
    return out


def variants_sql() -> str:
    return (HERE / "variants.sql").read_text()


def render(name: str, **params: int) -> str:
    """A query with integer parameters written in, for pgbench scripts (which take literal SQL)."""
    text = queries()[name]
    for key, value in params.items():
        text = text.replace(f"%({key})s", str(int(value)))
    if "%(" in text:
        raise ValueError(f"query {name!r} still has parameters after rendering: {text}")
    return text


class _Queries:
    """Attribute access: ``BQ.reset``."""

    def __getattr__(self, name: str) -> str:
        try:
            return queries()[name]
        except KeyError:
            raise AttributeError(f"no query named {name!r} in bench/bench.sql") from None


BQ = _Queries()
