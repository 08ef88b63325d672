"""The bench's receiver: a minimal keep-alive HTTP/1.1 server that records every arrival.

Run as its own process (``python -m bench.rxserver --dump FILE``) so that it never competes with
the daemon or the writers for a Python interpreter.  It is an ``asyncio.Protocol`` with no HTTP
framework: it reads request heads, answers ``200`` with ``Content-Length: 0`` and appends
``(time.time(), request target)`` to a list in memory.  That is a few microseconds per request,
far below what any client here can send, so the receiver is not what the bench measures.

A request with a JSON body (POST calls) is recorded once per call it carries: a single-call body
``{"ids": {…}, …}`` or a batch, an array of them, each as ``path?Name=value&…`` from its ``ids``
(so that a drain counts calls, batched or not, the same way as GET targets).

Control requests (not recorded) under ``/__bench/``: ``count`` (body: number recorded),
``dump`` (writes the records to the dump file, then answers), ``reset`` (forgets them).
SIGTERM also dumps, then exits.  Only loopback addresses may be bound.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import signal
import sys
import time
from pathlib import Path

MAX_RECORDS = 2_000_000      # bounded memory: ~200 MB worst case, far above any bench run
MAX_HEAD = 16384             # a request head larger than this is a client bug: drop the connection
MAX_BODY = 64 << 20          # a request body larger than this too
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


class Recorder:
    """Arrival records and the control actions on them."""

    def __init__(self, dump_path: Path) -> None:
        self.dump_path = dump_path
        self.records: list[tuple[float, bytes]] = []
        self.dropped = 0

    def add(self, at: float, target: bytes) -> None:
        if len(self.records) < MAX_RECORDS:
            self.records.append((at, target))
        else:
            self.dropped += 1

    def add_body(self, at: float, target: bytes, body: bytes) -> None:
        """One record per call in a JSON body (a call, or an array of calls), else one for the request."""
        try:
            doc = json.loads(body)
        except ValueError:
            self.add(at, target)
            return
        path = target.split(b"?", 1)[0].decode("latin-1")
        for call in doc if isinstance(doc, list) else [doc]:
            ids = call.get("ids") if isinstance(call, dict) else None
            if isinstance(ids, dict):
                self.add(at, f"{path}?{'&'.join(f'{k}={v}' for k, v in ids.items())}".encode())
            else:
                self.add(at, target)

    def dump(self) -> None:
        tmp = self.dump_path.with_suffix(".tmp")
        with tmp.open("wb") as f:
            for at, target in self.records:
                f.write(b"%.6f %s\n" % (at, target))
        tmp.replace(self.dump_path)

    def control(self, target: bytes) -> bytes:
        action = target.split(b"?", 1)[0].rsplit(b"/", 1)[-1]
        body = b""
        if action == b"count":
            body = str(len(self.records)).encode()
        elif action == b"dump":
            self.dump()
        elif action == b"reset":
            self.records.clear()
            self.dropped = 0
        else:
            return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


class HttpProtocol(asyncio.Protocol):
    """One connection: parse pipelined requests (heads, and bodies of Content-Length) and answer
    each at once."""

    def __init__(self, recorder: Recorder) -> None:
        self.rec = recorder
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        # One timestamp per read: requests that arrived together arrived at the same time.
        at = time.time()
        self.buf += data
        out = []
        close = False
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = self.buf[:end]
            line, _, headers = head.partition(b"\r\n")
            lower = headers.lower()
            length = 0
            if (at_cl := lower.find(b"content-length:")) >= 0:
                try:
                    length = int(lower[at_cl + 15:].split(b"\r\n", 1)[0])
                except ValueError:
                    close = True
                    break
            if length > MAX_BODY:
                close = True
                break
            if len(self.buf) < end + 4 + length:
                break                       # the body is not all here yet
            body = self.buf[end + 4:end + 4 + length]
            self.buf = self.buf[end + 4 + length:]
            parts = line.split(b" ")
            target = parts[1] if len(parts) == 3 else b"?"
            if target.startswith(b"/__bench/"):
                out.append(self.rec.control(target))
            else:
                if body:
                    self.rec.add_body(at, target, body)
                else:
                    self.rec.add(at, target)
                out.append(OK)
            if b"connection: close" in lower:
                close = True
                break
        assert self.transport is not None
        if out:
            self.transport.write(b"".join(out))
        if close or (len(self.buf) > MAX_HEAD and b"\r\n\r\n" not in self.buf):
            self.transport.close()


async def serve(host: str, port: int, recorder: Recorder) -> None:
    if not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"bench receiver: refusing to bind {host}: only loopback addresses are allowed")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(lambda: HttpProtocol(recorder), host, port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    # The parent reads this line to learn the port (and that we are ready).
    print(f"LISTENING {bound}", flush=True)
    async with server:
        await stop.wait()
    recorder.dump()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--dump", required=True, type=Path, help="file the records are written to")
    args = p.parse_args(argv)
    asyncio.run(serve(args.host, args.port, Recorder(args.dump)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
