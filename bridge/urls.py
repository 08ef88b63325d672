"""Building the call URL: ``<url>?AccountID=aaa&CaseID=ccc`` byte-exact as the seed sends it."""

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


def call_url(base: str, params: Sequence[str], values: Sequence[str | None]) -> str:
    """Append the IDs to the configured URL, with ``&`` when it already has a query string."""
    qs = query_string(params, values)
    if "?" not in base:
        return f"{base}?{qs}"
    if base.endswith(("?", "&")):
        return base + qs
    return f"{base}&{qs}"
