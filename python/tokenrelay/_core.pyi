# --- meter ---
from typing import final

@final
class Meters:
    """In-memory usage meters: `record()` per finished request, `drain()` deltas for the ledger."""

    def __init__(self) -> None: ...
    def record(
        self,
        *,
        ts: float,
        route: str,
        deployment: str,
        model: str,
        key_id: str,
        key_name: str,
        run: str,
        tags: str,
        status: int,
        error_class: str,
        input: int,
        output: int,
        cached_input: int,
        cache_write: int,
        reasoning: int,
        input_estimated: bool,
        output_estimated: bool,
        cached_estimated: bool,
        cache_write_estimated: bool,
        reasoning_estimated: bool,
        cost_usd: float | None,
        ttft_s: float | None,
        duration_s: float,
        stream: bool,
        api: str,
    ) -> None: ...
    def drain(self) -> list[dict[str, object]]: ...
    def restore(self, rows: list[dict[str, object]]) -> None: ...
    def pending_buckets(self) -> int: ...
    def prometheus(self) -> str: ...
    def totals(self) -> dict[str, object]: ...

def histogram_quantiles(buckets: str, qs: list[float]) -> list[float | None]: ...
def histogram_merge(a: str | None, b: str | None, /) -> str: ...

HISTOGRAM_BOUNDS: tuple[float, ...]
METER_ERROR_CLASSES: tuple[str, ...]
