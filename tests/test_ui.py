"""The live meters page's data: `/ui/snapshot` and the `/ui/events` stream, with the openai SDK driving traffic
through a real daemon; and the tokens/s accounting behind the chart."""

from __future__ import annotations

import asyncio
import itertools
import re
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tokenrelay.live import TokenRate

from tests.conftest import Daemon, MockUpstream

MESSAGES = [{"role": "user", "content": "Say something about foxes."}]
PRICED = "price = { input = 1.0, output = 2.0 }"


def two_deployments(a: MockUpstream, b: MockUpstream) -> str:
    out = "[routes.fast]\n"
    for name, m in (("d0", a), ("d1", b)):
        out += f"""
[[routes.fast.deployments]]
name = "{name}"
base_url = "{m.openai_base}"
model = "upstream-model"
api_key_env = "TEST_UPSTREAM_KEY"
{PRICED}
"""
    return out


def client(d: Daemon, base: str | None = None, key: str = "agent-key-1") -> openai.OpenAI:
    return openai.OpenAI(base_url=base or d.base_url, api_key=key, max_retries=0)


def stream_chat(c: openai.OpenAI) -> str:
    chunks = c.chat.completions.create(model="fast", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)


async def sse_events(session: aiohttp.ClientSession, url: str) -> AsyncIterator[dict[str, Any]]:
    """The JSON snapshots of an SSE stream, as they arrive."""
    async with session.get(url) as response:
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.content:
            if line.startswith(b"data: "):
                yield orjson.loads(line[6:])


def test_page_is_one_self_contained_document(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(None)
    start = time.monotonic()
    with urllib.request.urlopen(f"{d.url}/ui", timeout=10) as response:
        body = response.read().decode()
        headers = response.headers
    assert time.monotonic() - start < 1.0
    assert headers["content-type"].startswith("text/html")
    assert len(body) < 100_000
    # Stylesheet and script are inlined; nothing is fetched from anywhere (no CDN, no fonts, works offline).
    assert "/*STYLE*/" not in body and "/*SCRIPT*/" not in body and "EventSource" in body
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", body)
    assert "@import" not in body and "url(" not in body
    assert "prefers-color-scheme: dark" in body
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'sha256-" in csp


def test_snapshot_reflects_sdk_traffic(
    mock_factory: Callable[..., MockUpstream], daemon_factory: Callable[..., Daemon]
) -> None:
    a, b = mock_factory(delay_ms=1.0), mock_factory(delay_ms=1.0)
    d = daemon_factory(two_deployments(a, b))
    empty = d.get("/ui/snapshot")
    assert empty["totals"]["requests"] == 0 and empty["recent"] == [] and empty["in_flight"] == 0
    assert {r["route"] for r in empty["routes"]} >= {"fast", "mock"}

    c = client(d)
    for _ in range(3):
        assert stream_chat(c)
    c.chat.completions.create(model="fast", messages=MESSAGES)  # type: ignore[arg-type]
    in_run = client(d, base=f"{d.url}/run/nightly-42/v1", key="agent-key-2")
    assert stream_chat(in_run)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=MESSAGES)  # type: ignore[arg-type]

    time.sleep(1.0)  # the page's series ends at the last whole second
    snap = d.get("/ui/snapshot")
    totals = snap["totals"]
    recent = snap["recent"]
    assert totals["requests"] == 6 and len(recent) == 6
    assert totals["errors"] == sum(1 for r in recent if r["error_class"])
    assert totals["output"] == 5 * 24
    # Newest first, and the same requests, statuses and tokens as the ledger's request log.
    assert [r["seq"] for r in recent] == sorted((r["seq"] for r in recent), reverse=True)
    logged = d.get("/usage/requests?limit=10")["requests"]
    assert [(r["status"], r["error_class"], r["output"]) for r in recent] == [
        (r["status"], r["error_class"], r["output"]) for r in logged
    ]
    assert recent[0]["status"] == 404 and recent[0]["error_class"] == "client_4xx" and recent[0]["route"] == "nope"
    assert recent[2]["status"] == 200 and not recent[2]["stream"]
    assert recent[1]["run"] == "nightly-42" and recent[1]["stream"]
    for r in recent[1:]:
        assert r["route"] == "fast" and r["deployment"] in ("d0", "d1")
        assert r["output"] == 24 and r["input"] > 0 and r["duration_s"] > 0 and r["ttft_s"] is not None
        assert r["cost_usd"] == pytest.approx((r["input"] * 1.0 + r["output"] * 2.0) / 1e6)

    fast = next(r for r in snap["routes"] if r["route"] == "fast")
    deployments = {dep["name"]: dep for dep in fast["deployments"]}
    assert set(deployments) == {"d0", "d1"}
    assert sum(dep["requests"] for dep in deployments.values()) == 5
    for dep in deployments.values():
        assert dep["state"] == "healthy" and dep["outstanding"] == 0 and dep["error_rate"] == 0
        if dep["ttft_samples"]:
            assert 0 < dep["ttft_p50_s"] <= dep["ttft_p99_s"] < 5
    assert sum(snap["ttft_hist"]["counts"]) == sum(dep["ttft_samples"] for dep in deployments.values()) == 5
    # The tokens/s series holds exactly the tokens relayed (spread over the seconds they took).
    assert sum(snap["series"]["out"]) == pytest.approx(5 * 24, rel=0.02)
    assert sum(snap["series"]["in"]) == pytest.approx(sum(r["input"] for r in recent), rel=0.02)

    cost = snap["cost_today"]
    spent = sum(r["cost_usd"] for r in recent[1:])
    assert cost["requests"] == 6 and cost["cost_usd"] == pytest.approx(spent)
    by_route = {r["name"]: r for r in cost["by_route"]}
    assert by_route["fast"]["requests"] == 5 and by_route["fast"]["cost_usd"] == pytest.approx(spent)
    by_run = {r["name"]: r for r in cost["by_run"]}
    assert by_run["nightly-42"]["requests"] == 1 and by_run["nightly-42"]["output"] == 24
    assert len(cost["by_key"]) == 2  # two client keys (shown by id; the secret never leaves the daemon)
    assert all("agent-key" not in r["name"] for r in cost["by_key"])


def test_a_finished_sdk_stream_shows_as_success(relay_one: Daemon) -> None:
    assert stream_chat(client(relay_one))
    time.sleep(0.2)
    last = relay_one.get("/ui/snapshot")["recent"][0]
    assert (last["status"], last["error_class"], last["output"]) == (200, "", 24)


@pytest.fixture
def relay_one(mock_upstream: MockUpstream, daemon_factory: Callable[..., Daemon]) -> Daemon:
    return daemon_factory(two_deployments(mock_upstream, mock_upstream))


def test_deployment_health_shows_cooldown(
    mock_factory: Callable[..., MockUpstream], daemon_factory: Callable[..., Daemon]
) -> None:
    a, b = mock_factory(delay_ms=1.0), mock_factory(delay_ms=1.0)
    d = daemon_factory(two_deployments(a, b))
    a.control(fail_status=429, retry_after="30")
    c = client(d)
    for _ in range(20):  # until the balancer has tried d0 once: it answers 429, the request fails over to d1
        assert stream_chat(c)
        if a.stats()["requests"]:
            break
    deployments = {
        dep["name"]: dep for r in d.get("/ui/snapshot")["routes"] if r["route"] == "fast" for dep in r["deployments"]
    }
    assert deployments["d0"]["state"] == "cooling_down" and 20 < deployments["d0"]["until_s"] <= 30
    assert deployments["d1"]["state"] == "healthy"


async def test_events_shared_live_and_stop_with_the_browser(
    mock_upstream: MockUpstream, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory(two_deployments(mock_upstream, mock_upstream))
    url = f"{d.url}/ui/events"
    async with aiohttp.ClientSession() as session:
        first, second = sse_events(session, url), sse_events(session, url)
        a0 = await anext(first)
        await anext(second)
        assert a0["totals"]["requests"] == 0
        # A request made through the proxy shows up within about a second.
        c = openai.AsyncOpenAI(base_url=d.base_url, api_key="k", max_retries=0)
        await c.chat.completions.create(model="fast", messages=MESSAGES)  # type: ignore[arg-type]
        await c.close()
        deadline = time.monotonic() + 3
        while True:
            snap = await asyncio.wait_for(anext(first), 3)
            if snap["recent"]:
                break
            assert time.monotonic() < deadline
        assert snap["recent"][0]["output"] == 24 and snap["watchers"] == 2
        # Both watchers get the very same snapshot (computed once per second, shared).
        for _ in range(3):
            b = await asyncio.wait_for(anext(second), 3)
            if b["now"] == snap["now"]:
                break
        assert b == snap
        ticks = [snap["now"], (await anext(first))["now"], (await anext(first))["now"]]
        assert all(0.5 < later - earlier < 1.5 for earlier, later in itertools.pairwise(ticks))
        await second.aclose()  # one browser goes away: the daemon notices and stops serving it
        deadline = time.monotonic() + 3
        while (await asyncio.wait_for(anext(first), 3))["watchers"] != 1:
            assert time.monotonic() < deadline
        await first.aclose()
    deadline = time.monotonic() + 3
    while d.get("/ui/snapshot")["watchers"] != 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)


async def test_open_event_stream_does_not_hold_up_shutdown(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(None)
    async with aiohttp.ClientSession() as session:
        events = sse_events(session, f"{d.url}/ui/events")
        await anext(events)
        start = time.monotonic()
        code = await asyncio.to_thread(d.stop)
        assert code == 0 and time.monotonic() - start < 5  # the grace period is 30 s: nobody waited on /ui
        await events.aclose()


# ---- tokens/s accounting ---------------------------------------------------------------------------------------


def test_token_rate_spreads_a_request_over_its_seconds() -> None:
    rate = TokenRate(60)
    rate.add(1, 100, start=1000.5, end=1010.5, now=1011.0)  # 10 tokens/s for 10 s
    _ins, outs = rate.series(12, now=1011.0)
    assert outs == pytest.approx([5, 10, 10, 10, 10, 10, 10, 10, 10, 10, 5, 0])
    rate.add(0, 7, start=1011.2, end=1011.2, now=1011.3)
    ins, _ = rate.series(3, now=1011.3)
    assert ins == [0, 0, 7]


def test_token_rate_forgets_what_left_the_window() -> None:
    rate = TokenRate(10)
    rate.add(1, 50, start=100.0, end=105.0, now=105.0)
    assert sum(rate.series(10, now=105.0)[1]) == pytest.approx(50)
    assert sum(rate.series(10, now=112.0)[1]) == pytest.approx(20)  # seconds 103 and 104 remain
    assert rate.series(10, now=130.0)[1] == [0.0] * 10


@given(
    st.lists(
        st.tuples(st.integers(0, 400), st.floats(0, 30), st.floats(0, 25), st.integers(1, 5000)),
        max_size=30,
    )
)
def test_token_rate_matches_a_naive_count(requests: list[tuple[int, float, float, int]]) -> None:
    """Against a per-second loop: the same tokens land in the same seconds, whatever the order and overlap."""
    n = 60
    rate = TokenRate(n)
    naive: dict[int, float] = {}
    now = 0.0
    for at, start_back, length, tokens in sorted(requests):
        now = 1000.0 + at
        start = max(now - start_back, now - length - start_back)
        end = min(now, start + length)
        rate.add(1, tokens, start, end, now)
        lo = max(start, float(int(now) - n + 1))
        hi = max(end, lo)
        if hi - lo < 1e-3 or int(lo) == int(hi):
            naive[int(hi)] = naive.get(int(hi), 0.0) + tokens
            continue
        per_s = tokens / (hi - lo)
        for second in range(int(lo), int(hi) + 1):
            overlap = min(hi, second + 1) - max(lo, second)
            naive[second] = naive.get(second, 0.0) + per_s * max(0.0, overlap)
    _, outs = rate.series(n, now)
    expected = [naive.get(s, 0.0) for s in range(int(now) - n + 1, int(now) + 1)]
    assert outs == pytest.approx(expected, abs=1e-6)


def test_key_in_the_url_becomes_a_ui_cookie(daemon_factory: Callable[..., Daemon]) -> None:
    """EventSource cannot send a bearer header: `GET /ui?key=...` leaves the key in a cookie scoped to /ui,
    which the page's event stream then carries (and which an auth middleware reads via `ui_credential`)."""
    d = daemon_factory(None)
    with urllib.request.urlopen(f"{d.url}/ui?key=admin-secret", timeout=10) as response:
        cookie = response.headers["set-cookie"]
    assert cookie.startswith("tokenrelay_ui=admin-secret;")
    assert "HttpOnly" in cookie and "Path=/ui" in cookie and "SameSite=Strict" in cookie
    with urllib.request.urlopen(f"{d.url}/ui", timeout=10) as response:
        assert response.headers["set-cookie"] is None


def test_ui_credential_reads_query_then_cookie() -> None:
    from aiohttp.test_utils import make_mocked_request
    from tokenrelay.handlers.ui import ui_credential

    assert ui_credential(make_mocked_request("GET", "/ui/events?key=abc")) == "abc"
    cookie = make_mocked_request("GET", "/ui/events", headers={"cookie": "tokenrelay_ui=xyz"})
    assert ui_credential(cookie) == "xyz"
    assert ui_credential(make_mocked_request("GET", "/ui/events")) is None


async def test_page_needs_the_admin_key_once_keys_are_configured(daemon_factory: Callable[..., Daemon]) -> None:
    admin = "ui-admin-key-0123456789abcdef"
    d = daemon_factory(None, env={"TOKENRELAY_ADMIN_KEY": admin})
    # unsafe=True: keep cookies for an IP host, as browsers do (aiohttp's jar refuses them by default).
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        async with session.get(f"{d.url}/ui") as resp:  # no key: the login form, not the meters
            assert resp.status == 401
            assert "admin key" in await resp.text()
        async with session.get(f"{d.url}/ui/snapshot") as resp:
            assert resp.status == 401
        async with session.get(f"{d.url}/ui?key=wrong-key-0123456789") as resp:
            assert resp.status == 401
        async with session.get(f"{d.url}/ui?key={admin}") as resp:  # once with the key ...
            assert resp.status == 200
        async with session.get(f"{d.url}/ui/snapshot") as resp:  # ... then the cookie carries it
            assert resp.status == 200
            assert resp.content_type == "application/json"
