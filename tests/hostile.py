"""A hostile upstream: a raw-asyncio HTTP server on loopback that misbehaves on purpose, for tests.

The first path segment picks the misbehaviour: a deployment with `base_url = "http://127.0.0.1:PORT/gzip"`
gets a gzip-encoded stream for every request. It runs its own event loop on a thread, so a test (sync or async)
can start it in-process; `connections` and `requests` count what reached it (an SSRF canary wants zero).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import socket
import ssl
import struct
import threading
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

TEN_MB = 10 * 1024 * 1024


def chat_event(content: str | bytes, **extra: object) -> bytes:
    """One OpenAI chat chunk as an SSE event. `content` as bytes is spliced in raw (e.g. invalid UTF-8)."""
    marker = "\u0000CONTENT\u0000"
    chunk = {
        "id": "chatcmpl-hostile",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": marker}, "finish_reason": None}],
        **extra,
    }
    text = json.dumps(chunk).encode()
    raw = content if isinstance(content, bytes) else json.dumps(content)[1:-1].encode()
    return b"data: " + text.replace(json.dumps(marker)[1:-1].encode(), raw) + b"\n\n"


def chat_tail(output_tokens: int) -> bytes:
    """A finish chunk, a usage chunk and [DONE]."""
    finish = {
        "id": "chatcmpl-hostile",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
    }
    usage = {
        "id": "chatcmpl-hostile",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [],
        "usage": {"prompt_tokens": 7, "completion_tokens": output_tokens, "total_tokens": 7 + output_tokens},
    }
    return (
        b"data: " + json.dumps(finish).encode() + b"\n\n" + b"data: " + json.dumps(usage).encode() + b"\n\n"
        b"data: [DONE]\n\n"
    )


def good_stream(tokens: int = 3) -> bytes:
    return b"".join(chat_event(f"tok{i} ") for i in range(tokens)) + chat_tail(tokens)


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


@dataclass
class HostileUpstream:
    """The server. `start()` binds 127.0.0.1:0 and returns self; `stop()` ends every handler."""

    port: int = 0
    tls: ssl.SSLContext | None = None  # serve HTTPS with this context
    connections: int = 0
    requests: list[Request] = field(default_factory=list)
    disconnects: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def url(self, mode: str) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/{mode}"

    def start(self) -> HostileUpstream:
        ready = threading.Event()

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            serving = asyncio.start_server(self._on_connection, "127.0.0.1", 0, ssl=self.tls)
            self._server = loop.run_until_complete(serving)
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self._server.close()
            loop.run_until_complete(self._server.wait_closed())
            loop.close()

        self._thread = threading.Thread(target=run, name="hostile-upstream", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        self.connections += 1
        try:
            request = await _read_request(reader)
            if request is None:
                return
            self.requests.append(request)
            mode = request.target.lstrip("/").split("/", 1)[0]
            behaviour = BEHAVIOURS.get(mode, _ok)
            await behaviour(request, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            self.disconnects += 1
        finally:
            self._tasks.discard(task)  # type: ignore[arg-type]
            with contextlib.suppress(Exception):
                writer.close()


async def _read_request(reader: asyncio.StreamReader) -> Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = [*lines[0].split(" ", 2), "", ""][:3]
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Request(method, target, headers, body)


# --- behaviours ---------------------------------------------------------------------------------------------

Behaviour = Callable[[Request, asyncio.StreamWriter], Awaitable[None]]


def _head(status: str = "200 OK", content_type: str = "text/event-stream", *extra: str, version: str = "1.1") -> bytes:
    # Connection: close, as the server closes after each answer (a pooled connection would be reset).
    lines = [f"HTTP/{version} {status}", f"Content-Type: {content_type}", "Connection: close", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def _send_chunked(writer: asyncio.StreamWriter, parts: list[bytes], head: bytes | None = None) -> None:
    writer.write(head or _head("200 OK", "text/event-stream", "Transfer-Encoding: chunked"))
    for part in parts:
        writer.write(_chunk(part))
        await writer.drain()
    writer.write(b"0\r\n\r\n")
    await writer.drain()


async def _ok(request: Request, writer: asyncio.StreamWriter) -> None:
    await _send_chunked(writer, [good_stream()])


async def _bad_utf8(request: Request, writer: asyncio.StreamWriter) -> None:
    await _send_chunked(
        writer, [chat_event("ok "), chat_event(b"\xff\xfe\xc3( broken"), chat_event(" end"), chat_tail(3)]
    )


def _huge_event(size: int) -> bytes:
    return chat_event("x" * size)


async def _huge(request: Request, writer: asyncio.StreamWriter) -> None:
    big = _huge_event(TEN_MB)
    parts = [chat_event("first ")] + [big[i : i + 256 * 1024] for i in range(0, len(big), 256 * 1024)]
    await _send_chunked(writer, [*parts, chat_tail(3)])


async def _oversized(request: Request, writer: asyncio.StreamWriter) -> None:
    big = _huge_event(20 * 1024 * 1024)  # over the parser's 16 MiB limit for one event
    parts = [chat_event("first ")] + [big[i : i + 256 * 1024] for i in range(0, len(big), 256 * 1024)]
    await _send_chunked(writer, [*parts, chat_event(" after"), chat_tail(3)])


async def _endless(request: Request, writer: asyncio.StreamWriter) -> None:
    writer.write(_head("200 OK", "text/event-stream", "Transfer-Encoding: chunked"))
    i = 0
    while True:
        writer.write(_chunk(chat_event(f"t{i} ")))
        await writer.drain()
        i += 1
        await asyncio.sleep(0.01)


async def _stall(request: Request, writer: asyncio.StreamWriter) -> None:
    """Six content events 150 ms apart (each a read of its own, after the proxy committed), then nothing."""
    writer.write(_head("200 OK", "text/event-stream", "Transfer-Encoding: chunked"))
    for i in range(6):
        writer.write(_chunk(chat_event(f"s{i} ")))
        await writer.drain()
        await asyncio.sleep(0.15)
    await asyncio.sleep(3600)


async def _firehose(request: Request, writer: asyncio.StreamWriter) -> None:
    """As fast as the socket takes it: 64 KiB events, forever."""
    event = chat_event("y" * 65536)
    writer.write(_head("200 OK", "text/event-stream", "Transfer-Encoding: chunked"))
    while True:
        writer.write(_chunk(event))
        await writer.drain()


async def _text_plain(request: Request, writer: asyncio.StreamWriter) -> None:
    body = good_stream()
    writer.write(_head("200 OK", "text/plain", f"Content-Length: {len(body)}") + body)
    await writer.drain()


async def _html_200(request: Request, writer: asyncio.StreamWriter) -> None:
    body = b"<html><body><h1>502 Bad Gateway</h1><p>nginx</p></body></html>"
    writer.write(_head("200 OK", "text/html", f"Content-Length: {len(body)}") + body)
    await writer.drain()


async def _http10(request: Request, writer: asyncio.StreamWriter) -> None:
    writer.write(_head("200 OK", "text/event-stream", version="1.0"))
    for event in [chat_event("old "), chat_event("school"), chat_tail(2)]:
        writer.write(event)
        await writer.drain()
    # the body ends when the connection closes


async def _gzip(request: Request, writer: asyncio.StreamWriter) -> None:
    compressor = zlib.compressobj(wbits=31)  # gzip container
    parts = [compressor.compress(chat_event(f"zip{i} ")) + compressor.flush(zlib.Z_SYNC_FLUSH) for i in range(3)]
    parts.append(compressor.compress(chat_tail(3)) + compressor.flush())
    head = _head("200 OK", "text/event-stream", "Content-Encoding: gzip", "Transfer-Encoding: chunked")
    await _send_chunked(writer, parts, head)


async def _bad_gzip(request: Request, writer: asyncio.StreamWriter) -> None:
    good = gzip.compress(chat_event("zip "))
    head = _head("200 OK", "text/event-stream", "Content-Encoding: gzip", "Transfer-Encoding: chunked")
    await _send_chunked(writer, [good[:20], b"\x00not gzip at all" * 10], head)


async def _garbage(request: Request, writer: asyncio.StreamWriter) -> None:
    writer.write(b"\x16\x03\x01 SSH-2.0-OpenSSH_9 lorem ipsum \xff\xfe\r\n\r\n")
    await writer.drain()


async def _silence(request: Request, writer: asyncio.StreamWriter) -> None:
    writer.write(_head("200 OK", "text/event-stream", "Transfer-Encoding: chunked"))
    await writer.drain()
    await asyncio.sleep(3600)


async def _reset(request: Request, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/ev")
    await writer.drain()
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
    writer.transport.abort()


def _echo_body(request: Request) -> bytes:
    seen = request.headers.get("authorization") or request.headers.get("x-api-key", "")
    message = f"Incorrect API key provided: {seen}. Headers: {json.dumps(request.headers)}"
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "code": "bad_key"}}).encode()


async def _echo_401(request: Request, writer: asyncio.StreamWriter) -> None:
    body = _echo_body(request)
    writer.write(_head("401 Unauthorized", "application/json", f"Content-Length: {len(body)}") + body)
    await writer.drain()


async def _echo_400(request: Request, writer: asyncio.StreamWriter) -> None:
    body = _echo_body(request)
    writer.write(_head("400 Bad Request", "application/json", f"Content-Length: {len(body)}") + body)
    await writer.drain()


async def _echo_in_stream(request: Request, writer: asyncio.StreamWriter) -> None:
    seen = request.headers.get("authorization", "")
    error = {"error": {"message": f"key {seen} was rejected", "type": "invalid_request_error"}}
    await _send_chunked(writer, [b"data: " + json.dumps(error).encode() + b"\n\n"])


BEHAVIOURS: dict[str, Behaviour] = {
    "ok": _ok,
    "badutf8": _bad_utf8,
    "huge": _huge,
    "oversized": _oversized,
    "endless": _endless,
    "stall": _stall,
    "firehose": _firehose,
    "textplain": _text_plain,
    "html200": _html_200,
    "http10": _http10,
    "gzip": _gzip,
    "badgzip": _bad_gzip,
    "garbage": _garbage,
    "silence": _silence,
    "reset": _reset,
    "echo401": _echo_401,
    "echo400": _echo_400,
    "echostream": _echo_in_stream,
}
