"""Per-request hygiene of the relay, in process: nothing a finished request used stays alive after it."""

from __future__ import annotations

import gc
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from tokenrelay import relay
from tokenrelay.app import build_app
from tokenrelay.config import parse_config


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


async def test_finished_non_streaming_requests_leave_no_watchdog_alive(tmp_path: Path) -> None:
    upstream = await _upstream()
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
