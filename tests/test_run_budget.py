"""Reserve-then-settle budgets and the CLI's numbers for people."""

from __future__ import annotations

import random
import threading

import pytest
from tokenrelay.budget import Budget
from tokenrelay.runs import max_output_tokens
from tokenrelay.usage_cli import human_cost, human_count, human_seconds


def test_reserve_admits_within_the_limit_and_settles_the_actual_cost() -> None:
    b = Budget(1.0)
    first = b.reserve(0.6)
    assert first is not None
    assert b.reserve(0.5) is None  # 0.6 reserved + 0.5 > 1.0, even though nothing is spent yet
    b.settle(first, 0.1)
    assert b.spent_usd == pytest.approx(0.1) and b.reserved_usd == 0
    second = b.reserve(0.5)
    assert second is not None
    b.settle(second, 0.2)
    b.settle(second, 0.2)  # settling twice counts once
    assert b.spent_usd == pytest.approx(0.3) and b.rejected == 1 and b.in_flight == 0


def test_unknown_cost_is_not_counted_but_noted() -> None:
    b = Budget(1.0)
    token = b.reserve(0.4)
    assert token is not None
    b.settle(token, None)
    assert b.spent_usd == 0 and b.unpriced == 1


def test_a_spent_budget_refuses_even_free_requests() -> None:
    b = Budget(0.1, spent_usd=0.1)
    assert b.reserve(0.0) is None and b.exhausted


def test_concurrent_reservations_never_overshoot() -> None:
    b = Budget(5.0)
    rng = random.Random(7)

    def worker() -> None:
        for _ in range(500):
            worst = rng.uniform(0.0, 0.3)
            token = b.reserve(worst)
            if token is not None:
                b.settle(token, worst * rng.uniform(0.0, 1.0))  # actual <= worst case

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert b.spent_usd <= 5.0 and b.reserved_usd == pytest.approx(0.0) and b.in_flight == 0 and b.rejected > 0


def test_max_output_tokens_reads_each_api_s_field() -> None:
    assert max_output_tokens("chat", {"max_tokens": 10}) == 10
    assert max_output_tokens("chat", {"max_completion_tokens": 12, "max_tokens": 10}) == 12
    assert max_output_tokens("responses", {"max_output_tokens": 7}) == 7
    assert max_output_tokens("embeddings", {}) == 0
    assert max_output_tokens("messages", {}) == 4096


@pytest.mark.parametrize(
    ("value", "text"), [(0, "0"), (999, "999"), (1234, "1.2k"), (34_500, "34.5k"), (123_456, "123k"), (3.4e6, "3.4M")]
)
def test_human_count(value: float, text: str) -> None:
    assert human_count(value) == text


def test_human_cost_and_seconds() -> None:
    assert [human_cost(v) for v in (None, 0, 0.0043, 0.043, 1.5, 12345)] == ["—", "$0", "$0.0043", "$0.043",
                                                                            "$1.50", "$12,345"]  # fmt: skip
    assert [human_seconds(v) for v in (None, 0.085, 1.25, 42, 185, 3720)] == ["—", "85 ms", "1.2 s", "42 s",
                                                                             "3m05s", "1h02m"]  # fmt: skip
