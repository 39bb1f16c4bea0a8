"""The daemon's front end: its own HTTP/1.1 server protocol for the relayed API calls, aiohttp for the rest.

Every accepted connection starts here. A request this protocol serves itself is a plain `POST` of one of the
relayed APIs (`/v1/chat/completions` and the others of `handlers.api`, also under `/run/{run}/v1`), or the
`GET /v1/models` an application may send first, over HTTP/1.1 with a `Content-Length` body (or none) and no
`Transfer-Encoding`, `Expect` or `Upgrade` field: what the `openai` and `anthropic` SDKs send. Its head is
parsed in Rust (`parse_request_head`), and the handler (the same coroutine aiohttp runs, behind the app's one
middleware, `auth.middleware`) gets a `FastRequest`; a stream's response head and chunks are written straight
to the transport (`FastStream`), other responses are serialized from the `web.Response` the handler returns.

Anything else (another path or method, a query string, a percent-escape, a chunked body, a head that does not
parse...) and everything after it on that connection goes to aiohttp: the connection is handed to an aiohttp
`RequestHandler` with the bytes read so far, exactly as if aiohttp had accepted it.

Why: aiohttp's server side (parser objects, request, router, middleware chain, response head) was the largest
part of the Python a stream's first token waits for on a core that wakes up cold (benches/README.md, "Where the
first token goes"). `TOKENRELAY_FRONT_END=aiohttp` serves every request with aiohttp, as before.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, cast

from aiohttp import web
from multidict import CIMultiDict

from tokenrelay._core import Spinner, parse_request_head
from tokenrelay.errors import api_of_path, error_response

log = logging.getLogger("tokenrelay")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]
# How long an idle keep-alive connection stays open (aiohttp's own default).
KEEPALIVE_TIMEOUT_S = 75.0
# The head of a request, and what a client may pipeline behind a request in flight before reading stops.
MAX_HEAD_BYTES = 64 * 1024
MAX_PENDING_BYTES = 256 * 1024
# After a 413 the rest of the body is read and dropped for up to this long before the connection closes: closed
# while the client still sends, the kernel answers with a reset and the client may never see the 413 (aiohttp's
# `lingering_time`).
LINGER_S = 10.0
_HANDLED_HEADERS = frozenset(("content-length", "transfer-encoding", "connection", "date", "server"))


def enabled() -> bool:
    return os.environ.get("TOKENRELAY_FRONT_END", "") != "aiohttp"


_REASONS = {s.value: s.phrase for s in HTTPStatus}
_date: tuple[int, str] = (0, "")


def _http_date() -> str:
    global _date
    now = int(time.time())
    if now != _date[0]:
        _date = (now, formatdate(now, usegmt=True))
    return _date[1]


def _head(status: int, reason: str, headers: Any, framing: bytes, keep_alive: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in headers.items() if name.lower() not in _HANDLED_HEADERS]
    text = "".join(lines)
    if text.count("\n") != len(lines) or text.count("\r") != len(lines):
        raise ValueError("a line break inside a response header")
    close = "" if keep_alive else "Connection: close\r\n"
    # (UTF-8, as aiohttp writes a head)
    return f"{text}Date: {_http_date()}\r\nServer: tokenrelay\r\n{close}".encode() + framing + b"\r\n"


class FrontEnd:
    """The listening socket's protocol factory (`loop.create_server(front_end, sock=...)`)."""

    def __init__(
        self,
        app: web.Application,
        aiohttp_server: web.Server,
        middleware: Middleware,
        routes: dict[str, Handler],
        limit: int,
        gets: Mapping[str, Handler] | None = None,
    ) -> None:
        self.app = app
        self.middleware = middleware  # the app's one middleware (`auth.middleware`), run as aiohttp would
        self.aiohttp_server = aiohttp_server
        self.limit = limit  # the largest request body (`max_body_bytes`)
        self.loop = asyncio.get_running_loop()
        self.routes = routes  # POST: path under /v1 -> handler (`handlers.api.FAST_ROUTES`)
        self.gets = gets or {}  # GET: path under /v1 -> handler (the model list)
        self.connections: set[Connection] = set()
        self.closing = False
        self.requests = 0  # requests served here (/metrics)
        self.handed_off = 0  # connections handed to aiohttp (/metrics)
        self.spinner: Spinner | None = None  # busy polling: kept spinning while a client connection is open

    def __call__(self) -> Connection:
        return Connection(self)

    def route(self, method: str, target: str) -> tuple[Handler, str] | None:
        """The handler and run id of a request this protocol serves, else None."""
        table: Mapping[str, Handler]
        if method == "POST":
            table = self.routes
        elif method == "GET":
            table = self.gets
        else:
            return None
        if "?" in target or "%" in target:
            return None
        run = ""
        path = target
        if target.startswith("/run/"):
            end = target.find("/", 5)
            if end <= 5:
                return None
            run, path = target[5:end], target[end:]
        if not path.startswith("/v1/"):
            return None
        handler = table.get(path[3:])
        return None if handler is None else (handler, run)

    async def shutdown(self, grace_s: float) -> None:
        """Closes idle connections now; lets requests in flight finish for up to `grace_s`, then cancels them."""
        self.closing = True
        for conn in list(self.connections):
            if conn.request is None:
                conn.close()
        tasks = [c.task for c in self.connections if c.task is not None]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        for conn in list(self.connections):
            conn.close()


class FastRequest:
    """What the relayed handlers and the auth middleware read of a request (a `web.Request`'s names)."""

    __slots__ = ("_body", "_state", "app", "conn", "headers", "keep_alive", "match_info", "path", "transport")

    def __init__(
        self, conn: Connection, headers: CIMultiDict[str], path: str, run: str, keep_alive: bool, body: bytes
    ) -> None:
        self.conn = conn
        self.app = conn.front.app
        self.headers = headers
        self.path = path
        self.match_info = {"run": run} if run else {}
        self.transport = conn.transport
        self.keep_alive = keep_alive
        self._state: dict[str, Any] = {}
        self._body = body

    def get(self, key: str, default: Any = None) -> Any:
        return self._state.get(key, default)

    def __getitem__(self, key: str) -> Any:
        return self._state[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._state[key] = value

    @property
    def content(self) -> FastRequest:  # (the body reader is the request itself: `is_eof`, `read_nowait`)
        return self

    def is_eof(self) -> bool:
        return self.conn.body_missing == 0 and not self.conn.body_too_large

    def read_nowait(self) -> bytes:
        return self._body

    async def read(self) -> bytes:
        conn = self.conn
        if conn.body_too_large:
            raise web.HTTPRequestEntityTooLarge(max_size=conn.front.limit, actual_size=conn.body_length)
        if conn.body_missing:
            waiter = conn.body_waiter = conn.front.loop.create_future()
            await waiter  # (`_body` is whole once it is done)
        return self._body

    def stream(self, status: int, headers: CIMultiDict[str]) -> FastStream:
        """The response of a stream (chunked), its head sent with the first write."""
        keep_alive = self.keep_alive and not self.conn.front.closing
        return FastStream(self.conn, _head(status, _REASONS.get(status, ""), headers, _CHUNKED, keep_alive))


_CHUNKED = b"Transfer-Encoding: chunked\r\n"


class FastStream:
    """A chunked response written straight to the transport: the writer `Relay._deliver` and `Response.pump`
    use (`write`, `drain`, `send_headers`, `write_eof`, `chunked`)."""

    __slots__ = ("_head", "conn", "finished")
    chunked = True

    def __init__(self, conn: Connection, head: bytes) -> None:
        self.conn = conn
        self._head = head
        self.finished = False

    def _transport(self) -> asyncio.Transport:
        transport = self.conn.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        return transport

    def send_headers(self) -> None:
        if self._head:
            self._transport().write(self._head)
            self._head = b""
            self.conn.started = True

    async def write(self, data: bytes) -> None:
        if not data:
            return
        self._transport().write(b"%s%x\r\n%s\r\n" % (self._head, len(data), data))
        self._head = b""
        self.conn.started = True
        if self.conn.writing_paused:
            await self.conn.drain()

    async def drain(self) -> None:
        await self.conn.drain()

    async def write_eof(self, data: bytes = b"") -> None:
        if self.finished:
            return
        if data:
            await self.write(data)
        self._transport().write(self._head + b"0\r\n\r\n")
        self._head = b""
        self.finished = self.conn.started = True


class Connection(asyncio.Protocol):
    """One client connection, until a request it does not serve hands it to aiohttp."""

    def __init__(self, front: FrontEnd) -> None:
        self.front = front
        self.transport: asyncio.Transport | None = None
        self.pending = b""  # bytes after the request in flight (pipelined), or a head not complete yet
        self.request: FastRequest | None = None
        self.task: asyncio.Task[None] | None = None
        self.body_missing = 0  # bytes of the body in flight still to come
        self.body_length = 0
        self.body_too_large = False
        self.body_parts: list[bytes] = []
        self.body_waiter: asyncio.Future[None] | None = None
        self.writing_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._lost = False
        self._reading_paused = False
        self._linger: asyncio.TimerHandle | None = None
        self.started = False  # some of the response in flight has been written
        self._spinning = False  # this connection keeps the busy-poll spinner going

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.front.connections.add(self)
        self._idle = self.front.loop.call_later(KEEPALIVE_TIMEOUT_S, self.close)
        spinner = self.front.spinner
        if spinner is not None:
            spinner.enter()
            self._spinning = True

    def _stop_spinning(self) -> None:
        if self._spinning:
            self._spinning = False
            cast(Spinner, self.front.spinner).leave()

    def data_received(self, data: bytes) -> None:
        if self.body_missing:
            data = self._body_part(data)
            if not data:
                return
        if self.pending:
            data = self.pending + data
        self.pending = data
        if self.request is None:
            self._next()
        elif len(data) > MAX_PENDING_BYTES and self.transport is not None and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()  # (resumed when the request in flight is done)

    def _body_part(self, data: bytes) -> bytes:
        """Takes what belongs to the body in flight; returns the rest."""
        n = self.body_missing
        part, rest = (data, b"") if len(data) <= n else (data[:n], data[n:])
        self.body_missing -= len(part)
        if self.body_too_large:
            if not self.body_missing and self._linger is not None:  # the 413 is out and the body is drained
                self.close()
            return rest
        self.body_parts.append(part)
        if not self.body_missing:
            if self.request is not None:  # whole now, whether or not the handler has started to wait for it
                self.request._body = b"".join(self.body_parts)
            self.body_parts = []
            if self.body_waiter is not None and not self.body_waiter.done():
                self.body_waiter.set_result(None)
        return rest

    def _next(self) -> None:
        """Parses the next request in `pending` and starts its handler, or hands the connection to aiohttp."""
        data = self.pending
        if not data or self.front.closing:
            return
        try:
            head = parse_request_head(data)
        except ValueError:
            self._hand_off()
            return
        if head is None:
            if len(data) > MAX_HEAD_BYTES:
                self._hand_off()
            return
        method, target, minor, fields, head_len, length, unusual, keep_alive = head
        found = None if unusual or minor != 1 else self.front.route(method, target)
        if found is None:
            self._hand_off()
            return
        handler, run = found
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        length = length or 0
        end = head_len + length
        self.body_length = length
        self.body_too_large = length > self.front.limit
        if self.body_too_large:
            keep_alive = False  # the body is not read: the connection cannot carry another request
            body, self.pending = b"", b""
            self.body_missing = max(0, end - len(data))
        else:
            body, self.pending = data[head_len:end], data[end:]
            self.body_missing = length - len(body)
            if self.body_missing:
                self.body_parts = [body]
        self.front.requests += 1
        self.started = False
        request = self.request = FastRequest(self, CIMultiDict(fields), target, run, keep_alive, body)
        self.task = self.front.loop.create_task(self._serve(request, handler))

    async def _serve(self, request: FastRequest, handler: Handler) -> None:
        keep = False
        try:
            try:
                response: Any = await self.front.middleware(cast(web.Request, request), handler)
            except web.HTTPException as exc:
                response = error_response(exc.status, exc.reason, api_of_path(request.path))
            except (asyncio.CancelledError, ConnectionError):
                raise
            except Exception:
                log.exception("unhandled error serving %s", request.path)
                if self.started:  # part of a stream is out: another response cannot follow; the close tells
                    raise ConnectionResetError from None
                response = error_response(500, "internal error in tokenrelay", api_of_path(request.path))
            if isinstance(response, FastStream):
                keep = response.finished and request.keep_alive
            else:
                keep = self._send(cast(web.Response, response), request.keep_alive)
        except (asyncio.CancelledError, ConnectionError):
            keep = False
        except Exception:  # (a response that cannot be written: the client sees the connection close)
            log.exception("could not send the response to %s", request.path)
            keep = False
        finally:
            self.request = None
            self.task = None
        transport = self.transport
        if transport is None or self._lost:
            return
        if self.body_too_large and self.body_missing:  # (the 413): drain the body first, then close
            self._linger = self.front.loop.call_later(LINGER_S, self.close)
            return
        if not keep or self.front.closing or transport.is_closing():
            transport.close()
            return
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        self._idle = self.front.loop.call_later(KEEPALIVE_TIMEOUT_S, self.close)
        if self.pending:
            self._next()

    def _send(self, response: web.Response, keep_alive: bool) -> bool:
        """Writes a whole (not streamed) response; whether the connection stays open."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        body = response.body
        if body is None:
            body = b""
        elif not isinstance(body, bytes | bytearray):
            raise TypeError(f"cannot send a {type(body).__name__} body")
        keep_alive = keep_alive and response.keep_alive is not False
        framing = b"Content-Length: %d\r\n" % len(body)
        head = _head(response.status, response.reason, response.headers, framing, keep_alive)
        transport.write(head + body)
        return keep_alive

    def _hand_off(self) -> None:
        """aiohttp serves this connection from here on, starting with the bytes read so far."""
        transport = self.transport
        if transport is None:
            return
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self.front.connections.discard(self)
        self._stop_spinning()
        self.front.handed_off += 1
        data, self.pending = self.pending, b""
        protocol = self.front.aiohttp_server()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self.writing_paused:
            protocol.pause_writing()
        protocol.data_received(data)
        if self._reading_paused:
            transport.resume_reading()
        self.transport = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        waiter, self._drain = self._drain, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def drain(self) -> None:
        if self._lost:
            raise ConnectionResetError("the client closed the connection")
        if not self.writing_paused:
            return
        if self._drain is None:
            self._drain = self.front.loop.create_future()
        await asyncio.shield(self._drain)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.front.connections.discard(self)
        self._stop_spinning()
        for timer in (self._idle, self._linger):
            if timer is not None:
                timer.cancel()
        self._idle = self._linger = None
        for waiter in (self._drain, self.body_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_exception(ConnectionResetError("the client closed the connection"))
        if self.task is not None:
            self.task.cancel()  # as aiohttp's `handler_cancellation`: a relayed call ends when its client goes
