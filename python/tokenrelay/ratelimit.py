"""How long to cool a deployment down after a 429 or an overload answer, read from the response headers."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from datetime import datetime
from email.utils import parsedate_to_datetime

__all__ = ["MAX_COOLDOWN_S", "cooldown_from_headers", "parse_duration"]

MAX_COOLDOWN_S = 300.0
"""No header cools a deployment down for longer than this: a skewed clock or daily quota must not park it."""

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}

# (reset header, remaining header, format). A limit is spent when its remaining count is 0 or not given.
_RESETS = (
    ("x-ratelimit-reset-requests", "x-ratelimit-remaining-requests", "duration"),
    ("x-ratelimit-reset-tokens", "x-ratelimit-remaining-tokens", "duration"),
    ("anthropic-ratelimit-requests-reset", "anthropic-ratelimit-requests-remaining", "timestamp"),
    ("anthropic-ratelimit-tokens-reset", "anthropic-ratelimit-tokens-remaining", "timestamp"),
    ("anthropic-ratelimit-input-tokens-reset", "anthropic-ratelimit-input-tokens-remaining", "timestamp"),
    ("anthropic-ratelimit-output-tokens-reset", "anthropic-ratelimit-output-tokens-remaining", "timestamp"),
)


def parse_duration(value: str) -> float | None:
    """Seconds in an OpenAI/Go-style duration ("1s", "6m0s", "20ms", "1h2m3.5s") or a bare number."""
    text = value.strip()
    seconds = _number(text)
    if seconds is not None:
        return seconds
    total, end = 0.0, 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != end:
            return None
        total += float(match.group(1)) * _UNIT_S[match.group(2)]
        end = match.end()
    return total if end == len(text) and end > 0 else None


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _http_date(text: str, now: float) -> float | None:
    try:
        return parsedate_to_datetime(text).timestamp() - now
    except (TypeError, ValueError, IndexError):
        return None


def _timestamp(text: str, now: float) -> float | None:
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    if moment.tzinfo is None:  # RFC 3339 always has an offset; without one, assume UTC rather than local time
        return None
    return moment.timestamp() - now


def _spent(remaining: str | None) -> bool:
    if remaining is None:
        return True
    value = _number(remaining)
    return value is None or value <= 0


def cooldown_from_headers(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to keep a deployment out of rotation after a 429 (or 503/529 overloaded), or None if no header
    says. `now` is wall-clock epoch seconds (for dates and timestamps); the default is `time.time()`.

    An explicit `retry-after-ms` or `Retry-After` (seconds or HTTP date) is the server's own answer and wins;
    without one, the latest reset among the spent rate limits (OpenAI `x-ratelimit-reset-*` durations,
    Anthropic `anthropic-ratelimit-*-reset` RFC 3339 timestamps) is used, or the earliest reset when none is
    spent. The result lies in
    [0, MAX_COOLDOWN_S]; unparsable values are ignored.
    """
    lower = {key.lower(): value for key, value in headers.items()}
    current = time.time() if now is None else now

    explicit: float | None = None
    if (ms := lower.get("retry-after-ms")) is not None and (value := _number(ms)) is not None:
        explicit = value / 1000.0
    elif (after := lower.get("retry-after")) is not None:
        explicit = _number(after)
        if explicit is None:
            explicit = _http_date(after, current)
    if explicit is not None:
        return _clamp(explicit)

    spent: list[float] = []
    other: list[float] = []
    for reset_name, remaining_name, fmt in _RESETS:
        if (raw := lower.get(reset_name)) is None:
            continue
        value = parse_duration(raw) if fmt == "duration" else _timestamp(raw, current)
        if value is not None:
            (spent if _spent(lower.get(remaining_name)) else other).append(value)
    if spent:
        return _clamp(max(spent))
    # Refused although every limit has some room (a request larger than what remains): the request's size is
    # unknown here, so come back at the first reset and let another 429 say more.
    return _clamp(min(other)) if other else None


def _clamp(seconds: float) -> float:
    return min(max(seconds, 0.0), MAX_COOLDOWN_S)
