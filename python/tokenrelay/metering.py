"""What happened to one client request, recorded exactly once: meters, request log, and a structured log line."""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from tokenrelay._core import Usage

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


def key_id(secret: str) -> str:
    """A non-reversible id for a client key: enough to tell keys apart, useless to an attacker."""
    if not secret:
        return ""
    return "k_" + hashlib.sha256(secret.encode()).hexdigest()[:12]


def error_class_for_status(status: int, upstream: bool) -> str:
    if status == 429:
        return RATE_LIMITED
    if status in (408, 504):
        return TIMEOUT
    if status >= 500:
        return UPSTREAM_5XX if upstream else UPSTREAM_ERROR
    if status >= 400:
        return UPSTREAM_4XX if upstream else CLIENT_4XX
    return ""


@dataclass
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
    """Receives each finished request. The meters and the ledger are attached by the app when present."""

    def __init__(self, log_requests: bool = True) -> None:
        self.log_requests = log_requests
        self.recorded = 0

    def record(self, outcome: Outcome) -> None:
        """Records a finished request. Never raises: metering must not break relaying."""
        if not outcome.ended_ns:
            outcome.ended_ns = time.monotonic_ns()
        self.recorded += 1
        if self.log_requests and log.isEnabledFor(logging.INFO):
            log.info("%s", orjson.dumps(self.summary(outcome)).decode())

    @staticmethod
    def summary(outcome: Outcome) -> dict[str, Any]:
        """One request as a flat dict: the structured log line and the request log row."""
        usage = outcome.usage
        return {
            "ts": outcome.ts,
            "request_id": outcome.request_id,
            "api": outcome.api,
            "route": outcome.route,
            "deployment": outcome.deployment,
            "model": outcome.model,
            "stream": outcome.stream,
            "status": outcome.status,
            "error_class": outcome.error_class,
            "error": outcome.error_message,
            "attempts": outcome.attempts,
            "run": outcome.run,
            "tags": outcome.tags,
            "key_id": outcome.key_id,
            "key_name": outcome.key_name,
            "usage": usage.to_dict() if usage is not None else None,
            "ttft_s": outcome.ttft_s,
            "duration_s": outcome.duration_s,
        }
