"""Cooldowns read from 429 / overload response headers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from tokenrelay.ratelimit import MAX_COOLDOWN_S, cooldown_from_headers, parse_duration

NOW = 1_750_000_000.0


def rfc3339(seconds_from_now: float) -> str:
    moment = datetime.fromtimestamp(NOW, UTC) + timedelta(seconds=seconds_from_now)
    return moment.isoformat().replace("+00:00", "Z")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("2.5", 2.5), ("150us", 150e-6)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "abc", "5x", "1s garbage", "s"])
def test_parse_duration_rejects(text: str) -> None:
    assert parse_duration(text) is None


def test_no_header() -> None:
    assert cooldown_from_headers({}, NOW) is None
    assert cooldown_from_headers({"content-type": "application/json"}, NOW) is None


def test_retry_after_seconds_any_case() -> None:
    assert cooldown_from_headers({"Retry-After": "7"}, NOW) == 7.0
    assert cooldown_from_headers({"RETRY-AFTER": "1.5"}, NOW) == 1.5


def test_retry_after_http_date() -> None:
    date = format_datetime(datetime.fromtimestamp(NOW + 42, UTC), usegmt=True)
    assert cooldown_from_headers({"retry-after": date}, NOW) == pytest.approx(42.0)


def test_retry_after_ms_beats_retry_after() -> None:
    headers = {"retry-after-ms": "1250", "retry-after": "2"}
    assert cooldown_from_headers(headers, NOW) == 1.25


def test_explicit_retry_after_wins_over_resets() -> None:
    headers = {"retry-after": "3", "x-ratelimit-reset-tokens": "40s", "x-ratelimit-remaining-tokens": "0"}
    assert cooldown_from_headers(headers, NOW) == 3.0


def test_openai_spent_limit_reset() -> None:
    headers = {
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1m30s",
        "x-ratelimit-remaining-tokens": "15000",
        "x-ratelimit-reset-tokens": "6m0s",
    }
    assert cooldown_from_headers(headers, NOW) == 90.0


def test_openai_without_remaining_takes_the_latest_reset() -> None:
    headers = {"x-ratelimit-reset-requests": "20ms", "x-ratelimit-reset-tokens": "2s"}
    assert cooldown_from_headers(headers, NOW) == 2.0


def test_no_limit_spent_takes_the_earliest_reset() -> None:
    headers = {
        "x-ratelimit-remaining-requests": "10",
        "x-ratelimit-reset-requests": "500ms",
        "x-ratelimit-remaining-tokens": "100",
        "x-ratelimit-reset-tokens": "12s",
    }
    assert cooldown_from_headers(headers, NOW) == 0.5


def test_anthropic_timestamps() -> None:
    headers = {
        "anthropic-ratelimit-requests-remaining": "40",
        "anthropic-ratelimit-requests-reset": rfc3339(1),
        "anthropic-ratelimit-input-tokens-remaining": "0",
        "anthropic-ratelimit-input-tokens-reset": rfc3339(17),
        "anthropic-ratelimit-output-tokens-remaining": "0",
        "anthropic-ratelimit-output-tokens-reset": rfc3339(9),
    }
    assert cooldown_from_headers(headers, NOW) == pytest.approx(17.0)


def test_clamped_to_sane_range() -> None:
    assert cooldown_from_headers({"retry-after": "86400"}, NOW) == MAX_COOLDOWN_S
    assert cooldown_from_headers({"retry-after": "-3"}, NOW) == 0.0
    past = {"anthropic-ratelimit-tokens-reset": rfc3339(-5)}
    assert cooldown_from_headers(past, NOW) == 0.0


def test_garbage_is_ignored() -> None:
    assert cooldown_from_headers({"retry-after": "soon"}, NOW) is None
    assert cooldown_from_headers({"retry-after": "nan"}, NOW) is None
    headers = {"retry-after": "soon", "x-ratelimit-reset-tokens": "3s"}
    assert cooldown_from_headers(headers, NOW) == 3.0
    assert cooldown_from_headers({"anthropic-ratelimit-tokens-reset": "2025-01-01T00:00:00"}, NOW) is None


def test_default_now_is_wall_clock() -> None:
    date = format_datetime(datetime.now(UTC) + timedelta(seconds=60), usegmt=True)
    result = cooldown_from_headers({"Retry-After": date})
    assert result is not None and 55 < result <= 60
