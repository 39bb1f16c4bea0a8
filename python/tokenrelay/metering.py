"""What happened to one client request, recorded exactly once: meters, request log, and a structured log line."""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from tokenrelay._core import Meters, Usage
from tokenrelay.ledger import Ledger
from tokenrelay.live import LiveStats
from tokenrelay.pricing import Price, cost_usd, price_for, provider_from_url

log = logging.getLogger("tokenrelay.requests")

# Error classes, as stored in the ledger and shown in /usage.
CLIENT_4XX = "client_4xx"
UPSTREAM_4XX = "upstream_4xx"
RATE_LIMITED = "rate_limited"
UPSTREAM_5XX = "upstream_5xx"
UPSTREAM_ERROR = "upstream_error"
TIMEOUT = "timeout"
CLIENT_DISCONNECT = "client_disconnect"
CANCELLED_HEDGE = "cancelled_hedge"
CANCELLED = "cancelled"


_REQUEST_ID_PREFIX = os.urandom(8).hex()  # per process: workers and restarts never share one
_request_counter = itertools.count()


def new_request_id() -> str:
    """A unique request id, 32 hex digits like a UUID's: a random per-process prefix and a counter (no syscall per
    request, unlike uuid4)."""
    return f"{_REQUEST_ID_PREFIX}{next(_request_counter) & 0xFFFFFFFFFFFFFFFF:016x}"


@functools.lru_cache(maxsize=4096)  # agents reuse a handful of keys: hash each once, not per request
def key_id(secret: str) -> str:
    """A non-reversible id for a client key: enough to tell keys apart, useless to an attacker."""
    if not secret:
        return ""
    return "k_" + hashlib.sha256(secret.encode()).hexdigest()[:12]


def error_class_for_status(status: int, upstream: bool) -> str:
    """The error class of a status sent by an upstream (`upstream=True`) or by tokenrelay itself."""
    if status == 429:
        return RATE_LIMITED
    if status == 504 or (status == 408 and upstream):
        return TIMEOUT
    if status >= 500:
        return UPSTREAM_5XX if upstream else UPSTREAM_ERROR
    if status >= 400:
        return UPSTREAM_4XX if upstream else CLIENT_4XX
    return ""


@dataclass(slots=True)
class Outcome:
    """Filled in as a request goes; recorded once when it ends, whatever way it ends."""

    request_id: str
    ts: float
    started_ns: int
    api: str
    route: str
    stream: bool
    requested_model: str
    run: str = ""
    tags: str = ""
    key_id: str = ""
    key_name: str = ""
    deployment: str = ""
    model: str = ""  # the model name sent upstream
    status: int = 0
    error_class: str = ""
    error_message: str = ""
    attempts: int = 0
    delivered: bool = False  # the whole answer reached the client (a disconnect after that is no error)
    usage: Usage | None = None
    first_token_ns: int | None = None
    ended_ns: int = 0
    price: dict[str, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ttft_s(self) -> float | None:
        if self.first_token_ns is None:
            return None
        return max(0.0, (self.first_token_ns - self.started_ns) / 1e9)

    @property
    def duration_s(self) -> float:
        end = self.ended_ns or time.monotonic_ns()
        return max(0.0, (end - self.started_ns) / 1e9)

    def fail(self, status: int, error_class: str, message: str) -> None:
        self.status = status
        self.error_class = error_class
        self.error_message = message[:500]


class Metering:
    """Receives each finished request: aggregates it in the Rust meters, queues its request-log row for the
    ledger, and writes one structured log line. Recording is O(1) and does no I/O on the event loop."""

    def __init__(self, meters: Meters | None = None, ledger: Ledger | None = None, log_requests: bool = True) -> None:
        self.meters = meters if meters is not None else Meters()
        self.ledger = ledger
        self.log_requests = log_requests
        self.recorded = 0
        # Deployment names are unique within a route only: prices are cached per (route, deployment, model).
        self._prices: dict[tuple[str, str, str], Price | None] = {}
        self.price_sources: dict[tuple[str, str], str] = {}  # (route, deployment) -> base URL (provider hint)
        self.live = LiveStats()  # the last minutes, for /ui

    def price(self, outcome: Outcome) -> Price | None:
        key = (outcome.route, outcome.deployment, outcome.model)
        if key not in self._prices:
            provider = provider_from_url(self.price_sources.get((outcome.route, outcome.deployment), ""))
            try:
                self._prices[key] = price_for(outcome.model, outcome.price, provider=provider)
            except ValueError:
                self._prices[key] = None
        return self._prices[key]

    def cost(self, outcome: Outcome) -> float | None:
        """What a finished request cost: 0 with no usage (rejected, or nothing answered), None when the price is
        unknown (never a made-up zero)."""
        usage = outcome.usage
        if usage is None:
            return 0.0
        return cost_usd(
            self.price(outcome),
            input=usage.input,
            output=usage.output,
            cached_input=usage.cached_input,
            cache_write=usage.cache_write,
        )

    def record(self, outcome: Outcome) -> None:
        """Records a finished request exactly once. Never raises: metering must not break relaying."""
        if not outcome.ended_ns:
            outcome.ended_ns = time.monotonic_ns()
        self.recorded += 1
        try:
            self._record(outcome)
        except Exception:  # a bug here must not turn a served request into a failed one
            log.exception("could not meter request %s", outcome.request_id)

    def _record(self, outcome: Outcome) -> None:
        usage = outcome.usage
        row = self.summary(outcome, self.cost(outcome))
        self.meters.record(
            ts=outcome.ts,
            route=outcome.route,
            deployment=outcome.deployment,
            model=outcome.model or outcome.requested_model,
            key_id=outcome.key_id,
            key_name=outcome.key_name,
            run=outcome.run,
            tags=outcome.tags,
            status=outcome.status,
            error_class=outcome.error_class,
            input=row["input"],
            output=row["output"],
            cached_input=row["cached_input"],
            cache_write=row["cache_write"],
            reasoning=row["reasoning"],
            input_estimated=row["input_estimated"],
            output_estimated=row["output_estimated"],
            cached_estimated=row["cached_estimated"],
            cache_write_estimated=row["cache_write_estimated"],
            reasoning_estimated=row["reasoning_estimated"],
            cost_usd=row["cost_usd"],
            ttft_s=row["ttft_s"],
            duration_s=row["duration_s"],
            stream=outcome.stream,
            api=outcome.api,
        )
        if self.ledger is not None:
            self.ledger.log_summary(row)
        self.live.add(row)
        if self.log_requests and log.isEnabledFor(logging.INFO):
            log.info("%s", orjson.dumps({**row, "usage": usage.to_dict() if usage is not None else None}).decode())

    @staticmethod
    def summary(outcome: Outcome, cost: float | None = None) -> dict[str, Any]:
        """One request as a flat dict: the request-log row (ledger.REQUEST_COLUMNS) and the log line."""
        usage = outcome.usage
        row: dict[str, Any] = {
            "ts": outcome.ts,
            "request_id": outcome.request_id,
            "api": outcome.api,
            "route": outcome.route,
            "deployment": outcome.deployment,
            "model": outcome.model or outcome.requested_model,
            "stream": outcome.stream,
            "status": outcome.status,
            "error_class": outcome.error_class,
            "error": outcome.error_message,
            "attempts": outcome.attempts,
            "run": outcome.run,
            "tags": outcome.tags,
            "key_id": outcome.key_id,
            "key_name": outcome.key_name,
            "cost_usd": cost,
            "ttft_s": outcome.ttft_s,
            "duration_s": outcome.duration_s,
        }
        if usage is None:
            row.update(_NO_USAGE)
        else:
            row["input"] = usage.input
            row["output"] = usage.output
            row["cached_input"] = usage.cached_input
            row["cache_write"] = usage.cache_write
            row["reasoning"] = usage.reasoning
            row["input_estimated"] = usage.input_source == "estimated"
            row["output_estimated"] = usage.output_source == "estimated"
            row["cached_estimated"] = usage.cached_input_source == "estimated"
            row["cache_write_estimated"] = usage.cache_write_source == "estimated"
            row["reasoning_estimated"] = usage.reasoning_source == "estimated"
        return row


_NO_USAGE: dict[str, Any] = {
    "input": 0,
    "output": 0,
    "cached_input": 0,
    "cache_write": 0,
    "reasoning": 0,
    "input_estimated": False,
    "output_estimated": False,
    "cached_estimated": False,
    "cache_write_estimated": False,
    "reasoning_estimated": False,
}
