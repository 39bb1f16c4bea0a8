"""In-memory live view of the last minutes, for `/ui`: tokens per second, recent requests and recent times to
first token. Fed once per finished request in O(1); read (and summed) only while someone watches."""

from __future__ import annotations

import collections
import math
import time
from typing import Any

WINDOW_S = 600  # seconds of tokens/s history kept
RECENT_REQUESTS = 100
RECENT_TTFTS = 256  # per deployment, for p50/p99


class TokenRate:
    """Tokens per second over the last `WINDOW_S` seconds, spreading each request's tokens over the time it
    took: input tokens at its start, output tokens evenly from its first token to its end. Adding a request is
    O(1) whatever its length (a difference array: a rate starts in one second and stops in another); reading
    the series is O(window)."""

    def __init__(self, window_s: int = WINDOW_S) -> None:
        self.n = window_s
        self._stamp = [-1] * window_s  # the second each slot holds
        self._point = [[0.0, 0.0] for _ in range(window_s)]  # tokens landing in that second (in, out)
        self._delta = [[0.0, 0.0] for _ in range(window_s)]  # change of the running rate from that second on
        self._carry = [0.0, 0.0]  # the running rate contributed by seconds that left the window

    def _retire(self, slot: int) -> None:
        """Empties a slot whose second left the window, folding its rate change into the carry."""
        self._carry[0] += self._delta[slot][0]
        self._carry[1] += self._delta[slot][1]
        self._stamp[slot] = -1
        self._point[slot] = [0.0, 0.0]
        self._delta[slot] = [0.0, 0.0]

    def _slot(self, second: int) -> int:
        slot = second % self.n
        if self._stamp[slot] != second:
            self._retire(slot)
            self._stamp[slot] = second
        return slot

    def add(self, side: int, tokens: float, start: float, end: float, now: float) -> None:
        """Adds `tokens` on `side` (0 in, 1 out) spread evenly over [start, end] (Unix seconds)."""
        if tokens <= 0:
            return
        floor = math.floor(now) - self.n + 1
        end = min(max(end, start), now)
        start = max(min(start, end), float(floor))
        end = max(end, start)
        s0, s1 = math.floor(start), math.floor(end)
        if s0 == s1 or end - start < 1e-3:
            self._point[self._slot(s1)][side] += tokens
            return
        rate = tokens / (end - start)
        self._point[self._slot(s0)][side] += rate * (s0 + 1 - start)
        self._point[self._slot(s1)][side] += rate * (end - s1)
        if s1 > s0 + 1:  # whole seconds s0+1 .. s1-1 run at `rate`
            self._delta[self._slot(s0 + 1)][side] += rate
            self._delta[self._slot(s1)][side] -= rate

    def series(self, seconds: int, now: float) -> tuple[list[float], list[float]]:
        """Tokens in and out for each of the last `seconds` whole seconds before `now`, oldest first."""
        last = math.floor(now)
        first = last - self.n + 1
        for slot, stamp in enumerate(self._stamp):
            if 0 <= stamp < first:
                self._retire(slot)
        running = list(self._carry)
        ins: list[float] = []
        outs: list[float] = []
        for second in range(first, last + 1):
            slot = second % self.n
            value = [0.0, 0.0]
            if self._stamp[slot] == second:
                running[0] += self._delta[slot][0]
                running[1] += self._delta[slot][1]
                value = self._point[slot]
            if second > last - seconds:
                ins.append(max(0.0, running[0] + value[0]))
                outs.append(max(0.0, running[1] + value[1]))
        return ins, outs


class LiveStats:
    """What `/ui` shows that the cumulative meters do not: recent requests, tokens/s and TTFT samples."""

    def __init__(self) -> None:
        self.tokens = TokenRate()
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
        self.tokens.add(0, row["input"], start, start, now)
        self.tokens.add(1, row["output"], start + ttft if ttft is not None else start, end, now)
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
