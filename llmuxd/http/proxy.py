"""Forwarding one request to a model's backend and streaming the answer back.

One pooled aiohttp ClientSession serves every backend (connections are kept
alive per backend port). The response is relayed chunk by chunk as it
arrives, so SSE token streams pass through without buffering, and bytes are
relayed untouched (no decompression, no re-encoding).

Failure rules (what the client sees):
- the backend cannot be reached, or fails before its first body byte: a clean
  502 in OpenAI's envelope;
- the backend dies in the middle of an SSE stream: an SSE `data:` error event,
  then the end of the stream;
- it dies in the middle of any other body: the client connection is aborted,
  so the client sees a truncated response, never a silently short one;
- the client goes away or stops reading for `write_timeout`: the upstream
  request is closed too, so the backend stops generating;
- llmuxd stops and cannot wait any longer (`end_streams`): each SSE stream
  ends after its current event with an error event that says so.
The caller releases the lease in every case (it holds it around `forward`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Hashable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from llmuxd.http.errors import StreamEnded, UpstreamFailed, sse_error_event

log = logging.getLogger(__name__)

#: headers that describe one connection, not the message (RFC 9110 §7.6.1),
#: plus the ones aiohttp recomputes for the new message
HOP_BY_HOP = (
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE",
    "Trailer", "Trailers", "Transfer-Encoding", "Upgrade", "Host", "Content-Length",
    "Expect",
)

#: response header naming the model that answered (debugging aid)
ANSWERED_BY_HEADER = "X-LLMux-Model"
#: request key: time.monotonic() when the backend's first body bytes arrived (the console's TTFB)
FIRST_BYTE_AT = "llmux.first_byte_at"
#: how the bytes of an SSE stream end after a whole event (a blank line)
EVENT_ENDS = (b"\n\n", b"\r\n\r\n", b"\r\r")


class Upstream:
    """The pooled client to backends and the streaming relay."""

    def __init__(
        self,
        *,
        connect_timeout: float = 10.0,
        read_timeout: float = 300.0,
        write_timeout: float = 300.0,
    ):
        self.connect_timeout = connect_timeout
        #: longest silence from a backend between two body chunks
        self.read_timeout = read_timeout
        #: longest a client may leave one chunk unread before it is dropped
        self.write_timeout = write_timeout
        self._writes = _WriteDeadline(write_timeout)
        self._reads = _ReadDeadline(read_timeout)
        self._session: aiohttp.ClientSession | None = None
        self._ending = False

    def end_streams(self) -> None:
        """From now on, end each SSE stream after its current event (llmuxd is
        stopping and its drain is over); the backend request is closed."""
        self._ending = True

    async def start(self) -> None:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30.0)
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=self.connect_timeout  # reads: self._reads
                ),
                skip_auto_headers=("Accept-Encoding", "User-Agent"),
            )

    async def close(self) -> None:
        self._writes.close()
        self._reads.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Upstream.start() was not called")
        return self._session

    async def forward(
        self, request: web.BaseRequest, model: str, endpoint: str, body: bytes,
        drop: tuple[str, ...] = (),
    ) -> web.StreamResponse:
        """Send `request` (with the already-read `body`, without the headers
        named in `drop`) to `endpoint` and relay the answer. Raises
        UpstreamFailed only before anything was sent to the client."""
        headers = end_to_end(request.headers, drop)
        url = endpoint.rstrip("/") + request.raw_path
        task = asyncio.current_task()
        self._reads.start(task)
        try:
            upstream = await self.session.request(
                request.method, url, data=body, headers=headers, allow_redirects=False
            )
        except asyncio.CancelledError:
            if self._reads.timed_out(task):  # type: ignore[arg-type]
                raise UpstreamFailed(model, f"no response within {self.read_timeout:.0f}s") from None
            raise
        except asyncio.TimeoutError:
            raise UpstreamFailed(model, f"no response within {self.read_timeout:.0f}s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamFailed(model, _reason(exc)) from None
        finally:
            self._reads.stop(task)
        try:
            return await self._relay(request, model, upstream, task)  # type: ignore[arg-type]
        finally:
            # closing (not releasing) an unfinished response drops the upstream
            # connection, which is how vLLM learns to abort the generation
            if not upstream.content.is_eof():
                upstream.close()
            else:
                upstream.release()

    async def _read(self, upstream: aiohttp.ClientResponse, task: asyncio.Task) -> bytes:
        """The next chunk of the answer (b"" at its end); asyncio.TimeoutError
        when the backend stays silent for read_timeout."""
        reads = self._reads
        reads.start(task)
        try:
            return await upstream.content.readany()
        except asyncio.CancelledError:
            if reads.timed_out(task):
                raise asyncio.TimeoutError from None
            raise
        finally:
            reads.stop(task)

    async def _relay(
        self, request: web.BaseRequest, model: str, upstream: aiohttp.ClientResponse, task: asyncio.Task
    ) -> web.StreamResponse:
        # Read the first chunk before sending our status line: a backend that
        # fails before its first byte still gets the client a clean 502.
        try:
            first = await self._read(upstream, task)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise UpstreamFailed(model, _reason(exc), upstream.status) from None
        request[FIRST_BYTE_AT] = time.monotonic()

        headers = end_to_end(upstream.headers)
        headers[ANSWERED_BY_HEADER] = model
        deadline, client = self._writes, request.transport
        try:
            if upstream.content.at_eof():
                # the whole answer came at once (every non-streamed completion):
                # status line, headers and body leave in one write
                response: web.StreamResponse = web.Response(
                    body=first, status=upstream.status, reason=upstream.reason, headers=headers
                )
                await response.prepare(request)
                deadline.start(client)
                await response.write_eof()
                return response
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            is_sse = upstream.content_type == "text/event-stream"
            tail = b""  # the last bytes sent of an SSE stream: is it after a whole event?
            chunk = first
            while chunk:
                deadline.start(client)
                await response.write(chunk)
                deadline.stop(client)
                if is_sse:
                    tail = (tail + chunk)[-4:]
                    if self._ending and tail.endswith(EVENT_ENDS):
                        deadline.start(client)
                        await response.write(sse_error_event(StreamEnded(model)))
                        await response.write_eof()
                        return response
                try:
                    chunk = await self._read(upstream, task)
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                    return await self._broken_stream(request, response, model, upstream, exc, is_sse)
            deadline.start(client)
            await response.write_eof()
        except (ConnectionError, RuntimeError) as exc:
            # the client went away, or stopped reading for write_timeout
            # (RuntimeError: aiohttp 3.8's "Cannot write to closing transport")
            log.debug("client of %s gone mid-response: %s", model, _reason(exc))
            _abort(request)
        finally:
            deadline.stop(client)
        return response

    async def _broken_stream(
        self,
        request: web.BaseRequest,
        response: web.StreamResponse,
        model: str,
        upstream: aiohttp.ClientResponse,
        exc: BaseException,
        is_sse: bool,
    ) -> web.StreamResponse:
        failure = UpstreamFailed(model, _reason(exc), upstream.status)
        log.warning("%s", failure)
        if is_sse:
            self._writes.start(request.transport)
            try:
                await response.write(sse_error_event(failure))
                await response.write_eof()
                return response
            except (ConnectionError, RuntimeError):
                pass
            finally:
                self._writes.stop(request.transport)
        _abort(request)
        return response


def end_to_end(headers: "CIMultiDictProxy[str] | CIMultiDict[str]", drop: tuple[str, ...] = ()) -> "CIMultiDict[str]":
    """A copy of `headers` without the hop-by-hop ones (and `drop`), names and order as received."""
    copy = headers.copy()
    for name in HOP_BY_HOP + drop:
        if name in copy:
            del copy[name]
    return copy


class _SharedDeadline:
    """Acts on whatever has waited `timeout` seconds: one timer for all the
    waits of a kind, armed only while some are pending.

    Rather than a timeout context around each wait: a token stream waits
    hundreds of times (a write per chunk, a read per chunk), each
    asyncio.timeout() or aiohttp per-read timeout puts a timer in the loop's
    heap and takes it out again, and a wait only ever lasts when the other
    side stalls. So a wait costs a dict entry (`start` before it, `stop`
    after it), and the timer fires when the oldest pending wait would
    expire; `expire(key)` is called for each one that has.
    """

    def __init__(self, timeout: float, expire: Callable[[Hashable], None]):
        self.timeout = timeout
        self._on_expiry = expire
        self._pending: dict[Hashable, float] = {}  # what waits -> since when
        self._timer: asyncio.TimerHandle | None = None

    def start(self, key: Hashable | None) -> None:
        if key is not None:
            self._pending[key] = time.monotonic()
            if self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(self.timeout, self._expire)

    def stop(self, key: Hashable | None) -> None:
        self._pending.pop(key, None)

    def _expire(self) -> None:
        self._timer = None
        now = time.monotonic()
        oldest = None
        for key, since in list(self._pending.items()):
            if now - since >= self.timeout:
                del self._pending[key]
                self._on_expiry(key)
            elif oldest is None or since < oldest:
                oldest = since
        if oldest is not None:
            self._timer = asyncio.get_running_loop().call_later(oldest + self.timeout - now, self._expire)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _WriteDeadline(_SharedDeadline):
    """Drops clients that leave a write pending for `timeout` seconds: the
    pending write fails and its handler ends."""

    def __init__(self, timeout: float):
        super().__init__(timeout, self._drop_client)

    def _drop_client(self, transport: Hashable) -> None:
        log.debug("client left a write pending for %.0fs; dropping it", self.timeout)
        _drop(transport)  # type: ignore[arg-type]


class _ReadDeadline(_SharedDeadline):
    """Bounds how long a request's task waits for its backend (for the
    answer's head, or for the next body chunk): past `timeout`, the task is
    cancelled, and `timed_out` tells that cancellation from the client's.

    It replaces aiohttp's sock_read timeout, which takes a timer out of the
    loop and puts a new one in on every read from the backend (about 2 % of
    llmux's CPU per non-streamed request, measured with py-spy under wrk)."""

    def __init__(self, timeout: float):
        super().__init__(timeout, self._cancel)
        self._expired: set[asyncio.Task] = set()

    def _cancel(self, task: Hashable) -> None:
        self._expired.add(task)  # type: ignore[arg-type]
        task.cancel()  # type: ignore[attr-defined]

    def timed_out(self, task: asyncio.Task) -> bool:
        """Whether `task`'s CancelledError came from this deadline (then it
        is taken back: the task goes on, knowing that the backend is silent)."""
        if task in self._expired:
            self._expired.discard(task)
            task.uncancel()
            return True
        return False


def _abort(request: web.BaseRequest) -> None:
    """Drop the client connection without finishing the message."""
    if request.transport is not None:
        _drop(request.transport)


def _drop(transport: asyncio.BaseTransport) -> None:
    transport.abort() if hasattr(transport, "abort") else transport.close()


def _reason(exc: BaseException) -> str:
    """A short, single-line reason for a network failure."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port} ({exc.os_error.strerror or exc.os_error})"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "backend closed the connection"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "backend closed the connection mid-response"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
