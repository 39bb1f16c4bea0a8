"""The load-balancing Pool as relay.py uses it: pick, first token, release; limits, breaker, cooldowns."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterable

import pytest
from tokenrelay._core import Pool


def deployments(n: int, **extra: object) -> list[dict[str, object]]:
    return [{"name": f"d{i}", **extra} for i in range(n)]


def attempt(pool: Pool, exclude: Iterable[int] | None = None, outcome: str = "success") -> int:
    idx = pool.pick(exclude)
    assert idx >= 0
    pool.release(idx, outcome)  # type: ignore[arg-type]
    return idx


def states(pool: Pool) -> list[object]:
    return [d["state"] for d in pool.snapshot()]


def test_a_request_attempt_round_trip() -> None:
    pool = Pool(deployments(2))
    assert len(pool) == 2 and pool.strategy == "p2c"
    idx = pool.pick()
    assert pool.snapshot()[idx]["outstanding"] == 1
    pool.first_token(idx, 0.25)
    pool.release(idx, "success", output_tokens=50, total_tokens=80, duration_s=0.5)
    snap = pool.snapshot()[idx]
    assert snap["outstanding"] == 0
    assert snap["ewma_ttft_s"] == 0.25
    assert snap["ewma_tokens_per_s"] == 100.0
    assert (snap["requests"], snap["rpm_used"], snap["tpm_used"]) == (1, 1, 80)
    assert snap["state"] == "healthy"
    assert pool.snapshot()[1 - idx]["ewma_ttft_s"] is None


@pytest.mark.parametrize(
    "strategy", ["p2c", "least_outstanding", "round_robin", "weighted", "latency", "fastest", "priority"]
)
def test_every_strategy_spreads_and_respects_exclude(strategy: str) -> None:
    pool = Pool(deployments(3), strategy)
    counts = Counter(attempt(pool, [1]) for _ in range(300))
    assert counts[1] == 0
    assert counts[0] + counts[2] == 300
    assert pool.pick([0, 1, 2]) == Pool.UNAVAILABLE
    assert pool.retry_after([0, 1, 2]) is None
    assert pool.retry_after() == 0.0


def test_weighted_follows_weights() -> None:
    pool = Pool([{"name": "a", "weight": 5}, {"name": "b"}, {"name": "c"}], "weighted")
    assert [attempt(pool) for _ in range(7)] == [0, 0, 1, 0, 2, 0, 0]


def test_exclude_accepts_any_iterable() -> None:
    pool = Pool(deployments(3))
    assert {attempt(pool, (0, 2)) for _ in range(20)} == {1}
    idx = pool.pick(x for x in [0, 1])
    assert idx == 2
    pool.release(idx, "cancelled")


def test_max_concurrent_makes_the_pool_busy() -> None:
    pool = Pool(deployments(2, max_concurrent=1))
    held = [pool.pick(), pool.pick()]
    assert sorted(held) == [0, 1]
    assert pool.pick() == Pool.BUSY
    wait = pool.retry_after()
    assert wait is not None and 0 < wait <= 0.1
    pool.release(held[0], "success")
    assert pool.pick() == held[0]


def test_rpm_limit() -> None:
    pool = Pool([{"name": "a", "rpm": 2}])
    attempt(pool)
    attempt(pool)
    assert pool.pick() == Pool.BUSY
    wait = pool.retry_after()
    assert wait is not None and 58 < wait <= 60


def test_breaker_opens_then_probes_and_closes() -> None:
    pool = Pool(deployments(2), "round_robin", cooldown_s=0.05, max_cooldown_s=1.0)
    for _ in range(3):
        attempt(pool, [1], outcome="failure")
    assert states(pool)[0] == "open"
    assert pool.pick([1]) == Pool.UNAVAILABLE
    wait = pool.retry_after([1])
    assert wait is not None and 0 < wait <= 0.05
    assert {attempt(pool) for _ in range(5)} == {1}
    time.sleep(0.06)
    assert states(pool)[0] == "half_open"
    probe = pool.pick([1])
    assert probe == 0
    assert pool.pick([1]) == Pool.UNAVAILABLE, "one probe at a time"
    pool.release(probe, "success")
    assert states(pool)[0] == "healthy"
    assert attempt(pool, [1]) == 0


def test_rate_limited_and_cooldown() -> None:
    pool = Pool(deployments(2), "round_robin")
    idx = pool.pick([1])
    pool.release(idx, "rate_limited")
    pool.cooldown(idx, 30.0)
    snap = pool.snapshot()[0]
    assert snap["state"] == "cooling_down"
    assert 29 < snap["until_s"] <= 30  # type: ignore[operator]
    assert (snap["error_rate"], snap["rate_limited"], snap["failures"]) == (1.0, 1, 0)
    assert {attempt(pool) for _ in range(10)} == {1}


def test_health_checker_marks_down_and_up() -> None:
    pool = Pool(deployments(1))
    pool.set_health(0, False)
    assert states(pool) == ["down"]
    assert pool.pick() == Pool.UNAVAILABLE
    assert pool.retry_after() is None
    pool.set_health(0, True)
    assert attempt(pool) == 0


def test_priority_tiers() -> None:
    pool = Pool([{"name": "own-vllm", "tier": 1}, {"name": "paid-api", "tier": 2}], "priority")
    assert {attempt(pool) for _ in range(50)} == {0}
    pool.cooldown(0, 10)
    assert attempt(pool) == 1


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "a", "weight": 0}, r"deployments\[0\]\.weight"),
        ({"name": "a", "weight": True}, r"deployments\[0\]\.weight"),
        ({"name": "a", "rpm": -5}, r"deployments\[0\]\.rpm"),
        ({"name": "a", "tpm": "many"}, r"deployments\[0\]\.tpm"),
        ({"name": "a", "max_concurent": 3}, r"deployments\[0\]\.max_concurent: unknown field"),
        ({"weight": 2}, r"deployments\[0\]\.name: missing"),
        ({"name": 7}, r"deployments\[0\]\.name"),
    ],
)
def test_bad_deployment_fields_are_named(spec: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Pool([spec])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="strategy"):
        Pool(deployments(1), "random")
    with pytest.raises(ValueError, match="deployments"):
        Pool([])
    with pytest.raises(ValueError, match="duplicate"):
        Pool([{"name": "a"}, {"name": "a"}])
    with pytest.raises(ValueError, match="max_cooldown_s"):
        Pool(deployments(1), cooldown_s=10, max_cooldown_s=5)
    pool = Pool(deployments(1))
    with pytest.raises(ValueError, match="without a matching pick"):
        pool.release(0, "success")
    with pytest.raises(IndexError):
        pool.cooldown(3, 1.0)
    idx = pool.pick()
    with pytest.raises(ValueError, match="outcome"):
        pool.release(idx, "meh")  # type: ignore[arg-type]
    pool.release(idx, "client_gone")
    assert pool.snapshot()[0]["outstanding"] == 0


def test_threads_hammering_pick_release_leave_nothing_outstanding() -> None:
    pool = Pool(deployments(4, max_concurrent=3), "p2c")
    outcomes = ["success", "failure", "rate_limited", "cancelled"]
    picks = Counter[str]()
    lock = threading.Lock()

    def worker(seed: int) -> None:
        mine = Counter[str]()
        for k in range(5000):
            held = [pool.pick() for _ in range(2)]
            for idx in held:
                if idx >= 0:
                    mine["picked"] += 1
                    pool.first_token(idx, 0.01)
                    pool.release(idx, outcomes[(seed + k) % 4], 10, 20, 0.1)  # type: ignore[arg-type]
                else:
                    mine["refused"] += 1
        with lock:
            picks.update(mine)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = pool.snapshot()
    assert [d["outstanding"] for d in snap] == [0, 0, 0, 0]
    assert sum(d["requests"] for d in snap) == picks["picked"]  # type: ignore[misc]
    assert picks["picked"] + picks["refused"] == 4 * 5000 * 2
