"""In-memory live view of the last minutes, for `/ui`: tokens per second, recent requests and recent times to
first token. Fed once per finished request in O(1); read (and summed) only while someone watches. The tokens/s
series is `_core.TokenRate` (in Rust: it is fed on the event loop for every request)."""

from __future__ import annotations

import collections
import time
from typing import Any

from tokenrelay._core import TokenRate

__all__ = ["LiveStats", "TokenRate"]

WINDOW_S = 600  # seconds of tokens/s history kept (TokenRate's default)
RECENT_REQUESTS = 100
RECENT_TTFTS = 256  # per deployment, for p50/p99


class LiveStats:
    """What `/ui` shows that the cumulative meters do not: recent requests, tokens/s and TTFT samples."""

    def __init__(self) -> None:
        self.tokens = TokenRate(WINDOW_S)
        # (seq, Metering.summary row): the row is not copied, and never changed after it is recorded
        self.recent: collections.deque[tuple[int, dict[str, Any]]] = collections.deque(maxlen=RECENT_REQUESTS)
        self.ttfts: dict[tuple[str, str], collections.deque[float]] = {}
        self.seq = 0  # requests seen

    def add(self, row: dict[str, Any]) -> None:
        """One finished request (a `Metering.summary` row). O(1)."""
        self.seq += 1
        now = time.time()
        start = float(row["ts"])
        end = start + float(row["duration_s"])
        ttft = row["ttft_s"]
        first = start + ttft if ttft is not None else None
        self.tokens.add_request(row["input"], row["output"], start, first, end, now)
        if ttft is not None:
            key = (row["route"], row["deployment"])
            samples = self.ttfts.get(key)
            if samples is None:
                samples = self.ttfts[key] = collections.deque(maxlen=RECENT_TTFTS)
            samples.append(ttft)
        self.recent.append((self.seq, row))  # the UI's view of it is built only when someone reads it

    def recent_requests(self, n: int) -> list[dict[str, Any]]:
        """The last `n` finished requests, newest first, as `/ui` shows them."""
        shown = list(self.recent)[-n:] if n > 0 else []
        return [_recent_view(seq, row) for seq, row in reversed(shown)]


def _recent_view(seq: int, row: dict[str, Any]) -> dict[str, Any]:
    return {
        "seq": seq,
        "ts": float(row["ts"]),
        "route": row["route"],
        "deployment": row["deployment"],
        "model": row["model"],
        "api": row["api"],
        "stream": row["stream"],
        "status": row["status"],
        "error_class": row["error_class"],
        "run": row["run"],
        "key": row["key_name"] or row["key_id"],
        "input": row["input"],
        "output": row["output"],
        "cost_usd": row["cost_usd"],
        "ttft_s": row["ttft_s"],
        "duration_s": row["duration_s"],
    }
