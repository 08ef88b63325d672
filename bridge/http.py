"""The outbound HTTP client: httpx's interface on an aiohttp transport, with an address policy.

httpx's default transport loses throughput as concurrency grows (encode/httpx #3215; measured in
docs/DESIGN: 730 -> 200 req/s from 1 to 32 concurrent requests), so the shared
``httpx.AsyncClient`` runs on aiohttp's connection pool.  The transport also:

* sends the request target byte-exact (aiohttp would otherwise re-quote the query string),
* checks every destination address against an allow/deny policy *after* DNS resolution and
  *before* connecting (IP literals are checked before the request starts),
* never follows redirects itself (httpx decides, per request: off unless the URL opts in; every
  hop goes through this transport, so the address policy applies to redirect targets too),
* verifies TLS certificates and host names (certifi's CAs plus an optional CA bundle).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp
import httpx
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

if TYPE_CHECKING:
    from .settings import Settings

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Link-local (incl. the cloud metadata service at 169.254.169.254) and AWS's IPv6 metadata address.
DEFAULT_DENY = ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128")
MAX_ERROR_BODY = 512
MAX_REDIRECTS = 5


class AddressRefused(httpx.ConnectError):
    """The destination address is not allowed by the address policy (nothing was sent)."""


@dataclass(frozen=True)
class AddressPolicy:
    """Deny wins over allow; an empty allow list allows everything not denied."""

    deny: tuple[IPNetwork, ...] = field(default_factory=lambda: parse_networks(DEFAULT_DENY))
    allow: tuple[IPNetwork, ...] = ()

    def check(self, host: str, address: str) -> None:
        ip: IPAddress = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        for net in self.deny:
            if ip.version == net.version and ip in net:
                raise AddressRefused(f"address {ip} of {host} is denied by the address policy ({net})")
        if self.allow and not any(ip.version == n.version and ip in n for n in self.allow):
            raise AddressRefused(f"address {ip} of {host} is not in the address policy's allow list")


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
    return str(exc) or type(exc).__name__


class BridgeTransport(httpx.AsyncBaseTransport):
    def __init__(self, *, policy: AddressPolicy, verify: ssl.SSLContext | str | bool = True,
                 max_connections: int = 256) -> None:
        self._policy = policy
        self._ssl = httpx.create_ssl_context(verify=verify) if not isinstance(verify, ssl.SSLContext) else verify
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections, limit_per_host=0, ssl=self._ssl,
                resolver=PolicyResolver(self._policy), ttl_dns_cache=10, keepalive_timeout=30,
            )
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                                  skip_auto_headers=("User-Agent",))
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if (literal := _ip_literal(host)) is not None:
            self._policy.check(host, literal)
        timeout = request.extensions.get("timeout", {})
        body = await request.aread() or None  # redirected requests carry a stream, not bytes
        session = self._get_session()
        try:
            async with session.request(
                request.method,
                # httpx already turned user:password@ into an Authorization header; aiohttp
                # refuses a request that has both.
                URL(str(request.url), encoded=True).with_user(None),
                headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw],
                data=body,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(sock_connect=timeout.get("connect"),
                                              sock_read=timeout.get("read")),
            ) as resp:
                content = await resp.content.read(MAX_ERROR_BODY) if resp.status >= 300 else b""
                return httpx.Response(status_code=resp.status, headers=list(resp.raw_headers),
                                      content=content, request=request)
        except AddressRefused:
            raise
        except Exception as exc:
            for src, dst in _EXC_MAP:
                if isinstance(exc, src):
                    raise dst(_plain_error(exc), request=request) from exc
            raise

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def make_client(*, policy: AddressPolicy | None = None, verify: ssl.SSLContext | str | bool = True,
                timeout: float = 15.0, max_connections: int = 256) -> httpx.AsyncClient:
    """The daemon's single shared client.  Every request also carries its own per-URL timeout."""
    transport = BridgeTransport(policy=policy or AddressPolicy(), verify=verify,
                                max_connections=max_connections)
    return httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(timeout),
                             follow_redirects=False, max_redirects=MAX_REDIRECTS,
                             headers={"User-Agent": "crm-bridge/0.1"})


def ssl_context(ca_bundle: str = "") -> ssl.SSLContext:
    """Verifying TLS context: certifi's CAs, plus ``ca_bundle`` (a PEM file or a c_rehash'd
    directory) for internal CAs.  There is deliberately no switch to turn verification off."""
    import certifi

    ctx = ssl.create_default_context(cafile=certifi.where())
    if ca_bundle:
        if os.path.isdir(ca_bundle):
            ctx.load_verify_locations(capath=ca_bundle)
        else:
            ctx.load_verify_locations(cafile=ca_bundle)
    return ctx


def policy_from(deny: Iterable[str], allow: Iterable[str]) -> AddressPolicy:
    """The configured lists; the built-in denials (link-local, cloud metadata) always apply."""
    return AddressPolicy(deny=parse_networks((*DEFAULT_DENY, *deny)), allow=parse_networks(allow))


def client_for(settings: Settings) -> httpx.AsyncClient:
    """The client ``crm-bridge run`` uses, built from its settings."""
    return make_client(policy=policy_from(settings.deny_cidrs, settings.allow_cidrs),
                       verify=ssl_context(settings.ca_bundle), timeout=settings.timeout)
