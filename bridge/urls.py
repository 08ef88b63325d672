"""Building the call URL: ``<url>?AccountID=aaa&CaseID=ccc`` byte-exact, as the README's first table shows."""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import quote


class MissingId(ValueError):
    """An ID the call needs is NULL (or the column was dropped after attach())."""


def query_string(params: Sequence[str], values: Sequence[str | None]) -> str:
    """``AccountID=a%20b&CaseID=c`` — values are percent-encoded as UTF-8 (only A-Z a-z 0-9 -._~ stay)."""
    if len(params) != len(values):
        raise MissingId(f"expected {len(params)} IDs ({', '.join(params)}), got {len(values)}")
    missing = [p for p, v in zip(params, values, strict=True) if v is None]
    if missing:
        raise MissingId(f"ID {', '.join(missing)} is NULL in the captured row")
    return "&".join(f"{p}={quote(str(v), safe='')}" for p, v in zip(params, values, strict=True))


def query_prefix(base: str) -> str:
    """The configured URL ready for the IDs: ``?`` appended, or ``&`` when it already has a query
    string (nothing when it ends in ``?`` or ``&``)."""
    return base + ("" if base.endswith(("?", "&")) else "&" if "?" in base else "?")


def call_url(base: str, params: Sequence[str], values: Sequence[str | None]) -> str:
    """Append the IDs to the configured URL (query_prefix)."""
    return query_prefix(base) + query_string(params, values)
