"""The relay as an agent sees it: the official openai SDK pointed at a real tokenrelay process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp
import openai
import pytest

from tests.conftest import Daemon, MockUpstream, free_port, route_config


def expected_text(tokens: int, words_per_delta: int = 1) -> str:
    from tokenrelay.mock import Behaviour, MockProvider

    return "".join(MockProvider()._text(Behaviour(tokens=tokens, words_per_delta=words_per_delta)))


@pytest.fixture
def relay(mock_upstream: MockUpstream, daemon_factory: Callable[..., Daemon]) -> Daemon:
    return daemon_factory(route_config("fast", mock_upstream))


def client(d: Daemon, key: str = "agent-key-1") -> openai.OpenAI:
    return openai.OpenAI(base_url=d.base_url, api_key=key, max_retries=0)


def aclient(d: Daemon, key: str = "agent-key-1") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=d.base_url, api_key=key, max_retries=0)


MESSAGES = [{"role": "user", "content": "Say something about foxes."}]


def test_non_streaming_chat_content_and_usage(relay: Daemon, mock_upstream: MockUpstream) -> None:
    answer = client(relay).chat.completions.create(model="fast", messages=MESSAGES)  # type: ignore[arg-type]
    assert answer.choices[0].message.content == expected_text(24)
    assert answer.usage is not None and answer.usage.completion_tokens == 24
    seen = mock_upstream.stats()["last_request"]
    # The upstream got the deployment's model and key, never the client's.
    assert seen["body"]["model"] == "upstream-model"
    assert seen["headers"]["Authorization"] == "Bearer sk-upstream-secret-123"
    assert "agent-key-1" not in str(seen["headers"])


def test_streaming_chat_sync_with_usage(relay: Daemon) -> None:
    stream = client(relay).chat.completions.create(
        model="fast",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},  # type: ignore[arg-type]
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_text(24)
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0].usage.completion_tokens == 24  # type: ignore[union-attr]
    assert chunks[-1].choices == []


async def test_streaming_chat_async(relay: Daemon) -> None:
    stream = await aclient(relay).chat.completions.create(
        model="fast",
        messages=MESSAGES,
        stream=True,  # type: ignore[arg-type]
    )
    text = ""
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    assert text == expected_text(24)


def test_hidden_usage_is_requested_metered_and_removed(relay: Daemon, mock_upstream: MockUpstream) -> None:
    stream = client(relay).chat.completions.create(
        model="fast",
        messages=MESSAGES,
        stream=True,  # type: ignore[arg-type]
    )
    chunks = list(stream)
    # The client did not ask for usage, so it sees no usage chunk ...
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    # ... but the proxy asked the upstream for it and metered it as reported.
    assert mock_upstream.stats()["last_request"]["body"]["stream_options"] == {"include_usage": True}
    record = relay.wait_records(1)[-1]
    assert record["usage"]["output"] == 24
    assert record["usage"]["output_source"] == "reported"


async def test_stream_bytes_identical_to_direct(relay: Daemon, mock_upstream: MockUpstream) -> None:
    body = {
        "model": "upstream-model",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
        "mock": {"fixed_ids": True},
    }
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{mock_upstream.openai_base}/chat/completions", json=body) as r:
            direct = await r.read()
        async with session.post(f"{relay.base_url}/chat/completions", json={**body, "model": "fast"}) as r:
            assert r.status == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["x-tokenrelay-deployment"] == "d0"
            proxied = await r.read()
    assert proxied == direct
    assert direct.count(b"data: ") == 24 + 4


def test_completions_and_embeddings(relay: Daemon) -> None:
    c = client(relay)
    completion = c.completions.create(model="fast", prompt="Once upon a time")
    assert completion.choices[0].text == expected_text(24)
    streamed = "".join(
        ch.choices[0].text
        for ch in c.completions.create(model="fast", prompt="Once upon a time", stream=True)
        if ch.choices
    )
    assert streamed == expected_text(24)
    embedding = c.embeddings.create(model="fast", input=["a b c", "d e"])
    assert len(embedding.data) == 2 and embedding.usage.prompt_tokens > 0


def test_models_lists_routes(relay: Daemon) -> None:
    ids = {m.id for m in client(relay).models.list()}
    assert {"fast", "mock", "mock-anthropic"} <= ids


async def test_malformed_json_is_400_in_openai_shape(relay: Daemon) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{relay.base_url}/chat/completions",
            data=b"{not json",
            headers={"content-type": "application/json"},
        ) as r,
    ):
        assert r.status == 400
        payload = await r.json()
    assert payload["error"]["type"] == "invalid_request_error"
    assert "not valid JSON" in payload["error"]["message"]


def test_unknown_route_is_404_listing_routes(relay: Daemon) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client(relay).chat.completions.create(model="nope", messages=MESSAGES)  # type: ignore[arg-type]
    message = info.value.body["message"]  # type: ignore[index]
    assert "nope" in message and "fast" in message and "mock" in message
    assert info.value.code == "model_not_found"


def test_missing_model_is_400(relay: Daemon) -> None:
    with pytest.raises(openai.BadRequestError):
        client(relay).chat.completions.create(model="", messages=MESSAGES)  # type: ignore[arg-type]


def test_upstream_error_status_and_body_pass_through(relay: Daemon, mock_upstream: MockUpstream) -> None:
    mock_upstream.control(fail_status=400)
    with pytest.raises(openai.BadRequestError) as info:
        client(relay).chat.completions.create(model="fast", messages=MESSAGES)  # type: ignore[arg-type]
    assert info.value.status_code == 400
    assert "mock failure" in str(info.value)


def test_upstream_unreachable_is_502(daemon_factory: Callable[..., Daemon]) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    d = daemon_factory(f"""
        [routes.dead]
        [[routes.dead.deployments]]
        base_url = "{dead}"
        model = "m"
        """)
    with pytest.raises(openai.APIStatusError) as info:
        client(d).chat.completions.create(model="dead", messages=MESSAGES)  # type: ignore[arg-type]
    assert info.value.status_code == 502
    assert "unreachable" in str(info.value)


def test_upstream_timeout_is_504(mock_upstream: MockUpstream, daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(route_config("slow", mock_upstream, extra="timeouts = {first_token = 0.5}"))
    mock_upstream.control(first_token_ms=5000)
    start = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        client(d).chat.completions.create(model="slow", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    assert info.value.status_code == 504
    assert time.monotonic() - start < 4


def test_request_body_limit_is_413(mock_upstream: MockUpstream, daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory("max_body_bytes = 10000\n" + route_config("fast", mock_upstream))
    with pytest.raises(openai.APIStatusError) as info:
        client(d).chat.completions.create(
            model="fast",
            messages=[{"role": "user", "content": "x" * 20000}],  # type: ignore[list-item]
        )
    assert info.value.status_code == 413


async def test_client_disconnect_closes_upstream(
    mock_factory: Callable[..., MockUpstream], daemon_factory: Callable[..., Daemon]
) -> None:
    slow = mock_factory(delay_ms=200, tokens=100)
    d = daemon_factory(route_config("slow", slow))
    reader, writer = await asyncio.open_connection("127.0.0.1", int(d.url.rsplit(":", 1)[1]))
    body = b'{"model":"slow","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    await writer.drain()
    got = await reader.read(4096)
    assert b"200 OK" in got
    writer.transport.abort()  # the agent is killed mid-stream
    closed_at = time.monotonic()
    while slow.stats()["disconnected"] == 0:
        assert time.monotonic() - closed_at < 1.0, "the upstream did not see the connection close within 1 s"
        await asyncio.sleep(0.02)
    records = d.wait_records(1)
    assert records[-1]["error_class"] == "client_disconnect"


async def test_200_concurrent_streams_complete(
    mock_factory: Callable[..., MockUpstream], daemon_factory: Callable[..., Daemon]
) -> None:
    upstream = mock_factory(delay_ms=5, tokens=16)
    d = daemon_factory(route_config("fast", upstream))
    c = aclient(d)

    async def one() -> str:
        stream = await c.chat.completions.create(model="fast", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
        return "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])

    texts = await asyncio.gather(*(one() for _ in range(200)))
    assert texts == [expected_text(16)] * 200
    assert upstream.stats()["completed"] == 200
    await c.close()


def test_builtin_mock_route_needs_no_config(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(None)
    stream = client(d).chat.completions.create(model="mock", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected_text(24)


def test_no_socket_leak_after_many_requests(relay: Daemon) -> None:
    c = client(relay)
    for _ in range(30):
        c.chat.completions.create(model="fast", messages=MESSAGES, stream=False)  # type: ignore[arg-type]
    health = relay.get("/healthz")
    assert health["status"] == "ok" and health["in_flight"] == 0
