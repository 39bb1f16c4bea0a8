"""Meters as people rely on them: every request counted once, token for token, across concurrency, client
cancellations, failing upstreams, several workers, signals and a ledger that goes away."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import openai
import pytest
from tokenrelay import ledger_query

from tests.conftest import Daemon, MockUpstream, free_port, route_config, start_daemon

MESSAGES = [{"role": "user", "content": "count these tokens please"}]


def aclient(d: Daemon) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=d.base_url, api_key="meter-test", max_retries=0)


async def cancel_after_first_chunk(d: Daemon, route: str) -> None:
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            f"{d.base_url}/chat/completions", json={"model": route, "messages": MESSAGES, "stream": True}
        )
        await resp.content.readany()
        resp.close()  # the agent gives up mid-stream


async def test_totals_are_exact_under_concurrency(
    mock_factory: Callable[..., MockUpstream], daemon_factory: Callable[..., Daemon]
) -> None:
    good = mock_factory(delay_ms=5, tokens=12)
    flaky = mock_factory(delay_ms=5, tokens=12)
    flaky.control(fail_status=500)
    slow = mock_factory(delay_ms=100, tokens=50)
    dead = mock_factory(delay_ms=1)
    dead.control(fail_status=503)
    config = (
        route_config("r", good, flaky, extra='strategy = "round_robin"\nbreaker = {failures = 1000}')
        + route_config("slow", slow).replace('"d0"', '"s0"')
        + route_config("dead", dead).replace('"d0"', '"x0"')
    )
    d = daemon_factory(config)
    c = aclient(d)

    async def streaming() -> None:
        stream = await c.chat.completions.create(model="r", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
        async for _ in stream:
            pass

    async def plain() -> None:
        await c.chat.completions.create(model="r", messages=MESSAGES)  # type: ignore[arg-type]

    async def failing() -> None:
        with pytest.raises(openai.InternalServerError):
            await c.chat.completions.create(model="dead", messages=MESSAGES)  # type: ignore[arg-type]

    jobs = [streaming() for _ in range(30)] + [plain() for _ in range(20)]
    jobs += [cancel_after_first_chunk(d, "slow") for _ in range(8)] + [failing() for _ in range(4)]
    await asyncio.gather(*jobs)
    await c.close()
    await asyncio.sleep(0.3)  # the cancelled handlers finish their bookkeeping

    usage = d.get("/usage?group_by=route")
    totals = usage["totals"]
    assert totals["requests"] == 62
    assert totals["successes"] == 50
    assert totals["errors_by_class"]["client_disconnect"] == 8
    assert totals["errors_by_class"]["upstream_5xx"] == 4
    rows = {row["route"]: row for row in usage["rows"]}
    # Token for token what the healthy upstream served (and reported) for the 50 completed requests.
    served = good.stats()
    assert served["completed"] == 50
    assert rows["r"]["tokens"]["output"]["reported"] == served["output_tokens"] == 50 * 12
    assert rows["r"]["tokens"]["input"]["reported"] == served["input_tokens"]
    # The cancelled streams are metered with what they cost so far (estimated locally: no usage came).
    assert rows["slow"]["tokens"]["output"]["estimated"] > 0
    assert slow.stats()["disconnected"] == 8
    # One row per request in the request log, too.
    assert len(d.get("/usage/requests?limit=1000")["requests"]) == 62


async def test_two_workers_share_one_exact_ledger(mock_factory: Callable[..., MockUpstream], tmp_path: Path) -> None:
    up = mock_factory(delay_ms=1, tokens=7)
    port = free_port()
    d = start_daemon(tmp_path, route_config("r", up), args=["--workers", "2"], listen=f"127.0.0.1:{port}")
    try:
        c = aclient(d)

        async def one(stream: bool) -> None:
            if stream:
                s = await c.chat.completions.create(model="r", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
                async for _ in s:
                    pass
            else:
                await c.chat.completions.create(model="r", messages=MESSAGES)  # type: ignore[arg-type]

        await asyncio.gather(*(one(i % 2 == 0) for i in range(120)))
        await c.close()
        workers = {r["worker_pid"] for r in [d.get("/healthz") for _ in range(20)]}
        assert len(workers) == 2, "both workers should be serving"
    finally:
        assert d.stop() == 0
    result = ledger_query.query_usage(d.db_path)
    assert result["totals"]["requests"] == 120
    assert result["totals"]["tokens"]["output"]["reported"] == 120 * 7 == up.stats()["output_tokens"]


async def test_sigterm_lets_streams_finish_and_loses_nothing(
    mock_factory: Callable[..., MockUpstream], daemon_factory: Callable[..., Daemon]
) -> None:
    up = mock_factory(delay_ms=40, tokens=30)  # ~1.2 s per stream
    d = daemon_factory(route_config("r", up))
    c = aclient(d)

    async def one() -> str:
        s = await c.chat.completions.create(model="r", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
        return "".join([ch.choices[0].delta.content or "" async for ch in s if ch.choices])

    tasks = [asyncio.ensure_future(one()) for _ in range(20)]
    await asyncio.sleep(0.4)
    d.proc.send_signal(signal.SIGTERM)
    texts = await asyncio.gather(*tasks)
    assert all(len(t.split()) == 30 for t in texts)
    assert await asyncio.to_thread(d.proc.wait, 15) == 0
    await c.close()
    totals = ledger_query.query_usage(d.db_path)["totals"]
    assert totals["requests"] == 20 and totals["successes"] == 20
    assert totals["tokens"]["output"]["reported"] == 20 * 30


async def test_sigterm_past_the_grace_period_cancels_and_meters(
    mock_factory: Callable[..., MockUpstream], daemon_factory: Callable[..., Daemon]
) -> None:
    up = mock_factory(delay_ms=200, tokens=100)  # 20 s streams
    d = daemon_factory("shutdown_grace_s = 0.5\n" + route_config("r", up))
    tasks = [asyncio.ensure_future(cancel_never(d)) for _ in range(5)]
    await asyncio.sleep(0.5)
    d.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(d.proc.wait, 15) == 0
    results = await asyncio.gather(*tasks)
    assert all(not complete for complete in results)  # cut, not silently complete
    totals = ledger_query.query_usage(d.db_path)["totals"]
    assert totals["requests"] == 5
    assert totals["successes"] == 0
    assert totals["errors_by_class"]["cancelled"] == 5  # cut by the shutdown, not by the clients
    assert totals["tokens"]["output"]["estimated"] > 0


async def cancel_never(d: Daemon) -> bool:
    """Reads a stream to its end; True if it ended with [DONE]."""
    async with aiohttp.ClientSession() as session:
        try:
            async with session.post(
                f"{d.base_url}/chat/completions", json={"model": "r", "messages": MESSAGES, "stream": True}
            ) as resp:
                body = await resp.read()
        except aiohttp.ClientError:
            return False
    return body.rstrip().endswith(b"[DONE]")


async def test_sigkill_loses_at_most_one_flush_interval(
    mock_upstream: MockUpstream, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory(route_config("r", mock_upstream))
    c = aclient(d)
    for _ in range(10):
        await c.chat.completions.create(model="r", messages=MESSAGES)  # type: ignore[arg-type]
    await asyncio.sleep(1.5)  # > flush interval (1 s)
    for _ in range(5):
        await c.chat.completions.create(model="r", messages=MESSAGES)  # type: ignore[arg-type]
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(5)
    await c.close()
    requests = ledger_query.query_usage(d.db_path)["totals"]["requests"]
    assert 10 <= requests <= 15


async def test_ledger_deleted_mid_run_is_recreated(
    mock_upstream: MockUpstream, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory(route_config("r", mock_upstream))
    c = aclient(d)
    await c.chat.completions.create(model="r", messages=MESSAGES)  # type: ignore[arg-type]
    assert d.get("/usage")["totals"]["requests"] == 1
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(d.db_path) + suffix)
    for _ in range(3):
        await c.chat.completions.create(model="r", messages=MESSAGES)  # type: ignore[arg-type]
    await c.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if d.db_path.exists() and d.get("/usage")["totals"]["requests"] == 3:
            break
        await asyncio.sleep(0.2)
    assert d.get("/usage")["totals"]["requests"] == 3  # the rows after the deletion, in a new file
    assert d.proc.poll() is None


async def test_metrics_are_valid_prometheus_with_low_cardinality_labels(
    mock_upstream: MockUpstream, daemon_factory: Callable[..., Daemon]
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    d = daemon_factory(route_config("r", mock_upstream))
    c = openai.AsyncOpenAI(base_url=f"{d.url}/run/run-42/v1", api_key="k", max_retries=0)
    for _ in range(3):
        await c.chat.completions.create(model="r", messages=MESSAGES)  # type: ignore[arg-type]
    await c.close()
    async with aiohttp.ClientSession() as session, session.get(f"{d.url}/metrics") as resp:
        assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
        text = await resp.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = [s for s in families["tokenrelay_requests"].samples if s.labels.get("route") == "r"]
    assert sum(s.value for s in requests) == 3
    assert all(set(s.labels) == {"route", "deployment", "status_class"} for s in requests)
    assert "run-42" not in text and "k_" not in text
    assert "tokenrelay_time_to_first_token_seconds" in families
    assert "tokenrelay_upstream_up" in families


async def test_usage_csv_and_grouping_by_run(
    mock_upstream: MockUpstream, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory(route_config("r", mock_upstream))
    for run in ("alpha", "beta", "beta"):
        c = openai.AsyncOpenAI(
            base_url=d.base_url,
            api_key="k",
            max_retries=0,
            default_headers={"X-Tokenrelay-Run": run, "X-Tokenrelay-Tags": "eval,nightly"},
        )
        await c.chat.completions.create(model="r", messages=MESSAGES)  # type: ignore[arg-type]
        await c.close()
    by_run = {row["run"]: row["requests"] for row in d.get("/usage?group_by=run")["rows"]}
    assert by_run == {"alpha": 1, "beta": 2}
    by_tag = {row["tag"]: row["requests"] for row in d.get("/usage?group_by=tag")["rows"]}
    assert by_tag == {"eval": 3, "nightly": 3}
    async with aiohttp.ClientSession() as session, session.get(f"{d.url}/usage?group_by=run&format=csv") as resp:
        text = await resp.text()
    header, *lines = text.strip().splitlines()
    assert header.startswith("run,") and len(lines) == 2
    async with aiohttp.ClientSession() as session, session.get(f"{d.url}/usage?group_by=nonsense") as resp:
        assert resp.status == 400


def test_non_streaming_answers_carry_usage_headers(
    mock_upstream: MockUpstream, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory(route_config("r", mock_upstream))
    c = openai.OpenAI(base_url=d.base_url, api_key="k", max_retries=0)
    raw = c.chat.completions.with_raw_response.create(model="r", messages=MESSAGES)  # type: ignore[arg-type]
    answer = raw.parse()
    assert raw.headers["x-tokenrelay-deployment"] == "d0"
    assert answer.usage is not None
    assert int(raw.headers["x-tokenrelay-output-tokens"]) == answer.usage.completion_tokens
    assert int(raw.headers["x-tokenrelay-input-tokens"]) == answer.usage.prompt_tokens
