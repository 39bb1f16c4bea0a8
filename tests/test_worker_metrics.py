"""`/metrics` of a daemon with several workers: one exposition for the whole daemon, whichever worker a scrape
reaches, with totals that never go back (a worker killed and restarted included)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import openai
from prometheus_client.parser import text_string_to_metric_families
from tokenrelay.workermetrics import Exposition, merge

from tests.conftest import Daemon, MockUpstream, free_port, route_config, start_daemon

MESSAGES = [{"role": "user", "content": "count these tokens please"}]

RD = 'route="r",deployment="d"'


def family(name: str, kind: str, *samples: str) -> str:
    """One family of an exposition as tokenrelay writes it: HELP, TYPE, then its samples."""
    return f"# HELP {name} About {name}.\n# TYPE {name} {kind}\n" + "".join(f"{s}\n" for s in samples)


def ttft(under_100ms: int, count: int, seconds: float) -> str:
    """A first-token histogram: `under_100ms` of `count` first tokens within 0.1 s, `seconds` in all."""
    return family(
        "tokenrelay_ttft_seconds",
        "histogram",
        f'tokenrelay_ttft_seconds_bucket{{{RD},le="0.1"}} {under_100ms}',
        f'tokenrelay_ttft_seconds_bucket{{{RD},le="+Inf"}} {count}',
        f"tokenrelay_ttft_seconds_sum{{{RD}}} {seconds}",
        f"tokenrelay_ttft_seconds_count{{{RD}}} {count}",
    )


WORKER_A = (
    family(
        "tokenrelay_requests_total",
        "counter",
        f'tokenrelay_requests_total{{{RD},status_class="2xx"}} 3',
        f'tokenrelay_requests_total{{{RD},status_class="5xx"}} 1',
    )
    + family("tokenrelay_cost_usd_total", "counter", f"tokenrelay_cost_usd_total{{{RD}}} 0.25")
    + ttft(2, 3, 0.5)
    + family("tokenrelay_requests_in_flight", "gauge", "tokenrelay_requests_in_flight 2")
    + family("tokenrelay_upstream_up", "gauge", f"tokenrelay_upstream_up{{{RD}}} 0")
)
# Another worker: more of the same series, one series (route s) and one family (busy polling) of its own.
WORKER_B = (
    family(
        "tokenrelay_requests_total",
        "counter",
        f'tokenrelay_requests_total{{{RD},status_class="2xx"}} 4',
        'tokenrelay_requests_total{route="s",deployment="e",status_class="2xx"} 7',
    )
    + family("tokenrelay_cost_usd_total", "counter", f"tokenrelay_cost_usd_total{{{RD}}} 0.125")
    + ttft(1, 4, 2.25)
    + family("tokenrelay_requests_in_flight", "gauge", "tokenrelay_requests_in_flight 5")
    + family("tokenrelay_upstream_up", "gauge", f"tokenrelay_upstream_up{{{RD}}} 1")
    + family("tokenrelay_busy_poll_cpu_seconds_total", "counter", "tokenrelay_busy_poll_cpu_seconds_total 1.5")
)


def samples(text: str) -> dict[Key, float]:
    """Every sample of an exposition, parsed by the Prometheus client (which also checks the format)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


Key = tuple[str, tuple[tuple[str, str], ...]]


def k(name: str, **labels: str) -> Key:
    return (name, tuple(sorted(labels.items())))


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_counters_and_histograms_sum_and_only_live_workers_gauges_count(tmp_path: Path) -> None:
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f"{os.getpid()}.prom").write_text(WORKER_A)
        (tmp_path / f"{live.pid}.prom").write_text(WORKER_B)
        got = samples(merge(tmp_path))
    finally:
        live.kill()
        live.wait()
    assert got[k("tokenrelay_requests_total", route="r", deployment="d", status_class="2xx")] == 7
    assert got[k("tokenrelay_requests_total", route="r", deployment="d", status_class="5xx")] == 1
    assert got[k("tokenrelay_requests_total", route="s", deployment="e", status_class="2xx")] == 7
    assert got[k("tokenrelay_cost_usd_total", route="r", deployment="d")] == 0.375
    assert got[k("tokenrelay_ttft_seconds_bucket", route="r", deployment="d", le="0.1")] == 3
    assert got[k("tokenrelay_ttft_seconds_bucket", route="r", deployment="d", le="+Inf")] == 7
    assert got[k("tokenrelay_ttft_seconds_count", route="r", deployment="d")] == 7
    assert got[k("tokenrelay_ttft_seconds_sum", route="r", deployment="d")] == 2.75
    assert got[k("tokenrelay_requests_in_flight")] == 7
    assert got[k("tokenrelay_upstream_up", route="r", deployment="d")] == 1  # up in one worker: it takes traffic
    assert got[k("tokenrelay_busy_poll_cpu_seconds_total")] == 1.5  # (a family only one worker has)
    assert got[k("tokenrelay_workers")] == 2


def test_a_dead_workers_counts_stay_and_its_gauges_go(tmp_path: Path) -> None:
    (tmp_path / f"{os.getpid()}.prom").write_text(WORKER_A)
    (tmp_path / f"{dead_pid()}.prom").write_text(WORKER_B)
    (tmp_path / "notes.txt").write_text("not an exposition")
    (tmp_path / f".{os.getpid()}.tmp").write_text("half a fi")
    got = samples(merge(tmp_path))
    assert got[k("tokenrelay_requests_total", route="r", deployment="d", status_class="2xx")] == 7  # its counts stay
    assert got[k("tokenrelay_requests_in_flight")] == 2  # its requests are not in flight any more
    assert got[k("tokenrelay_upstream_up", route="r", deployment="d")] == 0  # (the live worker's view only)
    assert got[k("tokenrelay_workers")] == 1


def test_an_exposition_renders_back_as_it_was_read() -> None:
    assert Exposition.parse(WORKER_B).render() == WORKER_B


def _scrape(url: str) -> dict[Key, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:  # (a new connection: any worker)
        return samples(r.read().decode())


def _requests(got: dict[Key, float]) -> float:
    return sum(v for (name, labels), v in got.items() if name == "tokenrelay_requests_total")


def _worker_pids(d: Daemon) -> set[int]:
    """The workers that answer 20 new connections (one queued at a worker just killed is reset: skipped)."""
    pids = set()
    for _ in range(20):
        with contextlib.suppress(OSError):
            pids.add(d.get("/healthz")["worker_pid"])
    return pids


def wait_workers(d: Daemon, n: int = 2, timeout: float = 30.0) -> set[int]:
    """Until `n` workers answer (the daemon is up once its first worker listens; the others may take longer)."""
    deadline = time.monotonic() + timeout
    while len(pids := _worker_pids(d)) < n:
        assert time.monotonic() < deadline, f"only workers {pids} answer"
        time.sleep(0.1)
    return pids


def _wait_for(d: Daemon, want: float, timeout: float = 15.0) -> list[float]:
    """Scrapes until 10 in a row show `want` requests; returns every total seen (in order)."""
    seen: list[float] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen.append(_requests(_scrape(d.url)))
        if seen[-10:] == [want] * 10:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"/metrics never settled at {want}: {seen[-20:]}")


def two_workers(tmp_path: Path, up: MockUpstream) -> Daemon:
    return start_daemon(tmp_path, route_config("r", up), args=["--workers", "2"], listen=f"127.0.0.1:{free_port()}")


async def calls(d: Daemon, n: int, streams_only: bool = False) -> None:
    """`n` calls at once, each from its own client (a connection each: the kernel spreads them over the workers);
    every other one not streamed unless `streams_only`."""

    async def one(i: int) -> None:
        async with openai.AsyncOpenAI(base_url=d.base_url, api_key="k", max_retries=0) as c:
            if i % 2 and not streams_only:
                await c.chat.completions.create(model="r", messages=MESSAGES)  # type: ignore[arg-type]
            else:
                s = await c.chat.completions.create(model="r", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
                async for _ in s:
                    pass

    await asyncio.gather(*(one(i) for i in range(n)))


async def test_two_workers_serve_one_exposition_whose_totals_never_go_back(
    mock_factory: Callable[..., MockUpstream], tmp_path: Path
) -> None:
    up = mock_factory(delay_ms=1, tokens=5)
    d = two_workers(tmp_path, up)
    try:
        pids = wait_workers(d)
        await calls(d, 60)
        seen = _wait_for(d, 60)
        assert seen == sorted(seen) and max(seen) == 60  # never more than were made, never back
        got = _scrape(d.url)
        assert got[k("tokenrelay_workers")] == 2
        output = k("tokenrelay_tokens_total", route="r", deployment="d0", direction="output", source="reported")
        assert got[output] == 60 * 5 == up.stats()["output_tokens"]

        # A worker killed outright: its counts stay in the totals, the supervisor starts another in its place.
        os.kill(pids.pop(), signal.SIGKILL)
        deadline = time.monotonic() + 15
        while not _worker_pids(d) - pids:
            assert time.monotonic() < deadline, "no new worker"
            await asyncio.sleep(0.1)
        await calls(d, 20)
        seen = _wait_for(d, 80)
        assert seen == sorted(seen)
        assert _scrape(d.url)[k("tokenrelay_workers")] == 2  # (the dead one no longer counts as alive)
    finally:
        assert d.stop() == 0


async def test_the_live_page_of_two_workers_shows_them_both(
    mock_factory: Callable[..., MockUpstream], tmp_path: Path
) -> None:
    up = mock_factory(delay_ms=1, tokens=5)
    d = two_workers(tmp_path, up)
    try:
        wait_workers(d)
        await calls(d, 40, streams_only=True)
        settled, snap = 0, {}
        deadline = time.monotonic() + 15
        while settled < 10:  # 10 snapshots in a row, from whichever worker each new connection reaches
            assert time.monotonic() < deadline, f"the page never showed both workers' 40 requests: {snap['totals']}"
            snap = d.get("/ui/snapshot")
            settled = settled + 1 if snap["workers"] == 2 and snap["totals"]["requests"] == 40 else 0
            await asyncio.sleep(0.05)
        assert snap["totals"]["output"] == 40 * 5 == up.stats()["output_tokens"]
        assert snap["seen"] == 40
        (deployment,) = next(r for r in snap["routes"] if r["route"] == "r")["deployments"]
        assert deployment["ttft_samples"] == 40 and deployment["outstanding"] == 0
        assert sum(snap["ttft_hist"]["counts"]) == 40
        assert abs(sum(snap["series"]["out"]) - 40 * 5) < 1  # (each second rounded to 0.01)
        ends = [r["ts"] + r["duration_s"] for r in snap["recent"]]
        assert len(ends) == 30 and ends == sorted(ends, reverse=True)  # newest first across both workers
        assert len({r["seq"] for r in snap["recent"]}) == 30
        for _ in range(10):  # /admin/routes, from whichever worker: the deployment as both see it
            (shown,) = next(r for r in d.get("/admin/routes")["routes"] if r["route"] == "r")["deployments"]
            assert shown["requests"] == 40 and shown["outstanding"] == 0 and shown["state"] == "healthy"
            assert len(shown["by_worker"]) == 2 and sum(w["requests"] for w in shown["by_worker"]) == 40
    finally:
        assert d.stop() == 0
