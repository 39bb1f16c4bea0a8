"""Where a request goes: each route's pool of deployments (balancing state lives in Rust)."""

from __future__ import annotations

from dataclasses import dataclass

from tokenrelay.config import Route

# Outcomes reported back to the pool when an attempt ends.
SUCCESS = "success"
FAILURE = "failure"
RATE_LIMITED = "rate_limited"
CANCELLED = "cancelled"


@dataclass(frozen=True)
class Pick:
    """The pool's answer: a deployment index (a slot reserved), or why none, and when to try again."""

    index: int
    busy: bool = False
    retry_after_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.index >= 0


class RoutePool:
    """A route's deployments and their balancing state."""

    def __init__(self, route: Route) -> None:
        self.route = route
        self._next = 0
        self._outstanding = [0] * len(route.deployments)

    def pick(self, exclude: list[int]) -> Pick:
        n = len(self.route.deployments)
        for step in range(n):
            idx = (self._next + step) % n
            if idx not in exclude:
                self._next = idx + 1
                self._outstanding[idx] += 1
                return Pick(idx)
        return Pick(-1)

    def first_token(self, idx: int, ttft_s: float) -> None:
        pass

    def release(
        self, idx: int, outcome: str, output_tokens: int = 0, total_tokens: int = 0, duration_s: float = 0.0
    ) -> None:
        self._outstanding[idx] -= 1

    def cooldown(self, idx: int, seconds: float) -> None:
        pass

    def snapshot(self) -> list[dict[str, object]]:
        return [{"name": d.name, "outstanding": self._outstanding[i]} for i, d in enumerate(self.route.deployments)]
