"""The byte pump: a client request, sent to a deployment the route's pool picks, relayed back unchanged.

Failures before the first byte reaches the client are retried on another deployment; after it, a failure ends
the stream with an error event in the API's own format. Whatever happens, the request is metered exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from tokenrelay import metering
from tokenrelay._core import StreamMeter, Usage, decode_body
from tokenrelay.config import Config, Deployment, Route
from tokenrelay.errors import error_event, error_response
from tokenrelay.metering import Metering, Outcome
from tokenrelay.routing import CANCELLED, FAILURE, RATE_LIMITED, SUCCESS, RoutePool
from tokenrelay.upstream import response_headers, upstream_headers, upstream_url

log = logging.getLogger("tokenrelay.relay")

# Statuses that mean "this deployment, not this request": try another one.
RETRYABLE_STATUSES = frozenset({401, 403, 408, 409, 429, 500, 502, 503, 504, 529})
# Above this many bytes of text to count, usage estimation runs in a thread instead of on the event loop.
ESTIMATE_INLINE_BYTES = 16 * 1024
DEFAULT_COOLDOWN_S = 5.0
# How long the opening events of a stream may be held back waiting for the first content token, so that an
# in-band error before any content can still fail over. Capped by the route's keep-alive interval.
MAX_HOLD_S = 10.0
KEEPALIVE_COMMENT = b": keep-alive\n\n"


@dataclass
class Call:
    """One client request, parsed once."""

    request: web.Request
    api: str  # chat | completions | responses | messages | embeddings | count_tokens
    path: str  # the upstream path under the deployment's base URL, e.g. /chat/completions
    body: dict[str, Any]
    raw: bytes
    stream: bool
    outcome: Outcome


class _Retry(Exception):
    """An attempt failed before anything reached the client: another deployment may serve the request."""

    def __init__(self, status: int, error_class: str, message: str, response: web.Response | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_class = error_class
        self.message = message
        self.response = response  # the upstream's own error, passed through if no attempt is left


class _Watchdog:
    """One timer per attempt for the first-token, idle and total timeouts: no per-chunk timer churn.

    The pump stores the time of each read in `last`; the timer wakes at most a few times per idle period, and
    when a deadline has passed it closes the upstream response, which ends the read loop.
    """

    def __init__(self, route: Route, started: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.route = route
        self.started = started
        self.last = started
        self.first = True
        self.fired: str | None = None
        self.response: aiohttp.ClientResponse | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._arm()

    def _deadline(self) -> float:
        t = self.route.timeouts
        deadline = self.last + (t.first_token if self.first else t.idle)
        if t.total is not None:
            deadline = min(deadline, self.started + t.total)
        return deadline

    def _arm(self) -> None:
        self._handle = self.loop.call_at(self._deadline(), self._check)

    def _check(self) -> None:
        now = self.loop.time()
        deadline = self._deadline()
        if now < deadline:
            self._handle = self.loop.call_at(deadline, self._check)
            return
        t = self.route.timeouts
        total_hit = t.total is not None and now >= self.started + t.total
        self.fired = "total" if total_hit else ("first_token" if self.first else "idle")
        if self.response is not None:
            self.response.close()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()

    def describe(self) -> str:
        t = self.route.timeouts
        if self.fired == "total":
            return f"the request took longer than the route's total timeout ({t.total:g} s)"
        if self.fired == "first_token":
            return f"no first token within the route's first_token timeout ({t.first_token:g} s)"
        return f"the upstream sent nothing for the route's idle timeout ({t.idle:g} s)"


class Relay:
    """Holds the client session, one pool per route, and the metering sink."""

    def __init__(self, config: Config, session: aiohttp.ClientSession, meter: Metering) -> None:
        self.config = config
        self.session = session
        self.meter = meter
        self.pools: dict[str, RoutePool] = {name: RoutePool(route) for name, route in config.routes.items()}
        self.in_flight = 0

    async def handle(self, call: Call, route: Route) -> web.StreamResponse:
        """Relays the call; meters it once however it ends (including the client going away)."""
        self.in_flight += 1
        outcome = call.outcome
        try:
            return await self._serve(call, route)
        except asyncio.CancelledError:
            if not outcome.error_class:
                outcome.fail(499, metering.CLIENT_DISCONNECT, "the client closed the connection")
            raise
        finally:
            self.in_flight -= 1
            self.meter.record(outcome)

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
        return error_response(last.status, last.message, call.api)

    async def _serve_route(self, call: Call, route: Route) -> web.StreamResponse:
        """Tries the route's deployments until one answers; raises _Retry when none did."""
        pool = self.pools[route.name]
        outcome = call.outcome
        outcome.route = route.name
        tried: list[int] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + route.retry_budget_s
        last: _Retry | None = None
        while len(tried) < route.max_attempts and loop.time() < deadline:
            pick = pool.pick(tried)
            if not pick.ok:
                break
            tried.append(pick.index)
            outcome.attempts += 1
            try:
                return await self._attempt(call, route, pool, pick.index)
            except _Retry as failure:
                last = failure
                log.info(
                    "attempt %d on %s failed: %s",
                    outcome.attempts,
                    route.deployments[pick.index].name,
                    failure.message,
                )
        if last is None:
            last = _Retry(503, metering.UPSTREAM_ERROR, f"no deployment of route {route.name!r} is available")
        raise last

    def _upstream_body(self, call: Call, route: Route, deployment: Deployment) -> tuple[bytes, bool]:
        """The body the upstream gets (its own model name; usage asked for) and whether to strip that usage."""
        body = call.body
        model = deployment.upstream_model(call.outcome.requested_model, route.name)
        strip_usage = False
        changes: dict[str, Any] = {}
        if body.get("model") != model:
            changes["model"] = model
        if call.stream and call.api in ("chat", "completions") and deployment.kind == "openai":
            options = body.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage")):
                changes["stream_options"] = {
                    **(options if isinstance(options, dict) else {}),
                    "include_usage": True,
                }
                strip_usage = True
        if not changes:
            return call.raw, strip_usage
        return orjson.dumps({**body, **changes}), strip_usage

    async def _attempt(self, call: Call, route: Route, pool: RoutePool, idx: int) -> web.StreamResponse:
        deployment = route.deployments[idx]
        outcome = call.outcome
        outcome.deployment = deployment.name
        outcome.model = deployment.upstream_model(outcome.requested_model, route.name)
        outcome.price = dict(deployment.price) if deployment.price is not None else None
        body, strip_usage = self._upstream_body(call, route, deployment)
        loop = asyncio.get_running_loop()
        watchdog = _Watchdog(route, loop.time())
        released = False

        def release(result: str, usage: Usage | None = None) -> None:
            nonlocal released
            if not released:
                released = True
                pool.release(
                    idx,
                    result,
                    usage.output if usage is not None else 0,
                    usage.input + usage.output if usage is not None else 0,
                    outcome.duration_s,
                )

        try:
            try:
                upstream = await self.session.post(
                    upstream_url(deployment, call.path),
                    data=body,
                    headers=upstream_headers(deployment, call.request.headers, call.stream),
                    timeout=aiohttp.ClientTimeout(
                        total=None, connect=route.timeouts.connect, sock_connect=route.timeouts.connect
                    ),
                )
            except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, ConnectionError) as exc:
                release(FAILURE)
                raise _Retry(502, metering.UPSTREAM_ERROR, f"upstream {deployment.name} unreachable: {exc}") from exc
            except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
                release(FAILURE)
                raise _Retry(504, metering.TIMEOUT, f"upstream {deployment.name} timed out connecting") from exc
            except aiohttp.ClientError as exc:
                release(FAILURE)
                raise _Retry(502, metering.UPSTREAM_ERROR, f"upstream {deployment.name} failed: {exc}") from exc
            watchdog.response = upstream
            if watchdog.fired:
                upstream.close()
                release(FAILURE)
                raise _Retry(504, metering.TIMEOUT, watchdog.describe())
            outcome.status = upstream.status
            if upstream.status >= 400:
                return await self._upstream_error(call, pool, idx, upstream, watchdog, release)
            content_type = upstream.headers.get("content-type", "")
            if call.stream and content_type.startswith("text/event-stream"):
                return await self._relay_stream(call, route, pool, idx, upstream, watchdog, strip_usage, release)
            return await self._relay_body(call, upstream, watchdog, release)
        except asyncio.CancelledError:
            release(CANCELLED)
            raise
        finally:
            watchdog.cancel()
            if not released:
                release(CANCELLED)

    async def _upstream_error(
        self,
        call: Call,
        pool: RoutePool,
        idx: int,
        upstream: aiohttp.ClientResponse,
        watchdog: _Watchdog,
        release: Any,
    ) -> web.StreamResponse:
        """An error status from the upstream: retry elsewhere if it is the deployment's fault, else pass it on."""
        status = upstream.status
        try:
            data = await upstream.read()
        except aiohttp.ClientError:
            data = b""
        finally:
            upstream.release()
        overloaded = b"overloaded" in data[:2048]
        headers = response_headers(upstream.headers)
        passthrough = web.Response(status=status, body=data, headers=headers)
        if status in RETRYABLE_STATUSES or overloaded:
            if status == 429 or overloaded or status in (503, 529):
                from tokenrelay.ratelimit import cooldown_from_headers

                seconds = cooldown_from_headers(upstream.headers)
                pool.cooldown(idx, seconds if seconds is not None else DEFAULT_COOLDOWN_S)
                release(RATE_LIMITED)
            else:
                release(FAILURE)
            error_class = metering.error_class_for_status(status, upstream=True)
            raise _Retry(status, error_class, f"upstream returned {status}", passthrough)
        release(CANCELLED if status < 500 else FAILURE)
        call.outcome.fail(
            status,
            metering.error_class_for_status(status, upstream=True),
            data[:500].decode("utf-8", "replace"),
        )
        return passthrough

    async def _finish_usage(self, meter: StreamMeter, call: Call) -> Usage:
        """The request's usage; counting large texts happens in a thread so the event loop never waits on it."""
        if meter.estimate_bytes > ESTIMATE_INLINE_BYTES:
            return await asyncio.get_running_loop().run_in_executor(None, meter.finish, call.raw)
        return meter.finish(call.raw)

    async def _relay_body(
        self, call: Call, upstream: aiohttp.ClientResponse, watchdog: _Watchdog, release: Any
    ) -> web.StreamResponse:
        """A complete (non-streaming) answer: read, metered from its usage, returned as it came."""
        outcome = call.outcome
        try:
            data = await upstream.read()
        except (aiohttp.ClientError, ConnectionError) as exc:
            release(FAILURE)
            if watchdog.fired:
                raise _Retry(504, metering.TIMEOUT, watchdog.describe()) from exc
            raise _Retry(502, metering.UPSTREAM_ERROR, f"upstream failed while answering: {exc}") from exc
        finally:
            upstream.release()
        outcome.first_token_ns = time.monotonic_ns()
        api = call.api if call.api != "count_tokens" else ""
        usage: Usage | None = None
        if api:
            try:
                if len(data) + len(call.raw) > ESTIMATE_INLINE_BYTES:
                    usage = await asyncio.get_running_loop().run_in_executor(
                        None, decode_body, api, data, outcome.model, call.raw
                    )
                else:
                    usage = decode_body(api, data, outcome.model, call.raw)
            except ValueError as exc:
                log.warning("could not read usage from %s answer: %s", outcome.deployment, exc)
        outcome.usage = usage
        release(SUCCESS, usage)
        headers = response_headers(upstream.headers)
        headers["x-tokenrelay-deployment"] = outcome.deployment
        if usage is not None:
            headers["x-tokenrelay-input-tokens"] = str(usage.input)
            headers["x-tokenrelay-output-tokens"] = str(usage.output)
        return web.Response(status=upstream.status, body=data, headers=headers)

    async def _relay_stream(
        self,
        call: Call,
        route: Route,
        pool: RoutePool,
        idx: int,
        upstream: aiohttp.ClientResponse,
        watchdog: _Watchdog,
        strip_usage: bool,
        release: Any,
    ) -> web.StreamResponse:
        outcome = call.outcome
        meter = StreamMeter(call.api, outcome.model, strip_usage)
        loop = asyncio.get_running_loop()
        reader = upstream.content
        # Phase 1: hold the opening events back until the first content token (or the end, or an error), so
        # a pre-content failure can still go to another deployment. Costs nothing when content comes at once.
        held: list[bytes] = []
        hold_until = loop.time() + min(MAX_HOLD_S, route.keepalive_interval_s or MAX_HOLD_S)
        try:
            while not meter.content_started and not meter.done and meter.error is None:
                if held and loop.time() >= hold_until:
                    break
                chunk = await reader.readany()
                if not chunk:
                    break
                watchdog.last = loop.time()
                out = meter.feed(chunk)
                held.append(chunk if out is None else out)
        except (aiohttp.ClientError, ConnectionError) as exc:
            upstream.close()
            release(FAILURE)
            if watchdog.fired:
                raise _Retry(504, metering.TIMEOUT, watchdog.describe()) from exc
            raise _Retry(502, metering.UPSTREAM_ERROR, f"upstream stream failed before any content: {exc}") from exc
        if meter.error is not None and not meter.content_started:
            upstream.close()
            release(FAILURE)
            err = meter.error
            raise _Retry(502, metering.UPSTREAM_ERROR, f"upstream error before any content: {err.get('message')}")
        if not held and not meter.done:
            upstream.close()
            release(FAILURE)
            raise _Retry(502, metering.UPSTREAM_ERROR, "upstream closed the stream before sending anything")
        watchdog.first = False
        if meter.content_started:
            ttft_ns = meter.first_token_ns
            outcome.first_token_ns = ttft_ns if ttft_ns is not None else time.monotonic_ns()
            pool.first_token(idx, outcome.ttft_s or 0.0)
        # Phase 2: committed. From here on nothing is retried; bytes go out as they come in.
        headers = response_headers(upstream.headers)
        headers["x-tokenrelay-deployment"] = outcome.deployment
        headers["cache-control"] = "no-cache"
        response = web.StreamResponse(status=upstream.status, headers=headers)
        await response.prepare(call.request)
        failure: str | None = None
        try:
            if held:
                await response.write(b"".join(held))
            write = response.write
            feed = meter.feed
            async for chunk in reader.iter_any():
                watchdog.last = loop.time()
                out = feed(chunk)
                if out is None:
                    await write(chunk)
                elif out:
                    await write(out)
            rest = meter.flush()
            if rest:
                await write(rest)
            if watchdog.fired:
                failure = watchdog.describe()
            elif not meter.done:
                failure = "the upstream closed the stream before it finished"
        except (
            aiohttp.ClientPayloadError,
            aiohttp.ServerDisconnectedError,
            aiohttp.ClientResponseError,
        ) as exc:
            failure = watchdog.describe() if watchdog.fired else f"the upstream stream broke: {exc}"
        except (aiohttp.ClientConnectionResetError, ConnectionResetError):
            # The client went away: drop the upstream at once so it stops generating.
            upstream.close()
            outcome.fail(499, metering.CLIENT_DISCONNECT, "the client closed the connection")
        except asyncio.CancelledError:
            upstream.close()
            outcome.fail(499, metering.CLIENT_DISCONNECT, "the client closed the connection")
            outcome.usage = meter.finish(call.raw)
            release(CANCELLED, outcome.usage)
            raise
        finally:
            upstream.release()
        if failure is not None and not outcome.error_class:
            error_class = metering.TIMEOUT if watchdog.fired else metering.UPSTREAM_ERROR
            outcome.fail(504 if watchdog.fired else 502, error_class, failure)
            with contextlib.suppress(ConnectionError, aiohttp.ClientConnectionResetError):
                await response.write(error_event(failure, call.api))
        elif meter.error is not None and not outcome.error_class:
            outcome.fail(502, metering.UPSTREAM_ERROR, str(meter.error.get("message", "upstream error")))
        outcome.usage = await self._finish_usage(meter, call)
        if outcome.first_token_ns is None and meter.first_token_ns is not None:
            outcome.first_token_ns = meter.first_token_ns
        release(
            SUCCESS
            if not outcome.error_class
            else (CANCELLED if outcome.error_class == metering.CLIENT_DISCONNECT else FAILURE),
            outcome.usage,
        )
        if outcome.error_class != metering.CLIENT_DISCONNECT:
            try:
                await response.write_eof()
            except (ConnectionError, aiohttp.ClientConnectionResetError):
                outcome.fail(499, metering.CLIENT_DISCONNECT, "the client closed the connection")
        return response


def client_identity(headers: Mapping[str, str]) -> str:
    """The credential the client presented (its key), used only to identify it for metering and auth."""
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return headers.get("x-api-key", "").strip()
