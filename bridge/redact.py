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


# Anything that looks like a URL (scheme://...), for redaction inside free text.
_URL_IN_TEXT = re.compile(r"(?i)\b[a-z][a-z0-9+.-]*://[^\s'\"<>]+")
# name=value pairs whose name looks secret (query strings, libpq DSNs: password=...).
_SECRET_PAIR = re.compile(
    r"(?i)(?<![\w.-])([\w.-]*(?:token|secret|password|passwd|pwd|signature|sig|apikey|api_key|key|auth)[\w.-]*)"
    r"=(?!\*\*\*)([^&\s\"',;]+)")
# Header-like "Authorization: Bearer abc", "'x-api-key': 'abc'", "Cookie: a=b".
_SECRET_HEADER = re.compile(
    r"(?i)\b(authorization|proxy-authorization|x-api-key|api-key|x-auth-token|cookie|set-cookie)"
    r"([\"']?\s*[:=]\s*[\"']?)((?:bearer|basic|token|digest|negotiate)\s+)?([^\s\"',;]+)")


def redact_text(text: str) -> str:
    """Mask credentials anywhere in free text (log lines, error messages): URLs' user:password and
    secret-looking query parameters, ``password=…`` pairs, and Authorization/API-key/cookie headers."""
    if not text:
        return text
    text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
    text = _SECRET_HEADER.sub(lambda m: f"{m.group(1)}{m.group(2)}{m.group(3) or ''}{MASK}", text)
    return _SECRET_PAIR.sub(lambda m: f"{m.group(1)}={MASK}", text)
