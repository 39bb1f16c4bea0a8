# --- balance ---
from collections.abc import Iterable
from typing import ClassVar, Literal, Self, final

_Outcome = Literal["success", "failure", "rate_limited", "cancelled", "client_gone"]

@final
class Pool:
    """A route's deployments and their balancing state. Frozen and thread-safe.

    Per request attempt: `idx = pool.pick(tried)`; if `idx >= 0` a slot is reserved, then
    `pool.first_token(idx, ttft_s)` when the first token arrives and exactly one
    `pool.release(idx, outcome, ...)` (in a `finally`). If `idx` is `Pool.BUSY`, every eligible deployment
    is at a limit (queue and retry); if `Pool.UNAVAILABLE`, none may be used. `pool.retry_after(tried)` then
    says how long to wait (None: nothing comes back on its own).
    """

    BUSY: ClassVar[int]  # -1
    UNAVAILABLE: ClassVar[int]  # -2
    def __new__(
        cls,
        deployments: list[dict[str, object]],
        strategy: str = "p2c",
        *,
        breaker_failures: int = 3,
        breaker_error_rate: float = 0.5,
        breaker_window_s: float = 30.0,
        breaker_min_requests: int = 10,
        cooldown_s: float = 10.0,
        max_cooldown_s: float = 120.0,
    ) -> Self: ...
    @property
    def strategy(self) -> str: ...
    def pick(self, exclude: Iterable[int] | None = None) -> int: ...
    def retry_after(self, exclude: Iterable[int] | None = None) -> float | None: ...
    def first_token(self, idx: int, ttft_s: float) -> None: ...
    def release(
        self,
        idx: int,
        outcome: _Outcome,
        output_tokens: int = 0,
        total_tokens: int = 0,
        duration_s: float = 0.0,
    ) -> None: ...
    def cooldown(self, idx: int, seconds: float) -> None: ...
    def set_health(self, idx: int, up: bool) -> None: ...
    def snapshot(self) -> list[dict[str, object]]:
        """Per deployment, in index order: name, state ("healthy" | "cooling_down" | "open" | "half_open" |
        "down"), until_s (seconds until pickable again), outstanding, ewma_ttft_s, ewma_tokens_per_s (None
        until sampled), error_rate (failures + 429s in the breaker window), requests, failures, rate_limited,
        rpm_used, tpm_used (last 60 s), and the configured weight, tier, max_concurrent, rpm, tpm."""
    def __len__(self) -> int: ...

# --- end balance ---
