"""Keep credentials out of logs, status output, metrics labels and error messages."""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit

# Parameter/field names that mark a value as secret (one list for every pattern below).
_SECRET_WORDS = "token|secret|password|passwd|pwd|signature|sig|apikey|api_key|key|auth"
SECRET_PARAMS = re.compile(rf"(?i)^(.*({_SECRET_WORDS}).*)$")
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
_URL_IN_TEXT = re.compile(r"(?i)\b[a-z][a-z0-9+.-]*://[^\s'\"<>]+")
_SIGNING_SECRET = re.compile(r"whsec_[A-Za-z0-9+/=]+")
_AUTH_SCHEME = re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=-]{4,}")
# name=value pairs whose name looks secret (query strings, libpq DSNs: password=...).
_SECRET_PAIR = re.compile(
    rf"(?i)(?<![\w.-])([\w.-]*(?:{_SECRET_WORDS})[\w.-]*)"
    r"=(?!\*\*\*)([^&\s\"',;]+)")
# Header-like "Authorization: Bearer abc", "'x-api-key': 'abc'", "Cookie: a=b".
_SECRET_HEADER = re.compile(
    r"(?i)\b(authorization|proxy-authorization|x-api-key|api-key|x-auth-token|cookie|set-cookie)"
    r"([\"']?\s*[:=]\s*[\"']?)((?:bearer|basic|token|digest|negotiate)\s+)?([^\s\"',;]+)")


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """Mask credentials anywhere in free text (log lines, error messages, receiver answers): the
    given secret values (longest first), URLs' user:password and secret-looking query parameters,
    ``password=…`` pairs, Authorization/API-key/cookie headers, Bearer/Basic tokens, whsec_ keys."""
    if not text:
        return text
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    # user:password@ first: a password may hold characters that end the URL pattern below.
    text = _URL_USERINFO.sub(lambda m: f"{m[1]}{m[2]}:{MASK}@" if m[3] else f"{m[1]}{MASK}@", text)
    text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
    text = _SECRET_HEADER.sub(lambda m: f"{m.group(1)}{m.group(2)}{m.group(3) or ''}{MASK}", text)
    text = _AUTH_SCHEME.sub(lambda m: f"{m[1]}{m[2]}{MASK}", text)
    text = _SIGNING_SECRET.sub(f"whsec_{MASK}", text)
    return _SECRET_PAIR.sub(lambda m: f"{m.group(1)}={MASK}", text)
