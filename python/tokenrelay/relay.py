"""The byte pump: a client request, sent to a deployment the route's pool picks, relayed back unchanged.

An attempt has two phases. *Open*: connect, send, and wait for the first content token (holding back the
stream's opening events); any failure here is retried on another deployment, and a slow first token can be
hedged on a second one. *Deliver*: from the first byte the client receives, bytes go out as they come in and
nothing is retried; a failure ends the stream with an error event in the API's own format. Whatever happens,
the request is metered exactly once (and a hedge that lost, once more, as such).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import aiohttp
import orjson
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from tokenrelay import metering, runs
from tokenrelay._core import (
    BodySpans,
    StreamMeter,
    TranslationError,
    Usage,
    decode_body,
    estimate_input_tokens,
    patch_body,
    translate_error,
    translate_request,
    translate_response,
)
from tokenrelay.config import Config, Deployment, Route
from tokenrelay.errors import error_event, error_response
from tokenrelay.h1client import Client, ConnectError, ConnectTimeout, Response, UpstreamError
from tokenrelay.metering import Metering, Outcome
from tokenrelay.ratelimit import cooldown_from_headers
from tokenrelay.routing import CANCELLED, FAILURE, RATE_LIMITED, SUCCESS, RoutePool, Waker
from tokenrelay.server import FastRequest, FastStream, FrontEnd
from tokenrelay.upstream import redact, redact_text, response_headers, upstream_request
from tokenrelay.workermetrics import Exporter

log = logging.getLogger("tokenrelay.relay")
T = TypeVar("T")

# Statuses that mean "this deployment, not this request": try another one. 401/403 are here because the
# upstream key is the deployment's, not the client's: a revoked key on one deployment must not fail agents.
RETRYABLE_STATUSES = frozenset({401, 403, 408, 409, 429, 500, 502, 503, 504, 529})
# Above this many bytes of text to count, usage estimation runs in a thread instead of on the event loop.
ESTIMATE_INLINE_BYTES = 16 * 1024
DEFAULT_COOLDOWN_S = 5.0
# How long a stream's opening events may be held back waiting for the first content token, so that an in-band
# error before any content can still fail over; after that the client gets them (and keep-alive comments).
MAX_HOLD_S = 10.0
KEEPALIVE_COMMENT = b": keep-alive\n\n"
# Vocabularies are loaded lazily (they cost ~50 MB each), so a daemon whose upstreams all report usage never pays.
_vocabulary_loaded = False
_WRITE_ERRORS = (ConnectionError, aiohttp.ClientConnectionResetError)
# (client API, deployment kind) -> (the API the deployment is sent, its path; None: answered locally) for the
# requests a deployment of the other kind can serve, translated (see rust/src/translate.rs).
TRANSLATED: dict[tuple[str, str], tuple[str, str | None]] = {
    ("chat", "anthropic"): ("messages", "/messages"),
    ("messages", "openai"): ("chat", "/chat/completions"),
    ("count_tokens", "openai"): ("count_tokens", None),  # an estimate: OpenAI has no token-counting endpoint
    ("responses", "anthropic"): ("messages", "/messages"),
}
# The same for an openai-kind deployment whose server lacks the client's API (`api = "chat"` in its config).
CHAT_ONLY: dict[str, tuple[str, str | None]] = {"responses": ("chat", "/chat/completions")}
_READ_ERRORS = (UpstreamError,)


@dataclass
class Call:
    """One client request, parsed once."""

    request: web.Request
    api: str  # chat | completions | responses | messages | embeddings | count_tokens
    path: str  # the upstream path under the deployment's base URL, e.g. /chat/completions
    body: dict[str, Any]
    raw: bytes
    spans: BodySpans  # where `raw`'s top-level members lie (read_body's)
    stream: bool
    outcome: Outcome


class _Retry(Exception):
    """An attempt failed before anything reached the client: another deployment may serve the request."""

    def __init__(
        self,
        status: int,
        error_class: str,
        message: str,
        response: web.Response | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_class = error_class
        self.message = message
        self.response = response  # the upstream's own error, passed through if no attempt is left
        self.retry_after_s = retry_after_s


class _Watchdog:
    """One timer per attempt for the first-token, idle and total timeouts: no per-chunk timer churn.

    The upstream response stores the time of each read (`last_read`); the timer wakes at most a few times per
    idle period, and when a deadline has passed it closes the upstream response, which ends the read loop. Once
    the response is committed it also watches the client: one that reads nothing for `write_timeout` (its
    transport's buffer neither drains nor grows) is disconnected, so a write blocked on a full buffer cannot hang
    the handler. For a stream it also ends the hold of the opening events at `hold_until` (by waking the upstream
    response's reader): one timer, not one per wait.
    """

    def __init__(self, route: Route, loop: asyncio.AbstractEventLoop, hold_s: float | None = None) -> None:
        self.loop = loop
        self.timeouts = route.timeouts
        self.started = self.last = self.loop.time()
        self.hold_until = self.started + hold_s if hold_s is not None else None
        self.first = True
        self.fired: str | None = None
        self.response: Response | None = None
        self.task: asyncio.Task[Any] | None = None
        self.client: asyncio.Transport | None = None
        self.write_timeout = 0.0
        self._upstream_done = False
        self._stall_since = 0.0
        self._stall_size = 0
        self._handle = self.loop.call_at(self._next(self._deadline()), self._check)

    def _next(self, deadline: float) -> float:
        return deadline if self.hold_until is None else min(deadline, self.hold_until)

    def _deadline(self) -> float:
        t = self.timeouts
        last = self.last if self.response is None else self.response.read_at()
        deadline = last + (t.first_token if self.first else t.idle)
        return deadline if t.total is None else min(deadline, self.started + t.total)

    def _check(self) -> None:
        now = self.loop.time()
        if self.hold_until is not None and now >= self.hold_until:
            self.hold_until = None
            if self.response is not None:
                self.response.stop_holding()
                self.response.wake()
        if self.client is not None:
            if self.client.is_closing():
                return
            if self._client_stalled(now):
                self.fired = "client"
                self.client.abort()  # cancels the handler (handler_cancellation): metered as client_disconnect
                return
            self._handle = self.loop.call_at(now + self.write_timeout / 4, self._check)
        if self._upstream_done or self.fired is not None:
            return
        deadline = self._deadline()
        if now < deadline:
            if self.client is None:
                self._handle = self.loop.call_at(self._next(deadline), self._check)
            elif deadline < now + self.write_timeout / 4:
                self._handle.cancel()
                self._handle = self.loop.call_at(deadline, self._check)
            return
        total = self.timeouts.total
        self.fired = (
            "total" if total is not None and now >= self.started + total else ("first_token" if self.first else "idle")
        )
        if self.response is not None:
            self.response.close()
        elif self.task is not None:  # still connecting or waiting for headers
            self.task.cancel()

    def _client_stalled(self, now: float) -> bool:
        assert self.client is not None
        size = self.client.get_write_buffer_size()
        if self.response is not None:
            size += self.response.relay_buffered()  # (what the data plane holds for the client)
        if size == 0 or size != self._stall_size:
            self._stall_since, self._stall_size = now, size
            return False
        return now - self._stall_since >= self.write_timeout

    def watch_client(self, transport: asyncio.Transport | None, write_timeout: float) -> None:
        """From the commit on, also disconnect a client that reads nothing for `write_timeout` seconds; this
        watch outlives `cancel()` (the final writes can stall too) until `unwatch_client()` or the connection
        closes."""
        if transport is None or transport.is_closing():
            return
        self.client, self.write_timeout = transport, write_timeout
        # The stall clock starts now; the one timer moves to the sooner of the first client check and the upstream
        # deadline (as `_check` would arm it: no extra callback per request).
        now = self.loop.time()
        self._stall_since, self._stall_size = now, 0
        when = now + write_timeout / 4
        if not self._upstream_done and self.fired is None:
            when = min(when, self._deadline())
        self._handle.cancel()
        self._handle = self.loop.call_at(when, self._check)

    def cancel(self) -> None:
        """Stops the upstream deadlines (the client watch, if any, goes on)."""
        self._upstream_done = True
        if self.client is None:
            self._handle.cancel()

    def unwatch_client(self) -> None:
        """The response is complete: stop every timer."""
        self._upstream_done = True
        self.client = None
        self._handle.cancel()

    def describe(self) -> str:
        t = self.timeouts
        if self.fired == "client":
            return f"the client read nothing for write_timeout_s ({self.write_timeout:g} s); disconnected"
        if self.fired == "total":
            return f"the request took longer than the route's total timeout ({t.total:g} s)"
        if self.fired == "first_token":
            return f"no first token within the route's first_token timeout ({t.first_token:g} s)"
        return f"the upstream sent nothing for the route's idle timeout ({t.idle:g} s)"


class Attempt:
    """One try of a request on one deployment: its pool slot, upstream response and stream meter."""

    def __init__(self, call: Call, route: Route, pool: RoutePool, idx: int) -> None:
        self.call = call
        self.route = route
        self.pool = pool
        self.idx = idx
        self.deployment: Deployment = route.deployments[idx]
        self.model = self.deployment.upstream_model(call.outcome.requested_model, route.name)
        translation = translation_for(call.api, self.deployment)
        self.translated = translation is not None
        self.upstream_api, self.upstream_path = translation or (call.api, call.path)
        self.released = False
        self.upstream: Response | None = None
        self.meter: StreamMeter | None = None
        self.held: list[bytes] = []
        self.final: web.Response | None = None  # a complete answer (non-streaming, or a passed-through error)
        self.usage: Usage | None = None
        self.status = 0
        self.first_token_ns: int | None = None
        self.watchdog: _Watchdog | None = None
        # The request in the upstream's format (translated when the formats differ, else the client's bytes): what
        # input is estimated from when the upstream reports no usage, since the meter reads the upstream's format.
        self.sent: bytes = call.raw

    def release(self, result: str, usage: Usage | None = None) -> None:
        """Returns the pool slot, exactly once, with what the attempt cost."""
        if self.released:
            return
        self.released = True
        duration = (time.monotonic_ns() - self.call.outcome.started_ns) / 1e9
        output = usage.output if usage is not None else 0
        total = usage.input + usage.output if usage is not None else 0
        self.pool.release(self.idx, result, output, total, duration)

    def close(self) -> None:
        """Drops the upstream connection (so the provider stops generating) and frees the slot."""
        if self.watchdog is not None:
            self.watchdog.cancel()
        if self.upstream is not None:
            self.upstream.close()
        self.release(CANCELLED)

    def fill(self, outcome: Outcome) -> None:
        outcome.deployment = self.deployment.name
        outcome.model = self.model
        outcome.price = dict(self.deployment.price) if self.deployment.price is not None else None
        outcome.status = self.status
        if self.first_token_ns is not None:
            outcome.first_token_ns = self.first_token_ns


class Relay:
    """Holds the upstream client, one pool per route, and the metering sink."""

    def __init__(
        self, config: Config, client: Client, meter: Metering, shared: Path | None = None, worker: int = 0
    ) -> None:
        self.config = config
        self.client = client
        self.meter = meter
        # (with `shared`, the workers' directory: each route's balancing state is the daemon's, `RoutePool`)
        self.pools: dict[str, RoutePool] = {
            name: RoutePool(route, shared, worker) for name, route in config.routes.items()
        }
        self.waker: Waker | None = None
        if shared is not None:
            try:
                self.waker = Waker(shared, worker, self.pools)
            except OSError as exc:
                log.warning("requests queued at a deployment's limits are woken by polling only: %s", exc)
        # Built in the app's startup, on its loop; cached because in Python 3.11 every get_running_loop() is a
        # getpid() system call.
        self.loop = asyncio.get_running_loop()
        self.in_flight = 0
        self._background: set[asyncio.Future[None]] = set()  # hedge losers being counted
        self._settled = asyncio.Event()  # set while nothing is in flight or being counted
        self._settled.set()
        self.stopping = False  # set when a shutdown begins: handlers cancelled after that were cut by it
        self.front: FrontEnd | None = None  # the own HTTP front end, when it serves (set by `app.serve`)
        self.exporter: Exporter | None = None  # with several workers: their /metrics summed (set by `app.serve`)

    @property
    def db_path(self) -> str:
        ledger = self.meter.ledger
        return str(ledger.path) if ledger is not None else ""

    async def flush(self) -> None:
        """Writes what has been metered so far to the ledger (so a read right after a request sees it)."""
        if self.meter.ledger is not None:
            await self.meter.ledger.aflush()

    async def settled(self, limit_s: float) -> None:
        """Waits (up to `limit_s`) until every request in flight, and every hedge loser being counted, has been
        metered: at shutdown, handlers cut by the grace period may still be counting tokens in a thread."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit_s):
                await self._settled.wait()

    def _check_settled(self, _task: object = None) -> None:
        if not self.in_flight and not self._background:
            self._settled.set()

    async def run_in_ledger(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs a ledger query in a thread: SQLite is never touched on the event loop."""
        return await asyncio.to_thread(fn, *args)

    def prometheus(self) -> str:
        """The meters' Prometheus text plus live gauges: requests in flight, deployment state."""
        lines = [
            self.meter.meters.prometheus().rstrip("\n"),
            "# HELP tokenrelay_requests_in_flight Requests being relayed now.",
            "# TYPE tokenrelay_requests_in_flight gauge",
            f"tokenrelay_requests_in_flight {self.in_flight}",
            "# HELP tokenrelay_upstream_up 1 if a deployment takes traffic; 0 if open, cooling down or down.",
            "# TYPE tokenrelay_upstream_up gauge",
        ]
        outstanding = [
            "# HELP tokenrelay_upstream_outstanding Requests outstanding per deployment.",
            "# TYPE tokenrelay_upstream_outstanding gauge",
        ]
        for name, pool in sorted(self.pools.items()):
            for state in pool.snapshot():
                labels = f'route="{_label(name)}",deployment="{_label(str(state["name"]))}"'
                up = 1 if state["state"] in ("healthy", "half_open") else 0
                lines.append(f"tokenrelay_upstream_up{{{labels}}} {up}")
                outstanding.append(f"tokenrelay_upstream_outstanding{{{labels}}} {state['outstanding']}")
        plane = self.client.plane
        if plane is not None:
            outstanding += [
                "# HELP tokenrelay_data_plane_relays_total Streams whose rest the data plane thread relayed.",
                "# TYPE tokenrelay_data_plane_relays_total counter",
                f"tokenrelay_data_plane_relays_total {plane.relays}",
                "# HELP tokenrelay_data_plane_relays_in_flight Streams the data plane thread relays now.",
                "# TYPE tokenrelay_data_plane_relays_in_flight gauge",
                f"tokenrelay_data_plane_relays_in_flight {plane.in_flight}",
            ]
        front = self.front
        if front is not None:
            outstanding += [
                "# HELP tokenrelay_front_end_requests_total Relayed API calls served by the own HTTP front end.",
                "# TYPE tokenrelay_front_end_requests_total counter",
                f"tokenrelay_front_end_requests_total {front.requests}",
                "# HELP tokenrelay_front_end_handoffs_total Connections the front end handed to aiohttp.",
                "# TYPE tokenrelay_front_end_handoffs_total counter",
                f"tokenrelay_front_end_handoffs_total {front.handed_off}",
            ]
            if front.spinner is not None:
                outstanding += [
                    "# HELP tokenrelay_busy_poll_cpu_seconds_total CPU time of this worker's busy-poll thread.",
                    "# TYPE tokenrelay_busy_poll_cpu_seconds_total counter",
                    f"tokenrelay_busy_poll_cpu_seconds_total {front.spinner.cpu_seconds:.6f}",
                    "# HELP tokenrelay_busy_poll_clients Client connections keeping the busy-poll thread spinning.",
                    "# TYPE tokenrelay_busy_poll_clients gauge",
                    f"tokenrelay_busy_poll_clients {front.spinner.clients}",
                ]
        return "\n".join(lines + outstanding) + "\n"

    def _cancelled(self, outcome: Outcome, why: str) -> None:
        """A handler cancelled: by the client going away, or by a shutdown past its grace period."""
        if self.stopping:
            outcome.fail(503, metering.CANCELLED, "cut: the daemon shut down past its grace period")
        else:
            outcome.fail(499, metering.CLIENT_DISCONNECT, why)

    async def handle(self, call: Call, route: Route) -> web.StreamResponse:
        """Relays the call; meters it once however it ends (including the client going away)."""
        self.in_flight += 1
        self._settled.clear()
        outcome = call.outcome
        try:
            return await self._serve(call, route)
        except asyncio.CancelledError:
            if not outcome.error_class and not outcome.delivered:
                self._cancelled(outcome, "the client closed the connection")
            raise
        finally:
            self.in_flight -= 1
            self.meter.record(outcome)
            settle = outcome.extra.pop("settle", None)  # a client key's admission reservation (auth.Gate)
            if settle is not None:
                settle(outcome)
            runs.settle(self.meter, outcome)
            self._check_settled()

    async def _serve(self, call: Call, route: Route) -> web.StreamResponse:
        outcome = call.outcome
        last: _Retry | None = None
        for candidate in (route, *(self.config.routes[name] for name in route.fallbacks)):
            try:
                return await self._serve_route(call, candidate)
            except _Retry as failure:
                last = failure
        assert last is not None
        outcome.fail(last.status, last.error_class, last.message)
        if last.response is not None:
            return last.response
        headers = None
        if last.retry_after_s is not None:
            headers = {"retry-after": str(max(1, round(last.retry_after_s)))}
        return error_response(last.status, last.message, call.api, headers=headers)

    async def _serve_route(self, call: Call, route: Route) -> web.StreamResponse:
        """Tries the route's deployments until one answers; raises _Retry when none did."""
        pool = self.pools[route.name]
        outcome = call.outcome
        outcome.route = route.name
        tried: list[int] = []
        loop = self.loop
        deadline = loop.time() + route.retry_budget_s
        last: _Retry | None = None
        while len(tried) < route.max_attempts and loop.time() < deadline:
            pick = await pool.acquire(tried)
            if not pick.ok:
                if pick.busy:
                    last = _Retry(
                        429,
                        metering.RATE_LIMITED,
                        f"every deployment of route {route.name!r} is at its concurrency or rate limit; "
                        f"waited {route.queue_timeout_s:g} s in the queue",
                        retry_after_s=pick.retry_after_s or 1.0,
                    )
                break
            tried.append(pick.index)
            attempt = Attempt(call, route, pool, pick.index)
            outcome.attempts += 1
            delay = self._hedge_delay(route, pool) if len(route.deployments) > 1 else None
            try:
                if delay is None:
                    await self._open(attempt)  # (directly: one coroutine frame less held per open stream)
                    winner = attempt
                else:
                    winner = await self._open_hedged(attempt, tried, delay)
            except _Retry as failure:
                last = failure
                log.info("attempt %d on %s failed: %s", outcome.attempts, attempt.deployment.name, failure.message)
                continue
            winner.fill(outcome)
            return await self._deliver(winner)
        if last is None:
            last = _Retry(503, metering.UPSTREAM_ERROR, f"no deployment of route {route.name!r} is available")
        raise last

    # --- open: everything that may still fail over ----------------------------------------------------------

    def _hedge_delay(self, route: Route, pool: RoutePool) -> float | None:
        if route.hedge_after_ms is not None:
            return route.hedge_after_ms / 1000
        if route.hedge_after_p95:
            return pool.ttft_quantile(0.95)
        return None

    async def _open_hedged(self, first: Attempt, tried: list[int], delay: float) -> Attempt:
        """Opens the attempt; if no first token came within `delay` seconds, races a second deployment."""
        tasks: dict[asyncio.Task[None], Attempt] = {asyncio.ensure_future(self._open(first)): first}
        try:
            done, _ = await asyncio.wait(tasks, timeout=delay)
            if not done:
                pick = first.pool.pick(tried)
                if pick.ok:
                    tried.append(pick.index)
                    second = Attempt(first.call, first.route, first.pool, pick.index)
                    first.call.outcome.attempts += 1
                    tasks[asyncio.ensure_future(self._open(second))] = second
            failure: BaseException | None = None
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task.exception() is None:
                        winner = tasks[task]
                        for other, loser in tasks.items():
                            if loser is not winner:
                                await self._cancel_hedge(other, loser)
                        return winner
                    failure = task.exception()
            assert failure is not None
            raise failure
        finally:
            for task, attempt in tasks.items():
                if not task.done():
                    task.cancel()
                    attempt.close()

    async def _cancel_hedge(self, task: asyncio.Task[None], loser: Attempt) -> None:
        """Stops the slower of two hedged attempts and meters what it cost, as a cancelled hedge."""
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, _Retry):
            await task
        loser.close()
        if task.exception() if not task.cancelled() else None:
            return  # it had failed on its own: nothing was spent beyond what failed attempts cost
        call = loser.call
        record = dataclasses.replace(call.outcome, request_id=metering.new_request_id(), attempts=1, extra={})
        loser.fill(record)
        record.fail(499, metering.CANCELLED_HEDGE, "a hedged attempt on another deployment answered first")
        record.ended_ns = time.monotonic_ns()
        meter = loser.meter
        if meter is None:
            self.meter.record(record)
            return
        # Its count may take a thread: the winner's stream does not wait for it.
        task = asyncio.ensure_future(self._record_counted(meter, loser.sent, record))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(self._check_settled)

    async def _record_counted(self, meter: StreamMeter, sent: bytes, record: Outcome) -> None:
        try:
            await self._finish_usage(meter, sent, record)
        finally:
            self.meter.record(record)

    def _upstream_body(self, attempt: Attempt) -> tuple[bytes, bool]:
        """The body the upstream gets (its own model name; usage asked for) and whether to strip that usage."""
        call = attempt.call
        body = call.body
        if attempt.translated:
            return self._translated_body(attempt)
        strip_usage = False
        changes: list[tuple[str, bytes]] = []
        if body.get("model") != attempt.model:
            changes.append(("model", orjson.dumps(attempt.model)))
        if call.stream and call.api in ("chat", "completions") and attempt.deployment.kind == "openai":
            options = body.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage")):
                new = {**(options if isinstance(options, dict) else {}), "include_usage": True}
                changes.append(("stream_options", orjson.dumps(new)))
                strip_usage = True
        if not changes:
            return call.raw, strip_usage
        # Spliced into the client's bytes (Rust), not re-encoded: the messages go upstream as they came.
        return patch_body(call.raw, changes, call.spans), strip_usage

    @staticmethod
    def _translated_body(attempt: Attempt) -> tuple[bytes, bool]:
        """The request in the deployment's format; a parameter with no equivalent fails the attempt with a 400 naming
        it (another deployment of the route may still serve the request natively)."""
        call, kind = attempt.call, attempt.deployment.kind
        options = call.body.get("stream_options")
        strip_usage = not (isinstance(options, dict) and options.get("include_usage"))
        if attempt.upstream_path is None:
            return b"", strip_usage
        try:
            body = translate_request(call.api, kind, call.raw, attempt.model, attempt.route.drop_unsupported)
        except TranslationError as exc:
            attempt.close()
            message = f"{exc} (route {attempt.route.name!r} sends it to a {kind}-kind deployment)"
            answer = error_response(
                400, message, _error_format(call.api), code="unsupported_parameter", param=exc.param
            )
            raise _Retry(400, metering.CLIENT_4XX, message, answer) from None
        return body, strip_usage

    async def _open(self, attempt: Attempt) -> None:
        """Connects and reads up to the first content token. Raises _Retry on any failure; on return the attempt
        either holds a complete answer (`final`) or a stream ready to deliver."""
        call, deployment = attempt.call, attempt.deployment
        body, strip_usage = self._upstream_body(attempt)
        # Input is estimated from the request in the upstream's format: the translated body; else the client's
        # own bytes (the model name and stream_options patched in make no difference), so the patched copy is
        # dropped once sent instead of living as long as the stream.
        attempt.sent = body if attempt.translated else call.raw
        if attempt.upstream_path is None:
            self._count_locally(attempt)
            return
        loop = self.loop
        hold_s = min(MAX_HOLD_S, attempt.route.keepalive_interval_s or MAX_HOLD_S) if call.stream else None
        watchdog = attempt.watchdog = _Watchdog(attempt.route, loop, hold_s)
        watchdog.task = asyncio.current_task(loop)
        ok = False
        try:
            try:
                origin, head = upstream_request(deployment, attempt.upstream_path, call.request.headers, call.stream)
                on_head = self._stream_on_head(attempt, strip_usage) if call.stream else None
                upstream = await self.client.send(
                    origin, head, body, connect_timeout=attempt.route.timeouts.connect, on_head=on_head
                )
                body = b""
            except asyncio.CancelledError:
                if watchdog.fired is None:
                    raise
                raise _Retry(504, metering.TIMEOUT, f"{deployment.name}: {watchdog.describe()}") from None
            except ConnectTimeout as exc:
                raise _Retry(504, metering.TIMEOUT, f"upstream {deployment.name} timed out connecting") from exc
            except ConnectError as exc:
                raise _Retry(502, metering.UPSTREAM_ERROR, f"upstream {deployment.name} unreachable: {exc}") from exc
            except UpstreamError as exc:
                raise _Retry(502, metering.UPSTREAM_ERROR, f"upstream {deployment.name} failed: {exc}") from exc
            watchdog.task = None
            watchdog.response = attempt.upstream = upstream
            attempt.status = upstream.status
            if upstream.status >= 400:
                await self._upstream_error(attempt, upstream)
            elif call.stream and _is_stream(upstream.headers.get("content-type", "")):
                await self._open_stream(attempt, upstream, strip_usage)
            else:
                await self._read_body(attempt, upstream)
            if attempt.final is not None:
                # A complete answer: its deadlines are over. (Left armed, the timer would keep the watchdog and the
                # upstream response alive until the first-token deadline, minutes away.)
                watchdog.cancel()
            ok = True
        except _Retry:
            attempt.close()
            raise
        finally:
            if not ok:
                attempt.close()

    @staticmethod
    def _stream_on_head(attempt: Attempt, strip_usage: bool) -> Callable[[Response], bool]:
        """For a streamed request: in the upstream's callback that completes the head of a stream, start
        metering there and hold the handler until the first content (or the end, an error event, the hold limit):
        one wake-up of the handler where there were two (the head, then the first token)."""

        def on_head(upstream: Response) -> bool:
            if upstream.status >= 400 or not _is_stream(upstream.headers.get("content-type", "")):
                return False
            watchdog = attempt.watchdog
            if watchdog is None or watchdog.hold_until is None:
                return False
            meter = _new_meter(attempt, strip_usage)
            upstream.hold(lambda: meter.content_started or meter.done or meter.error is not None)
            try:
                upstream.start_stream(meter)
            except UpstreamError:  # an unsupported content-encoding: the handler meets it again, and reports it
                upstream.hold(None)
                return False
            attempt.meter = meter
            watchdog.response = upstream  # the watchdog's deadlines and the hold limit now act on the response
            return True

        return on_head

    async def _upstream_error(self, attempt: Attempt, upstream: Response) -> None:
        """An error status: retry elsewhere if it is the deployment's fault, else keep it to pass on."""
        status = upstream.status
        try:
            data = await upstream.read()
        except _READ_ERRORS:
            data = b""
        finally:
            upstream.release()
        data = redact(data, attempt.deployment)
        overloaded = b"overloaded" in data[:2048]
        if attempt.translated:
            data = translate_error(attempt.upstream_api, _error_format(attempt.call.api), status, data)
        passthrough = web.Response(status=status, body=data, headers=response_headers(upstream.headers))
        error_class = metering.error_class_for_status(status, upstream=True)
        if status in RETRYABLE_STATUSES or overloaded:
            if status == 429 or overloaded or status in (503, 529):
                seconds = cooldown_from_headers(upstream.headers)
                attempt.pool.cooldown(attempt.idx, seconds if seconds is not None else DEFAULT_COOLDOWN_S)
                attempt.release(RATE_LIMITED)
            else:
                attempt.release(FAILURE)
            raise _Retry(status, error_class, f"upstream {attempt.deployment.name} returned {status}", passthrough)
        # The request's own fault (400, 404, 422...): the deployment is fine; the client gets the upstream's answer.
        attempt.release(CANCELLED if status < 500 else FAILURE)
        attempt.call.outcome.fail(status, error_class, data[:500].decode("utf-8", "replace"))
        attempt.final = passthrough

    async def _read_body(self, attempt: Attempt, upstream: Response) -> None:
        """A complete (non-streaming) answer: read it and take its usage."""
        call = attempt.call
        try:
            data = await upstream.read()
        except _READ_ERRORS as exc:
            attempt.release(FAILURE)
            watchdog = attempt.watchdog
            if watchdog is not None and watchdog.fired:
                raise _Retry(504, metering.TIMEOUT, watchdog.describe()) from exc
            raise _Retry(502, metering.UPSTREAM_ERROR, f"upstream failed while answering: {exc}") from exc
        finally:
            upstream.release()
        attempt.first_token_ns = time.monotonic_ns()
        usage: Usage | None = None
        if call.api != "count_tokens":
            try:
                if len(data) + len(attempt.sent) > ESTIMATE_INLINE_BYTES:
                    loop = self.loop
                    usage = await loop.run_in_executor(
                        None, decode_body, attempt.upstream_api, data, attempt.model, attempt.sent
                    )
                else:
                    usage = decode_body(attempt.upstream_api, data, attempt.model, attempt.sent)
            except ValueError as exc:
                log.warning("could not read usage from %s's answer: %s", attempt.deployment.name, exc)
        if attempt.translated:
            try:
                data = translate_response(attempt.upstream_api, call.api, data)
            except TranslationError as exc:
                attempt.release(FAILURE)
                raise _Retry(502, metering.UPSTREAM_ERROR, f"{attempt.deployment.name}: {exc}") from exc
        attempt.usage = usage
        attempt.release(SUCCESS, usage)
        headers = response_headers(upstream.headers)
        headers["x-tokenrelay-deployment"] = attempt.deployment.name
        if usage is not None:
            headers["x-tokenrelay-input-tokens"] = str(usage.input)
            headers["x-tokenrelay-output-tokens"] = str(usage.output)
        attempt.final = web.Response(status=upstream.status, body=data, headers=headers)

    async def _open_stream(self, attempt: Attempt, upstream: Response, strip_usage: bool) -> None:
        """Holds the opening events until the first content token (or the end, an error, or the hold limit)."""
        meter = attempt.meter
        watchdog = attempt.watchdog
        assert watchdog is not None
        try:
            if meter is None:  # (else it was started by `_stream_on_head`, in the upstream's callbacks)
                meter = attempt.meter = _new_meter(attempt, strip_usage)
                upstream.start_stream(meter)  # the opening events are often in already: metered here, no wait
            while True:
                data = upstream.take()
                if data:
                    attempt.held.append(data)
                if meter.content_started or meter.done or meter.error is not None:
                    break
                if upstream.ended:
                    upstream.take()  # raises if the stream broke (what came before the break is taken above)
                    break
                if watchdog.hold_until is None:  # the hold is over (counted from the attempt's start)
                    break
                await upstream.wait(None)  # until a read, the end, or the watchdog at hold_until
        except _READ_ERRORS as exc:
            attempt.release(FAILURE)
            if watchdog.fired:
                raise _Retry(504, metering.TIMEOUT, f"{attempt.deployment.name}: {watchdog.describe()}") from exc
            raise _Retry(502, metering.UPSTREAM_ERROR, f"upstream stream failed before any content: {exc}") from exc
        finally:
            watchdog.hold_until = None
        if meter.error is not None and not meter.content_started:
            attempt.release(FAILURE)
            message = redact_text(meter.error.get("message", ""), attempt.deployment)
            raise _Retry(502, metering.UPSTREAM_ERROR, f"upstream error before any content: {message}")
        if upstream.ended and not meter.done and not meter.content_started:
            attempt.release(FAILURE)
            raise _Retry(502, metering.UPSTREAM_ERROR, "the upstream closed the stream before sending any content")
        if meter.content_started:
            self._first_token(attempt)

    @staticmethod
    def _count_locally(attempt: Attempt) -> None:
        """count_tokens on a deployment without such an endpoint: an estimate, marked as one in a header."""
        tokens = estimate_input_tokens("messages", attempt.call.raw, attempt.model)
        attempt.first_token_ns = time.monotonic_ns()
        attempt.status = 200
        attempt.release(SUCCESS)
        headers = {"x-tokenrelay-deployment": attempt.deployment.name, "x-tokenrelay-estimated": "true"}
        attempt.final = web.Response(
            body=orjson.dumps({"input_tokens": tokens}), content_type="application/json", headers=headers
        )

    @staticmethod
    def _first_token(attempt: Attempt) -> None:
        assert attempt.meter is not None
        ns = attempt.meter.first_token_ns
        attempt.first_token_ns = ns if ns is not None else time.monotonic_ns()
        attempt.call.outcome.first_token_ns = attempt.first_token_ns
        if attempt.watchdog is not None:
            attempt.watchdog.first = False
        ttft = (attempt.first_token_ns - attempt.call.outcome.started_ns) / 1e9
        attempt.pool.first_token(attempt.idx, max(0.0, ttft))

    # --- deliver: committed, bytes flow -------------------------------------------------------------------------

    async def _deliver(self, attempt: Attempt) -> web.StreamResponse:
        call = attempt.call
        outcome = call.outcome
        if attempt.final is not None:
            outcome.usage = attempt.usage
            return attempt.final
        meter, upstream, watchdog = attempt.meter, attempt.upstream, attempt.watchdog
        assert meter is not None and upstream is not None and watchdog is not None
        # Committed: no other attempt will be made, so the client's bytes need not live as long as the stream when
        # the upstream got a translation (the estimates read `attempt.sent`, which is them otherwise).
        call.raw = b""
        headers = response_headers(upstream.headers)
        headers["x-tokenrelay-deployment"] = attempt.deployment.name
        headers["cache-control"] = "no-cache"
        if not headers.get("content-type", "").startswith("text/event-stream"):
            headers["content-type"] = "text/event-stream"  # the upstream mislabelled its stream (text/plain...)
        request = call.request
        response: web.StreamResponse | FastStream
        writer: AbstractStreamWriter | FastStream | None
        failure: str | None = None
        transport = request.transport
        watchdog.watch_client(transport, self.config.write_timeout_s)
        try:
            if isinstance(request, FastRequest):  # the own front end (`tokenrelay.server`)
                response = writer = request.stream(upstream.status, headers)
            else:
                response = _StreamHead(status=upstream.status, headers=headers)
                writer = await response.prepare(request)
            if attempt.held:
                await response.write(b"".join(attempt.held))  # one write with the head
            elif writer is not None:
                writer.send_headers()  # nothing to send yet (a long thinking phase): the head goes out now
            if not (meter.content_started or meter.done):
                await self._await_content(attempt, response)
            if transport is None or writer is None:
                raise ConnectionResetError("the client closed the connection")
            await upstream.pump(writer, transport)  # the stream's bytes go out from the upstream's callbacks
            rest = meter.flush()
            if rest:
                await response.write(rest)
            if watchdog.fired:
                failure = watchdog.describe()
            elif not meter.done:
                failure = "the upstream closed the stream before it finished"
        except _WRITE_ERRORS:
            # The client went away: drop the upstream at once so it stops generating. (SDKs close the
            # connection as soon as they read the end event: after it, that is a finished request.)
            upstream.close()
            if not meter.done:
                outcome.fail(499, metering.CLIENT_DISCONNECT, "the client closed the connection")
        except _READ_ERRORS as exc:
            failure = watchdog.describe() if watchdog.fired else f"the upstream stream broke: {exc}"
        except asyncio.CancelledError:
            upstream.close()
            try:
                # Off the loop when it counts tokens: a cut stream has no usage chunk, and the first count also
                # loads a vocabulary (~50-100 ms).
                await self._finish_usage(meter, attempt.sent, outcome)
            finally:
                if meter.done:
                    outcome.delivered = True
                    attempt.release(SUCCESS, outcome.usage)
                else:
                    why = watchdog.describe() if watchdog.fired == "client" else "the client closed the connection"
                    self._cancelled(outcome, why)
                    attempt.release(CANCELLED, outcome.usage)
            raise
        finally:
            watchdog.cancel()
            upstream.release()
        await self._finish_usage(meter, attempt.sent, outcome)
        if failure is not None and not outcome.error_class:
            outcome.fail(
                504 if watchdog.fired else 502, metering.TIMEOUT if watchdog.fired else metering.UPSTREAM_ERROR, failure
            )
            with contextlib.suppress(*_WRITE_ERRORS):
                await response.write(error_event(failure, call.api))
        elif meter.error is not None and not outcome.error_class:
            message = redact_text(str(meter.error.get("message", "upstream error")), attempt.deployment)
            outcome.fail(502, metering.UPSTREAM_ERROR, message)
        if outcome.first_token_ns is None and meter.first_token_ns is not None:
            outcome.first_token_ns = meter.first_token_ns
        if not outcome.error_class:
            attempt.release(SUCCESS, outcome.usage)
        else:
            attempt.release(CANCELLED if outcome.error_class == metering.CLIENT_DISCONNECT else FAILURE, outcome.usage)
        if outcome.error_class != metering.CLIENT_DISCONNECT:
            try:
                await response.write_eof()
            except _WRITE_ERRORS:
                if not meter.done:
                    outcome.fail(499, metering.CLIENT_DISCONNECT, "the client closed the connection")
        watchdog.unwatch_client()
        return cast(web.StreamResponse, response)  # (a FastStream goes back to the front end that made it)

    async def _await_content(self, attempt: Attempt, response: web.StreamResponse | FastStream) -> None:
        """Committed but no content yet (a long thinking phase): relay what comes, and keep the client's idle
        timer alive with SSE comments, sent only on event boundaries."""
        meter, upstream, watchdog = attempt.meter, attempt.upstream, attempt.watchdog
        assert meter is not None and upstream is not None and watchdog is not None
        interval = attempt.route.keepalive_interval_s
        at_boundary = not attempt.held or attempt.held[-1].endswith((b"\n\n", b"\r\n\r\n", b"\r\r"))
        while not (meter.content_started or meter.done or meter.error is not None):
            if not await upstream.wait(interval):
                if at_boundary:
                    await response.write(KEEPALIVE_COMMENT)
                continue
            data = upstream.take()
            if data:
                await response.write(data)
                at_boundary = data.endswith((b"\n\n", b"\r\n\r\n", b"\r\r"))
            if upstream.ended:
                break
        if meter.content_started:
            self._first_token(attempt)

    async def _finish_usage(self, meter: StreamMeter, sent: bytes, outcome: Outcome) -> Usage:
        """The usage of a stream, into `outcome`; counting large texts happens in a thread so the event loop never
        waits on it.

        If the client goes away meanwhile (the handler is cancelled), the count still completes and is recorded
        before the cancellation goes on: a metered request is never lost."""
        global _vocabulary_loaded
        pending = meter.work_bytes(len(sent))
        # The first count loads a BPE vocabulary (~50-100 ms): that too happens off the loop.
        if not (pending > ESTIMATE_INLINE_BYTES or (pending and not _vocabulary_loaded)):
            usage = outcome.usage = meter.finish(sent)
            return usage
        counting = self.loop.run_in_executor(None, meter.finish, sent)
        try:
            usage = await asyncio.shield(counting)
        except asyncio.CancelledError:
            outcome.usage = await counting
            raise
        _vocabulary_loaded = True
        outcome.usage = usage
        return usage


class _StreamHead(web.StreamResponse):
    """A stream response whose head goes out with the first bytes of the body: one write and one TCP segment
    for the client to wake up to, not two (aiohttp's StreamResponse sends its head at prepare())."""

    _send_headers_immediately = False


def _new_meter(attempt: Attempt, strip_usage: bool) -> StreamMeter:
    """The meter of an attempt's stream (in the upstream's format; translating to the client's when they differ)."""
    translate_to = attempt.call.api if attempt.translated else None
    return StreamMeter(attempt.upstream_api, attempt.model, strip_usage, translate_to)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def translation_for(api: str, deployment: Deployment) -> tuple[str, str | None] | None:
    """(upstream API, path) when `deployment` is sent a request of `api` translated; None when it speaks it."""
    if deployment.api == "chat" and api in CHAT_ONLY:
        return CHAT_ONLY[api]
    return TRANSLATED.get((api, deployment.kind))


def _error_format(api: str) -> str:
    """The API whose error shape a client of `api` parses."""
    return "messages" if api in ("messages", "count_tokens") else api


def _is_stream(content_type: str) -> bool:
    """Whether to read an answer to a streaming request as SSE: anything but JSON (a provider that ignored
    `stream`). A mislabelled stream (text/plain) is still parsed; a body with no events at all (an HTML error page
    sent with 200) ends before any content and fails over like any broken stream."""
    return "json" not in content_type.split(";", 1)[0].lower()


def client_identity(headers: Mapping[str, str]) -> str:
    """The credential the client presented (its key), used only to identify it for metering and auth."""
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return headers.get("x-api-key", "").strip()
