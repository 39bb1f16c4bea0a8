"""Load balancing and failover as an agent fleet sees it: several mock upstreams with injected faults, the
official openai SDK with its own retries off (`max_retries=0`), so what is tested is the proxy's behaviour."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable

import aiohttp
import openai
import pytest

from tests.conftest import Daemon, MockUpstream, free_port, route_config

MESSAGES = [{"role": "user", "content": "hello"}]


def client(d: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=d.base_url, api_key="agent", max_retries=0)


def aclient(d: Daemon) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=d.base_url, api_key="agent", max_retries=0)


def served_by(d: Daemon, route: str, n: int, stream: bool = False) -> collections.Counter[str]:
    """Sends n requests; counts which deployment served each (the X-Tokenrelay-Deployment header)."""
    c = client(d)
    counts: collections.Counter[str] = collections.Counter()
    for _ in range(n):
        raw = c.chat.completions.with_raw_response.create(model=route, messages=MESSAGES, stream=stream)  # type: ignore[call-overload]
        counts[raw.headers["x-tokenrelay-deployment"]] += 1
        raw.parse()
    return counts


def test_weighted_spreads_by_weight(
    mock_factory: Callable[..., MockUpstream], daemon_factory: Callable[..., Daemon]
) -> None:
    ups = [mock_factory(delay_ms=0, tokens=2) for _ in range(3)]
    config = route_config("w", *ups, extra='strategy = "weighted"')
    # weights 5, 1, 1
    config = config.replace('name = "d0"', 'name = "d0"\nweight = 5', 1)
    d = daemon_factory(config)
    counts = served_by(d, "w", 280)
    assert counts["d0"] == pytest.approx(200, abs=10)
    assert counts["d1"] == pytest.approx(40, abs=10)
    assert counts["d2"] == pytest.approx(40, abs=10)


def test_round_robin_is_even(mock_factory: Callable[..., MockUpstream], daemon_factory: Callable[..., Daemon]) -> None:
    ups = [mock_factory(delay_ms=0, tokens=2) for _ in range(2)]
    d = daemon_factory(route_config("rr", *ups, extra='strategy = "round_robin"'))
    assert served_by(d, "rr", 40) == {"d0": 20, "d1": 20}


def test_dead_deployment_is_skipped_and_comes_back_after_cooldown(
    mock_factory: Callable[..., MockUpstream], daemon_factory: Callable[..., Daemon]
) -> None:
    good, bad = mock_factory(delay_ms=0, tokens=2), mock_factory(delay_ms=0, tokens=2)
    bad.control(fail_status=500)
    d = daemon_factory(route_config("r", good, bad, extra='strategy = "round_robin"\nbreaker = {failures = 3, cooldown_s = 1.5}'))
    # Every client request succeeds: failures before the first byte go to the healthy deployment.
    counts = served_by(d, "r", 30)
    assert counts == {"d0": 30}
    # The breaker opened after 3 consecutive failures: the dead one saw 3 requests, not 15.
    assert bad.stats()["requests"] == 3
    routes = {r["route"]: r for r in d.get("/v1/routes")["routes"]}
    state = {dep["name"]: dep for dep in routes["r"]["deployments"]}
    assert state["d1"]["state"] == "open"
    # Healed and the cooldown passed: it gets traffic again (after a successful half-open probe).
    bad.control(fail_status=0)
    time.sleep(1.7)
    counts = served_by(d, "r", 20)
    assert counts["d1"] >= 5


def test_connection_refused_deployment_never_fails_a_request(
    mock_upstream: MockUpstream, daemon_factory: Callable[..., Daemon]
) -> None:
    config = route_config("r", mock_upstream, extra='strategy = "round_robin"') + f"""
[[routes.r.deployments]]
name = "dead"
base_url = "http://127.0.0.1:{free_port()}/v1"
model = "m"
"""
    d = daemon_factory(config)
    assert served_by(d, "r", 20, stream=True) == {"d0": 20}


def test_429_storm_moves_traffic_and_honours_retry_after(
    mock_factory: Callable[..., MockUpstream], daemon_factory: Callable[..., Daemon]
) -> None:
    a, b = mock_factory(delay_ms=0, tokens=2), mock_factory(delay_ms=0, tokens=2)
    a.control(fail_status=429, retry_after="2")
    d = daemon_factory(route_config("r", a, b, extra='strategy = "round_robin"'))
    counts = served_by(d, "r", 20)
    assert counts == {"d1": 20}
    assert a.stats()["requests"] == 1  # cooled down for Retry-After after the first 429
    routes = {r["route"]: r for r in d.get("/v1/routes")["routes"]}
    assert {dep["name"]: dep["state"] for dep in routes["r"]["deployments"]}["d0"] == "cooling_down"


def test_all_deployments_failing_returns_the_upstream_error(
    mock_upstream: MockUpstream, daemon_factory: Callable[..., Daemon]
) -> None:
    mock_upstream.control(fail_status=503)
    d = daemon_factory(route_config("r", mock_upstream))
    with pytest.raises(openai.InternalServerError) as info:
        client(d).chat.completions.create(model="r", messages=MESSAGES)  # type: ignore[arg-type]
    assert info.value.status_code == 503


def test_fallback_route_serves_when_every_deployment_failed(
    mock_factory: Callable[..., MockUpstream], daemon_factory: Callable[..., Daemon]
) -> None:
    broken, backup = mock_factory(delay_ms=0), mock_factory(delay_ms=0)
    broken.control(fail_status=500)
    config = route_config("main", broken, extra='fallbacks = ["backup"]') + route_config("backup", backup)
    d = daemon_factory(config)
    answer = client(d).chat.completions.with_raw_response.create(model="main", messages=MESSAGES)  # type: ignore[arg-type]
    assert answer.status_code == 200
    assert backup.stats()["completed"] == 1
    assert d.wait_records(1)[-1]["route"] == "backup"


def test_in_band_error_before_content_fails_over(
    mock_factory: Callable[..., MockUpstream], daemon_factory: Callable[..., Daemon]
) -> None:
    flaky, good = mock_factory(delay_ms=0), mock_factory(delay_ms=0)
    flaky.control(error_after=0)  # 200 OK, then an error event before any content
    d = daemon_factory(route_config("r", flaky, good, extra='strategy = "round_robin"'))
    for _ in range(6):
        stream = client(d).chat.completions.create(model="r", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text.startswith("the quick brown fox")
    assert good.stats()["completed"] == 6


def test_mid_stream_death_ends_with_an_error_event_and_is_metered(
    mock_upstream: MockUpstream, daemon_factory: Callable[..., Daemon]
) -> None:
    mock_upstream.control(die_after=5)
    d = daemon_factory(route_config("r", mock_upstream))
    stream = client(d).chat.completions.create(model="r", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    received = ""
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            if chunk.choices:
                received += chunk.choices[0].delta.content or ""
    assert "closed the stream before it finished" in str(info.value) or "broke" in str(info.value)
    assert received == "the quick brown fox jumps "  # the 5 deltas that were sent, nothing lost, nothing more
    record = d.wait_records(1)[-1]
    assert record["error_class"] == "upstream_error"
    assert record["usage"]["output"] > 0  # the partial answer is metered (estimated: no usage chunk came)
    assert record["usage"]["output_source"] == "estimated"
    assert mock_upstream.stats()["requests"] == 1  # never retried after the first byte


async def test_keepalive_comments_during_a_slow_first_token(
    mock_upstream: MockUpstream, daemon_factory: Callable[..., Daemon]
) -> None:
    mock_upstream.control(first_token_ms=1500)
    d = daemon_factory(route_config("r", mock_upstream, extra="keepalive_interval_s = 0.3"))
    async with aiohttp.ClientSession() as session, session.post(
        f"{d.base_url}/chat/completions", json={"model": "r", "messages": MESSAGES, "stream": True}
    ) as r:
        body = await r.read()
    assert body.count(b": keep-alive\n\n") >= 2
    assert body.rstrip().endswith(b"data: [DONE]")
    # ... and the SDK, which ignores comments, still reads the whole answer.
    stream = client(d).chat.completions.create(model="r", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices).startswith("the quick")


async def test_hedging_cuts_the_slow_tail(
    mock_factory: Callable[..., MockUpstream], daemon_factory: Callable[..., Daemon]
) -> None:
    slow, fast = mock_factory(delay_ms=1, first_token_ms=1500), mock_factory(delay_ms=1)
    d = daemon_factory(route_config("r", slow, fast, extra='strategy = "round_robin"\nhedge_after_ms = 150'))
    c = aclient(d)

    async def ttft() -> float:
        start = time.monotonic()
        stream = await c.chat.completions.create(model="r", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
        first = None
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.monotonic() - start
        assert first is not None
        return first

    times = [await ttft() for _ in range(8)]
    assert max(times) < 1.0, times  # without hedging, half of them would take 1.5 s
    records = d.wait_records(12)
    hedges = [r for r in records if r["error_class"] == "cancelled_hedge"]
    assert len(hedges) >= 3 and all(r["deployment"] == "d0" for r in hedges)
    await c.close()


async def test_queue_times_out_with_429_and_retry_after(
    mock_upstream: MockUpstream, daemon_factory: Callable[..., Daemon]
) -> None:
    mock_upstream.control(delay_ms=100, tokens=20)
    d = daemon_factory(route_config("r", mock_upstream, extra="queue_timeout_s = 0.3", deployment_extra="max_concurrent = 1"))
    c = aclient(d)

    async def one() -> str:
        stream = await c.chat.completions.create(model="r", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
        return "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])

    first = asyncio.ensure_future(one())
    await asyncio.sleep(0.2)
    with pytest.raises(openai.RateLimitError) as info:
        await one()
    assert info.value.response.headers.get("retry-after")
    assert "concurrency or rate limit" in str(info.value)
    assert (await first).startswith("the quick")
    await c.close()
