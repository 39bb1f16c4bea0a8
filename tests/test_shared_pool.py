"""A deployment's balancing state with several workers: one for the whole daemon (`Pool(shared=...)`, a file
the workers map), so a deployment's `max_concurrent`, its cooldowns and its breaker hold for N workers as for
one, and a worker that dies does not leave its requests counted."""

from __future__ import annotations

import asyncio
import os
import signal
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
from tokenrelay._core import Pool
from tokenrelay.config import Route, parse_config
from tokenrelay.routing import RoutePool, Waker, shared_pool_path

from tests.conftest import Daemon, MockUpstream, free_port, start_daemon
from tests.test_worker_metrics import wait_workers

MESSAGES = [{"role": "user", "content": "hi"}]


def deployment(name: str, up: MockUpstream, extra: str = "") -> str:
    return textwrap.dedent(f"""
        [[routes.r.deployments]]
        name = "{name}"
        kind = "openai"
        base_url = "{up.openai_base}"
        model = "upstream-model"
        api_key_env = "TEST_UPSTREAM_KEY"
        {extra}
        """)


def two_workers(tmp_path: Path, config: str) -> Daemon:
    d = start_daemon(tmp_path, config, args=["--workers", "2"], listen=f"127.0.0.1:{free_port()}")
    try:
        wait_workers(d)
    except BaseException:
        d.stop()
        raise
    return d


FAST = {"mock": {"tokens": 2, "delay_ms": 1.0}}  # (per request: a short answer from a slow mock)


async def call(d: Daemon, stream: bool = False, fast: bool = True) -> int:
    """One chat completion on a new connection (whichever worker the kernel gives it): its HTTP status."""
    extra = FAST if fast else None
    async with openai.AsyncOpenAI(base_url=d.base_url, api_key="k", max_retries=0) as c:
        try:
            if stream:
                chunks = await c.chat.completions.create(model="r", messages=MESSAGES, stream=True, extra_body=extra)
                async for _ in chunks:
                    pass
            else:
                await c.chat.completions.create(model="r", messages=MESSAGES, extra_body=extra)
        except openai.APIStatusError as exc:
            return exc.status_code
    return 200


def shared_pool(tmp_path: Path, worker: int, max_concurrent: int = 1) -> Pool:
    spec = {"name": "d0", "weight": 1, "tier": 1, "max_concurrent": max_concurrent, "rpm": None, "tpm": None}
    return Pool([spec], "p2c", shared=tmp_path / "pool.shm", worker=worker)


def test_pools_on_one_file_are_one_pool(tmp_path: Path) -> None:
    a, b = shared_pool(tmp_path, 0), shared_pool(tmp_path, 1)
    assert a.shared and b.shared and not Pool([{"name": "x"}]).shared
    assert a.pick() == 0 and b.pick() == Pool.BUSY
    assert [s["outstanding"] for s in (a.snapshot()[0], b.snapshot()[0])] == [1, 0]
    a.release(0, "success")
    assert b.pick() == 0
    with pytest.raises(ValueError, match="another configuration"):
        shared_pool(tmp_path, 2, max_concurrent=2)


def bench_route() -> Route:
    config = {
        "routes": {
            "r": {
                "queue_timeout_s": 30.0,
                "deployments": [
                    {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m", "max_concurrent": 1}
                ],
            }
        }
    }
    return parse_config(config, env={}).routes["r"]


def test_a_worker_that_cannot_map_the_pool_file_serves_with_its_own_limits(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    route = bench_route()
    shared_pool_path(tmp_path, "r").mkdir()  # (something in the way: open() fails)
    pool = RoutePool(route, tmp_path, 1)
    assert not pool.pool.shared and pool.pick([]).ok
    assert "limits and breakers are this worker's alone" in caplog.text


async def test_room_freed_in_one_worker_wakes_a_request_queued_in_another(tmp_path: Path) -> None:
    route = bench_route()
    a, b = RoutePool(route, tmp_path, 0), RoutePool(route, tmp_path, 1)
    waker_a, waker_b = Waker(tmp_path, 0, {"r": a}), Waker(tmp_path, 1, {"r": b})
    try:
        held = a.pick([])
        assert held.ok and not b.pick([]).ok
        queued = asyncio.create_task(b.acquire([]))
        await asyncio.sleep(0)  # (b's request runs up to its wait in the queue)
        assert a.pool.others_waiting() == 1 << 1
        a.release(held.index, "success")
        # Woken by a's datagram, not by its own 50 ms poll of the shared state.
        got = await asyncio.wait_for(queued, 5)
        assert got.ok and (waker_a.sent, waker_b.received) == (1, 1)
        assert not a.pool.others_waiting()  # (b waits no more)
        b.release(got.index, "success")
        assert waker_b.sent == 0  # nobody was waiting
    finally:
        waker_a.close()
        waker_b.close()


async def test_a_429_through_one_worker_keeps_every_worker_off_the_deployment(
    mock_factory: Callable[..., MockUpstream], tmp_path: Path
) -> None:
    limited = mock_factory(fail_status=429, retry_after="60")
    spare = mock_factory(delay_ms=1.0)
    config = (
        '[routes.r]\nstrategy = "priority"\n'
        + deployment("limited", limited, "tier = 1")
        + deployment("spare", spare, "tier = 2")
    )
    d = two_workers(tmp_path, config)
    try:
        # 16 new connections (both workers serve some): each worker would try `limited` first if it had only
        # its own view of the deployment; it is tried once, by whichever worker came first.
        statuses = [await call(d) for _ in range(16)]
        assert statuses == [200] * 16
        assert limited.stats()["requests"] == 1
        assert spare.stats()["requests"] == 16
        # Each worker's view (written once a second) shows it cooling down, for its Retry-After.
        deadline = time.monotonic() + 5
        while True:
            (route,) = [r for r in d.get("/admin/routes")["routes"] if r["route"] == "r"]
            views = route["deployments"][0]["by_worker"]
            if len(views) == 2 and all(v["state"] == "cooling_down" and v["until_s"] > 50 for v in views):
                break
            assert time.monotonic() < deadline, views
            await asyncio.sleep(0.1)
    finally:
        d.stop()


def one_at_a_time(
    mock_factory: Callable[..., MockUpstream], tmp_path: Path, seconds: int
) -> tuple[MockUpstream, Daemon]:
    """Two workers over one deployment that takes one request at a time (others queue for 0.2 s), whose mock
    streams for `seconds` unless told otherwise (`FAST`)."""
    slow = mock_factory(tokens=10 * seconds, delay_ms=100.0)
    config = "[routes.r]\nqueue_timeout_s = 0.2\n" + deployment("d0", slow, "max_concurrent = 1")
    return slow, two_workers(tmp_path, config)


async def test_the_breaker_opens_once_for_the_daemon(
    mock_factory: Callable[..., MockUpstream], tmp_path: Path
) -> None:
    broken = mock_factory(fail_status=500)
    spare = mock_factory(delay_ms=1.0)
    config = (
        '[routes.r]\nstrategy = "priority"\n[routes.r.breaker]\nfailures = 3\ncooldown_s = 60.0\n'
        + deployment("broken", broken, "tier = 1")
        + deployment("spare", spare, "tier = 2")
    )
    d = two_workers(tmp_path, config)
    try:
        # One request at a time over new connections: the first three fail over from `broken` to `spare` and
        # open its circuit for every worker (a breaker per worker would let each send its own three).
        assert [await call(d) for _ in range(16)] == [200] * 16
        assert broken.stats()["requests"] == 3
        assert spare.stats()["requests"] == 16
    finally:
        d.stop()


async def test_max_concurrent_is_the_daemons_not_each_workers(
    mock_factory: Callable[..., MockUpstream], tmp_path: Path
) -> None:
    slow, d = one_at_a_time(mock_factory, tmp_path, 3)
    try:
        held = asyncio.create_task(call(d, stream=True, fast=False))
        deadline = time.monotonic() + 10
        while slow.stats()["streams"] < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        # While that one streams, every other request waits its 0.2 s in the queue and is refused, whichever
        # worker it reaches (with a pool per worker, those reaching the other worker would stream).
        others = await asyncio.gather(*(call(d, fast=False) for _ in range(10)))
        assert others == [429] * 10
        assert slow.stats()["requests"] == 1
        assert await held == 200
        assert await call(d) == 200
    finally:
        d.stop()


async def test_a_killed_workers_request_in_flight_is_not_counted_after_its_restart(
    mock_factory: Callable[..., MockUpstream], tmp_path: Path
) -> None:
    _, d = one_at_a_time(mock_factory, tmp_path, 10)
    try:
        held = asyncio.create_task(call(d, stream=True, fast=False))
        deadline = time.monotonic() + 10
        holder = None
        while holder is None:
            assert time.monotonic() < deadline, "no worker shows the stream in flight"
            await asyncio.sleep(0.05)
            (route,) = [r for r in d.get("/admin/routes")["routes"] if r["route"] == "r"]
            holder = next((w["pid"] for w in route["deployments"][0]["by_worker"] if w["outstanding"] == 1), None)
        os.kill(holder, signal.SIGKILL)
        with pytest.raises(openai.APIError):
            await held
        # The supervisor restarts the worker; its predecessor's stream is no longer counted against the limit.
        wait_workers(d)
        # Each call ends before the next: with the dead stream still counted, those reaching the other worker
        # (or the restarted one) would wait out the queue and be refused.
        assert [await call(d) for _ in range(8)] == [200] * 8
    finally:
        d.stop()
