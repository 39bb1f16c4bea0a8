"""Meters from Python: what the relay records is what drain(), totals() and /metrics show."""

from __future__ import annotations

import bisect
from typing import Any

import pytest
from tokenrelay._core import (
    HISTOGRAM_BOUNDS,
    METER_ERROR_CLASSES,
    Meters,
    histogram_merge,
    histogram_quantiles,
)
from tokenrelay.ledger import COUNTER_COLUMNS, HIST_COLUMNS, KEY_COLUMNS

T0 = 1_800_000_000.0  # a minute boundary


def record(m: Meters, **overrides: Any) -> None:
    kw: dict[str, Any] = dict(
        ts=T0 + 1, route="chat", deployment="openai-1", model="gpt-4o", key_id="k1", key_name="team-a",
        run="run-1", tags="", status=200, error_class="", input=1000, output=200, cached_input=600,
        cache_write=0, reasoning=50, input_estimated=False, output_estimated=False, cached_estimated=False,
        cache_write_estimated=False, reasoning_estimated=False, cost_usd=0.002, ttft_s=0.3, duration_s=2.3,
        stream=True, api="chat",
    )  # fmt: skip
    kw.update(overrides)
    m.record(**kw)


def test_drained_rows_have_exactly_the_ledger_columns() -> None:
    m = Meters()
    record(m)
    (row,) = m.drain()
    assert set(row) == set(KEY_COLUMNS + COUNTER_COLUMNS + HIST_COLUMNS)
    assert row["minute"] == T0
    assert row["input_reported"] == 1000 and row["cached_input_reported"] == 600
    assert row["reasoning_reported"] == 50
    assert row["gen_output_tokens"] == 200 and row["gen_time_s"] == pytest.approx(2.0)


def test_estimated_tokens_unknown_cost_and_errors_are_kept_apart() -> None:
    m = Meters()
    record(m, output_estimated=True, output=7)
    record(m, cost_usd=None)
    record(m, error_class="client_disconnect", status=200, output=3, output_estimated=True, ttft_s=None)
    record(m, error_class="rate_limited", status=429, input=0, output=0, cached_input=0, reasoning=0,
           cost_usd=0.0, ttft_s=None, duration_s=0.05)  # fmt: skip
    (row,) = m.drain()
    assert row["requests"] == 4 and row["successes"] == 2
    assert row["errors_client_disconnect"] == 1 and row["errors_rate_limited"] == 1
    assert row["output_estimated"] == 10 and row["output_reported"] == 200
    assert row["cost_unknown_requests"] == 1
    assert row["cost_usd"] == pytest.approx(0.002 * 2)
    assert row["ttft_count"] == 2
    totals = m.totals()
    assert totals["requests"] == 4 and totals["errors"] == 2


def test_unknown_error_class_raises_and_counts_nothing() -> None:
    m = Meters()
    with pytest.raises(ValueError, match="error class"):
        record(m, error_class="kaboom")
    assert m.drain() == []
    assert set(METER_ERROR_CLASSES) >= {"timeout", "cancelled_hedge", "upstream_error"}


def test_buckets_split_by_minute_and_key() -> None:
    m = Meters()
    record(m)
    record(m, ts=T0 + 59.9)
    record(m, ts=T0 + 60)
    record(m, run="run-2")
    record(m, tags="batch,eval")
    rows = m.drain()
    assert [(r["minute"], r["run"], r["tags"], r["requests"]) for r in rows] == [
        (T0, "run-1", "", 2),
        (T0, "run-1", "batch,eval", 1),
        (T0, "run-2", "", 1),
        (T0 + 60, "run-1", "", 1),
    ]


def test_restore_merges_without_double_counting() -> None:
    m = Meters()
    for _ in range(3):
        record(m)
    drained = m.drain()
    record(m)  # recorded while the write was failing
    m.restore(drained)
    assert m.pending_buckets() == 1
    (row,) = m.drain()
    assert row["requests"] == 4
    bucket = bisect.bisect_left(HISTOGRAM_BOUNDS, 2.3)  # every record lasted 2.3 s
    assert drained[0]["duration_hist"] == f"{bucket}:3"
    assert row["duration_hist"] == f"{bucket}:4"
    assert m.drain() == []
    assert m.totals()["requests"] == 4


def test_restore_validates_before_changing_anything() -> None:
    m = Meters()
    record(m)
    good = m.drain()
    bad = dict(good[0], requests=-1)
    with pytest.raises((ValueError, OverflowError)):
        m.restore([*good, bad])
    assert m.drain() == []
    with pytest.raises(ValueError):
        m.restore([{"route": "x"}])


def test_histogram_helpers() -> None:
    assert len(HISTOGRAM_BOUNDS) == 59 and HISTOGRAM_BOUNDS[0] == 0.001 and HISTOGRAM_BOUNDS[-1] == 630.0
    assert histogram_quantiles("", [0.5]) == [None]
    assert histogram_merge("1:2,5:1", "5:3") == "1:2,5:4"
    assert histogram_merge(None, "2:1") == "2:1"
    # 90 fast requests (≈ 0.1 s) and 10 slow ones (≈ 10 s): p50 is fast, p99 slow.
    m = Meters()
    for i in range(100):
        record(m, duration_s=10.0 if i % 10 == 0 else 0.1)
    (row,) = m.drain()
    p50, p99 = histogram_quantiles(row["duration_hist"], [0.5, 0.99])
    assert p50 is not None and 0.08 < p50 <= 0.1
    assert p99 is not None and 8.0 < p99 <= 10.0
    with pytest.raises(ValueError):
        histogram_quantiles("nonsense", [0.5])


def test_prometheus_text_parses_with_the_reference_parser() -> None:
    parser = pytest.importorskip("prometheus_client.parser")
    m = Meters()
    record(m)
    record(m, route='odd"route\\with\nnewline')
    record(m, error_class="upstream_5xx", status=502, ttft_s=None, duration_s=0.4)
    record(m, error_class="", status=200, deployment="anthropic-1", cost_usd=None)
    families = {f.name: f for f in parser.text_string_to_metric_families(m.prometheus())}
    assert set(families) >= {
        "tokenrelay_requests",
        "tokenrelay_tokens",
        "tokenrelay_cost_usd",
        "tokenrelay_time_to_first_token_seconds",
        "tokenrelay_request_duration_seconds",
    }
    reqs = {
        (s.labels["route"], s.labels["deployment"], s.labels["status_class"]): s.value
        for s in families["tokenrelay_requests"].samples
    }
    assert reqs[("chat", "openai-1", "2xx")] == 1
    assert reqs[("chat", "openai-1", "upstream_5xx")] == 1
    assert reqs[('odd"route\\with\nnewline', "openai-1", "2xx")] == 1
    for family in families.values():
        for s in family.samples:
            assert "run" not in s.labels and "key_id" not in s.labels
    dur = families["tokenrelay_request_duration_seconds"]
    chat = [s for s in dur.samples if s.labels.get("route") == "chat" and s.labels["deployment"] == "openai-1"]
    count = next(s.value for s in chat if s.name.endswith("_count"))
    inf = next(s.value for s in chat if s.labels.get("le") == "+Inf")
    assert count == inf == 2
    tokens = {
        (s.labels["direction"], s.labels["source"]): s.value
        for s in families["tokenrelay_tokens"].samples
        if s.labels["route"] == "chat" and s.labels["deployment"] == "openai-1"
    }
    assert tokens[("input", "reported")] == 2000 and tokens[("output", "estimated")] == 0
    # Cumulative: draining for the ledger does not reset /metrics.
    m.drain()
    again = {f.name: f for f in parser.text_string_to_metric_families(m.prometheus())}
    assert len(again["tokenrelay_requests"].samples) == len(reqs)
