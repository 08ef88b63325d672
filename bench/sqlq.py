"""The bench's SQL: named queries from ``bench.sql`` and the benchmark-only objects in ``variants.sql``."""

from __future__ import annotations

import functools
from pathlib import Path

from bridge.sqlfiles import Queries, split_named

HERE = Path(__file__).resolve().parent


@functools.cache
def queries() -> dict[str, str]:
    """``{name: query}`` from the ``-- name: xxx`` headers of bench.sql."""
    return split_named((HERE / "bench.sql").read_text())


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


BQ = Queries(queries, "bench/bench.sql")
