"""The outbound HTTP client: httpx's interface on an aiohttp transport, with an address policy.

httpx's default transport loses throughput as concurrency grows (encode/httpx #3215; see
docs/DESIGN.md, "HTTP client"), so the shared ``httpx.AsyncClient`` runs on aiohttp's connection
pool.  The transport also:

* sends the request target byte-exact (aiohttp would otherwise re-quote the query string),
* checks every destination address against an allow/deny policy *after* DNS resolution and
  *before* connecting (IP literals are checked before the request starts); the unspecified
  addresses (0.0.0.0/8, ::) are refused whatever the lists say,
* never follows redirects itself (httpx decides, per request: off unless the URL opts in; every
  hop goes through this transport, so the address policy applies to redirect targets too); a hop
  to another origin than the configured URL's (``REDIRECT_HOP`` in the request's extensions) is
  made on a separate connection pool whose policy also refuses non-public addresses unless they
  are listed in ``redirect_allow_cidrs`` -- the configured URL is the operator's choice, a
  redirect target is the receiver's,
* verifies TLS certificates and host names (certifi's CAs plus an optional CA bundle).

The redirect rules live here too (:func:`send`): which hops are followed, which headers a hop to
another origin loses, and the error text of a redirect that was not followed.
"""

from __future__ import annotations

import dataclasses
import http.cookiejar
import ipaddress
import os
import socket
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import certifi
import httpx
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from .redact import redact_url

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Link-local (incl. the cloud metadata service at 169.254.169.254) and AWS's IPv6 metadata address.
DEFAULT_DENY = ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128")
# Never a destination, whatever the lists say: connecting to 0.0.0.0 or :: reaches this very host
# (Linux), and the rest of 0.0.0.0/8 means "this network" (RFC 1122).  Spellings such as `0x0`,
# `[0:0::0]` or `[::ffff:0.0.0.0]` resolve or map to these and are caught the same way.
UNSPECIFIED = ("0.0.0.0/8", "::/128")
# Not public (RFC 6890 special-purpose ranges that are not globally reachable, plus multicast):
# a redirect to another origin may not lead here unless redirect_allow_cidrs lists the range.
NON_PUBLIC = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
    "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    "::/96", "::1/128", "64:ff9b:1::/48", "100::/64", "2001:db8::/32", "fc00::/7", "fe80::/10",
    "fec0::/10", "ff00::/8",
)
# httpx request extension set on a redirect hop to another origin than the configured URL's.
REDIRECT_HOP = "crm_bridge_redirect_hop"
MAX_ERROR_BODY = 512
# A request extension: read this many bytes of a 2xx answer's body too (batched calls, whose
# receiver may list the events that failed); other 2xx bodies are never read.
READ_ANSWER = "crm_bridge_read_answer"
MAX_REDIRECTS = 5
USER_AGENT = "crm-bridge/0.1"
# Never forwarded to another origin: they would let that origin replay a signed call to the real
# receiver.  webhook-id / Idempotency-Key (the call id) stay: they authenticate nothing and let
# the new origin drop duplicates.
SIGNING_HEADERS = ("webhook-signature", "webhook-timestamp")


class AddressRefused(httpx.ConnectError):
    """The destination address is not allowed by the address policy (nothing was sent)."""


class NotPublic(AddressRefused):
    """A redirect to another origin leads to a non-public address the operator did not allow."""


def _member(ip: IPAddress, nets: Iterable[IPNetwork]) -> IPNetwork | None:
    return next((n for n in nets if ip.version == n.version and ip in n), None)


@dataclass(frozen=True)
class AddressPolicy:
    """Unspecified addresses are always refused; then deny wins over allow, and an empty allow list
    allows everything not denied.  ``public_only`` (the policy for redirect hops to another origin,
    see :attr:`for_redirects`) also refuses NON_PUBLIC addresses not listed in ``redirect_allow``."""

    deny: tuple[IPNetwork, ...] = field(default_factory=lambda: parse_networks(DEFAULT_DENY))
    allow: tuple[IPNetwork, ...] = ()
    redirect_allow: tuple[IPNetwork, ...] = ()
    public_only: bool = False

    def check(self, host: str, address: str) -> None:
        ip: IPAddress = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        if net := _member(ip, _UNSPECIFIED):
            raise AddressRefused(f"address {ip} of {host} is never a valid destination ({net}: the unspecified "
                                 "address, connecting to it reaches the local host)")
        if net := _member(ip, self.deny):
            raise AddressRefused(f"address {ip} of {host} is denied by the address policy ({net})")
        if self.allow and not _member(ip, self.allow):
            raise AddressRefused(f"address {ip} of {host} is not in the address policy's allow list")
        if self.public_only and (net := _member(ip, _NON_PUBLIC)) and not _member(ip, self.redirect_allow):
            raise NotPublic(f"address {ip} of {host} is not a public address ({net}): a redirect to another "
                            "origin may only lead to public addresses unless the range is listed in the "
                            "redirect_allow_cidrs setting")

    @property
    def for_redirects(self) -> AddressPolicy:
        """The policy for a redirect hop to another origin than the configured URL's."""
        return dataclasses.replace(self, public_only=True)


def parse_networks(items: Iterable[str]) -> tuple[IPNetwork, ...]:
    out = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"invalid CIDR {item!r} in address policy") from None
    return tuple(out)


_UNSPECIFIED = parse_networks(UNSPECIFIED)
_NON_PUBLIC = parse_networks(NON_PUBLIC)


def _ip_literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


class PolicyResolver(AbstractResolver):
    """Resolves with getaddrinfo, then refuses the host if any address is denied."""

    def __init__(self, policy: AddressPolicy) -> None:
        self._policy = policy
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for r in results:
            self._policy.check(host, r["host"])
        return results

    async def close(self) -> None:
        await self._inner.close()


_EXC_MAP: Sequence[tuple[type[BaseException], type[httpx.HTTPError]]] = (
    (aiohttp.ServerTimeoutError, httpx.ReadTimeout),
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),
    (aiohttp.SocketTimeoutError, httpx.ReadTimeout),
    (aiohttp.ClientSSLError, httpx.ConnectError),
    (aiohttp.ClientConnectorError, httpx.ConnectError),
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.ClientPayloadError, httpx.ReadError),
    (aiohttp.ClientResponseError, httpx.RemoteProtocolError),
    (aiohttp.ClientOSError, httpx.ConnectError),
    (aiohttp.ClientError, httpx.TransportError),
)


def _plain_error(exc: BaseException) -> str:
    """What went wrong, without aiohttp's transport details (``ssl:default [Connect call failed …]``)."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"TLS certificate of {exc.host}:{exc.port} refused: {exc.certificate_error}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = exc.os_error
        if isinstance(exc, aiohttp.ClientSSLError) or isinstance(os_error, ssl.SSLError):
            return f"TLS handshake with {exc.host}:{exc.port} failed: {os_error}"
        errno = getattr(os_error, "errno", None)
        reason = (os.strerror(errno) if isinstance(errno, int) and errno > 0 else None) \
            or getattr(os_error, "strerror", None) or str(os_error) or type(os_error).__name__
        return f"cannot connect to {exc.host}:{exc.port}: {reason}"
    return str(exc)  # the httpx error it becomes names the class (redact.describe_exception)


class BridgeTransport(httpx.AsyncBaseTransport):
    def __init__(self, *, policy: AddressPolicy, verify: ssl.SSLContext | str | bool = True,
                 max_connections: int = 256) -> None:
        self._policies = (policy, policy.for_redirects)
        self._ssl = httpx.create_ssl_context(verify=verify) if not isinstance(verify, ssl.SSLContext) else verify
        self._max_connections = max_connections
        # One pool per policy: a pooled connection is only ever reused by requests judged by the
        # policy that admitted it (a redirect hop never rides on a connection the configured URLs'
        # policy opened to an internal address).
        self._sessions: list[aiohttp.ClientSession | None] = [None, None]
        # Per call, only dictionary look-ups: hosts whose literal address a policy admitted (the
        # policies never change), and aiohttp's timeout objects by value.
        self._admitted: set[tuple[bool, str]] = set()
        self._timeouts: dict[tuple[float | None, float | None], aiohttp.ClientTimeout] = {}

    def _get_session(self, redirect: bool) -> aiohttp.ClientSession:
        session = self._sessions[redirect]
        if session is None:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections, limit_per_host=0, ssl=self._ssl,
                resolver=PolicyResolver(self._policies[redirect]), ttl_dns_cache=10, keepalive_timeout=30,
            )
            session = self._sessions[redirect] = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",))
        return session

    def _admit(self, redirect: bool, host: str) -> None:
        """Refuse an IP literal the policy does not allow (host names: the resolver checks them)."""
        if (redirect, host) in self._admitted:
            return
        if (literal := _ip_literal(host)) is not None:
            self._policies[redirect].check(host, literal)
        if len(self._admitted) >= 10_000:
            self._admitted.clear()
        self._admitted.add((redirect, host))

    def _timeout(self, timeout: dict[str, float | None]) -> aiohttp.ClientTimeout:
        key = (timeout.get("connect"), timeout.get("read"))
        found = self._timeouts.get(key)
        if found is None:
            if len(self._timeouts) >= 1000:
                self._timeouts.clear()
            found = self._timeouts[key] = aiohttp.ClientTimeout(sock_connect=key[0], sock_read=key[1])
        return found

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        redirect = bool(request.extensions.get(REDIRECT_HOP))
        self._admit(redirect, url.host)
        body = await request.aread() or None  # redirected requests carry a stream, not bytes
        session = self._get_session(redirect)
        target = URL(str(url), encoded=True)
        if url.userinfo:
            # httpx already turned user:password@ into an Authorization header; aiohttp
            # refuses a request that has both.
            target = target.with_user(None)
        try:
            async with session.request(
                request.method,
                target,
                headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw],
                data=body,
                allow_redirects=False,
                timeout=self._timeout(request.extensions.get("timeout", {})),
            ) as resp:
                if resp.status >= 300:
                    content = await resp.content.read(MAX_ERROR_BODY)
                elif answer := request.extensions.get(READ_ANSWER):
                    content = await resp.content.read(answer)
                else:
                    content = b""
                return httpx.Response(status_code=resp.status, headers=resp.raw_headers,
                                      content=content, request=request)
        except AddressRefused:
            raise
        except Exception as exc:
            for src, dst in _EXC_MAP:
                if isinstance(exc, src):
                    raise dst(_plain_error(exc), request=request) from exc
            raise

    async def aclose(self) -> None:
        for i, session in enumerate(self._sessions):
            if session is not None:
                await session.close()
                self._sessions[i] = None


class _NoCookies(http.cookiejar.DefaultCookiePolicy):
    """Receivers' cookies are neither kept nor sent: the client is shared by every URL, and one
    receiver's Set-Cookie must not travel to another URL of the same domain."""

    def set_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False

    def return_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False


class _NoCookieJar(httpx.Cookies):
    """A jar that is never filled and never consulted: httpx reads every response's cookies
    through two urllib compatibility objects (a third of its own cost per call), only for
    _NoCookies to refuse them."""

    def __init__(self) -> None:
        super().__init__(http.cookiejar.CookieJar(policy=_NoCookies()))

    def extract_cookies(self, response: httpx.Response) -> None:
        return None

    def set_cookie_header(self, request: httpx.Request) -> None:
        return None


class BridgeClient(httpx.AsyncClient):
    """httpx's AsyncClient that keeps no cookies (see _NoCookies): its jar is always empty."""

    def __init__(self, **kwargs: Any) -> None:
        self._no_cookies = _NoCookieJar()
        super().__init__(**kwargs)

    @property  # type: ignore[override]
    def cookies(self) -> httpx.Cookies:
        return self._no_cookies

    @cookies.setter
    def cookies(self, cookies: Any) -> None:
        raise TypeError("crm-bridge's HTTP client keeps no cookies")


def make_client(*, policy: AddressPolicy | None = None, verify: ssl.SSLContext | str | bool = True,
                timeout: float = 15.0, max_connections: int = 256) -> httpx.AsyncClient:
    """The daemon's single shared client.  Every request also carries its own per-URL timeout."""
    transport = BridgeTransport(policy=policy or AddressPolicy(), verify=verify,
                                max_connections=max_connections)
    return BridgeClient(transport=transport, timeout=httpx.Timeout(timeout), follow_redirects=False,
                        max_redirects=MAX_REDIRECTS, headers={"User-Agent": USER_AGENT})


def ssl_context(ca_bundle: str = "") -> ssl.SSLContext:
    """Verifying TLS context: certifi's CAs, plus ``ca_bundle`` (a PEM file or a c_rehash'd
    directory) for internal CAs.  There is deliberately no switch to turn verification off."""
    ctx = ssl.create_default_context(cafile=certifi.where())
    if ca_bundle:
        if os.path.isdir(ca_bundle):
            ctx.load_verify_locations(capath=ca_bundle)
        else:
            ctx.load_verify_locations(cafile=ca_bundle)
    return ctx


def policy_from(deny: Iterable[str], allow: Iterable[str], redirect_allow: Iterable[str] = ()) -> AddressPolicy:
    """The configured lists; the built-in denials (unspecified, link-local, cloud metadata) always apply."""
    return AddressPolicy(deny=parse_networks((*DEFAULT_DENY, *deny)), allow=parse_networks(allow),
                         redirect_allow=parse_networks(redirect_allow))


# -- redirects ------------------------------------------------------------------------------------
def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port


async def send(client: httpx.AsyncClient, request: httpx.Request, *, follow: bool,
               private_headers: tuple[str, ...] = ()) -> tuple[httpx.Response, str | None]:
    """Send ``request``, following up to MAX_REDIRECTS redirects when the URL opted in (``follow``);
    returns the last answer and, when a redirect was refused, why.  Every hop passes the
    transport's address policy, and a hop to another origin than the configured URL's is marked
    REDIRECT_HOP, so that it may only reach public addresses (unless redirect_allow_cidrs lists
    the range).  ``private_headers`` (the URL's configured headers), Authorization and the
    signature are not forwarded to another origin (they may be credentials), and an https URL is
    never redirected to plain http."""
    resp = await client.send(request, follow_redirects=False)
    if not follow or resp.next_request is None:
        return resp, None
    configured = _origin(request.url)
    hops = 0
    while resp.next_request is not None and hops < MAX_REDIRECTS:
        nxt = resp.next_request
        if request.url.scheme == "https" and nxt.url.scheme != "https":
            return resp, f"HTTP {resp.status_code} redirect from https to {redact_url(str(nxt.url))} refused"
        if _origin(nxt.url) != _origin(request.url):
            for name in (*private_headers, "Authorization", *SIGNING_HEADERS):
                nxt.headers.pop(name, None)
        # httpx copies the previous request's extensions: set the mark for this hop afresh.
        nxt.extensions = {**nxt.extensions, REDIRECT_HOP: _origin(nxt.url) != configured}
        await resp.aclose()
        request, hops = nxt, hops + 1
        resp = await client.send(request, follow_redirects=False)
    return resp, None


def unfollowed_redirect(resp: httpx.Response, follow: bool) -> str | None:
    """The error text of a 3xx answer left as it is (``follow`` off, or too many hops); None when
    ``resp`` is not a redirect."""
    if not 300 <= resp.status_code < 400 or "location" not in resp.headers:
        return None
    hint = f"more than {MAX_REDIRECTS} redirects" if follow else "not followed: follow_redirects is off for this URL"
    return f"HTTP {resp.status_code} redirect to {redact_url(resp.headers['location'])} ({hint})"
