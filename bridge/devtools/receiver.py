"""A small HTTP receiver on 127.0.0.1 that records every call: the demo's and the tests' far end.

It runs in a background thread with its own event loop, so synchronous code (pytest, the demo)
can start it, script its answers per path (status, Retry-After, delay, connection reset) and
wait for calls with a deadline instead of sleeping.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web


async def _cancel_the_rest() -> None:
    """Cancel and await every task of the running loop but this one."""
    rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in rest:
        task.cancel()
    await asyncio.gather(*rest, return_exceptions=True)


@dataclass(frozen=True)
class ReceivedCall:
    """One request as the receiver saw it (not bridge.calls.Call, the request the daemon builds)."""

    method: str
    target: str            # the raw request target: path + "?" + query, byte-exact
    headers: dict[str, str]
    body: bytes
    at: float              # time.time() when the request arrived

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> str:
        return self.target.split("?", 1)[1] if "?" in self.target else ""


@dataclass
class Rule:
    """How to answer calls whose path starts with a prefix.  ``times``: only the next N calls."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    reset: bool = False
    times: int | None = None
    handler: Callable[[ReceivedCall], None] | None = None
    body: str | None = None              # answer body (default "ok" / "no")
    # Decides the answer from the request: (status, body); status and body above are then unused.
    respond: Callable[[ReceivedCall], tuple[int, str]] | None = None


class Receiver:
    """The HTTP server: ``calls`` (answered 2xx) and ``attempts`` (every request), scripted by
    ``answer(prefix, Rule)``; a context manager that starts and stops its thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.ssl_context = ssl_context       # serve HTTPS with this (server-side) context
        self.port = port
        self.calls: list[ReceivedCall] = []
        self.attempts: list[ReceivedCall] = []       # every request, including failed answers
        self._running: dict[str, int] = {}
        self._most_running: dict[str, int] = {}
        self._rules: list[tuple[str, Rule]] = []
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    # -- scripting --------------------------------------------------------------------------
    def url(self, path: str = "/hook") -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{self.host}:{self.port}{path}"

    def answer(self, prefix: str, rule: Rule) -> None:
        """Answer calls whose target (path and query) starts with ``prefix`` by ``rule`` (newest wins)."""
        with self._cond:
            self._rules.insert(0, (prefix, rule))

    def clear_rules(self) -> None:
        with self._cond:
            self._rules.clear()

    def _rule_for(self, target: str) -> Rule | None:
        with self._cond:
            for i, (prefix, rule) in enumerate(self._rules):
                if target.startswith(prefix):
                    if rule.times is not None:
                        rule.times -= 1
                        if rule.times <= 0:
                            del self._rules[i]
                    return rule
        return None

    # -- reading ----------------------------------------------------------------------------
    def received(self, path: str | None = None) -> list[ReceivedCall]:
        """Calls answered with a 2xx (optionally only those to ``path``)."""
        with self._cond:
            return [c for c in self.calls if path is None or c.path == path]

    def wait_for(self, count: int, path: str | None = None, timeout: float = 15.0,
                 *, attempts: bool = False) -> list[ReceivedCall]:
        """Block until ``count`` calls (2xx, or any request with attempts=True) have arrived."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                pool = self.attempts if attempts else self.calls
                got = [c for c in pool if path is None or c.path == path]
                if len(got) >= count:
                    return got
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"expected {count} calls{' to ' + path if path else ''}, "
                                       f"got {len(got)}: {[c.target for c in got][-10:]}")
                self._cond.wait(remaining)

    def max_concurrent(self, path: str) -> int:
        """The most requests to ``path`` that were being answered at the same time."""
        with self._cond:
            return self._most_running.get(path, 0)

    # -- server -----------------------------------------------------------------------------
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        with self._cond:
            self._running[path] = running = self._running.get(path, 0) + 1
            self._most_running[path] = max(self._most_running.get(path, 0), running)
        try:
            return await self._answer(request)
        finally:
            with self._cond:
                self._running[path] -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        call = ReceivedCall(request.method, request.raw_path, dict(request.headers), body, time.time())
        rule = self._rule_for(call.target) or Rule()
        if rule.respond is not None:
            status, text = rule.respond(call)
            rule = Rule(status=status, headers=rule.headers, delay=rule.delay, body=text)
        with self._cond:
            self.attempts.append(call)  # on arrival, before any scripted delay
            self._cond.notify_all()
        if rule.delay:
            await asyncio.sleep(rule.delay)
        if 200 <= rule.status < 300 and not rule.reset:
            with self._cond:
                self.calls.append(call)  # answered with a 2xx
                self._cond.notify_all()
        if rule.handler:
            await asyncio.get_running_loop().run_in_executor(None, rule.handler, call)
        if rule.reset and request.transport is not None:
            request.transport.abort()
            raise web.HTTPInternalServerError()  # never written: the connection is gone
        text = rule.body if rule.body is not None else ("ok" if rule.status < 300 else "no")
        return web.Response(status=rule.status, headers=rule.headers, text=text)

    def start(self) -> Receiver:
        started = threading.Event()
        errors: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                app = web.Application()
                app.router.add_route("*", "/{tail:.*}", self._handle)
                # Handlers still answering (a scripted delay) are cancelled at stop, not waited for.
                self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
                loop.run_until_complete(self._runner.setup())
                site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context)
                loop.run_until_complete(site.start())
                server = site._server
                assert server is not None and server.sockets
                self.port = server.sockets[0].getsockname()[1]
            except BaseException as exc:
                errors.append(exc)
                started.set()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            # Handlers that outlived the shutdown timeout (a scripted delay) end here, not as
            # "Task was destroyed but it is pending!" when the loop is collected.
            loop.run_until_complete(_cancel_the_rest())
            loop.close()

        self._thread = threading.Thread(target=serve, name="receiver", daemon=True)
        self._thread.start()
        started.wait(10)
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        if self._loop and self._thread:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
