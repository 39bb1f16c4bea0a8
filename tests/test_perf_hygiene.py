"""Per-request hygiene of the relay, in process: nothing a finished request used stays alive after it."""

from __future__ import annotations

import gc
import sqlite3
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from tokenrelay import h1client, relay
from tokenrelay._core import decode_body
from tokenrelay.app import build_app
from tokenrelay.config import parse_config
from tokenrelay.ledger import REQUEST_COLUMNS, Ledger
from tokenrelay.metering import Metering, Outcome


async def _upstream() -> TestServer:
    async def answer(request: web.Request) -> web.Response:
        await request.read()
        body = (
            b'{"id":"x","object":"chat.completion","model":"m","choices":[{"index":0,"message":'
            b'{"role":"assistant","content":"hi"},"finish_reason":"stop"}],'
            b'"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}'
        )
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    server = TestServer(app)
    await server.start_server()
    return server


def _live(kind: type) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is kind)


async def _relay_client(tmp_path: Path, upstream: TestServer) -> TestClient[web.Request, web.Application]:
    """The daemon's app in process, with one route `r` to `upstream`."""
    config = parse_config(
        {
            "log_level": "warning",
            "db": str(tmp_path / "u.db"),
            "routes": {
                "r": {"deployments": [{"kind": "openai", "base_url": str(upstream.make_url("/v1")), "model": "m"}]}
            },
        }
    )
    client = TestClient(TestServer(build_app(config)))
    await client.start_server()
    return client


async def test_finished_non_streaming_requests_leave_no_watchdog_alive(tmp_path: Path) -> None:
    upstream = await _upstream()
    client = await _relay_client(tmp_path, upstream)
    try:
        before = _live(relay._Watchdog)
        for _ in range(20):
            response = await client.post("/v1/chat/completions", json={"model": "r", "messages": []})
            assert response.status == 200
            assert (await response.json())["choices"][0]["message"]["content"] == "hi"
        # Each request's watchdog timer (first-token deadline: minutes away) must be cancelled once the answer is
        # complete; an armed timer would keep the watchdog and the upstream response alive until it fires.
        assert _live(relay._Watchdog) == before
    finally:
        await client.close()
        await upstream.close()


async def _stream_upstream() -> TestServer:
    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for i in range(3):
            await response.write(b'data: {"choices":[{"index":0,"delta":{"content":"t%d "}}]}\n\n' % i)
        usage = b'{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":3,"total_tokens":6}}'
        await response.write(b"data: " + usage + b"\n\ndata: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    server = TestServer(app)
    await server.start_server()
    return server


async def test_finished_streams_are_freed_without_the_cyclic_gc(tmp_path: Path) -> None:
    """A finished stream's upstream response (and what it holds: the client's transport, the meter, the head) is
    freed by reference counting alone. A cycle through its read callbacks once left every stream's objects to the
    cyclic GC, whose passes then took up to ~10 ms with the loop stopped."""
    upstream = await _stream_upstream()
    client = await _relay_client(tmp_path, upstream)
    gc.collect()
    gc.disable()
    try:
        before = sum(1 for o in gc.get_objects() if type(o) is h1client.Response)
        for _ in range(20):
            response = await client.post("/v1/chat/completions", json={"model": "r", "messages": [], "stream": True})
            assert response.status == 200
            assert (await response.read()).endswith(b"data: [DONE]\n\n")
        alive = sum(1 for o in gc.get_objects() if type(o) is h1client.Response)
        assert alive <= before + 1, f"{alive - before} finished upstream responses left for the cyclic GC"
    finally:
        gc.enable()
        await client.close()
        await upstream.close()


def _outcomes() -> list[Outcome]:
    answer = (
        b'{"id":"x","object":"chat.completion","model":"m","choices":[],'
        b'"usage":{"prompt_tokens":7,"completion_tokens":5,"total_tokens":12,'
        b'"prompt_tokens_details":{"cached_tokens":2},"completion_tokens_details":{"reasoning_tokens":3}}}'
    )
    served = Outcome("req-1", 1_800_000_000.5, 1_000, "chat", "r", True, "r", run="run-1", tags="a,b", key_id="k1")
    served.deployment, served.model, served.status, served.attempts = "d0", "m", 200, 1
    served.usage = decode_body("chat", answer, "m", b'{"model":"r","messages":[]}')
    served.first_token_ns, served.ended_ns = 2_000_000, 9_000_000
    estimated = Outcome("req-2", 1_800_000_001.0, 1_000, "messages", "r", False, "r", key_name="agent")
    estimated.usage = decode_body("messages", b'{"content":[{"type":"text","text":"hello there"}]}', "m", b"{}")
    estimated.ended_ns = 5_000
    failed = Outcome("req-3", 1_800_000_002.0, 1_000, "chat", "nope", False, "nope")
    failed.fail(404, "client_4xx", "x" * 900)
    failed.ended_ns = 2_000
    return [served, estimated, failed]


def test_summary_rows_are_stored_as_the_general_row_conversion_stores_them(tmp_path: Path) -> None:
    ledger = Ledger(None, tmp_path / "u.db")
    ledger.start()
    try:
        for outcome in _outcomes():
            row = Metering.summary(outcome, 0.25 if outcome.usage is not None else None)
            ledger.log_summary(row)  # the fast path: itemgetter on the loop
            ledger.log_request(row)  # the general one: converted in the writer thread
        assert ledger.flush()
    finally:
        ledger.close()
    conn = sqlite3.connect(tmp_path / "u.db")
    rows = conn.execute(f"SELECT {', '.join(REQUEST_COLUMNS)} FROM requests ORDER BY id").fetchall()
    conn.close()
    assert len(rows) == 6
    for fast, general in zip(rows[0::2], rows[1::2], strict=True):
        assert fast == general
        assert [type(v) for v in fast] == [type(v) for v in general]
    assert rows[0][REQUEST_COLUMNS.index("cached_input")] == 2 and rows[0][REQUEST_COLUMNS.index("reasoning")] == 3
    assert rows[2][REQUEST_COLUMNS.index("output_estimated")] == 1
    assert len(rows[4][REQUEST_COLUMNS.index("error")]) == 500
