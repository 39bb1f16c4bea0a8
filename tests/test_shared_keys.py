"""Client keys' limits with several workers: one table of counters for the whole daemon (`sharedkeys`), so N
workers admit what one would, and a worker that dies does not leave its reservations behind."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from tokenrelay import keys
from tokenrelay.admission import Admission, Denial, Reservation
from tokenrelay.sharedkeys import PAIRS, SharedKeyStates

from tests.conftest import MockUpstream, free_port, route_config, start_daemon
from tests.test_budget import ANSWER_USD, PRICED
from tests.test_keys import ADMIN, create, http
from tests.test_worker_metrics import wait_workers

NOW = 1_800_000_000.0


def key(**limits: Any) -> keys.ClientKey:
    return keys.ClientKey("0123456789ab", "k", "00", "00", **limits)


def workers(tmp_path: Path, n: int = 2) -> list[Admission]:
    """`n` workers' admissions over one table (as separate processes have; here in one, one after another)."""
    return [Admission(SharedKeyStates(tmp_path / "keys.shm", worker=i)) for i in range(n)]


def test_rpm_and_tpm_count_every_workers_requests(tmp_path: Path) -> None:
    a, b = workers(tmp_path)
    k = key(rpm=3, tpm=100)
    assert isinstance(a.admit(k, 0, 10, NOW), Reservation)
    assert isinstance(b.admit(k, 0, 10, NOW + 1), Reservation)
    third = a.admit(k, 0, 10, NOW + 2)
    assert isinstance(third, Reservation)
    over = b.admit(k, 0, 0, NOW + 3)
    assert isinstance(over, Denial) and over.code == "rpm_limit" and over.retry_after_s == pytest.approx(57)
    assert isinstance(a.admit(k, 0, 0, NOW + 61), Reservation)  # the first one aged out, whoever admitted it
    # tpm: 80 tokens settled by one worker leave 20 for the other.
    b.settle(third, 0, 80, NOW + 61)
    tpm = b.admit(k, 0, 30, NOW + 62)
    assert isinstance(tpm, Denial) and tpm.code == "tpm_limit"


def test_a_budget_is_reserved_and_spent_across_workers(tmp_path: Path) -> None:
    a, b = workers(tmp_path)
    k = key(budget_usd=1.0, period="day")
    first = a.admit(k, 0.6, 0, NOW)
    assert isinstance(first, Reservation)
    held = b.admit(k, 0.6, 0, NOW)
    assert isinstance(held, Denial) and held.code == "budget_reserved"
    a.settle(first, 0.25, 0, NOW)
    assert isinstance(b.admit(k, 0.75, 0, NOW), Reservation)  # exactly what is left, seen from the other worker
    spent = a.admit(k, 0.01, 0, NOW)
    assert isinstance(spent, Denial) and spent.code == "budget_reserved"


def test_a_dead_workers_reservations_go_with_it(tmp_path: Path) -> None:
    a, b = workers(tmp_path)
    k = key(budget_usd=1.0, period="day")
    assert isinstance(b.admit(k, 0.9, 0, NOW), Reservation)  # ...and worker 1 dies before it settles
    assert isinstance(a.admit(k, 0.2, 0, NOW), Denial)
    Admission(SharedKeyStates(tmp_path / "keys.shm", worker=1))  # its replacement starts
    assert isinstance(a.admit(k, 0.2, 0, NOW), Reservation)


def test_a_busy_keys_minute_is_merged_but_counted_exactly(tmp_path: Path) -> None:
    a, b = workers(tmp_path)
    n = 3 * PAIRS  # more requests in a minute than a slot has entries
    k = key(rpm=n + 1, tpm=10 * n)
    for i in range(n):
        r = (a, b)[i % 2].admit(k, 0, 1, NOW + i * 0.01)
        assert isinstance(r, Reservation)
        (a, b)[i % 2].settle(r, 0, 1, NOW + i * 0.01)
    assert isinstance(a.admit(k, 0, 0, NOW + 40), Reservation)  # request n + 1
    over = b.admit(k, 0, 0, NOW + 40)
    assert isinstance(over, Denial) and over.code == "rpm_limit"
    # Merged entries age out at the later request's time: later than exact, never earlier.
    assert 0 < over.retry_after_s <= 60 - 40 + 0.01 * (n - 1) and over.retry_after_s >= 20


async def _call(d_url: str, secret: str) -> int:
    async with openai.AsyncOpenAI(base_url=d_url, api_key=secret, max_retries=0) as c:  # (a connection each)
        try:
            await c.chat.completions.create(model="paid", messages=[{"role": "user", "content": "hi"}], max_tokens=24)
        except openai.APIStatusError as exc:
            return exc.status_code
    return 200


async def test_two_workers_admit_what_one_would(mock_factory: Callable[..., MockUpstream], tmp_path: Path) -> None:
    up = mock_factory(tokens=24)
    db = tmp_path / "keys.db"
    rpm = create(db, "rpm", "--rpm", "10")
    budget = create(db, "budget", "--budget-usd", str(10 * ANSWER_USD), "--period", "day")
    config = route_config("paid", up, deployment_extra=PRICED)
    d = start_daemon(
        tmp_path,
        config,
        args=["--workers", "2", "--db", str(db)],
        env={"TOKENRELAY_ADMIN_KEY": ADMIN},
        listen=f"127.0.0.1:{free_port()}",
    )
    try:
        wait_workers(d)
        statuses = await asyncio.gather(*(_call(d.base_url, rpm) for _ in range(30)))
        assert statuses.count(200) == 10 and statuses.count(429) == 20, statuses
        statuses = await asyncio.gather(*(_call(d.base_url, budget) for _ in range(40)))
        assert statuses.count(200) == 10 and set(statuses) <= {200, 403, 429}, statuses
        for _ in range(50):  # (the other worker's ledger writes land within a second)
            status, body, _ = http("GET", f"{d.url}/usage?key_id={keys.key_id_of(budget)}", ADMIN)
            if body["totals"]["cost_usd"] == pytest.approx(10 * ANSWER_USD):
                break
            await asyncio.sleep(0.1)
        assert status == 200 and body["totals"]["cost_usd"] == pytest.approx(10 * ANSWER_USD)
    finally:
        assert d.stop() == 0


_RACER = """
import sys, time
from pathlib import Path
from tokenrelay import keys
from tokenrelay.admission import Admission, Reservation
from tokenrelay.sharedkeys import SharedKeyStates
a = Admission(SharedKeyStates(Path(sys.argv[1]), worker=int(sys.argv[2])))
k = keys.ClientKey("0123456789ab", "k", "00", "00", rpm=1500, budget_usd=1000.0, period="day")
while time.time() < float(sys.argv[3]):
    pass
admitted = 0
for _ in range(1000):
    r = a.admit(k, 0.5, 0)
    if isinstance(r, Reservation):
        admitted += 1
        a.settle(r, 0.25, 0)
print(admitted)
"""


def test_two_processes_racing_for_one_key_admit_exactly_its_limit(tmp_path: Path) -> None:
    # Two processes, 1000 admissions each at the same moment: exactly 1500 (rpm) get through, and the spend is
    # exactly theirs (no lost update between the read and the write of a slot).
    start = str(time.time() + 1.0)
    path = str(tmp_path / "keys.shm")
    procs = [
        subprocess.Popen([sys.executable, "-c", _RACER, path, str(i), start], stdout=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    counts = [int(p.communicate(timeout=60)[0]) for p in procs]
    assert sum(counts) == 1500 and min(counts) > 0, counts
    a = Admission(SharedKeyStates(tmp_path / "keys.shm", worker=2))
    k = key(rpm=1500, budget_usd=1000.0, period="day")
    denied = a.admit(k, 0.0, 0)
    assert isinstance(denied, Denial) and denied.code == "rpm_limit"
    budget = key(budget_usd=1500 * 0.25 + 0.5, period="day")  # what they spent, plus one more reservation
    assert isinstance(a.admit(budget, 0.5, 0), Reservation) and isinstance(a.admit(budget, 0.01, 0), Denial)


async def test_a_run_registered_through_one_worker_is_the_same_run_on_every_worker(
    mock_factory: Callable[..., MockUpstream], tmp_path: Path
) -> None:
    up = mock_factory(tokens=24)
    config = route_config("paid", up, deployment_extra=PRICED)
    d = start_daemon(tmp_path, config, args=["--workers", "2"], listen=f"127.0.0.1:{free_port()}")
    try:
        wait_workers(d)
        status, created, _ = http("POST", f"{d.url}/runs", body={"id": "evals-1", "budget_usd": 10 * ANSWER_USD})
        assert status == 201 and created["budget"]["limit_usd"] == pytest.approx(10 * ANSWER_USD)
        # (each request a new connection: whichever worker the kernel picks)
        assert {http("GET", f"{d.url}/runs/evals-1")[0] for _ in range(10)} == {200}
        assert {http("POST", f"{d.url}/runs", body={"id": "evals-1"})[0] for _ in range(6)} == {409}

        async def one() -> int:
            headers = {"X-Tokenrelay-Run": "evals-1"}
            async with openai.AsyncOpenAI(
                base_url=d.base_url, api_key="k", max_retries=0, default_headers=headers
            ) as c:
                try:
                    await c.chat.completions.create(
                        model="paid", messages=[{"role": "user", "content": "hi"}], max_tokens=24
                    )
                except openai.APIStatusError as exc:
                    return exc.status_code
            return 200

        statuses = await asyncio.gather(*(one() for _ in range(40)))
        assert statuses.count(200) == 10 and statuses.count(429) == 30, statuses  # the run's budget, exactly
        assert {http("POST", f"{d.url}/runs/evals-1/end", body={"exit_code": 0})[0] for _ in range(4)} == {200}
        for _ in range(10):
            status, shown, _ = http("GET", f"{d.url}/runs/evals-1")
            assert status == 200 and shown["run"]["ended"] is not None and shown["run"]["exit_code"] == 0
            assert shown["run"]["budget"]["spent_usd"] == pytest.approx(10 * ANSWER_USD)
            assert shown["run"]["budget"]["rejected"] == 30 and shown["run"]["budget"]["in_flight"] == 0
    finally:
        assert d.stop() == 0


def test_a_run_budget_is_one_budget_for_every_worker(tmp_path: Path) -> None:
    a, b = (SharedKeyStates(tmp_path / "keys.shm", worker=i) for i in range(2))
    on_a, on_b = (t.budget("run:evals") for t in (a, b))
    assert on_a is not None and on_b is not None
    on_a.init(1.0, 0.0)
    on_b.init(1.0, 0.25)  # (the ledger's spend, seen by the worker that found the run later: the larger counts)
    first = on_a.reserve(0.5)
    assert first is not None and on_b.reserve(0.5) is None  # 0.25 spent + 0.5 reserved + 0.5 > 1.0
    on_a.settle(first, 0.125)
    assert on_b.reserve(0.625) is not None  # exactly what is left
    on_b.refuse()
    s = on_a.snapshot()
    assert s["spent_usd"] == 0.375 and s["reserved_usd"] == 0.625 and s["in_flight"] == 1 and s["rejected"] == 2
    SharedKeyStates(tmp_path / "keys.shm", worker=1)  # worker 1 died holding 0.625; its replacement starts
    assert on_a.snapshot()["reserved_usd"] == 0.0 and on_a.reserve(0.625) is not None
