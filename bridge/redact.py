"""Keep credentials out of logs, status output, metrics labels and error messages, and keep text
from outside (receivers' answers, database rows) storable in PostgreSQL and safe on a terminal.

Rules (docs/SECURITY.md, "Credentials are redacted everywhere the bridge shows text"):

* ``user:password@`` in a URL: the password (or a lone user name, which may be a token) is masked;
* query parameters whose *name* looks secret (token, secret, key, sig, auth, password, … and
  Azure Functions' ``code``): the value is masked;
* path segments that look like tokens (:func:`is_token`): masked one by one;
* URLs on well-known webhook hosts (Slack, Discord, Teams/Office 365, Zapier, IFTTT), whose whole
  path after the first segment is the credential: only the first segment is kept;
* in free text also ``password=…`` pairs, Authorization/API-key/cookie headers, Bearer/Basic
  tokens, ``whsec_`` keys, and the fragments libpq quotes from a connection string it cannot parse.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from urllib.parse import urlsplit

# Parameter/field names that mark a value as secret (one list for every pattern below).
_SECRET_WORDS = "token|secret|password|passwd|pwd|signature|sig|apikey|api_key|key|auth"
# `code` is Azure Functions' key parameter; only as the whole name (postcode is no secret).
SECRET_PARAMS = re.compile(rf"(?i)^(.*({_SECRET_WORDS}).*|code)$")
MASK = "***"

# Hosts whose webhook URLs carry the credential in the path (everything after the first segment).
_WEBHOOK_HOSTS = re.compile(
    r"(?i)^(hooks\.slack\.com|(?:[a-z0-9-]+\.)*discord(?:app)?\.com|(?:[a-z0-9-]+\.)*webhook\.office\.com"
    r"|outlook\.office(?:365)?\.com|hooks\.zapier\.com|maker\.ifttt\.com)$")
TOKEN_MIN_LEN = 16


def is_token(segment: str) -> bool:
    """A path segment that looks like a credential: at least 16 characters mixing at least two of
    lower-case letters, upper-case letters and digits (random tokens, UUIDs, ``bot123:AAH…``).
    Words and hyphenated names (``customer-updates``) and plain numbers stay readable."""
    if len(segment) < TOKEN_MIN_LEN:
        return False
    classes = (any(c.islower() for c in segment), any(c.isupper() for c in segment),
               any(c.isdigit() for c in segment))
    return sum(classes) >= 2


def redact_path(path: str, host: str = "") -> str:
    """The URL path with token-looking segments masked (all but the first on webhook hosts)."""
    if not path:
        return path
    segments = path.split("/")
    if host and _WEBHOOK_HOSTS.match(host):
        # "/services/T/B/X" -> ["", "services", "T", "B", "X"]: keep "", "services".
        return "/".join(segments[:2]) + (f"/{MASK}" if len(segments) > 2 and any(segments[2:]) else "")
    return "/".join(MASK if is_token(s) else s for s in segments)


def path_secrets(url: str) -> list[str]:
    """The path segments :func:`redact_url` masks (so that error texts quoting them alone are scrubbed)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    segments = [s for s in parts.path.split("/") if s]
    if parts.hostname and _WEBHOOK_HOSTS.match(parts.hostname):
        return [s for s in segments[1:] if len(s) >= 8]
    return [s for s in segments if is_token(s)]


def redact_url(url: str) -> str:
    """``https://user:pw@host/hooks/<token>?token=x&a=1`` -> ``https://user:***@host/hooks/***?token=***&a=1``."""
    try:
        parts = urlsplit(url)
        hostname = parts.hostname or ""
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
    path = redact_path(parts.path, hostname)
    out = f"{parts.scheme}://{netloc}{path}" if parts.scheme or netloc else path
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
# libpq quotes pieces of a connection string it cannot parse, e.g. `missing "=" after "S3cret" in
# connection info string`, `invalid sslmode value: "…"`, `… in URI: "postgresql://…"`: any of
# them may be (part of) the password.
_CONNINFO_FRAGMENT = re.compile(
    r"(?i)(missing \"=\" after |invalid connection option |invalid integer value |invalid [\w ]*value: "
    r"|in URI: |in URI \(expected \":\" or \"/\"\): |routine: |query parameter: |token: |port number: )"
    r"\"[^\"]*\"")


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """Mask credentials anywhere in free text (log lines, error messages, receiver answers): the
    given secret values (longest first), URLs' user:password, secret-looking query parameters and
    token-looking path segments, ``password=…`` pairs, Authorization/API-key/cookie headers,
    Bearer/Basic tokens, whsec_ keys and libpq's quotes of an unparsable connection string."""
    if not text:
        return text
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    text = _CONNINFO_FRAGMENT.sub(lambda m: f'{m[1]}"{MASK}"', text)
    # user:password@ first: a password may hold characters that end the URL pattern below.
    text = _URL_USERINFO.sub(lambda m: f"{m[1]}{m[2]}:{MASK}@" if m[3] else f"{m[1]}{MASK}@", text)
    text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
    text = _SECRET_HEADER.sub(lambda m: f"{m.group(1)}{m.group(2)}{m.group(3) or ''}{MASK}", text)
    text = _AUTH_SCHEME.sub(lambda m: f"{m[1]}{m[2]}{MASK}", text)
    text = _SIGNING_SECRET.sub(f"whsec_{MASK}", text)
    return _SECRET_PAIR.sub(lambda m: f"{m.group(1)}={MASK}", text)


# -- storable, printable text ---------------------------------------------------------------------
ELLIPSIS = "…"


def _escape(ch: str) -> str:
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


_UNSAFE = ("Cc", "Cs", "Cf", "Zl", "Zp")


def safe_text(text: str | None, limit: int | None = None, *, keep: str = "\t") -> str:
    """``text`` made storable in a PostgreSQL text column and harmless on a terminal or in a log:
    NUL and every control/format character except TAB become a visible escape (``\\x00``,
    ``\\x1b``, ``\\u202e``), and the result is cut to at most ``limit`` characters (ending in "…"
    when cut; an escape is never cut in half).  ``keep``: control characters left as they are.

    Escaped: Unicode categories Cc (C0 such as NUL, ESC, CR, LF; DEL; C1, where 0x9b is a one-byte
    CSI on many terminals), Cs (lone surrogates: not encodable as UTF-8, so not storable), Cf
    (bidi overrides and other invisible characters that can disguise what a line says), Zl/Zp."""
    if not text:
        return "" if text is None else text
    if limit is not None and limit <= 0:
        return ""
    out: list[str] = []
    size = 0
    # Escaping never needs to look further than the bound: at most `limit` input characters matter.
    source = text if limit is None else text[: limit + 1]
    for ch in source:
        piece = _escape(ch) if ch not in keep and unicodedata.category(ch) in _UNSAFE else ch
        out.append(piece)
        size += len(piece)
        if limit is not None and size > limit:
            break
    if limit is None or size <= limit:  # everything fitted (a longer text would have overflowed)
        return "".join(out)
    # Cut: drop whole pieces until the ellipsis fits.
    while out and size + len(ELLIPSIS) > limit:
        size -= len(out.pop())
    return "".join(out) + ELLIPSIS if limit >= len(ELLIPSIS) else ""


def clean_text(text: str | None, secrets: Iterable[str] = (), limit: int | None = None, *,
               keep: str = "\t") -> str:
    """The one way an error text from outside is made fit to store, log or print: credentials
    scrubbed (:func:`scrub`, with ``secrets``) *before* it is cut to ``limit`` (:func:`safe_text`),
    so that a cut never leaves half a secret behind."""
    return safe_text(scrub(text or "", secrets), limit, keep=keep)


def describe_exception(exc: BaseException) -> str:
    """``ClassName: message`` (or the class name alone): the one place an exception's class name
    is put in front of its text, so that no message names two classes."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
