"""The upstream HTTP/1.1 client: keep-alive connections on asyncio protocols, framing parsed in Rust.

Why not aiohttp's client (what tokenrelay used first): per request it builds a request object, a URL, a
timer set and a StreamReader, and every chunk of a stream wakes the handler task through a future. Here a
streamed body goes from the upstream connection's `data_received` through the meter (`StreamMeter.feed_wire`,
which also decodes the upstream's chunked framing) straight to the client's transport, in one callback, and that
callback is Rust's (`Pump`: the connection's protocol while it streams, so no Python frame runs per read); a run of
whole upstream chunks is written to the client as it came, with no copy. The handler task only wakes at the end
of the body, on an error, or to wait for a slow client to drain.

A response is used in one of two ways: `read()` (a complete answer), or `start_stream(meter)`, then `wait()`
and `take()` (pull: the stream's opening events, read by read), then `pump()` (push: the rest of the stream to a
client transport, from the upstream's callbacks).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

from multidict import CIMultiDict, CIMultiDictProxy

from tokenrelay._core import (
    PUMP_CLIENT_GONE,
    PUMP_END,
    PUMP_MALFORMED,
    PUMP_PAUSED,
    RELAY_BROKEN,
    RELAY_CLIENT_GONE,
    RELAY_END,
    RELAY_MALFORMED,
    BodyDecoder,
    Pump,
    Relay,
    StreamMeter,
    parse_response_head,
)
from tokenrelay.plane import DataPlane

# Idle keep-alive connections are closed after this long (servers usually close theirs sooner).
KEEPALIVE_S = 60.0
# Idle connections kept per origin (per worker): as many as a worker's steady load of concurrent streams to one
# provider needs, so that load does not reconnect (a TCP and often a TLS handshake) for every stream past the
# cap. The bound is for the fds after a burst; Envoy's default connection limit per cluster is the same.
MAX_IDLE_PER_ORIGIN = 1024
DNS_TTL_S = 300.0
# Copy the request body into the head's write below this size (one buffer); above it, write both.
_COALESCE_BODY = 16 * 1024


class UpstreamError(Exception):
    """The upstream failed: it could not be reached, broke the protocol, or closed the connection early."""


class ConnectError(UpstreamError):
    """No connection could be made."""


class ConnectTimeout(UpstreamError):
    """No connection within the connect timeout."""


class _WireFeed(Protocol):
    """What the stream pump feeds each upstream read: a StreamMeter, or `_Inflating` around one."""

    client_chunked: bool

    def feed_wire(self, data: bytes) -> bytes | None: ...
    def wire_close(self) -> None: ...
    @property
    def wire_done(self) -> bool: ...
    @property
    def wire_excess(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a base URL connects: scheme, host, port, and the path prefix requests go under."""

    tls: bool
    host: str
    port: int
    host_header: str
    prefix: str

    @property
    def key(self) -> tuple[bool, str, int]:
        return (self.tls, self.host, self.port)


@lru_cache(maxsize=1024)
def origin_of(base_url: str) -> Origin:
    """Parses a deployment's base URL once (cached): `http(s)://host[:port][/prefix]`."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {base_url!r}")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if port == (443 if tls else 80) else f"{shown}:{port}"
    return Origin(tls, host, port, host_header, parts.path.rstrip("/"))


def request_head(method: str, origin: Origin, path: str, headers: Mapping[str, str]) -> bytes:
    """A request line and header block for `origin` (no Content-Length, no closing blank line)."""
    line = f"{method} {origin.prefix}{path} HTTP/1.1\r\nhost: {origin.host_header}\r\n"
    return line.encode("latin-1", "replace") + header_lines(headers)


def header_lines(headers: Mapping[str, str]) -> bytes:
    """`name: value` lines; UpstreamError names a header whose name or value holds a line break (it would
    inject headers)."""
    lines = []
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise UpstreamError(f"the request header {name!r} holds a line break")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines).encode("latin-1", "replace")


class _Conn(asyncio.Protocol):
    """One upstream connection; carries one response at a time."""

    __slots__ = ("client", "dead", "idle_since", "key", "response", "transport")

    def __init__(self, client: Client, key: tuple[bool, str, int]) -> None:
        self.client = client
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        self.dead = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # (uvloop's transports don't subclass asyncio's)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # nothing was asked: a server talking out of turn; don't reuse it
            self.dead = True
            if self.transport is not None:
                self.transport.abort()
            return
        response.sink(data)

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.dead = True
        response, self.response = self.response, None
        if response is not None:
            response.on_lost(exc)


class Response:
    """One upstream response: the head once `Client.send` returns, then the body, read whole or as a stream."""

    __slots__ = (
        "_ended",
        "_error",
        "_excess",
        "_feed",
        "_held",
        "_pending",
        "_plane",
        "_relay",
        "_relay_to",
        "_waiter",
        "body",
        "client",
        "closed_by_us",
        "conn",
        "framing",
        "head_buf",
        "head_future",
        "headers",
        "keep_alive",
        "last_read",
        "length",
        "loop",
        "on_head",
        "received",
        "sink",
        "status",
        "time",
    )

    def __init__(self, client: Client, conn: _Conn) -> None:
        self.client = client
        self.conn = conn
        self.loop = client.loop
        self.time = client.loop.time
        self.status = 0
        self.headers: CIMultiDictProxy[str] = _EMPTY_HEADERS
        self.framing = "close"
        self.length = 0
        self.keep_alive = False
        self.head_buf = b""
        self.head_future: asyncio.Future[None] = self.loop.create_future()
        self.sink: Callable[[bytes], None] = self._head
        self.received = False  # any byte of this response arrived (a reused connection that died before: retried)
        self.last_read = self.time()  # when the last upstream read arrived (the watchdog's idle clock)
        self.closed_by_us = False
        self._pending: list[bytes] = []  # body reads (or meter output) not yet consumed
        self._feed: _WireFeed | None = None
        self.body: BodyDecoder | None = None
        self._ended = False  # the body is complete, or the connection is gone
        self._error: UpstreamError | None = None
        self._excess = False
        self._waiter: asyncio.Future[None] | None = None
        self._plane: DataPlane | None = None
        self._relay: Relay | None = None  # the data plane relays the rest of the body (see `pump`)
        self._relay_to: asyncio.Transport | None = None  # to the client's transport
        # Called in the callback that completes the head (see `send`); while `_held` is set, the head future waits
        # until it returns True (or the body ends or breaks, or `stop_holding()`).
        self.on_head: Callable[[Response], bool] | None = None
        self._held: Callable[[], bool] | None = None

    # --- the head ----------------------------------------------------------------------------------------------

    def _head(self, data: bytes) -> None:
        self.received = True
        self.last_read = self.time()
        buf = self.head_buf + data if self.head_buf else data
        try:
            head = parse_response_head(buf)
        except ValueError as exc:
            self._fail(UpstreamError(f"malformed response: {exc}"))
            return
        if head is None:
            self.head_buf = buf
            return
        self.head_buf = b""
        self.status, _reason, _minor, fields, size, self.framing, self.length, self.keep_alive = head
        headers: CIMultiDict[str] = CIMultiDict(fields)
        self.headers = CIMultiDictProxy(headers)
        self.sink = self._early
        if self.framing == "empty" or (self.framing == "length" and self.length == 0):
            self._resolve_head()
            self._end()
            return
        if size < len(buf):
            self._pending.append(buf[size:])
        on_head = self.on_head
        self.on_head = None
        if on_head is not None and on_head(self) and self._held is not None:
            return  # the caller reads on here, in the callbacks; `wake()` resolves the head future
        self._resolve_head()

    def _resolve_head(self) -> None:
        self._held = None
        if not self.head_future.done():
            self.head_future.set_result(None)

    def hold(self, ready: Callable[[], bool] | None) -> None:
        """From `on_head`: `send()` returns only once `ready()` is true after a read (or the body ended or broke,
        or `stop_holding()` was called): the reads until then go through the sink chosen in `on_head`, with no
        wake-up of the caller for each. `None` cancels the hold."""
        self._held = ready

    def stop_holding(self) -> None:
        """Ends a hold: `send()` returns now."""
        if self._held is not None:
            self._resolve_head()

    def _early(self, data: bytes) -> None:
        """Body bytes before the caller chose how to read them."""
        self.last_read = self.time()
        self._pending.append(data)

    # --- the end of a response ---------------------------------------------------------------------------------

    def _end(self) -> None:
        """The body is complete: the connection goes back to the pool if it can carry another request."""
        if self._ended:
            return
        self._ended = True
        self.client._finished(self.conn.key)
        self.sink = _ignore  # the sinks are bound methods and closures of self: no cycle left for the GC
        conn = self.conn
        if conn.response is self:
            conn.response = None
            if self.keep_alive and not self._excess and not conn.dead:
                self.client._release(conn)
            elif conn.transport is not None:
                conn.transport.close()
        self.wake()

    def _fail(self, error: UpstreamError) -> None:
        if self._ended:
            return
        self._cancel_relay()  # (every early end passes here: `close`, the watchdog, a break)
        self._error = error
        self._ended = True
        self.client._finished(self.conn.key)
        self.sink = _ignore
        conn = self.conn
        if conn.response is self:
            conn.response = None
        conn.dead = True
        if conn.transport is not None:
            conn.transport.abort()
        if self._held is not None:
            self._resolve_head()  # the head itself was whole: `take()` raises the error, after what came before it
        elif not self.head_future.done():
            self.head_future.set_exception(error)
            self.head_future.exception()  # retrieved here: a caller that gave up must not log it
        self.wake()

    def on_lost(self, exc: Exception | None) -> None:
        """The connection closed while this response was on it."""
        if self._ended:
            return
        self._cancel_relay()  # (before the meter is touched here)
        if self.closed_by_us:
            self._fail(UpstreamError("the connection was closed"))
            return
        if self.head_future.done():
            feed = self._feed
            try:
                if feed is not None:
                    feed.wire_close()
                elif self.body is not None:
                    self.body.close()
                elif self.framing != "close":
                    raise ValueError("the connection closed before the body was complete")
            except ValueError as error:
                detail = f": {exc}" if exc is not None else ""
                self._fail(UpstreamError(f"{error}{detail}"))
                return
            self.keep_alive = False
            self._end()
            return
        detail = f" ({exc})" if exc is not None else ""
        self._fail(UpstreamError(f"the upstream closed the connection before answering{detail}"))

    def wake(self) -> None:
        """Wakes a `wait()` in progress (it returns True; nothing may have arrived), or, during a hold, `send()` if
        the hold is over."""
        held = self._held
        if held is not None:
            if self._ended or held():
                self._resolve_head()
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, limit_s: float | None) -> bool:
        """Waits for `wake`; False when `limit_s` passed first."""
        waiter = self._waiter = self.loop.create_future()
        timer = self.loop.call_later(limit_s, _resolve, waiter) if limit_s is not None else None
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
        return waiter.result() is not _TIMED_OUT

    # --- ways to read the body ---------------------------------------------------------------------------------

    @property
    def ended(self) -> bool:
        """The body is complete or broken (and all of it was consumed)."""
        return self._ended and not self._pending

    def close(self) -> None:
        """Drops the connection (the upstream stops generating); a read in progress ends with UpstreamError."""
        if self._ended:
            return
        self.closed_by_us = True
        transport = self.conn.transport
        if transport is not None:
            transport.abort()  # connection_lost follows, now or on the next loop iteration
        self._fail(UpstreamError("the connection was closed"))

    def read_at(self) -> float:
        """When the last upstream read arrived (the watchdog's idle clock), the data plane's reads included."""
        relay = self._relay
        return relay.last_read if relay is not None else self.last_read

    def relay_buffered(self) -> int:
        """Bytes the data plane holds for a client that reads slowly (0 unless it relays this response)."""
        relay = self._relay
        return relay.buffered if relay is not None else 0

    def _cancel_relay(self) -> None:
        """Takes the rest of the stream back from the data plane: nothing more is relayed, and what it had metered
        but not yet written to the client goes out through the client's transport, ahead of anything else."""
        relay = self._relay
        if relay is not None and self._plane is not None:
            self._handed_back(relay, self._plane.cancel(relay))

    def _handed_back(self, relay: Relay, rest: bytes) -> bool:
        """The relay is over (ended or cancelled): its clock becomes the response's, and the bytes it had not
        written go out first. False if the client's transport is closed (they could not)."""
        self._relay = None
        self.last_read = relay.last_read
        client = self._relay_to
        if not rest or client is None:
            return True
        if client.is_closing():
            return False
        try:
            client.write(rest)
        except (RuntimeError, OSError):
            return False
        return True

    def release(self) -> None:
        """Done with the response: an unfinished body closes the connection (it cannot carry another request)."""
        if not self._ended:
            self.close()

    async def read(self) -> bytes:
        """The whole body, decoded (framing, gzip/deflate). Raises UpstreamError."""
        body = self.body = BodyDecoder(self.framing, self.length)
        chunks: list[bytes] = []
        self._replay(self._collect_into(chunks), body.close)
        while not self._ended:
            await self._wait(None)
        if self._error is not None:
            raise self._error
        if not body.done:
            raise UpstreamError("the body ended early")
        data = b"".join(chunks)
        encoding = self.headers.get("content-encoding", "").strip().lower()
        if encoding and encoding != "identity":
            try:
                return _inflate_all(data, encoding)
            except (zlib.error, ValueError) as exc:
                raise UpstreamError(f"could not decode the {encoding} body: {exc}") from exc
        return data

    def _collect_into(self, chunks: list[bytes]) -> Callable[[bytes], None]:
        body = self.body
        assert body is not None

        def collect(data: bytes) -> None:
            self.last_read = self.time()
            try:
                chunks.append(body.decode(data))
            except ValueError as exc:
                self._fail(UpstreamError(str(exc)))
                return
            if body.done:
                self._excess = body.excess
                self._end()

        return collect

    def start_stream(self, meter: StreamMeter) -> None:
        """Reads the body as a stream through `meter` (which decodes its framing): `wait()` and `take()`, then
        `pump()`."""
        encoding = self.headers.get("content-encoding", "").strip().lower()
        feed: _WireFeed
        if encoding and encoding != "identity":
            feed = _Inflating(meter, self.framing, self.length, encoding)
        else:
            meter.frame(self.framing, self.length)
            feed = meter
        feed.client_chunked = False
        self._feed = feed
        self._replay(self._pull, feed.wire_close)

    def _replay(self, sink: Callable[[bytes], None], close: Callable[[], None]) -> None:
        """Reads the body through `sink` from now on, starting with the bytes that came before the caller chose
        how to read them. If the connection had already closed, the decoder is finished as `on_lost` would have
        finished it (a body read to the close is complete then)."""
        pending, self._pending = self._pending, []
        ended = self._ended
        self.sink = sink
        for data in pending:
            sink(data)
        if ended:
            self.sink = _ignore
            if self._error is None:
                try:
                    close()
                except ValueError as exc:
                    self._error = UpstreamError(str(exc))

    def _pull(self, data: bytes) -> None:
        self.last_read = self.time()
        feed = self._feed
        assert feed is not None
        try:
            out = feed.feed_wire(data)
        except (ValueError, zlib.error) as exc:
            self._fail(UpstreamError(f"malformed stream: {exc}"))
            return
        self._pending.append(data if out is None else out)
        if feed.wire_done:
            self._excess = feed.wire_excess
            self._end()
        else:
            self.wake()

    def take(self) -> bytes:
        """What the meter made of the reads so far (unframed; `b""` if nothing came). Raises UpstreamError once the
        stream broke and everything before the break was taken."""
        if self._pending:
            pending, self._pending = self._pending, []
            return pending[0] if len(pending) == 1 else b"".join(pending)
        if self._error is not None:
            raise self._error
        return b""

    async def wait(self, limit_s: float | None) -> bool:
        """Waits up to `limit_s` (None: no limit) for a read to `take()` or for the end; False on timeout."""
        if self._pending or self._ended:
            return True
        return await self._wait(limit_s)

    async def pump(self, writer: Any, client: asyncio.Transport) -> None:
        """Relays the rest of the stream to the client, from the upstream's `data_received`: returns at the end
        of the body; raises UpstreamError if it broke, ConnectionError if the client went away.

        `writer` is the client response's stream writer (`StreamResponse.prepare()`'s result): the pump frames
        its writes as that writer does (chunked or not) and waits on its drain when the client reads slowly."""
        feed = self._feed
        assert feed is not None
        while self._pending:  # made in pull mode (unframed): the writer frames it (more may come while it drains)
            pending, self._pending = self._pending, []
            await writer.write(b"".join(pending))
        if self._ended:
            if self._error is not None:
                raise self._error
            return
        writer.send_headers()  # (if nothing was written yet) the pump writes past aiohttp's buffered head
        feed.client_chunked = bool(writer.chunked)
        high = client.get_write_buffer_limits()[1]
        upstream = self.conn.transport
        assert upstream is not None
        plane = self.client.plane
        if plane is not None and isinstance(feed, StreamMeter):
            fds = self._plain_fds(upstream, client)
            if fds is not None and await self._relay_in(plane, feed, fds, client, high):
                return
        paused = False
        gone: list[BaseException] = []
        pump: Pump | None = None
        as_protocol: asyncio.BaseProtocol | None = None  # the pump, as the transport sees it (a duck-typed protocol)

        def on_event(kind: int, arg: Any) -> None:
            nonlocal paused
            if kind == PUMP_PAUSED:
                if paused:
                    return
                paused = True
                upstream.pause_reading()
                self.wake()
                return
            if as_protocol is not None:
                upstream.set_protocol(self.conn)  # (before `_end()` can put the connection back in the pool)
            if kind == PUMP_END:
                self._excess = bool(arg)
                self._end()
            elif kind == PUMP_MALFORMED:
                self._fail(UpstreamError(f"malformed stream: {arg}"))
            else:
                gone.append(arg)
                self.close()

        if isinstance(feed, StreamMeter):
            # The reads go from the event loop to Rust and on to the client: the connection's protocol is the
            # pump until the body ends (see `Pump`).
            pump = Pump(
                feed,
                self,
                self.time,
                client.write,
                client.get_write_buffer_size,
                high,
                self.conn,
                on_event,
            )
            as_protocol = cast(asyncio.BaseProtocol, pump)
            upstream.set_protocol(as_protocol)
        else:
            self.sink = self._push(feed, client, high, on_event)
        try:
            while not self._ended:
                await self._wait(None)
                if paused and not self._ended:
                    await writer.drain()
                    paused = False
                    if pump is not None:
                        pump.resume()
                    if not self._ended:
                        upstream.resume_reading()
        finally:
            if as_protocol is not None and upstream.get_protocol() is as_protocol:
                upstream.set_protocol(self.conn)
        if gone:
            raise ConnectionResetError(f"the client went away: {gone[0]}")
        if self._error is not None:
            raise self._error

    def _plain_fds(self, upstream: asyncio.Transport, client: asyncio.Transport) -> tuple[int, int] | None:
        """The two sockets' descriptors if the data plane can relay between them: plaintext on both sides, and
        nothing of the client's response still buffered in its transport (the plane's writes would pass it)."""
        if self.conn.key[0] or client.get_write_buffer_size() or client.get_extra_info("sslcontext") is not None:
            return None
        up, down = upstream.get_extra_info("socket"), client.get_extra_info("socket")
        if up is None or down is None:
            return None
        return up.fileno(), down.fileno()

    async def _relay_in(
        self, plane: DataPlane, meter: StreamMeter, fds: tuple[int, int], client: asyncio.Transport, high: int
    ) -> bool:
        """`pump()` by the data plane: the event loop waits for the end of the relay, and nothing else. False if
        the plane could not take the stream (no descriptor left to duplicate): it is pumped in the loop."""
        upstream = self.conn.transport
        assert upstream is not None
        gone: list[str] = []

        def on_done(kind: int, arg: Any, rest: bytes) -> None:
            relay = self._relay
            assert relay is not None  # (a cancelled relay reports nothing)
            if not self._handed_back(relay, rest) and kind != RELAY_CLIENT_GONE:
                kind, arg = RELAY_CLIENT_GONE, "the client's connection is closed"
            if kind == RELAY_END:
                if arg:
                    upstream.resume_reading()  # (before `_end()` can put the connection back in the pool)
                else:
                    self._excess = True  # read to the close, or bytes came after the body: not reused
                self._end()
            elif kind == RELAY_MALFORMED:
                self._fail(UpstreamError(f"malformed stream: {arg}"))
            elif kind == RELAY_BROKEN:
                self._fail(UpstreamError(str(arg)))
            elif kind == RELAY_CLIENT_GONE:
                gone.append(str(arg))
                self.close()

        upstream.pause_reading()
        try:
            self._relay = plane.relay(meter, fds[0], fds[1], high, on_done)
        except OSError:
            upstream.resume_reading()
            return False
        self._plane, self._relay_to = plane, client
        try:
            while not self._ended:
                await self._wait(None)
        finally:
            self._cancel_relay()  # (the handler was cancelled: nothing more goes to the client)
        if gone:
            raise ConnectionResetError(f"the client went away: {gone[0]}")
        if self._error is not None:
            raise self._error
        return True

    def _push(
        self, feed: _WireFeed, client: asyncio.Transport, high: int, on_event: Callable[[int, Any], None]
    ) -> Callable[[bytes], None]:
        """`Pump` in Python, for a feed that is not a StreamMeter (`_Inflating`: a compressed stream); it reports
        to `on_event` as the pump does."""
        write = client.write
        buffered = client.get_write_buffer_size
        wire = feed.feed_wire
        time = self.time

        def push(data: bytes) -> None:
            self.last_read = time()
            try:
                out = wire(data)
            except (ValueError, zlib.error) as exc:
                on_event(PUMP_MALFORMED, exc)
                return
            try:
                if out is None:
                    write(data)
                elif out:
                    write(out)
            except (RuntimeError, OSError) as exc:  # the client's transport is closed
                on_event(PUMP_CLIENT_GONE, exc)
                return
            if feed.wire_done:
                on_event(PUMP_END, feed.wire_excess)
            elif buffered() > high:
                on_event(PUMP_PAUSED, None)  # (once until drained: the pump ignores it while paused)

        return push


class _Inflating:
    """`feed_wire` for a compressed stream (an upstream that gzips its events although not asked to): the
    framing is decoded in Rust, the payload inflated here, then metered and framed for the client."""

    def __init__(self, meter: StreamMeter, framing: str, length: int, encoding: str) -> None:
        if encoding not in ("gzip", "x-gzip", "deflate"):
            raise UpstreamError(f"unsupported content-encoding {encoding!r}")
        self.meter = meter
        self.body = BodyDecoder(framing, length)
        self.inflate = zlib.decompressobj(47 if encoding != "deflate" else 15)
        self.client_chunked = False

    def feed_wire(self, data: bytes) -> bytes | None:
        payload = self.inflate.decompress(self.body.decode(data))
        out = self.meter.feed(payload)
        if out is None:
            out = payload
        if self.client_chunked and out:
            return b"%x\r\n%b\r\n" % (len(out), out)
        return out

    def wire_close(self) -> None:
        self.body.close()

    @property
    def wire_done(self) -> bool:
        return bool(self.body.done)

    @property
    def wire_excess(self) -> bool:
        return bool(self.body.excess)


def _inflate_all(data: bytes, encoding: str) -> bytes:
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompress(data, 47)
    if encoding == "deflate":
        try:
            return zlib.decompress(data)
        except zlib.error:
            return zlib.decompress(data, -15)  # raw deflate, as some servers send it
    raise ValueError("unsupported content-encoding")


def _ignore(data: bytes) -> None:
    """The sink of a response that has ended (its connection no longer feeds it)."""


_TIMED_OUT = object()
_EMPTY_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


def _resolve(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_result(_TIMED_OUT)


class Client:
    """Keep-alive connections per origin, reused last-in first-out; no cap on connections."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tls: bool = False) -> None:
        self.loop = loop
        self.idle: dict[tuple[bool, str, int], list[_Conn]] = {}
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if tls else None
        self._dns: dict[tuple[str, int], tuple[float, list[Any]]] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self.closed = False
        # Relays committed plaintext streams off the event loop (see `Response.pump`); None: all in the loop.
        self.plane: DataPlane | None = None
        self._busy: dict[tuple[bool, str, int], int] = {}  # responses in progress per origin
        self._warming: set[tuple[bool, str, int]] = set()  # origins with a spare connection being made
        self._tasks: set[asyncio.Task[None]] = set()

    async def request(
        self,
        method: str,
        base_url: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
        *,
        connect_timeout: float,
    ) -> Response:
        """Sends the request and waits for the response head (see `send`)."""
        origin = origin_of(base_url)
        return await self.send(
            origin,
            request_head(method, origin, path, headers),
            body,
            connect_timeout=connect_timeout,
            sized=bool(body) or method == "POST",
        )

    async def send(
        self,
        origin: Origin,
        head: bytes,
        body: bytes,
        *,
        connect_timeout: float,
        sized: bool = True,
        on_head: Callable[[Response], bool] | None = None,
    ) -> Response:
        """Sends a request whose head (`request_head()`: request line and headers, without Content-Length and
        the blank line) is already built, and waits for the response head. Raises ConnectError, ConnectTimeout
        or UpstreamError. A reused connection that closes before any byte of the answer is retried once on a
        new one (the server closed it while idle).

        `on_head(response)` is called in the upstream's callback that completes the head (not for an empty
        body); it may start reading there (`start_stream`) and `hold()` the head until the body has something
        worth a wake-up: then `send()` returns once, not at the head and again at the first read."""
        raw = head + (b"content-length: %d\r\n\r\n" % len(body) if sized else b"\r\n")
        key = origin.key
        for attempt in (0, 1):
            conn, reused = self._idle_conn(key)
            if conn is None:
                conn = await self._connect(origin, connect_timeout)
            if self._busy.get(key) and not self.idle.get(key):
                self._warm(origin, connect_timeout)  # a burst: the next request should not wait for a handshake
            response = Response(self, conn)
            response.on_head = on_head
            conn.response = response
            self._busy[key] = self._busy.get(key, 0) + 1
            transport = conn.transport
            assert transport is not None
            if len(body) < _COALESCE_BODY:
                transport.write(raw + body)
            else:
                transport.writelines((raw, body))
            try:
                await response.head_future
            except UpstreamError:
                if reused and attempt == 0 and not response.received and not response.closed_by_us:
                    continue
                raise
            except BaseException:
                response.close()
                raise
            return response
        raise AssertionError("unreachable")

    def _finished(self, key: tuple[bool, str, int]) -> None:
        """A response on a connection to `key` ended (see `_busy`)."""
        left = self._busy.get(key, 0) - 1
        if left > 0:
            self._busy[key] = left
        else:
            self._busy.pop(key, None)

    def _warm(self, origin: Origin, limit_s: float) -> None:
        """Opens one spare connection to `origin` in the background, for the next request (at most one at a time
        per origin). Called when a request found no idle connection left while others to the same origin are in
        flight — a burst of new streams — so each of the burst's next requests finds a connection ready instead of
        waiting for a TCP (and TLS) handshake before its first token. What is left when the burst ends idles out
        like any connection (KEEPALIVE_S)."""
        key = origin.key
        if key in self._warming or self.closed:
            return
        self._warming.add(key)
        task = self.loop.create_task(self._preconnect(origin, limit_s))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _preconnect(self, origin: Origin, limit_s: float) -> None:
        try:
            conn = await self._connect(origin, limit_s)
        except UpstreamError:
            return  # (the next request connects itself, and reports what fails)
        finally:
            self._warming.discard(origin.key)
        if self.closed:
            if conn.transport is not None:
                conn.transport.close()
            return
        self._release(conn)

    def _idle_conn(self, key: tuple[bool, str, int]) -> tuple[_Conn | None, bool]:
        idle = self.idle.get(key)
        if not idle:
            return None, False
        oldest = self.loop.time() - KEEPALIVE_S
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if conn.dead or transport is None or transport.is_closing():
                continue
            if conn.idle_since < oldest:
                transport.close()
                continue
            return conn, True
        return None, False

    def _release(self, conn: _Conn) -> None:
        idle = self.idle.setdefault(conn.key, [])
        if self.closed or len(idle) >= MAX_IDLE_PER_ORIGIN:
            if conn.transport is not None:
                conn.transport.close()
            return
        conn.idle_since = self.loop.time()
        idle.append(conn)
        if self._sweep is None:
            self._sweep = self.loop.call_later(KEEPALIVE_S, self._expire)

    def _expire(self) -> None:
        """Closes connections idle longer than KEEPALIVE_S; runs while any connection is idle."""
        self._sweep = None
        oldest = self.loop.time() - KEEPALIVE_S
        left = 0
        for key, idle in list(self.idle.items()):
            keep = []
            for conn in idle:
                if conn.dead or conn.transport is None or conn.transport.is_closing():
                    continue
                if conn.idle_since < oldest:
                    conn.transport.close()
                else:
                    keep.append(conn)
            if keep:
                self.idle[key] = keep
                left += len(keep)
            else:
                del self.idle[key]
        if left:
            self._sweep = self.loop.call_later(KEEPALIVE_S / 2, self._expire)

    async def _connect(self, origin: Origin, limit_s: float) -> _Conn:
        ssl_context: ssl.SSLContext | None = None
        if origin.tls:
            if self._ssl is None:
                self._ssl = await asyncio.to_thread(ssl.create_default_context)
            ssl_context = self._ssl
        try:
            async with asyncio.timeout(limit_s):
                addresses = await self._resolve(origin.host, origin.port)
                last: OSError | None = None
                for family, _type, proto, _, address in addresses:
                    try:
                        transport, conn = await self.loop.create_connection(
                            lambda: _Conn(self, origin.key),
                            host=address[0],
                            port=address[1],
                            family=family,
                            proto=proto,
                            ssl=ssl_context,
                            server_hostname=origin.host if ssl_context is not None else None,
                        )
                        conn.transport = transport  # (uvloop may call connection_made only after this returns)
                        return conn
                    except OSError as exc:
                        last = exc
                raise ConnectError(f"cannot connect to {origin.host}:{origin.port}: {last}")
        except TimeoutError:
            raise ConnectTimeout(f"no connection to {origin.host}:{origin.port} within {limit_s:g} s") from None
        except OSError as exc:  # includes socket.gaierror and ssl.SSLError
            raise ConnectError(f"cannot connect to {origin.host}:{origin.port}: {exc}") from exc

    async def _resolve(self, host: str, port: int) -> list[Any]:
        now = self.loop.time()
        cached = self._dns.get((host, port))
        if cached is not None and cached[0] > now:
            return cached[1]
        infos = await self.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        if not infos:
            raise ConnectError(f"{host} has no address")
        self._dns[host, port] = (now + DNS_TTL_S, list(infos))
        return list(infos)

    async def close(self) -> None:
        """Closes every idle connection (responses in flight close with their handlers)."""
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for task in list(self._tasks):
            task.cancel()
        if self.plane is not None:
            self.plane.close()
        for idle in self.idle.values():
            for conn in idle:
                if conn.transport is not None:
                    conn.transport.close()
        self.idle.clear()
