"""Keep credentials out of logs, status output, metrics labels and error messages."""

from __future__ import annotations

import re
from collections.abc import Iterable
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


# Patterns that are secret wherever they appear (log lines, exception text, receiver answers).
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^/\s:@?#]*)(:[^/\s@?#]*)?@")
_SIGNING_SECRET = re.compile(r"whsec_[A-Za-z0-9+/=]+")
_AUTH_SCHEME = re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=-]{4,}")
_SECRET_QUERY = re.compile(r"(?i)([?&][^=&\s#]*(?:token|secret|password|passwd|pwd|signature|sig|apikey|api_key"
                           r"|key|auth)[^=&\s#]*=)[^&\s#]*")


def _mask_userinfo(m: re.Match[str]) -> str:
    return f"{m[1]}{m[2]}:{MASK}@" if m[3] else f"{m[1]}{MASK}@"


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """Mask known secret values (longest first) and anything shaped like a credential: URL userinfo,
    whsec_ keys, Bearer/Basic tokens and secret-looking query parameters."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    text = _URL_USERINFO.sub(_mask_userinfo, text)
    text = _SIGNING_SECRET.sub(f"whsec_{MASK}", text)
    text = _AUTH_SCHEME.sub(lambda m: f"{m[1]}{m[2]}{MASK}", text)
    return _SECRET_QUERY.sub(lambda m: f"{m[1]}{MASK}", text)
