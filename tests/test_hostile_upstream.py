"""Hostile upstreams: whatever bytes a provider sends, the relay relays them or ends the stream cleanly with an
error event in the API's format, stays up, never hangs past the route's timeouts, and meters the request."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Daemon, start_daemon
from tests.hostile import TEN_MB, HostileUpstream, good_stream

KEY = "sk-upstream-secret-123"
MODES = (
    "ok",
    "stall",
    "badutf8",
    "huge",
    "oversized",
    "endless",
    "textplain",
    "html200",
    "http10",
    "gzip",
    "badgzip",
    "garbage",
    "silence",
    "reset",
)


def hostile_config(hostile: HostileUpstream, modes: tuple[str, ...], timeouts: str) -> str:
    out = ""
    for mode in modes:
        out += f"""
[routes.h-{mode}]
max_attempts = 1
timeouts = {timeouts}
breaker = {{failures = 1000, min_requests = 1000}}
[[routes.h-{mode}.deployments]]
name = "{mode}"
base_url = "{hostile.url(mode)}"
model = "m"
api_key_env = "TEST_UPSTREAM_KEY"
"""
    return out


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileUpstream]:
    server = HostileUpstream().start()
    yield server
    server.stop()


def hostile_daemon(hostile: HostileUpstream, tmp_path_factory: pytest.TempPathFactory, name: str) -> Daemon:
    tmp: Path = tmp_path_factory.mktemp(name)
    timeouts = "{connect = 2, first_token = 1.5, idle = 1.5, total = 3}"
    return start_daemon(tmp, hostile_config(hostile, MODES, timeouts), env={"TEST_UPSTREAM_KEY": KEY})


@pytest.fixture(scope="module")
def relay(hostile: HostileUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = hostile_daemon(hostile, tmp_path_factory, "hostile")
    yield d
    d.stop()


async def post_stream(d: Daemon, route: str, include_usage: bool = True, limit_s: float = 15.0) -> tuple[int, bytes]:
    body: dict[str, Any] = {"model": route, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=limit_s)) as session,
        session.post(f"{d.base_url}/chat/completions", json=body, headers={"authorization": "Bearer agent"}) as r,
    ):
        return r.status, await r.read()


def record_for(d: Daemon, route: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        matching = [r for r in d.log_records() if r["route"] == route]
        if matching:
            assert len(matching) == 1, f"one record per request, got {matching}"
            return matching[0]
        time.sleep(0.05)
    raise AssertionError(f"no request record for {route}")


def error_events(data: bytes) -> list[dict[str, Any]]:
    out = []
    for line in data.split(b"\n"):
        if line.startswith(b"data: {") and b'"error"' in line[:20]:
            out.append(json.loads(line[6:]))
    return out


def assert_alive(d: Daemon) -> None:
    assert d.proc.poll() is None
    assert d.get("/healthz")["status"] == "ok"


async def test_control_stream_relays_byte_for_byte(relay: Daemon) -> None:
    status, data = await post_stream(relay, "h-ok")
    assert status == 200 and data == good_stream()
    rec = record_for(relay, "h-ok")
    assert rec["error_class"] == "" and rec["usage"]["output"] == 3


@pytest.fixture(scope="module")
def relay10(hostile: HostileUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon of its own for the HTTP/1.0 client tests (the other tests count one record per route)."""
    d = hostile_daemon(hostile, tmp_path_factory, "hostile10")
    yield d
    d.stop()


@pytest.mark.parametrize("mode", ["ok", "huge", "textplain", "http10"])
async def test_http10_client_gets_the_stream_unframed(relay10: Daemon, mode: str) -> None:
    """An HTTP/1.0 client cannot take chunked framing: the upstream's framing is decoded and the events reach it
    as the body, ended by the close."""
    relay = relay10
    body = json.dumps({"model": f"h-{mode}", "stream": True, "stream_options": {"include_usage": True},
                       "messages": [{"role": "user", "content": "hi"}]}).encode()  # fmt: skip
    reader, writer = await asyncio.open_connection("127.0.0.1", int(relay.url.rsplit(":", 1)[1]))
    writer.write(
        b"POST /v1/chat/completions HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer agent\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
    )
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 15)  # to the close
    writer.close()
    head, _, data = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), head[:100]
    assert b"transfer-encoding" not in head.lower()
    if mode == "huge":
        assert data.startswith(b"data: ") and len(data) > TEN_MB and data.endswith(b"data: [DONE]\n\n")
    elif mode == "http10":
        assert b"school" in data and data.endswith(b"data: [DONE]\n\n")
    else:
        assert data == good_stream()


async def test_invalid_utf8_in_sse_data_is_relayed_unchanged(relay: Daemon) -> None:
    status, data = await post_stream(relay, "h-badutf8")
    assert status == 200
    assert b"\xff\xfe\xc3( broken" in data and data.endswith(b"data: [DONE]\n\n")
    rec = record_for(relay, "h-badutf8")
    assert rec["error_class"] == "" and rec["usage"]["output"] == 3 and rec["usage"]["output_source"] == "reported"
    assert_alive(relay)


async def test_ten_megabyte_event_line_is_relayed(relay: Daemon) -> None:
    status, data = await post_stream(relay, "h-huge", include_usage=False)
    assert status == 200
    assert len(data) > TEN_MB and data.count(b"x" * 1000) >= TEN_MB // 1000
    rec = record_for(relay, "h-huge")
    assert rec["error_class"] == "" and rec["usage"]["output"] == 3
    assert_alive(relay)


async def test_event_over_the_parser_limit_is_forwarded_and_the_stream_goes_on(relay: Daemon) -> None:
    status, data = await post_stream(relay, "h-oversized")
    assert status == 200
    assert len(data) > 20 * 1024 * 1024 and data.endswith(b"data: [DONE]\n\n")
    rec = record_for(relay, "h-oversized")
    assert rec["usage"]["output"] == 3  # the usage chunk after the oversized event still counted
    assert_alive(relay)


async def test_endless_stream_is_cut_by_the_total_timeout(relay: Daemon) -> None:
    started = time.monotonic()
    status, data = await post_stream(relay, "h-endless")
    assert time.monotonic() - started < 6
    assert status == 200
    events = error_events(data)
    assert len(events) == 1 and "total timeout" in events[0]["error"]["message"]
    rec = record_for(relay, "h-endless")
    assert rec["error_class"] == "timeout"
    assert rec["usage"]["output"] > 10 and rec["usage"]["output_source"] == "estimated"
    assert_alive(relay)


async def test_a_stream_that_stalls_after_its_content_started_is_cut_by_the_idle_timeout(relay: Daemon) -> None:
    # The events after the first go through the data plane: its clock of the last read is the watchdog's. The
    # last event comes ~0.9 s in, so the idle timeout (1.5 s) is due at ~2.4 s: counted from the commit instead
    # it would cut at ~1.5 s, and never counted, the total timeout (3 s) would.
    relayed = relay.metric("tokenrelay_data_plane_relays_total")
    started = time.monotonic()
    status, data = await post_stream(relay, "h-stall")
    elapsed = time.monotonic() - started
    assert status == 200
    assert 2.1 < elapsed < 2.95, elapsed
    for i in range(6):
        assert f'"content": "s{i} "'.encode() in data or f'"content":"s{i} "'.encode() in data
    events = error_events(data)
    assert len(events) == 1 and "idle timeout" in events[0]["error"]["message"]
    assert data.rstrip().endswith(b"}")  # the error event is the last thing, whole
    rec = record_for(relay, "h-stall")
    assert rec["error_class"] == "timeout" and rec["usage"]["output"] > 0
    assert relay.metric("tokenrelay_data_plane_relays_total") == relayed + 1
    assert_alive(relay)


async def test_stream_served_as_text_plain_is_relayed_as_a_stream(relay: Daemon) -> None:
    status, data = await post_stream(relay, "h-textplain")
    assert status == 200 and data == good_stream()
    rec = record_for(relay, "h-textplain")
    assert rec["error_class"] == "" and rec["usage"]["output"] == 3


async def test_html_error_page_with_200_is_a_clean_502(relay: Daemon) -> None:
    status, data = await post_stream(relay, "h-html200")
    assert status == 502
    error = json.loads(data)["error"]
    assert "before sending any content" in error["message"] or "content-type" in error["message"]
    rec = record_for(relay, "h-html200")
    assert rec["error_class"] == "upstream_error" and rec["status"] == 502


async def test_http10_close_delimited_body(relay: Daemon) -> None:
    status, data = await post_stream(relay, "h-http10")
    assert status == 200 and b"school" in data and data.endswith(b"data: [DONE]\n\n")
    rec = record_for(relay, "h-http10")
    assert rec["error_class"] == "" and rec["usage"]["output"] == 2


async def test_gzip_encoded_stream_is_decoded(relay: Daemon) -> None:
    status, data = await post_stream(relay, "h-gzip")
    assert status == 200
    assert b"zip0 " in data and b"zip2 " in data and data.endswith(b"data: [DONE]\n\n")
    rec = record_for(relay, "h-gzip")
    assert rec["error_class"] == "" and rec["usage"]["output"] == 3


async def test_corrupt_gzip_is_a_clean_error(relay: Daemon) -> None:
    status, data = await post_stream(relay, "h-badgzip")
    rec = record_for(relay, "h-badgzip")
    assert rec["error_class"] == "upstream_error"
    if status == 200:
        assert len(error_events(data)) == 1
    else:
        assert status == 502 and "error" in json.loads(data)
    assert_alive(relay)


@pytest.mark.parametrize(
    ("mode", "status", "error_class"),
    [("garbage", 502, "upstream_error"), ("reset", 502, "upstream_error"), ("silence", 504, "timeout")],
)
async def test_broken_http_is_a_clean_error(relay: Daemon, mode: str, status: int, error_class: str) -> None:
    started = time.monotonic()
    got, data = await post_stream(relay, f"h-{mode}")
    assert time.monotonic() - started < 5
    assert got == status
    error = json.loads(data)["error"]
    assert error["type"] in ("upstream_error", "timeout_error") and error["message"]
    rec = record_for(relay, f"h-{mode}")
    assert rec["error_class"] == error_class and rec["status"] == status
    assert_alive(relay)


async def test_non_streaming_request_to_hostile_upstreams(relay: Daemon) -> None:
    """A non-streaming request to each misbehaving upstream: an answer or a clean error, never a hang."""
    body = {"model": "h-garbage", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        for mode in ("garbage", "reset", "html200", "badgzip"):
            async with session.post(f"{relay.base_url}/chat/completions", json={**body, "model": f"h-{mode}"}) as r:
                assert r.status in (200, 502), mode
                await r.read()
    assert_alive(relay)
