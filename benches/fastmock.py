"""A lean mock provider for the benchmarks: the same wire format as `tokenrelay.mock`, at a fraction of its CPU.

`python -m tokenrelay.mock` runs on aiohttp; at ~50k events/s (1024 paced streams) it saturates the core it
shares with the load generator, so the *direct* baseline itself starts to lag and the rig, not the proxy, is what
gets measured. This server is a raw uvloop protocol: it reads the request (Content-Length body), precomputes the
answer's SSE events, and writes them with chunked framing, one event per write at the configured pace, from a
timer per stream. It serves OpenAI `/v1/chat/completions` (streamed or not; `stream_options.include_usage`
honoured) and Anthropic `/v1/messages`, with keep-alive. Behaviour: command line, or `POST /_control` with a JSON
object of `tokens`, `delay_ms`, `first_token_ms`, `usage` (as `tokenrelay.mock`'s control endpoint).

`run.py --mock aiohttp` uses `tokenrelay.mock` instead, to check that both give the same picture where the
aiohttp one is not saturated.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import socket
import time
from typing import Any

import orjson

TEXT = (
    "the quick brown fox jumps over a lazy dog while agents stream tokens through a relay that meters every one of "
    "them and balances load across many deployments without dropping a byte"
)
WORDS = TEXT.split()
IDS = itertools.count(1)


class Behaviour:
    def __init__(self, tokens: int, delay_ms: float, first_token_ms: float, usage: bool) -> None:
        self.tokens = tokens
        self.delay_ms = delay_ms
        self.first_token_ms = first_token_ms
        self.usage = usage


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def openai_events(body: dict[str, Any], b: Behaviour) -> tuple[list[bytes], list[bytes], list[bytes]]:
    rid = f"chatcmpl-mock{next(IDS)}"
    base = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": str(body.get("model", "mock")),
        "system_fingerprint": "fp_mock",
    }
    include_usage = b.usage and bool((body.get("stream_options") or {}).get("include_usage"))

    def ev(delta: dict[str, Any], finish: str | None = None) -> bytes:
        data: dict[str, Any] = {
            **base,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            data["usage"] = None
        return b"data: " + orjson.dumps(data) + b"\n\n"

    n = b.tokens
    head = [ev({"role": "assistant", "content": "", "refusal": None})]
    deltas = [ev({"content": WORDS[i % len(WORDS)] + ("" if i == n - 1 else " ")}) for i in range(n)]
    tail = [ev({}, "stop")]
    if include_usage:
        usage = {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n}
        tail.append(b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
    tail.append(b"data: [DONE]\n\n")
    return head, deltas, tail


def anthropic_events(body: dict[str, Any], b: Behaviour) -> tuple[list[bytes], list[bytes], list[bytes]]:
    def ev(kind: str, data: dict[str, Any]) -> bytes:
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **data}) + b"\n\n"

    n = b.tokens
    usage = {"input_tokens": 8, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 1}
    start = {
        "id": f"msg_mock{next(IDS)}",
        "type": "message",
        "role": "assistant",
        "model": str(body.get("model", "mock")),
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage,
    }
    head = [
        ev("message_start", {"message": start}),
        ev("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        ev("ping", {}),
    ]
    deltas = [
        ev(
            "content_block_delta",
            {"index": 0, "delta": {"type": "text_delta", "text": WORDS[i % len(WORDS)] + ("" if i == n - 1 else " ")}},
        )
        for i in range(n)
    ]
    tail = [
        ev("content_block_stop", {"index": 0}),
        ev(
            "message_delta",
            {"delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": n}},
        ),
        ev("message_stop", {}),
    ]
    return head, deltas, tail


def json_answer(body: dict[str, Any], b: Behaviour, anthropic: bool) -> bytes:
    text = "".join(WORDS[i % len(WORDS)] + ("" if i == b.tokens - 1 else " ") for i in range(b.tokens))
    if anthropic:
        answer: dict[str, Any] = {
            "id": f"msg_mock{next(IDS)}",
            "type": "message",
            "role": "assistant",
            "model": str(body.get("model", "mock")),
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 8, "output_tokens": b.tokens},
        }
    else:
        answer = {
            "id": f"chatcmpl-mock{next(IDS)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": str(body.get("model", "mock")),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 8, "completion_tokens": b.tokens, "total_tokens": 8 + b.tokens},
        }
    return orjson.dumps(answer)


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
)


class Server(asyncio.Protocol):
    behaviour: Behaviour
    open_streams = 0  # streamed answers started and not yet finished (GET /_control reports it)

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.timer: asyncio.TimerHandle | None = None
        self.streaming = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.timer is not None:
            self.timer.cancel()
        if self.streaming:
            self.streaming = False
            Server.open_streams -= 1

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._next()

    def _next(self) -> None:
        buf = self.buf
        i = buf.find(b"\r\n\r\n")
        if i < 0:
            return
        head = bytes(buf[:i])
        lower = head.lower()
        j = lower.find(b"content-length:")
        length = int(lower[j + 15 : lower.find(b"\r\n", j) if lower.find(b"\r\n", j) >= 0 else None]) if j >= 0 else 0
        if len(buf) < i + 4 + length:
            return
        raw = bytes(buf[i + 4 : i + 4 + length])
        del buf[: i + 4 + length]
        method, path = head.split(b" ", 2)[:2]
        self.busy = True
        self._handle(method, path.split(b"?", 1)[0], raw)

    def _send_json(self, status: int, payload: bytes) -> None:
        reason = b"OK" if status == 200 else b"Error"
        if self.transport is not None:
            self.transport.write(
                b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: keep-alive"
                b"\r\n\r\n%s" % (status, reason, len(payload), payload)
            )
        self._done()

    def _done(self) -> None:
        if self.streaming:
            self.streaming = False
            Server.open_streams -= 1
        self.busy = False
        if self.buf:
            self._next()

    def _handle(self, method: bytes, path: bytes, raw: bytes) -> None:
        b = Server.behaviour
        if path == b"/_control":
            if method == b"POST" and raw:
                changes = orjson.loads(raw)
                for key in ("tokens", "delay_ms", "first_token_ms", "usage"):
                    if key in changes:
                        setattr(b, key, type(getattr(b, key))(changes[key]))
            self._send_json(200, orjson.dumps({**vars(b), "open_streams": Server.open_streams}))
            return
        if path.endswith(b"/models"):
            self._send_json(200, b'{"object":"list","data":[{"id":"mock-gpt","object":"model","owned_by":"mock"}]}')
            return
        anthropic = path.endswith(b"/messages")
        if not (anthropic or path.endswith(b"/chat/completions")):
            self._send_json(404, b'{"error":{"message":"not found"}}')
            return
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self._send_json(400, b'{"error":{"message":"bad json"}}')
            return
        if not body.get("stream"):
            self._send_json(200, json_answer(body, b, anthropic))
            return
        head, deltas, tail = (anthropic_events if anthropic else openai_events)(body, b)
        if self.transport is None:
            return
        self.transport.write(SSE_HEAD + chunk(b"".join(head)))
        self.streaming = True
        Server.open_streams += 1
        pending = [chunk(d) for d in deltas]
        pending.reverse()
        last = chunk(b"".join(tail)) + b"0\r\n\r\n"
        delay = b.delay_ms / 1000
        loop = asyncio.get_running_loop()

        def step() -> None:
            self.timer = None
            t = self.transport
            if t is None:
                return
            if pending:
                if delay:
                    t.write(pending.pop())
                    self.timer = loop.call_later(delay, step)
                    return
                # Unpaced: one write per event (as a real server flushes each token), 16 per loop turn so
                # concurrent streams interleave, pausing while the socket's buffer is full.
                if t.get_write_buffer_size() > 256 * 1024:
                    self.timer = loop.call_later(0.001, step)
                    return
                for _ in range(min(16, len(pending))):
                    t.write(pending.pop())
                self.timer = loop.call_later(0, step)  # type: ignore[assignment]
                return
            else:
                t.write(last)
            self._done()

        if b.first_token_ms:
            self.timer = loop.call_later(b.first_token_ms / 1000, step)
        else:
            step()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--delay-ms", type=float, default=20.0)
    p.add_argument("--first-token-ms", type=float, default=0.0)
    p.add_argument("--usage", default="true")
    args = p.parse_args(argv)
    Server.behaviour = Behaviour(args.tokens, args.delay_ms, args.first_token_ms, args.usage.lower() == "true")

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Server, args.host, args.port, backlog=8192, reuse_address=True)
        port = server.sockets[0].getsockname()[1]
        print(f"mock listening on http://{args.host}:{port}", flush=True)
        await asyncio.Event().wait()

    try:
        import uvloop

        uvloop.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
