"""The daemon's own HTTP/1.1 front end (`tokenrelay.server`): the relayed API calls the SDKs make are served by
it, everything else on a connection is handed to aiohttp, and both answer on one keep-alive connection as a
client expects (order, framing, errors in the API's shape, the connection kept or closed)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import anthropic
import openai
import pytest

from tests.conftest import Daemon, MockUpstream, route_config

CHAT = {"model": "r", "messages": [{"role": "user", "content": "hello there"}]}


@pytest.fixture
def relay(daemon_factory: Callable[..., Daemon], mock_upstream: MockUpstream) -> Daemon:
    config = "max_body_bytes = 1000000\nbody_timeout_s = 2\n" + route_config("r", mock_upstream)
    for route, name, kind in (("u", "nœud-東", "openai"), ("claude", "c0", "anthropic")):
        config += f"""
[routes.{route}]
[[routes.{route}.deployments]]
name = "{name}"
kind = "{kind}"
base_url = "{mock_upstream.openai_base}"
model = "upstream-model"
api_key_env = "TEST_UPSTREAM_KEY"
"""
    return daemon_factory(config)


def post(path: str, body: dict[str, Any] | bytes, extra: str = "") -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    return (head + extra + "\r\n").encode() + data


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response off a keep-alive connection: status, headers (lower-case names), the de-framed body."""
    async with asyncio.timeout(10):
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        status_line, *lines = head.split("\r\n")[:-2]
        assert status_line.startswith("HTTP/1.1 "), status_line
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
                chunk = await reader.readexactly(size + 2)
                assert chunk.endswith(b"\r\n")
                if size == 0:
                    break
                body += chunk[:-2]
        else:
            body = await reader.readexactly(int(headers["content-length"]))
        return int(status_line.split()[1]), headers, body


async def test_sdk_calls_are_served_by_the_front_end_and_metered_once(relay: Daemon) -> None:
    handoffs = relay.metric("tokenrelay_front_end_handoffs_total")  # (this /metrics GET is one: it is aiohttp's)
    served = relay.metric("tokenrelay_front_end_requests_total")
    client = openai.AsyncOpenAI(base_url=relay.base_url, api_key="k", max_retries=0)
    listed = [m.id async for m in client.models.list()]  # (an application's first call, on the connection it reuses)
    text = ""
    async with await client.chat.completions.create(model="r", messages=CHAT["messages"], stream=True) as stream:
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
    answer = await client.chat.completions.create(model="r", messages=CHAT["messages"])
    embedded = await client.embeddings.create(model="r", input="some text")
    await client.close()
    claude = anthropic.AsyncAnthropic(base_url=relay.url, api_key="k", max_retries=0)
    message = await claude.messages.create(
        model="claude", max_tokens=64, messages=[{"role": "user", "content": "hello"}]
    )
    async with claude.messages.stream(
        model="claude", max_tokens=64, messages=[{"role": "user", "content": "hello"}]
    ) as events:
        streamed = await events.get_final_message()
    await claude.close()
    assert text and answer.choices[0].message.content and embedded.data[0].embedding
    assert message.content[0].type == "text" and streamed.content[0].type == "text"  # type: ignore[union-attr]
    assert "r" in listed and "claude" in listed
    assert relay.metric("tokenrelay_front_end_requests_total") - served == 6
    # Each /metrics GET is a connection aiohttp serves: the three after the first, and none of the SDKs' calls.
    assert relay.metric("tokenrelay_front_end_handoffs_total") - handoffs == 3
    records = relay.wait_records(5)
    assert [r["status"] for r in records] == [200] * 5 and len({r["request_id"] for r in records}) == 5


async def test_a_connection_mixes_front_end_and_aiohttp_requests_in_order(relay: Daemon) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    # Two relayed calls pipelined in one write, then a request the front end leaves to aiohttp, then another call.
    writer.write(post("/v1/chat/completions", CHAT) + post("/v1/chat/completions", {**CHAT, "model": "nope"}))
    first = await read_response(reader)
    second = await read_response(reader)
    writer.write(b"GET /v1/routes HTTP/1.1\r\nHost: x\r\n\r\n" + post("/v1/chat/completions", CHAT))
    routes = await read_response(reader)
    third = await read_response(reader)
    writer.close()
    # A deployment name beyond Latin-1 goes out in its header as UTF-8, from either front end.
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(post("/v1/chat/completions", {**CHAT, "model": "u"}))
    named = await read_response(reader)
    writer.write(post("/v1/chat/completions", {**CHAT, "model": "u", "stream": True}))
    named_stream = await read_response(reader)
    writer.close()
    assert named[1]["x-tokenrelay-deployment"] == named_stream[1]["x-tokenrelay-deployment"] == "nœud-東"
    assert first[0] == 200 and json.loads(first[2])["object"] == "chat.completion"
    assert first[1]["content-type"].startswith("application/json") and "date" in first[1]
    assert second[0] == 404 and json.loads(second[2])["error"]["code"] == "model_not_found"
    assert routes[0] == 200 and any(r["route"] == "r" for r in json.loads(routes[2])["routes"])
    assert third[0] == 200 and json.loads(third[2])["object"] == "chat.completion"
    assert [r["status"] for r in relay.wait_records(5)] == [200, 404, 200, 200, 200]


async def test_thousands_of_pipelined_calls_are_answered_in_order(relay: Daemon) -> None:
    # A client may write many requests before reading an answer (HTTP/1.1 pipelining): each is answered, in
    # order, on the one connection, however many the front end finds in one read.
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    n = 1000
    models = [f"nope-{i}" for i in range(n)]
    writer.write(b"".join(post("/v1/chat/completions", {**CHAT, "model": m}) for m in models))
    writer.write(post("/v1/chat/completions", CHAT))
    answers = [await read_response(reader) for _ in range(n + 1)]
    writer.close()
    assert [a[0] for a in answers] == [404] * n + [200]
    assert all(repr(m) in json.loads(a[2])["error"]["message"] for m, a in zip(models, answers, strict=False))
    assert relay.get("/healthz")["status"] == "ok"


async def test_a_stream_is_chunked_and_the_connection_carries_the_next_call(relay: Daemon) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(post("/run/job-7/v1/chat/completions", {**CHAT, "stream": True}))
    status, headers, body = await read_response(reader)
    writer.write(post("/v1/messages", {"model": "claude", "max_tokens": 32, "messages": CHAT["messages"]}))
    after = await read_response(reader)
    writer.close()
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert headers["x-tokenrelay-deployment"] == "d0" and "content-length" not in headers
    events = [e for e in body.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]" and len(events) > 3
    assert after[0] == 200 and json.loads(after[2])["type"] == "message"
    records = relay.wait_records(2)
    assert records[0]["run"] == "job-7" and records[0]["stream"] is True and records[0]["usage"]["output"] > 0


async def test_a_body_in_pieces_and_a_chunked_body(relay: Daemon) -> None:
    data = json.dumps(CHAT).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    request = post("/v1/chat/completions", data)
    writer.write(request[: -len(data) + 5])  # the head and 5 bytes of the body
    await asyncio.sleep(0.2)
    writer.write(request[-len(data) + 5 :])
    pieces = await read_response(reader)
    # A large body sent at once arrives in several reads before the handler first runs: it gets all of them.
    long_chat = {**CHAT, "messages": [{"role": "user", "content": "word " * 150_000}]}
    writer.write(post("/v1/chat/completions", long_chat))
    large = await read_response(reader)
    # A chunked body (no Content-Length) is aiohttp's to read: the connection is handed over, and still answers.
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    writer.write(f"{head}Transfer-Encoding: chunked\r\n\r\n{len(data):x}\r\n".encode() + data + b"\r\n0\r\n\r\n")
    chunked = await read_response(reader)
    writer.close()
    assert pieces[0] == 200 and chunked[0] == 200
    assert large[0] == 200, large[2][:200]
    assert relay.wait_records(3)[1]["usage"]["input"] > 100_000
    assert relay.metric("tokenrelay_front_end_handoffs_total") >= 2  # the chunked call, and this /metrics GET


async def test_an_oversized_body_is_413_in_the_api_shape_and_the_connection_closes(relay: Daemon) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    head = "POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5000000\r\n\r\n"
    writer.write(head.encode())

    async def upload() -> None:  # the whole body, as a client that does not look at the answer first sends it
        for _ in range(50):
            writer.write(b"{" * 100_000)
            await writer.drain()

    sending = asyncio.create_task(upload())
    status, headers, body = await read_response(reader)  # (no reset: the server reads the body it refused)
    await sending
    async with asyncio.timeout(5):
        rest = await reader.read()  # then it closes: the body it did not read cannot be framed past
    writer.close()
    error = json.loads(body)
    assert status == 413 and headers["connection"] == "close" and rest == b""
    assert error["type"] == "error" and error["error"]["type"] == "request_too_large"
    record = relay.wait_records(1)[0]
    assert record["status"] == 413 and record["api"] == "messages"


async def test_malformed_and_old_requests_get_aiohttps_answers(relay: Daemon) -> None:
    for raw in (
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http\r\n\r\n",
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(raw)
        async with asyncio.timeout(5):
            answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.") and answer[9:10] == b"4", answer[:80]
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(post("/v1/chat/completions", CHAT).replace(b"HTTP/1.1", b"HTTP/1.0", 1))
    async with asyncio.timeout(5):
        answer = await reader.read()  # HTTP/1.0 without keep-alive: answered, then closed
    writer.close()
    assert answer.startswith(b"HTTP/1.") and b" 200 " in answer.split(b"\r\n", 1)[0]
    assert relay.get("/healthz")["status"] == "ok"


def test_the_front_end_can_be_turned_off(daemon_factory: Callable[..., Daemon], mock_upstream: MockUpstream) -> None:
    d = daemon_factory(route_config("r", mock_upstream), env={"TOKENRELAY_FRONT_END": "aiohttp"})
    client = openai.OpenAI(base_url=d.base_url, api_key="k", max_retries=0)
    chunks = list(client.chat.completions.create(model="r", messages=CHAT["messages"], stream=True))
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
    with pytest.raises(AssertionError, match="no tokenrelay_front_end_requests_total"):
        d.metric("tokenrelay_front_end_requests_total")
