"""The raw-client ceiling: N GETs at a fixed concurrency, with nothing else around them.

Run as its own process (``python -m bench.rawclient --lib aiohttp --url U --count N
--concurrency C``), like the daemon, and prints one JSON line.  Two clients: plain aiohttp, and
httpx's API on the daemon's own aiohttp transport (``bridge.http.make_client``) — the stack the
daemon sends with.  Only loopback URLs are accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys
import time
from urllib.parse import urlsplit

import aiohttp

from bridge.aio import tune_gc
from bridge.http import AddressPolicy, make_client


async def _run_aiohttp(url: str, count: int, concurrency: int) -> int:
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        it = iter(range(count))

        async def worker() -> None:
            nonlocal errors
            for i in it:
                async with session.get(f"{url}?AccountID=raw&CaseID={i}") as resp:
                    await resp.read()
                    errors += resp.status != 200

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return errors


async def _run_httpx(url: str, count: int, concurrency: int) -> int:
    errors = 0
    client = make_client(policy=AddressPolicy(deny=()), timeout=15.0, max_connections=concurrency)
    async with client:
        it = iter(range(count))

        async def worker() -> None:
            nonlocal errors
            for i in it:
                resp = await client.get(f"{url}?AccountID=raw&CaseID={i}")
                errors += resp.status_code != 200

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return errors


CLIENTS = {"aiohttp": _run_aiohttp, "httpx-aiohttp": _run_httpx}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lib", choices=sorted(CLIENTS), required=True)
    p.add_argument("--url", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--concurrency", type=int, required=True)
    p.add_argument("--gc", choices=("python", "daemon"), default="python",
                   help="garbage-collector thresholds: Python's defaults, or the daemon's (bridge.aio.tune_gc)")
    args = p.parse_args(argv)
    if args.gc == "daemon":
        tune_gc()
    try:
        loopback = ipaddress.ip_address(urlsplit(args.url).hostname or "").is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        print(f"rawclient: refusing non-loopback URL {args.url}", file=sys.stderr)
        return 2
    t0, c0 = time.perf_counter(), time.process_time()
    errors = asyncio.run(CLIENTS[args.lib](args.url, args.count, args.concurrency))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({"lib": args.lib, "count": args.count, "errors": errors, "seconds": seconds,
                      "cpu_seconds": cpu}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
