"""The upstream HTTP/1.1 client (tokenrelay.h1client) against raw loopback servers, and StreamMeter.feed_wire.

The relay's own behaviour through this client is covered end to end by test_relay, test_hostile_upstream and
test_routing; here: connection reuse, a keep-alive connection the server closed while idle, header injection,
and the wire feed's framing (what reaches the client must decode to the upstream's payload, whatever the split).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenrelay._core import BodyDecoder, StreamMeter
from tokenrelay.h1client import Client, ConnectError, Response, UpstreamError, origin_of, request_head
from tokenrelay.plane import DataPlane

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[tuple[str, list[int]]]:
    """A loopback server running `handler` per connection; yields its base URL and a connection counter."""
    connections = [0]

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections[0] += 1
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1", connections
    finally:
        srv.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)


def answer_once(raw: bytes) -> Handler:
    """A handler that answers one request with `raw`, then hangs up."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(raw)
        await writer.drain()

    return handler


def answer_in_two(first: bytes, then: bytes, gap_s: float) -> Handler:
    """A handler that answers one request with `first`, then `gap_s` later with `then` (a read of its own), and
    keeps the connection open."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(first)
        await writer.drain()
        await asyncio.sleep(gap_s)
        writer.write(then)
        await writer.drain()
        await reader.read()

    return handler


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


async def test_keep_alive_connection_is_reused() -> None:
    heads: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, body = await read_request(reader)
            heads.append(head)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
            await writer.drain()

    async with server(handler) as (url, connections):
        client = Client(asyncio.get_running_loop())
        for i in range(3):
            resp = await client.request("POST", url, "/echo", {"x-n": str(i)}, b'{"n": %d}' % i, connect_timeout=5)
            assert resp.status == 200
            assert await resp.read() == b'{"n": %d}' % i
            resp.release()
        await client.close()
    assert connections[0] == 1
    assert heads[0].startswith(b"POST /v1/echo HTTP/1.1\r\nhost: 127.0.0.1:")
    assert b"x-n: 2\r\n" in heads[2]


async def test_a_burst_of_streams_finds_a_connection_ready() -> None:
    # Each stream stays open until the test ends; with one in flight, a request that finds no idle connection
    # leaves a spare made in the background, so the next one does not wait for a handshake.
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError):
            while True:
                await read_request(reader)
                writer.write(SSE_HEAD + chunk(ROLE))
                await writer.drain()
                await release.wait()
                writer.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
                await writer.drain()

    async with server(handler) as (url, connections):
        client = Client(asyncio.get_running_loop())
        key = origin_of(url).key
        first = await client.request("POST", url, "/s", {}, b"{}", connect_timeout=5)
        await asyncio.sleep(0.05)
        assert connections[0] == 1 and not client.idle.get(key)  # alone: no spare
        second = await client.request("POST", url, "/s", {}, b"{}", connect_timeout=5)
        await asyncio.sleep(0.05)
        assert connections[0] == 3 and len(client.idle[key]) == 1  # its own, and a spare
        spare = client.idle[key][0]
        third = await client.request("POST", url, "/s", {}, b"{}", connect_timeout=5)
        assert third.conn is spare  # no handshake on its way
        await asyncio.sleep(0.05)
        assert connections[0] == 4 and len(client.idle[key]) == 1  # and the next spare is ready
        release.set()
        for resp in (first, second, third):
            resp.release()
        await client.close()


async def test_connection_closed_while_idle_is_retried_on_a_new_one() -> None:
    # no Connection: close, yet the server hangs up after one answer (as servers do on their idle timeout)
    async with server(answer_once(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")) as (url, connections):
        client = Client(asyncio.get_running_loop())
        for _ in range(2):
            resp = await client.request("POST", url, "/x", {}, b"{}", connect_timeout=5)
            assert await resp.read() == b"ok"
            await asyncio.sleep(0.05)  # the close reaches the idle connection
        await client.close()
    assert connections[0] == 2


async def test_stale_connection_that_dies_on_use_is_retried() -> None:
    """The server's close crosses the next request on the wire: answered on a new connection, not an error."""
    served = [0]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            served[0] += 1
            if served[0] == 2:
                return  # close without answering: the first request on a reused connection
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async with server(handler) as (url, connections):
        client = Client(asyncio.get_running_loop())
        for _ in range(2):
            resp = await client.request("POST", url, "/x", {}, b"{}", connect_timeout=5)
            assert await resp.read() == b"ok"
        await client.close()
    assert connections[0] == 2


async def test_connection_close_and_http10_are_not_reused() -> None:
    answers = [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\na",
        b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nb",
    ]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answers.pop(0))
        await writer.drain()
        await reader.read()  # keep the connection open: only the client may decide not to reuse it

    async with server(handler) as (url, connections):
        client = Client(asyncio.get_running_loop())
        for expected in (b"a", b"b"):
            resp = await client.request("POST", url, "/x", {}, b"{}", connect_timeout=5)
            assert await resp.read() == expected
        await client.close()
    assert connections[0] == 2


async def test_a_body_read_to_the_close_that_closed_before_it_was_read() -> None:
    """HTTP/1.0 without a length: the body ends with the connection, which may close before the caller reads
    the body (head, body and FIN in one go). That is a complete body, whole or streamed."""
    answer = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + b'data: {"x": 1}\n\n'
    async with server(answer_once(answer)) as (url, _):
        client = Client(asyncio.get_running_loop())
        resp = await client.request("POST", url, "/x", {}, b"{}", connect_timeout=5)
        await asyncio.sleep(0.05)  # the close arrives first
        assert await resp.read() == b'data: {"x": 1}\n\n'
        resp = await client.request("POST", url, "/x", {}, b"{}", connect_timeout=5)
        await asyncio.sleep(0.05)
        meter = StreamMeter("chat")
        resp.start_stream(meter)
        assert resp.take() == b'data: {"x": 1}\n\n'
        assert resp.ended and meter.wire_done and meter.events == 1
        await client.close()


async def test_garbage_and_early_close_are_upstream_errors() -> None:
    async with server(answer_once(b"SSH-2.0-OpenSSH\r\n\r\n")) as (url, _):
        client = Client(asyncio.get_running_loop())
        with pytest.raises(UpstreamError, match="malformed response"):
            await client.request("POST", url, "/x", {}, b"{}", connect_timeout=5)

    async with server(answer_once(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")) as (url, _):
        resp = await client.request("POST", url, "/x", {}, b"{}", connect_timeout=5)
        with pytest.raises(UpstreamError, match="before the body was complete"):
            await resp.read()
        await client.close()


async def test_unreachable_is_a_connect_error() -> None:
    async with server(read_request) as (url, _):
        pass  # closed: nothing listens on that port any more
    client = Client(asyncio.get_running_loop())
    with pytest.raises(ConnectError):
        await client.request("POST", url, "/x", {}, b"{}", connect_timeout=5)


async def test_header_line_breaks_are_refused() -> None:
    client = Client(asyncio.get_running_loop())
    for value in ("a\r\nx-injected: 1", "a\nb", "a\rb"):
        with pytest.raises(UpstreamError, match="line break"):
            await client.request("POST", "http://127.0.0.1:9/v1", "/x", {"x": value}, b"", connect_timeout=1)


async def test_gzip_answer_is_inflated() -> None:
    import gzip

    payload = b'{"ok": true}' * 100

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        body = gzip.compress(payload)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(chunk(body[:10]) + chunk(body[10:]) + b"0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with server(handler) as (url, _):
        client = Client(asyncio.get_running_loop())
        resp = await client.request("POST", url, "/x", {}, b"{}", connect_timeout=5)
        assert await resp.read() == payload
        await client.close()


ROLE = b'data: {"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
CONTENT = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def holding(meters: list[StreamMeter]) -> Callable[[Response], bool]:
    """An `on_head` that meters the stream in the callbacks and holds `send()` until content (as the relay's)."""

    def on_head(response: Response) -> bool:
        meter = StreamMeter("chat", "gpt-4o")
        meters.append(meter)
        response.hold(lambda: meter.content_started or meter.done)
        response.start_stream(meter)
        return True

    return on_head


async def send_held(client: Client, url: str, on_head: Callable[[Response], bool]) -> Response:
    origin = origin_of(url)
    return await client.send(origin, request_head("POST", origin, "/x", {}), b"{}", connect_timeout=5, on_head=on_head)


async def test_a_held_head_returns_once_content_arrives() -> None:
    """`send(on_head=...)` returns at the first content, not at the head: the reads before it (the head, a role
    event) are metered in the callbacks, and all of it is there to `take()`."""
    gap_s = 0.3

    handler = answer_in_two(SSE_HEAD + chunk(ROLE), chunk(CONTENT) + b"0\r\n\r\n", gap_s)
    async with server(handler) as (url, _):
        loop = asyncio.get_running_loop()
        client = Client(loop)
        meters: list[StreamMeter] = []
        started = loop.time()
        resp = await send_held(client, url, holding(meters))
        assert loop.time() - started >= gap_s * 0.9  # not woken at the head
        assert meters and meters[0].content_started
        assert resp.take() == ROLE + CONTENT
        await client.close()


async def test_a_break_during_the_hold_is_raised_by_take_after_what_came_before() -> None:
    handler = answer_in_two(SSE_HEAD + chunk(ROLE), b"zz\r\n", 0.1)  # then a broken chunk size
    async with server(handler) as (url, _):
        client = Client(asyncio.get_running_loop())
        resp = await send_held(client, url, holding([]))
        assert resp.status == 200
        assert resp.take() == ROLE
        with pytest.raises(UpstreamError, match="malformed"):
            resp.take()
        await client.close()


async def test_stop_holding_releases_a_held_head() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(SSE_HEAD + chunk(ROLE))  # and nothing more: a long thinking phase
        await writer.drain()
        await reader.read()

    async with server(handler) as (url, _):
        loop = asyncio.get_running_loop()
        client = Client(loop)
        held: list[Response] = []

        def on_head(response: Response) -> bool:
            held.append(response)
            return holding([])(response)

        loop.call_later(0.2, lambda: held[0].stop_holding())
        resp = await asyncio.wait_for(send_held(client, url, on_head), timeout=5)
        assert resp.take() == ROLE and not resp.ended
        resp.close()
        await client.close()


# --- pump(): the rest of a stream, from the upstream's callbacks to the client -----------------------------


class _Writer:
    """What pump() needs of the client response's writer (aiohttp's StreamWriter): chunked framing."""

    chunked = True

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    async def write(self, data: bytes) -> None:
        self.transport.write(chunk(data))

    def send_headers(self) -> None:
        pass

    async def drain(self) -> None:
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def client_sink() -> AsyncIterator[tuple[asyncio.Transport, bytearray]]:
    """A real client connection: the transport pump() writes to, and what the client received through it."""
    received = bytearray()
    done = asyncio.Event()

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            received.extend(data)
        done.set()
        writer.close()

    srv = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(asyncio.Protocol, *srv.sockets[0].getsockname()[:2])
    try:
        yield transport, received
    finally:
        transport.close()
        await asyncio.wait_for(done.wait(), 5)
        srv.close()


def new_client(data_plane: bool) -> Client:
    client = Client(asyncio.get_running_loop())
    if data_plane:
        client.plane = DataPlane(asyncio.get_running_loop())
    return client


async def pump_two_streams_over_one_connection(data_plane: bool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            await read_request(reader)
            writer.write(SSE_HEAD + chunk(ROLE) + chunk(CONTENT))
            for _ in range(3):  # each in a read of its own, after send() returned: through the pump
                await writer.drain()
                await asyncio.sleep(0.02)
                writer.write(chunk(CONTENT))
            writer.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await writer.drain()
        await reader.read()

    async with server(handler) as (url, connections), client_sink() as (transport, received):
        client = new_client(data_plane)
        meters: list[StreamMeter] = []
        for i in range(2):
            resp = await send_held(client, url, holding(meters))
            await _Writer(transport).write(resp.take())
            await resp.pump(_Writer(transport), transport)
            assert resp.ended
            assert meters[i].events == 6 and meters[i].done
            assert resp.conn.transport is not None
            assert resp.conn.transport.get_protocol() is resp.conn  # the pump handed the connection back
        if data_plane:
            assert client.plane is not None and client.plane.relays == 2 and client.plane.in_flight == 0
        await client.close()
        await asyncio.sleep(0.05)
    assert connections[0] == 1  # reused after each stream
    assert unchunk(bytes(received)) == (ROLE + CONTENT * 4 + b"data: [DONE]\n\n") * 2


@pytest.mark.parametrize("data_plane", [False, True], ids=["pump", "data-plane"])
async def test_pump_relays_every_read_and_hands_the_connection_back(data_plane: bool) -> None:
    await pump_two_streams_over_one_connection(data_plane)


@pytest.mark.parametrize("data_plane", [False, True], ids=["pump", "data-plane"])
def test_pump_relays_every_read_and_hands_the_connection_back_on_uvloop(data_plane: bool) -> None:
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(pump_two_streams_over_one_connection(data_plane))


@pytest.mark.parametrize("data_plane", [False, True], ids=["pump", "data-plane"])
async def test_a_break_in_the_pump_is_an_upstream_error_and_the_connection_is_dropped(data_plane: bool) -> None:
    # a good chunk, then a broken chunk size, after send() returned: through the pump
    handler = answer_in_two(SSE_HEAD + chunk(ROLE) + chunk(CONTENT), chunk(CONTENT) + b"zz\r\n", 0.05)
    async with server(handler) as (url, _), client_sink() as (transport, received):
        client = new_client(data_plane)
        resp = await send_held(client, url, holding([]))
        await _Writer(transport).write(resp.take())
        with pytest.raises(UpstreamError, match="malformed"):
            await asyncio.wait_for(resp.pump(_Writer(transport), transport), 5)
        assert resp.conn.dead
        await client.close()
    assert bytes(received).startswith(chunk(ROLE + CONTENT))


async def test_the_data_plane_reports_an_upstream_that_closes_mid_stream() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(SSE_HEAD + chunk(ROLE) + chunk(CONTENT))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(chunk(CONTENT))  # then the connection closes (the handler returns) inside the body

    async with server(handler) as (url, _), client_sink() as (transport, received):
        client = new_client(True)
        resp = await send_held(client, url, holding([]))
        await _Writer(transport).write(resp.take())
        with pytest.raises(UpstreamError, match="closed before the body was complete"):
            await asyncio.wait_for(resp.pump(_Writer(transport), transport), 5)
        assert resp.conn.dead
        await client.close()
        await asyncio.sleep(0.05)
    assert unchunk(bytes(received)) == ROLE + CONTENT * 2  # everything before the break reached the client


async def test_a_stream_the_plane_cannot_take_is_pumped_in_the_loop() -> None:
    handler = answer_in_two(
        SSE_HEAD + chunk(ROLE) + chunk(CONTENT), chunk(CONTENT) + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n", 0.05
    )
    async with server(handler) as (url, _), client_sink() as (transport, received):
        client = new_client(True)
        assert client.plane is not None

        def no_descriptors(*args: object) -> None:
            raise OSError(24, "Too many open files")

        client.plane.relay = no_descriptors  # type: ignore[method-assign,assignment]
        meters: list[StreamMeter] = []
        resp = await send_held(client, url, holding(meters))
        await _Writer(transport).write(resp.take())
        await asyncio.wait_for(resp.pump(_Writer(transport), transport), 5)
        assert resp.ended and meters[0].done
        await client.close()
        await asyncio.sleep(0.05)
    assert unchunk(bytes(received)) == ROLE + CONTENT * 2 + b"data: [DONE]\n\n"


async def test_a_cancelled_relay_writes_nothing_more_and_drops_the_upstream() -> None:
    upstream_closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(SSE_HEAD + chunk(ROLE) + chunk(CONTENT))
        try:
            while True:  # an endless stream, one event every 10 ms, until the proxy drops the connection
                await writer.drain()
                await asyncio.sleep(0.01)
                writer.write(chunk(CONTENT))
        except ConnectionError:
            pass
        finally:
            upstream_closed.set()

    async with server(handler) as (url, _), client_sink() as (transport, received):
        client = new_client(True)
        meters: list[StreamMeter] = []
        resp = await send_held(client, url, holding(meters))
        await _Writer(transport).write(resp.take())
        pumping = asyncio.ensure_future(resp.pump(_Writer(transport), transport))
        await asyncio.sleep(0.15)
        assert not pumping.done() and meters[0].events > 5  # the data plane relays and meters
        pumping.cancel()  # as aiohttp cancels a handler whose client went away
        with pytest.raises(asyncio.CancelledError):
            await pumping
        events = meters[0].events
        resp.close()
        await asyncio.wait_for(upstream_closed.wait(), 5)
        await asyncio.sleep(0.05)  # (what was written before the cancel has reached the client)
        size = len(received)
        await asyncio.sleep(0.1)
        assert (meters[0].events, len(received)) == (events, size)  # nothing after the cancel
        assert client.plane is not None and client.plane.in_flight == 0
        await client.close()


# --- StreamMeter.feed_wire: the framing of what the client receives ---------------------------------------


def chat_events(n: int) -> list[bytes]:
    events = [
        b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"t%d "}}]}\n\n' % i
        for i in range(n)
    ]
    usage = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":%d}}\n\n' % n
    return [*events, usage, b"data: [DONE]\n\n"]


def relay_through(meter: StreamMeter, wire: bytes, cuts: list[int], chunked_client: bool) -> tuple[bytes, int]:
    """Feeds `wire` split at `cuts`; the bytes a client would get (framing included) and how many reads went out
    unchanged."""
    meter.client_chunked = chunked_client
    out = []
    as_is = 0
    bounds = sorted({c % (len(wire) + 1) for c in cuts} | {len(wire)})
    start = 0
    for end in bounds:
        part = wire[start:end]
        start = end
        if not part:
            continue
        got = meter.feed_wire(part)
        if got is None:
            as_is += 1
            out.append(part)
        else:
            out.append(got)
    return b"".join(out), as_is


def unchunk(data: bytes) -> bytes:
    decoder = BodyDecoder("chunked")
    payload = decoder.decode(data + b"0\r\n\r\n")
    assert decoder.done
    return payload


def test_whole_chunks_go_out_as_they_came() -> None:
    events = chat_events(3)
    meter = StreamMeter("chat")
    meter.frame("chunked")
    meter.client_chunked = True
    reads = [chunk(e) for e in events[:-1]]
    for read in reads:
        assert meter.feed_wire(read) is None  # forwarded without a copy
    last = meter.feed_wire(chunk(events[-1]) + b"0\r\n\r\n")
    assert last == chunk(events[-1])  # the last chunk is the client's framing to write
    assert meter.wire_done and meter.done and meter.content_started


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 12),
    sizes=st.lists(st.integers(1, 400), min_size=1, max_size=8),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
    strip=st.booleans(),
    chunked_client=st.booleans(),
)
def test_any_split_reaches_the_client_intact(
    n: int, sizes: list[int], cuts: list[int], strip: bool, chunked_client: bool
) -> None:
    events = chat_events(n)
    body = b"".join(events)
    pieces, i, k = [], 0, 0
    while i < len(body):
        size = sizes[k % len(sizes)]
        pieces.append(body[i : i + size])
        i, k = i + size, k + 1
    wire = b"".join(chunk(p) for p in pieces) + b"0\r\n\r\n"
    meter = StreamMeter("chat", strip_usage=strip)
    meter.frame("chunked")
    got, _ = relay_through(meter, wire, cuts, chunked_client)
    rest = meter.flush()  # held back by strip mode: written by aiohttp's writer, which frames it
    got += chunk(rest) if chunked_client and rest else rest
    payload = unchunk(got) if chunked_client else got
    expected = body if not strip else b"".join(e for e in events if b'"usage"' not in e)
    assert payload == expected
    assert meter.wire_done and meter.done
    assert meter.finish().output == n


def test_length_and_close_framing_are_framed_for_a_chunked_client() -> None:
    body = b"".join(chat_events(2))
    meter = StreamMeter("chat")
    meter.frame("length", len(body) - 5)  # a short Content-Length: the rest is not this response's
    got, as_is = relay_through(meter, body, [40], chunked_client=True)
    assert as_is == 0 and unchunk(got) == body[:-5]
    assert meter.wire_done and meter.wire_excess
    meter = StreamMeter("chat")
    meter.frame("close")
    got, as_is = relay_through(meter, body, [40], chunked_client=False)
    assert got == body and as_is == 2  # unframed in, unframed out: no copy
    assert not meter.wire_done
    meter.wire_close()
    assert meter.wire_done


def test_malformed_framing_and_early_close() -> None:
    meter = StreamMeter("chat")
    meter.frame("chunked")
    with pytest.raises(ValueError, match="chunk"):
        meter.feed_wire(b"zz\r\n")
    meter = StreamMeter("chat")
    meter.frame("chunked")
    meter.feed_wire(b"5\r\nda")
    with pytest.raises(ValueError, match="before the body was complete"):
        meter.wire_close()
    with pytest.raises(ValueError, match="framing"):
        StreamMeter("chat").frame("sideways")
