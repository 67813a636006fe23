"""Where the front end listens: systemd's sockets, or the configured address.

Socket activation (sd_listen_fds(3)): when LISTEN_PID is our pid, fds 3 ..
3+LISTEN_FDS-1 are listening sockets systemd holds for us (named by
LISTEN_FDNAMES). We serve on every stream socket among them, TCP or Unix,
and unset the variables so that backends we spawn do not inherit them.
Otherwise we bind `listen`: "host:port", "[v6]:port" or "unix:/path".

The server also bounds slow clients: a connection that has not finished its
first request's headers within `header_timeout` is closed (aiohttp bounds
idle keep-alive connections itself with `keepalive_timeout`).

Stopping drains (`HttpServer.stop`): it stops accepting first. With socket
activation that closes only our descriptor of systemd's listening socket,
which keeps listening: connections made meanwhile queue in its backlog for
the next llmuxd, none is refused. Whatever was accepted is then served
within `shutdown_timeout`: requests in progress run to their end, and a
connection whose first request is still on its way gets it answered (a
client cannot tell an accepted connection from one in the backlog, so
closing it would lose its request). Answers sent while draining carry
`Connection: close`. When time is up, the app's on_shutdown hooks run (the
front end ends streams at the next event boundary, waiting requests get 503)
and aiohttp gives running handlers `END_GRACE` more seconds before it
cancels them and closes every connection.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket
import stat
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
#: seconds handlers still running when the drain is over get to finish (after on_shutdown)
END_GRACE = 5.0
#: seconds between two looks at what is left while draining
DRAIN_POLL = 0.05


@dataclass(frozen=True)
class ActivatedSocket:
    sock: socket.socket
    name: str


def activation_sockets(environ: dict[str, str] | None = None, *, unset: bool = True) -> list[ActivatedSocket]:
    """The listening sockets systemd passed us; empty when not activated."""
    env = os.environ if environ is None else environ
    try:
        if int(env.get("LISTEN_PID", "0")) != os.getpid():
            return []
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    if unset:
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(var, None)
    found = []
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        name = names[i] if i < len(names) else "unknown"
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                log.warning("activation fd %d (%s) is not a socket; ignored", fd, name)
                continue
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            log.warning("activation fd %d (%s) unusable: %s", fd, name, exc)
            continue
        if sock.type != socket.SOCK_STREAM:
            log.warning("activation fd %d (%s) is not a stream socket; ignored", fd, name)
            sock.detach()
            continue
        os.set_inheritable(fd, False)
        sock.setblocking(False)
        found.append(ActivatedSocket(sock, name))
    return found


class ListenError(OSError):
    """The listen address cannot be bound; says which and what to do."""

    def __str__(self) -> str:
        return str(self.strerror)


def parse_listen(address: str) -> tuple[str, Any]:
    """("unix", path) or ("tcp", (host, port)) for a `listen` setting."""
    if address.startswith("unix:"):
        path = address[len("unix:"):]
        if not path:
            raise ValueError(f"listen address {address!r} has no path; write unix:/run/llmux.sock")
        return "unix", path
    host, sep, port_s = address.rpartition(":")
    if not sep or not port_s.isdigit():
        raise ValueError(f"listen address {address!r} is not host:port or unix:/path")
    host = host.strip("[]") or "0.0.0.0"
    port = int(port_s)
    if not 0 <= port <= 65535:
        raise ValueError(f"listen port {port} is out of range 0-65535")
    return "tcp", (host, port)


LISTEN_HINT = "pick another address with --listen or `listen:`"


def bind_listen(address: str, backlog: int = 1024, *, hint: str = LISTEN_HINT) -> socket.socket:
    """A bound, listening, non-blocking socket for `address`; `hint` says what
    to change when it cannot be bound."""
    kind, where = parse_listen(address)
    if kind == "unix":
        try:
            if stat.S_ISSOCK(os.stat(where).st_mode):
                os.unlink(where)  # stale socket from a previous run
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        host, port = where
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family = infos[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        where = infos[0][4]
    try:
        sock.bind(where)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ListenError(exc.errno, f"cannot listen on {address}: {exc.strerror}; {hint}") from None
    sock.setblocking(False)
    return sock


def beside(listen: str, port: int) -> str:
    """The address of a second port on the host `listen` binds (metrics_port):
    the same host for a TCP listen address, 127.0.0.1 for a unix socket."""
    kind, where = parse_listen(listen)
    host = where[0] if kind == "tcp" else "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def socket_address(sock: socket.socket) -> str:
    """The `listen`-style address a socket is bound to."""
    if sock.family == socket.AF_UNIX:
        return f"unix:{sock.getsockname()}"
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _HeaderDeadline:
    """Closes connections whose first request headers do not arrive in time."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._pending: dict[asyncio.BaseTransport, asyncio.TimerHandle] = {}

    def arm(self, transport: asyncio.BaseTransport) -> None:
        loop = asyncio.get_running_loop()
        self._pending[transport] = loop.call_later(self.timeout, self._expire, transport)

    def disarm(self, transport: asyncio.BaseTransport | None) -> None:
        handle = self._pending.pop(transport, None) if transport is not None else None
        if handle is not None:
            handle.cancel()

    @property
    def waiting(self) -> int:
        """Connections accepted whose first request has not arrived yet."""
        return len(self._pending)

    def _expire(self, transport: asyncio.BaseTransport) -> None:
        if self._pending.pop(transport, None) is not None:
            log.info("closing a connection that sent no request headers within %.0fs", self.timeout)
            transport.close()


def _supported(callable_: Callable, name: str) -> bool:
    return name in inspect.signature(callable_).parameters


_NATIVE_HANDLER_CANCELLATION = _supported(web.Server.__init__, "handler_cancellation")


class _InFlight:
    """Counts requests inside handlers, for the drain: from routing until the
    handler returned.

    It wraps the low-level server's request handler rather than being an
    app middleware: with no middleware at all aiohttp calls the route's
    handler directly, while a single one makes it build a middleware chain
    and enter a context manager around every request (about 3 % of the CPU
    a request costs here, measured with py-spy under wrk)."""

    def __init__(self) -> None:
        self.count = 0

    def wrap(self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
             ) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
        async def counted(request: web.BaseRequest) -> web.StreamResponse:
            self.count += 1
            try:
                return await handler(request)
            finally:
                self.count -= 1
        return counted


#: seconds between two warnings about malformed HTTP requests (the rest are counted)
CLIENT_ERROR_LOG_INTERVAL = 60.0


class _ServerLog(logging.LoggerAdapter):
    """The logger aiohttp's request handlers use (`logger=`), with one change:
    a request aiohttp's parser refused (a 100 KB header, a bad request line)
    is the client's doing, answered 400 by aiohttp itself. aiohttp logs each
    with an ERROR traceback, so anyone could flood the journal; here it is
    one warning line without a traceback, at most one per
    CLIENT_ERROR_LOG_INTERVAL seconds, saying how many were not logged.
    Every other exception keeps its traceback (those are ours to fix)."""

    def __init__(self, interval: float = CLIENT_ERROR_LOG_INTERVAL) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})
        self.interval = interval
        self._next_line = 0.0
        self._unlogged = 0

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kw: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            self.client_error(exc_info)
        else:
            super().exception(msg, *args, exc_info=exc_info, **kw)

    def client_error(self, exc: HttpProcessingError) -> None:
        now = time.monotonic()
        if now < self._next_line:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more since the last such line)" if self._unlogged else ""
        log.warning("refused a malformed HTTP request (%s %s)%s; further ones are counted, "
                    "one line per %.0fs", exc.code, str(exc.message)[:200], more, self.interval)
        self._next_line, self._unlogged = now + self.interval, 0


#: the blank line that ends a request's headers ("\r\n\r\n", or "\n\n" from lenient clients)
_END_OF_HEADERS = (b"\n\r\n", b"\n\n")


class _GuardedProtocol(asyncio.Protocol):
    """Delegates to aiohttp's RequestHandler, adding the header deadline and
    TCP_NODELAY (token streams are many small writes).

    The deadline is disarmed here, when the bytes that end the first
    request's headers arrive, rather than in a middleware: a middleware
    would wrap every request's handler for a check that matters once per
    connection."""

    def __init__(self, inner: asyncio.Protocol, deadline: _HeaderDeadline):
        self._inner = inner
        self._deadline = deadline
        self._transport: asyncio.BaseTransport | None = None
        self._head_tail: bytes | None = b""  # last bytes seen before the headers ended; None once they have

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self._inner.connection_made(transport)
        self._deadline.arm(transport)

    def data_received(self, data: bytes) -> None:
        if self._head_tail is not None:
            seen = self._head_tail + data
            if any(end in seen for end in _END_OF_HEADERS):
                self._head_tail = None
                self._deadline.disarm(self._transport)
            else:
                self._head_tail = seen[-2:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline.disarm(self._transport)
        # aiohttp 3.8 does not cancel a running handler when its client goes
        # away; do what 3.9+'s handler_cancellation=True does, so a request
        # waiting for a switch or streaming releases its lease at once
        task = None if _NATIVE_HANDLER_CANCELLATION else getattr(self._inner, "_task_handler", None)
        self._inner.connection_lost(exc)
        if task is not None and not task.done():
            task.cancel()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class _GuardedSockSite(web.SockSite):
    __slots__ = ("_deadline",)

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, deadline: _HeaderDeadline, **kw: Any):
        super().__init__(runner, sock, **kw)
        self._deadline = deadline

    def stop_accepting(self) -> None:
        """Close our listening descriptor; accepted connections stay open."""
        if self._server is not None:
            self._server.close()

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        deadline = self._deadline
        self._server = await loop.create_server(
            lambda: _GuardedProtocol(server(), deadline), sock=self._sock, backlog=self._backlog
        )


class HttpServer:
    """Serves an aiohttp app on activation sockets or a bound address."""

    def __init__(
        self,
        app: web.Application,
        *,
        listen: str = "127.0.0.1:3000",
        sockets: list[socket.socket] | None = None,
        header_timeout: float = 30.0,
        keepalive_timeout: float = 75.0,
        shutdown_timeout: float = 5.0,
    ):
        self.app = app
        self.listen = listen
        self._given = sockets
        self._deadline = _HeaderDeadline(header_timeout)
        self.keepalive_timeout = keepalive_timeout
        self.shutdown_timeout = shutdown_timeout
        self._runner: web.AppRunner | None = None
        self._sites: list[_GuardedSockSite] = []
        self._in_flight = _InFlight()
        self._draining = False
        self.sockets: list[socket.socket] = []
        app.on_response_prepare.append(self._on_response_prepare)

    @property
    def addresses(self) -> list[str]:
        return [socket_address(s) for s in self.sockets]

    async def start(self) -> None:
        runner_kw: dict[str, Any] = {"access_log": None, "keepalive_timeout": self.keepalive_timeout,
                                     "logger": _ServerLog()}
        site_kw: dict[str, Any] = {"backlog": 1024}
        # aiohttp >= 3.9: cancel the handler when its client disconnects (3.8
        # always does), so waiting requests release their place at once
        if _NATIVE_HANDLER_CANCELLATION:
            runner_kw["handler_cancellation"] = True
        # aiohttp's own grace for handlers still running after our drain; it
        # moved from the site to the runner in aiohttp 3.9
        if _supported(web.BaseRunner.__init__, "shutdown_timeout"):
            runner_kw["shutdown_timeout"] = END_GRACE
        else:
            site_kw["shutdown_timeout"] = END_GRACE
        self._runner = web.AppRunner(self.app, **runner_kw)
        await self._runner.setup()
        server = self._runner.server
        assert server is not None
        # read by each connection's RequestHandler when it is made, so set before any site starts
        server.request_handler = self._in_flight.wrap(server.request_handler)
        if self._given is not None:
            self.sockets = list(self._given)
        else:
            activated = activation_sockets()
            if activated:
                log.info("socket activation: serving on %s",
                         ", ".join(f"{a.name}={socket_address(a.sock)}" for a in activated))
                self.sockets = [a.sock for a in activated]
            else:
                self.sockets = [bind_listen(self.listen)]
        for sock in self.sockets:
            site = _GuardedSockSite(self._runner, sock, self._deadline, **site_kw)
            await site.start()
            self._sites.append(site)

    @property
    def busy(self) -> bool:
        """Requests in handlers, or accepted connections whose request is on its way."""
        return bool(self._in_flight.count or self._deadline.waiting)

    async def stop(self) -> None:
        """Stop accepting, serve what was accepted within `shutdown_timeout`,
        then close (module docstring: "Stopping drains")."""
        if self._runner is None:
            return
        self._draining = True
        for site in self._sites:
            site.stop_accepting()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shutdown_timeout
        # connections accepted just before are still being set up: let them
        # reach connection_made (and so the header deadline's list) first
        for _ in range(3):
            await asyncio.sleep(0)
        if self.busy:
            log.info("draining: %d request(s) in progress, %d connection(s) waiting for their request",
                     self._in_flight.count, self._deadline.waiting)
        while self.busy and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL)
        if self.busy:
            log.warning("draining took longer than %.0fs: ending %d request(s) still in progress",
                        self.shutdown_timeout, self._in_flight.count)
        self._sites.clear()
        await self._runner.cleanup()
        self._runner = None

    async def _on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        if self._draining:  # the client's next request goes to the next llmuxd
            response.force_close()
            response.headers["Connection"] = "close"  # (headers were prepared before this hook)
