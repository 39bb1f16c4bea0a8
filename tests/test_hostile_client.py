"""Hostile clients: oversized headers, too many tags, long run ids, slowloris bodies, clients that stop reading,
and too many requests on one key. Each gets a clean 4xx (in the API's error shape where the relay answers),
the daemon stays up with bounded memory, and every relayed request is metered."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from tokenrelay.metering import key_id

from tests.conftest import Daemon, start_daemon
from tests.hostile import HostileUpstream
from tests.test_hostile_upstream import hostile_config

KEY = "sk-upstream-secret-123"
CHAT = b'{"model":"h-ok","stream":true,"messages":[{"role":"user","content":"hi"}]}'


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileUpstream]:
    server = HostileUpstream().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def relay(hostile: HostileUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp: Path = tmp_path_factory.mktemp("clients")
    config = "body_timeout_s = 1\nwrite_timeout_s = 1\nmax_connections_per_key = 2\n" + hostile_config(
        hostile, ("ok", "endless", "firehose"), "{connect = 2, first_token = 5, idle = 5, total = 30}"
    )
    d = start_daemon(tmp, config, env={"TEST_UPSTREAM_KEY": KEY})
    yield d
    d.stop()


def records(d: Daemon, **match: Any) -> list[dict[str, Any]]:
    return [r for r in d.log_records() if all(r.get(k) == v for k, v in match.items())]


def wait_record(d: Daemon, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = records(d, **match)
        if found:
            return found[-1]
        time.sleep(0.05)
    raise AssertionError(f"no record matching {match}: {d.log_records()[-3:]}")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def raw_request(d: Daemon, head: bytes, body: bytes = b"", read_timeout: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
    writer.write(head + body)
    await writer.drain()
    try:
        async with asyncio.timeout(read_timeout):
            return await reader.read()
    finally:
        writer.close()


def post_head(path: str = "/v1/chat/completions", length: int = len(CHAT), extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\nConnection: close\r\n{extra}\r\n"
    ).encode()


async def test_oversized_header_is_a_clean_4xx(relay: Daemon) -> None:
    answer = await raw_request(relay, post_head(extra=f"X-Junk: {'a' * 100_000}\r\n"), CHAT)
    assert answer[:9] in (b"HTTP/1.0 ", b"HTTP/1.1 ") and answer[9:10] == b"4", answer[:100]
    answer = await raw_request(relay, post_head(extra="".join(f"X-H{i}: v\r\n" for i in range(500))), CHAT)
    assert answer[:9] in (b"HTTP/1.0 ", b"HTTP/1.1 ") and answer[9:10] == b"4", answer[:100]
    answer = await raw_request(relay, f"POST /v1/{'a' * 20_000} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert answer[:9] in (b"HTTP/1.0 ", b"HTTP/1.1 ") and answer[9:10] == b"4", answer[:100]
    assert relay.get("/healthz")["status"] == "ok"


async def post_json(d: Daemon, path: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.post(f"{d.url}{path}", json=body, headers=headers) as r:
        data = await r.read()
        return r.status, json.loads(data) if r.content_type == "application/json" else data


@pytest.mark.parametrize(
    ("path", "headers", "fragment"),
    [
        ("/v1/chat/completions", {"x-tokenrelay-tags": ",".join(f"t{i}" for i in range(17))}, "at most 16 tags"),
        ("/v1/chat/completions", {"x-tokenrelay-tags": "a" * 65}, "at most 16 tags of 64"),
        ("/v1/chat/completions", {"x-tokenrelay-run": "r" * 129}, "longer than 128"),
        (f"/run/{'r' * 129}/v1/chat/completions", {}, "longer than 128"),
    ],
)
async def test_tag_and_run_id_limits(relay: Daemon, path: str, headers: dict[str, str], fragment: str) -> None:
    tag = f"limit-{len(path)}-{len(json.dumps(headers))}"
    body = {"model": "h-ok", "messages": [{"role": "user", "content": tag}]}
    status, payload = await post_json(relay, path, body, {"authorization": f"Bearer {tag}", **headers})
    assert status == 400
    assert payload["error"]["type"] == "invalid_request_error" and fragment in payload["error"]["message"]
    rec = wait_record(relay, key_id=key_id(tag))
    assert rec["error_class"] == "client_4xx" and rec["status"] == 400


async def test_limits_admit_the_maximum(relay: Daemon) -> None:
    body = {"model": "h-ok", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"x-tokenrelay-tags": ",".join(f"t{i:02d}" + "x" * 60 for i in range(16))}
    status, _ = await post_json(relay, f"/run/{'r' * 128}/v1/chat/completions", body, headers)
    assert status == 200
    rec = wait_record(relay, run="r" * 128)
    assert rec["error_class"] == "" and len(rec["tags"].split(",")) == 16


async def test_slowloris_body_is_408_in_openai_shape(relay: Daemon) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(post_head(extra="Authorization: Bearer slowloris\r\n"))
    started = time.monotonic()
    with contextlib.suppress(ConnectionError):
        for byte in CHAT:  # one byte every 100 ms: the whole body would take 7 s
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.1)
            if reader.at_eof() or len(reader._buffer):  # type: ignore[attr-defined]
                break
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
        body = await reader.readexactly(length)
    writer.close()
    elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 3.0, elapsed
    assert head.startswith(b"HTTP/1.1 408")
    error = json.loads(body)["error"]
    assert error["type"] == "timeout_error" and "body_timeout_s" in error["message"]
    rec = wait_record(relay, key_id=key_id("slowloris"))
    assert rec["status"] == 408 and rec["error_class"] == "client_4xx"


def stream_request(route: str, key: str) -> bytes:
    body = f'{{"model":"{route}","stream":true,"messages":[{{"role":"user","content":"hi"}}]}}'.encode()
    return post_head(length=len(body), extra=f"Authorization: Bearer {key}\r\n") + body


async def open_stalled_client(d: Daemon, route: str, key: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the server's buffer fills fast
    sock.connect(("127.0.0.1", d.port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    writer.write(stream_request(route, key))
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    return reader, writer


async def test_client_that_stops_reading_is_disconnected_with_bounded_memory(
    relay: Daemon, hostile: HostileUpstream
) -> None:
    before = rss_kib(relay.proc.pid)
    relayed = relay.metric("tokenrelay_data_plane_relays_total")
    _, writer = await open_stalled_client(relay, "h-firehose", "stalled")
    peak = before
    for _ in range(30):  # the upstream can send as fast as loopback goes; the relay must not buffer it
        await asyncio.sleep(0.1)
        peak = max(peak, rss_kib(relay.proc.pid))
    rec = wait_record(relay, key_id=key_id("stalled"), timeout=5)
    assert rec["error_class"] == "client_disconnect" and "write_timeout_s" in rec["error"]
    assert rec["usage"]["output"] > 0  # what was relayed before the stall is metered
    assert peak - before < 64 * 1024, f"RSS grew by {(peak - before) // 1024} MiB"
    writer.close()
    assert relay.get("/healthz")["in_flight"] == 0
    # The stream was relayed by the data plane thread (whose held bytes the write timeout counts) and left it.
    assert relay.metric("tokenrelay_data_plane_relays_total") == relayed + 1
    assert relay.metric("tokenrelay_data_plane_relays_in_flight") == 0


async def test_slow_but_reading_client_is_not_disconnected(relay: Daemon) -> None:
    reader, writer = await open_stalled_client(relay, "h-endless", "slow-reader")
    got = 0
    for _ in range(25):  # 2.5 s, longer than write_timeout_s = 1, reading a little at a time
        got += len(await reader.read(2048))
        await asyncio.sleep(0.1)
    assert got > 0
    assert not records(relay, key_id=key_id("slow-reader"))
    writer.close()


async def test_concurrent_requests_per_key_are_capped(relay: Daemon) -> None:
    first = [await open_stalled_client(relay, "h-endless", "greedy") for _ in range(2)]
    async with aiohttp.ClientSession() as session:
        body = {"model": "h-ok", "messages": [{"role": "user", "content": "hi"}]}
        async with session.post(f"{relay.base_url}/chat/completions", json=body, headers={"x-api-key": "greedy"}) as r:
            assert r.status == 429 and r.headers["retry-after"] == "1"
            error = (await r.json())["error"]
        assert error["type"] == "rate_limit_error" and "max_connections_per_key" in error["message"]
        async with session.post(f"{relay.base_url}/chat/completions", json=body, headers={"x-api-key": "other"}) as r:
            assert r.status == 200  # another key is not affected
        for _, writer in first:
            writer.transport.abort()
            deadline = time.monotonic() + 5
        while len(records(relay, key_id=key_id("greedy"))) < 3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        async with session.post(f"{relay.base_url}/chat/completions", json=body, headers={"x-api-key": "greedy"}) as r:
            assert r.status == 200  # the slots were given back
    greedy = records(relay, key_id=key_id("greedy"))
    assert sorted(r["error_class"] for r in greedy) == ["", "client_disconnect", "client_disconnect", "rate_limited"]


def test_limit_keys_are_validated_with_their_key_path() -> None:
    from tokenrelay.config import ConfigError, parse_config

    config = parse_config({"body_timeout_s": 2, "write_timeout_s": 0.5, "max_connections_per_key": 8}, env={})
    assert (config.body_timeout_s, config.write_timeout_s, config.max_connections_per_key) == (2.0, 0.5, 8)
    assert parse_config({}, env={}).max_connections_per_key is None
    with pytest.raises(ConfigError) as info:
        parse_config({"body_timeout_s": 0, "write_timeout_s": "x", "max_connections_per_key": 0}, env={})
    assert sorted(info.value.errors) == [
        "body_timeout_s: must be greater than 0",
        "max_connections_per_key: must be greater than 0",
        "write_timeout_s: expected a number, got str 'x'",
    ]


async def test_a_connection_burst_while_the_daemon_is_busy_is_queued_not_dropped(relay: Daemon) -> None:
    """A fleet connecting at once (hundreds of SDK clients starting) while the loop is busy: the kernel queues the
    connections until the daemon accepts them. A short listen queue drops the SYNs past it, and the client only
    retries a second later (a one-second first token); aiohttp's default queue is 128."""
    burst = 600
    relay.proc.send_signal(signal.SIGSTOP)  # the busiest a loop can be: it accepts nothing
    writers: list[asyncio.StreamWriter] = []
    try:
        started = time.monotonic()
        opened = await asyncio.gather(
            *(asyncio.wait_for(asyncio.open_connection("127.0.0.1", relay.port), 0.9) for _ in range(burst)),
            return_exceptions=True,
        )
        connect_s = time.monotonic() - started
        failed = [o for o in opened if isinstance(o, BaseException)]
        writers = [w for o in opened if not isinstance(o, BaseException) for w in (o[1],)]
        assert not failed, f"{len(failed)} of {burst} connections not queued within 0.9 s ({connect_s:.2f} s)"
        for w in writers:
            w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    finally:
        relay.proc.send_signal(signal.SIGCONT)
    try:
        readers = [r for o in opened if not isinstance(o, BaseException) for r in (o[0],)]
        heads = await asyncio.wait_for(asyncio.gather(*(r.readuntil(b"\r\n\r\n") for r in readers)), 20)
        assert all(h.startswith(b"HTTP/1.1 200") for h in heads)
    finally:
        for w in writers:
            w.close()


def test_the_open_file_limit_is_raised_to_the_hard_limit(tmp_path: Path) -> None:
    """Started under a soft limit of 256 open files (1024 is common), the daemon still serves 400 connections
    at once: it raises its soft limit to the hard one, as each stream holds two sockets."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip(f"the hard open-file limit here is {hard}")
    d = start_daemon(tmp_path, preexec=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)))

    async def burst(n: int) -> list[bytes]:
        opened = [await asyncio.open_connection("127.0.0.1", d.port) for _ in range(n)]
        try:
            for _, w in opened:
                w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            return await asyncio.wait_for(asyncio.gather(*(r.readuntil(b"\r\n\r\n") for r, _ in opened)), 10)
        finally:
            for _, w in opened:
                w.close()

    try:
        heads = asyncio.run(burst(400))
        assert all(h.startswith(b"HTTP/1.1 200") for h in heads)
        limits = Path(f"/proc/{d.proc.pid}/limits").read_text()
        soft = next(line.split()[3] for line in limits.splitlines() if line.startswith("Max open files"))
        assert soft == str(hard) if hard != resource.RLIM_INFINITY else soft != "256"
    finally:
        d.stop()
