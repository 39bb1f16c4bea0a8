"""Spend limits by reserve-then-settle: a request reserves its worst-case cost before it is sent and settles its
actual cost when it ends, so N concurrent requests can never overshoot the limit together.

Pure and synchronous: callers on the event loop (one thread) need no lock; a `threading.Lock` guards the few
counters anyway so a budget may be shared with worker threads. Used by run budgets (`runs.py`); meant to be
the one implementation behind client-key budgets too.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tokenrelay.config import Route
from tokenrelay.pricing import cost_usd, price_for, provider_from_url

# Output tokens reserved for a request that sets no limit of its own.
DEFAULT_OUTPUT_TOKENS = 4096


def max_output_tokens(api: str, body: Mapping[str, Any]) -> int:
    """The most output tokens a request may produce: its own cap (times `n` choices), else the default."""
    if api in ("embeddings", "count_tokens"):
        return 0
    cap = DEFAULT_OUTPUT_TOKENS
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            cap = value
            break
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > 1:
        cap *= n
    return cap


def worst_case_cost(
    routes: Mapping[str, Route], route: Route, requested: str, input_tokens: int, output_tokens: int
) -> tuple[float, str | None]:
    """The most a request can cost on any deployment of the route or its fallbacks (input priced at the dearer of
    the input and cache-write rates), and the name of a deployment whose price is unknown, if any (its cost
    counts as 0 in the figure)."""
    worst, unknown = 0.0, None
    for candidate in (route, *(routes[n] for n in route.fallbacks if n in routes)):
        for d in candidate.deployments:
            try:
                price = price_for(
                    d.upstream_model(requested, candidate.name), d.price, provider=provider_from_url(d.base_url)
                )
            except ValueError:
                price = None
            if price is None:
                unknown = unknown or d.name
                continue
            for cache_write in (0, input_tokens):  # a cache write can cost more than plain input
                cost = cost_usd(price, input=input_tokens, output=output_tokens, cache_write=cache_write)
                worst = max(worst, cost or 0.0)
    return worst, unknown


@dataclass(eq=False)
class Reservation:
    """What `Budget.reserve` hands out: settle it exactly once (later settles are ignored)."""

    amount: float
    settled: bool = False


class Budget:
    """A spend limit in USD. `reserve(worst_case)` admits a request if the spend so far, plus what requests in
    flight have reserved, plus this worst case stays within the limit; `settle(token, actual)` replaces the
    reservation by what the request actually cost."""

    def __init__(self, limit_usd: float, spent_usd: float = 0.0) -> None:
        if not limit_usd >= 0:
            raise ValueError(f"a budget must be a number >= 0, got {limit_usd!r}")
        self.limit_usd = float(limit_usd)
        self.spent_usd = float(spent_usd)
        self.reserved_usd = 0.0
        self.in_flight = 0
        self.rejected = 0
        self.unpriced = 0  # settled requests whose cost was unknown (not counted against the limit)
        self._lock = threading.Lock()

    @property
    def remaining_usd(self) -> float:
        return max(0.0, self.limit_usd - self.spent_usd - self.reserved_usd)

    @property
    def exhausted(self) -> bool:
        return self.spent_usd >= self.limit_usd

    def refuse(self) -> None:
        """Counts a request refused without a reservation (the budget was spent)."""
        with self._lock:
            self.rejected += 1

    def reserve(self, amount: float) -> Reservation | None:
        """Admits a request whose cost is at most `amount`, or returns None (nothing is reserved then)."""
        amount = max(0.0, float(amount))
        with self._lock:
            # Spent at the limit: nothing more, even a request that claims to be free (its price may be wrong).
            if self.spent_usd >= self.limit_usd or self.spent_usd + self.reserved_usd + amount > self.limit_usd:
                self.rejected += 1
                return None
            self.reserved_usd += amount
            self.in_flight += 1
            return Reservation(amount)

    def settle(self, token: Reservation, actual: float | None) -> None:
        """Releases the reservation and adds the actual cost (None: unknown price, counted in `unpriced`)."""
        with self._lock:
            if token.settled:
                return
            token.settled = True
            self.reserved_usd = max(0.0, self.reserved_usd - token.amount)
            self.in_flight -= 1
            if actual is None:
                self.unpriced += 1
            else:
                self.spent_usd += max(0.0, float(actual))

    def snapshot(self) -> dict[str, float | int]:
        with self._lock:
            return {
                "limit_usd": self.limit_usd,
                "spent_usd": self.spent_usd,
                "reserved_usd": self.reserved_usd,
                "remaining_usd": max(0.0, self.limit_usd - self.spent_usd - self.reserved_usd),
                "in_flight": self.in_flight,
                "rejected": self.rejected,
                "unpriced": self.unpriced,
            }
