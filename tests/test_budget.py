"""Budgets and rate limits per client key: admission reserves the worst case, so concurrency cannot overshoot."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from tokenrelay import _core, keys
from tokenrelay.admission import Admission, Denial, Reservation

from tests.conftest import Daemon, MockUpstream, route_config
from tests.test_keys import ADMIN, create, http

MESSAGES: Any = [{"role": "user", "content": "Say something about foxes."}]
# Output at $1000 per 1M tokens, input free: a 24-token answer costs exactly $0.024, and so does its worst case
# (max_tokens=24), so a $0.24 budget admits exactly 10 requests however they interleave.
PRICED = "price = {input = 0.0, output = 1000.0}"
ANSWER_USD = 24 * 1000.0 / 1_000_000


def key(**limits: Any) -> keys.ClientKey:
    return keys.ClientKey("0123456789ab", "k", "00", "00", **limits)


# --- the admission arithmetic ------------------------------------------------------------------------------------


def test_reservations_hold_the_budget_until_settled() -> None:
    a, k, now = Admission(), key(budget_usd=1.0, period="day"), 1_800_000_000.0
    first = a.admit(k, 0.6, 0, now)
    assert isinstance(first, Reservation)
    held = a.admit(k, 0.6, 0, now)
    assert isinstance(held, Denial) and held.status == 429 and held.code == "budget_reserved"
    assert held.headers() == {"retry-after": "1"}
    a.settle(first, 0.25, 0, now)
    a.settle(first, 0.25, 0, now)  # settling twice counts once
    assert a.states[k.id].spent_usd == 0.25 and a.states[k.id].reserved_usd == 0.0
    assert isinstance(a.admit(k, 0.75, 0, now), Reservation)  # lands exactly on the budget
    too_big = a.admit(k, 2.0, 0, now)
    assert isinstance(too_big, Denial) and too_big.status == 403 and too_big.code == "budget_exceeded"


def test_exhausted_budget_is_403_until_the_next_period() -> None:
    a, k = Admission(), key(budget_usd=0.5, period="day")
    now = dt.datetime(2026, 3, 10, 23, 59, tzinfo=dt.UTC).timestamp()
    r = a.admit(k, 0.5, 0, now)
    assert isinstance(r, Reservation)
    a.settle(r, 0.5, 0, now)
    denied = a.admit(k, 0.01, 0, now + 30)
    assert isinstance(denied, Denial) and denied.status == 403 and denied.code == "budget_exhausted"
    assert "resets at 2026-03-11 00:00 UTC" in denied.message
    assert isinstance(a.admit(k, 0.01, 0, now + 120), Reservation)  # a new UTC day


def test_ledger_spend_from_other_workers_counts() -> None:
    a, k, now = Admission(), key(budget_usd=1.0, period="month"), 1_800_000_000.0
    start = keys.period_start("month", now)
    a.sync_spent({k.id: (start, 0.9)})
    denied = a.admit(k, 0.2, 0, now)
    assert isinstance(denied, Denial) and denied.code == "budget_exceeded"
    a.sync_spent({k.id: (start - 86400 * 31, 5.0)})  # last month's spend does not count
    assert isinstance(a.admit(k, 0.1, 0, now), Reservation)


def test_tpm_and_rpm_windows() -> None:
    a, k, now = Admission(), key(tpm=100, rpm=3), 1_800_000_000.0
    r1 = a.admit(k, 0, 60, now)
    assert isinstance(r1, Reservation)
    over = a.admit(k, 0, 50, now)
    assert isinstance(over, Denial) and over.status == 429 and "tokens per minute" in over.message
    a.settle(r1, 0, 30, now + 1)  # the real usage replaces the reservation
    assert isinstance(a.admit(k, 0, 50, now + 2), Reservation)
    assert isinstance(a.admit(k, 0, 0, now + 3), Reservation)
    rpm = a.admit(k, 0, 0, now + 4)
    assert isinstance(rpm, Denial) and rpm.code == "rpm_limit" and rpm.retry_after_s == pytest.approx(56)
    alone = a.admit(k, 0, 101, now + 61)
    assert isinstance(alone, Denial) and alone.status == 403 and "lower max_tokens" in alone.message


# --- through a real daemon ---------------------------------------------------------------------------------------


@pytest.fixture
def paid(tmp_path: Path, mock_upstream: MockUpstream, daemon_factory: Callable[..., Daemon]) -> dict[str, Any]:
    db = tmp_path / "keys.db"
    # Deployment names must differ across routes: the metering price cache is keyed by deployment name.
    unpriced = route_config("unpriced", mock_upstream).replace('name = "d0"', 'name = "free0"')
    config = route_config("paid", mock_upstream, deployment_extra=PRICED) + unpriced
    budget = create(db, "budget", "--budget-usd", str(10 * ANSWER_USD), "--period", "day")
    d = daemon_factory(config, args=["--db", str(db)], env={"TOKENRELAY_ADMIN_KEY": ADMIN})
    return {"daemon": d, "db": db, "budget": budget, "config": config}


async def _one(client: openai.AsyncOpenAI, i: int) -> int:
    try:
        if i % 2:
            stream = await client.chat.completions.create(model="paid", messages=MESSAGES, max_tokens=24, stream=True)
            async for _ in stream:
                pass
        else:
            await client.chat.completions.create(model="paid", messages=MESSAGES, max_tokens=24)
    except openai.APIStatusError as exc:
        return exc.status_code
    return 200


def spent(d: Daemon, key_id: str) -> float:
    status, body, _ = http("GET", f"{d.url}/usage?key_id={key_id}", ADMIN)
    assert status == 200
    return float(body["totals"]["cost_usd"] or 0.0)


async def test_100_concurrent_requests_cannot_overshoot_the_budget(
    paid: dict[str, Any], tmp_path: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    d: Daemon = paid["daemon"]
    client = openai.AsyncOpenAI(base_url=d.base_url, api_key=paid["budget"], max_retries=0)
    statuses = await asyncio.gather(*(_one(client, i) for i in range(100)))
    assert statuses.count(200) == 10
    assert set(statuses) <= {200, 403, 429}
    key_id = str(keys.key_id_of(paid["budget"]))
    assert spent(d, key_id) == pytest.approx(10 * ANSWER_USD) and spent(d, key_id) <= 10 * ANSWER_USD + 1e-12
    # Exhausted now, with a message saying which limit; the spend survives a restart (read from the ledger).
    with pytest.raises(openai.PermissionDeniedError, match=r"exhausted its budget of \$0\.24 per day"):
        await client.chat.completions.create(model="paid", messages=MESSAGES, max_tokens=24)
    d.stop()
    again = daemon_factory(paid["config"], args=["--db", str(paid["db"])], env={"TOKENRELAY_ADMIN_KEY": ADMIN})
    client = openai.AsyncOpenAI(base_url=again.base_url, api_key=paid["budget"], max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as info:
        await client.chat.completions.create(model="paid", messages=MESSAGES, max_tokens=24)
    assert info.value.code == "budget_exhausted"
    records = again.wait_records(1)
    assert records[-1]["key_name"] == "budget" and records[-1]["status"] == 403


def test_budget_needs_a_known_price_and_a_bounded_request(paid: dict[str, Any]) -> None:
    d: Daemon = paid["daemon"]
    client = openai.OpenAI(base_url=d.base_url, api_key=paid["budget"], max_retries=0)
    with pytest.raises(openai.PermissionDeniedError, match="deployment 'free0' has no known price") as info:
        client.chat.completions.create(model="unpriced", messages=MESSAGES, max_tokens=24)
    assert info.value.code == "price_unknown"
    # No max_tokens: 4096 output tokens are reserved ($4.10 here), more than the whole budget.
    with pytest.raises(openai.PermissionDeniedError, match=r"may cost up to \$4\.096"):
        client.chat.completions.create(model="paid", messages=MESSAGES)
    client.chat.completions.create(model="paid", messages=MESSAGES, max_tokens=24)


async def test_tpm_limit_holds_under_concurrency(
    tmp_path: Path, mock_upstream: MockUpstream, daemon_factory: Callable[..., Daemon]
) -> None:
    body = {"model": "fast", "messages": MESSAGES, "max_tokens": 24, "mock": {"delay_ms": 30}}
    raw = orjson.dumps(body)
    worst = _core.estimate_input_tokens("chat", raw, "fast") + 24
    db = tmp_path / "keys.db"
    tpm_key = create(db, "tpm", "--tpm", str(10 * worst))
    d = daemon_factory(route_config("fast", mock_upstream), args=["--db", str(db)])
    headers = {"authorization": f"Bearer {tpm_key}", "content-type": "application/json"}

    async def one(session: aiohttp.ClientSession) -> tuple[int, dict[str, Any], str | None]:
        async with session.post(f"{d.base_url}/chat/completions", data=raw, headers=headers) as r:
            return r.status, json.loads(await r.read()), r.headers.get("retry-after")

    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(one(session) for _ in range(30)))
    ok = [r for r in results if r[0] == 200]
    limited = [r for r in results if r[0] == 429]
    # Each answer takes ~0.7 s (24 deltas, 30 ms apart), so all 30 arrive while the first 10 are in flight.
    assert len(ok) == 10 and len(limited) == 20
    assert all("tokens per minute (tpm)" in r[1]["error"]["message"] for r in limited)
    assert all(r[1]["error"]["type"] == "rate_limit_error" for r in limited)
    assert all(r[2] is not None and 1 <= int(r[2]) <= 60 for r in limited)
    used = sum(r[1]["usage"]["total_tokens"] for r in ok)
    assert used <= 10 * worst
    # A request that alone may use more than the limit can never pass: 403, not a retry loop.
    big = orjson.dumps({**body, "max_tokens": 100 * worst})
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{d.base_url}/chat/completions", data=big, headers=headers) as r,
    ):
        assert r.status == 403 and "lower max_tokens" in (await r.json())["error"]["message"]


def test_rpm_limit_is_429_with_retry_after(
    tmp_path: Path, mock_upstream: MockUpstream, daemon_factory: Callable[..., Daemon]
) -> None:
    db = tmp_path / "keys.db"
    rpm_key = create(db, "rpm", "--rpm", "3")
    d = daemon_factory(route_config("fast", mock_upstream), args=["--db", str(db)])
    client = openai.OpenAI(base_url=d.base_url, api_key=rpm_key, max_retries=0)
    for _ in range(3):
        client.chat.completions.create(model="fast", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError, match="3 requests per minute") as info:
        client.chat.completions.create(model="fast", messages=MESSAGES)
    assert 55 <= int(info.value.response.headers["retry-after"]) <= 60
    records = d.wait_records(4)
    assert records[-1]["error_class"] == "rate_limited" and records[-1]["key_name"] == "rpm"
