"""Keep credentials out of logs, status output, metrics labels and error messages."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

SECRET_PARAMS = re.compile(r"(?i)^(.*(token|secret|password|passwd|pwd|signature|sig|apikey|api_key|key|auth).*)$")
MASK = "***"


def redact_url(url: str) -> str:
    """``https://user:pw@host/p?token=x&a=1`` -> ``https://user:***@host/p?token=***&a=1``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{MASK}@{hostport}" if ":" in userinfo else f"{MASK}@{hostport}"
    query = parts.query
    if query:
        pairs = []
        for pair in query.split("&"):
            name, eq, _value = pair.partition("=")
            pairs.append(f"{name}={MASK}" if eq and SECRET_PARAMS.match(name) else pair)
        query = "&".join(pairs)
    out = f"{parts.scheme}://{netloc}{parts.path}"
    if query:
        out += f"?{query}"
    return out
