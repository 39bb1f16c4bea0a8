"""No SSRF, no key leaks: nothing in a request moves where tokenrelay connects (a canary listener sees zero
connections), and the upstream key never shows up in a response, an error, an admin endpoint or the log, even
when a provider echoes the credentials it was sent."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Daemon, start_daemon
from tests.hostile import HostileUpstream
from tests.test_hostile_upstream import hostile_config

KEY = "sk-upstream-secret-123"
CLIENT_KEY = "agent-secret-456"


@pytest.fixture(scope="module")
def upstream() -> Iterator[HostileUpstream]:
    server = HostileUpstream().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def canary() -> Iterator[HostileUpstream]:
    server = HostileUpstream().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def relay(upstream: HostileUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp: Path = tmp_path_factory.mktemp("ssrf")
    config = hostile_config(upstream, ("ok", "echo401", "echo400", "echostream"), "{connect = 2}")
    config += f"""
[routes."pt/*"]
[[routes."pt/*".deployments]]
base_url = "{upstream.url("ok")}"
model = "*"
api_key_env = "TEST_UPSTREAM_KEY"
"""
    d = start_daemon(tmp, config, env={"TEST_UPSTREAM_KEY": KEY})
    yield d
    d.stop()


async def raw(d: Daemon, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
    writer.write(request)
    await writer.drain()
    async with asyncio.timeout(10):
        data = await reader.read()
    writer.close()
    return data


def raw_post(target: str, body: dict[str, Any], extra: str = "") -> bytes:
    data = json.dumps(body).encode()
    head = (
        f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {CLIENT_KEY}\r\nContent-Length: {len(data)}\r\nConnection: close\r\n{extra}\r\n"
    )
    return head.encode() + data


async def test_nothing_in_a_request_changes_where_tokenrelay_connects(
    relay: Daemon, upstream: HostileUpstream, canary: HostileUpstream
) -> None:
    evil = f"http://127.0.0.1:{canary.port}"
    messages = [{"role": "user", "content": "hi"}]
    ok = {"model": "h-ok", "messages": messages}
    attempts: list[bytes] = [
        raw_post("/v1/chat/completions", {"model": evil + "/v1", "messages": messages}),
        raw_post("/v1/chat/completions", {"model": f"pt/{evil}/v1", "messages": messages}),
        raw_post("/v1/chat/completions", {"model": "pt/../../../x", "messages": messages}),
        raw_post(
            "/v1/chat/completions",
            {**ok, "base_url": evil, "api_base": evil, "url": evil, "extra_headers": {"host": evil}},
        ),
        raw_post(f"/v1/chat/completions?base_url={evil}&api-version=1&host={evil}", ok),
        raw_post(f"{evil}/v1/chat/completions", ok),  # absolute-URI request target
        raw_post(
            "/v1/chat/completions",
            ok,
            f"X-Forwarded-Host: 127.0.0.1:{canary.port}\r\nX-Forwarded-Proto: http\r\n"
            f"Forwarded: host=127.0.0.1:{canary.port}\r\nX-Original-URL: {evil}/v1\r\nX-Rewrite-URL: {evil}/v1\r\n"
            f"X-Real-IP: 127.0.0.1\r\nOpenAI-Base-URL: {evil}\r\n",
        ),
        raw_post("/v1/chat/completions", ok).replace(b"Host: 127.0.0.1", f"Host: 127.0.0.1:{canary.port}".encode()),
        raw_post("/v1/../v1/chat/completions", ok),
        raw_post("/v1/chat/completions/../../_mock/openai/v1/chat/completions", ok),
        raw_post("/run/..%2F..%2F/v1/chat/completions", ok),
        raw_post("/run/%2e%2e/v1/chat/completions", ok),
        raw_post(f"/run/http:%2F%2F127.0.0.1:{canary.port}/v1/chat/completions", ok),
        raw_post(f"/run/@127.0.0.1:{canary.port}/v1/chat/completions", ok),
        raw_post("/run/a%0d%0aHost:%20evil/v1/chat/completions", ok),
    ]
    before = len(upstream.requests)
    for request in attempts:
        answer = await raw(relay, request)
        status = int(answer.split(b" ", 2)[1])
        assert status in (200, 400, 404), answer[:300]
        assert KEY.encode() not in answer
    assert canary.connections == 0, "a request field reached the canary"
    seen = upstream.requests[before:]
    assert seen, "the legitimate upstream was used"
    for request in seen:
        assert request.target == "/ok/chat/completions"
        assert request.headers["host"] == f"127.0.0.1:{upstream.port}"
        assert request.headers["authorization"] == f"Bearer {KEY}"  # the deployment's key ...
        assert CLIENT_KEY not in json.dumps(request.headers)  # ... never the client's


def leaked(data: bytes | str) -> bool:
    return KEY in (data if isinstance(data, str) else data.decode("utf-8", "replace"))


async def test_upstream_key_never_leaks_even_when_echoed(relay: Daemon, upstream: HostileUpstream) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as session:
        # An echo in an error status, either way, and an in-band error event before any content (a stream).
        cases = [
            (route, status, stream)
            for route, status in (("h-echo401", 401), ("h-echo400", 400))
            for stream in (False, True)
        ]
        cases.append(("h-echostream", 502, True))
        for route, status, stream in cases:
            async with session.post(
                f"{relay.base_url}/chat/completions",
                json={**body, "model": route, "stream": stream},
                headers={"authorization": f"Bearer {CLIENT_KEY}"},
            ) as r:
                data = await r.read()
                assert r.status == status, (route, data)
                assert not leaked(data) and not leaked(json.dumps(dict(r.headers)))
                assert b"[redacted]" in data  # the echo was there, and was scrubbed
        for path in ("/v1/routes", "/admin/routes", "/healthz", "/v1/models"):
            async with session.get(f"{relay.url}{path}") as r:
                assert r.status == 200 and not leaked(await r.read())
    # The upstream really received (and echoed) the key: the scrubbing above is what kept it out.
    assert any(r.headers.get("authorization") == f"Bearer {KEY}" for r in upstream.requests)
    records = relay.wait_records(6)
    assert {r["route"] for r in records} >= {"h-echo401", "h-echo400", "h-echostream"}
    assert not leaked(relay.log_path.read_text())
