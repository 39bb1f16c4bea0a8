"""The relayed endpoints: OpenAI chat completions, completions, responses, embeddings; Anthropic messages."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from tokenrelay import auth, metering, runs
from tokenrelay._core import read_body
from tokenrelay.errors import error_response
from tokenrelay.metering import Outcome
from tokenrelay.relay import TRANSLATED, Call, client_identity
from tokenrelay.state import RELAY

MAX_RUN_ID = 128
MAX_TAGS = 16
MAX_TAG_LENGTH = 64
# Requests in flight per client key id, for `max_connections_per_key`.
IN_FLIGHT_BY_KEY: web.AppKey[collections.Counter[str]] = web.AppKey("in_flight_by_key")
# The handler of each relayed API by its path under /v1, for the daemon's own front end (`tokenrelay.server`).
FAST_ROUTES: web.AppKey[dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = web.AppKey("fast_routes")

# api name -> upstream path under a deployment's base URL
ENDPOINTS: dict[str, str] = {
    "chat": "/chat/completions",
    "completions": "/completions",
    "responses": "/responses",
    "embeddings": "/embeddings",
    "messages": "/messages",
    "count_tokens": "/messages/count_tokens",
}
# The wire format each API belongs to (what a deployment's `kind` must be to serve it without translation).
API_KIND = {
    "chat": "openai",
    "completions": "openai",
    "responses": "openai",
    "embeddings": "openai",
    "messages": "anthropic",
    "count_tokens": "anthropic",
}


def _error_api(api: str) -> str:
    return "messages" if api in ("messages", "count_tokens") else api


def _too_large(limit: int) -> str:
    return f"the request body is larger than the limit of {limit} bytes"


def _parse_tags(value: str) -> str | None:
    if not value:
        return ""
    tags = [t.strip() for t in value.split(",") if t.strip()]
    if len(tags) > MAX_TAGS or any(len(t) > MAX_TAG_LENGTH for t in tags):
        return None
    return ",".join(sorted(set(tags)))


def endpoint(api: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The handler for one relayed API."""

    async def handle(request: web.Request) -> web.StreamResponse:
        relay = request.app[RELAY]
        err_api = _error_api(api)
        principal = request.get(auth.PRINCIPAL)  # set by the auth middleware once client keys exist
        secret = client_identity(request.headers)
        outcome = Outcome(
            request_id=metering.new_request_id(),
            ts=time.time(),
            started_ns=time.monotonic_ns(),
            api=api,
            route="",
            stream=False,
            requested_model="",
            key_id=principal.key_id if principal is not None else metering.key_id(secret),
            key_name=principal.key_name if principal is not None else "",
        )

        def reject(
            status: int,
            message: str,
            code: str | None = None,
            param: str | None = None,
            headers: dict[str, str] | None = None,
        ) -> web.Response:
            outcome.fail(status, metering.error_class_for_status(status, upstream=False), message)
            relay.meter.record(outcome)
            return error_response(status, message, err_api, code=code, param=param, headers=headers)

        cap = relay.config.max_connections_per_key
        if cap is None:
            return await serve(request, outcome, reject, principal)
        in_flight = request.app[IN_FLIGHT_BY_KEY]
        key = outcome.key_id
        if in_flight[key] >= cap:
            message = f"this client key already has {cap} requests in flight (max_connections_per_key)"
            return reject(429, message, "too_many_connections", headers={"retry-after": "1"})
        in_flight[key] += 1
        try:
            return await serve(request, outcome, reject, principal)
        finally:
            in_flight[key] -= 1
            if not in_flight[key]:
                del in_flight[key]

    async def serve(
        request: web.Request, outcome: Outcome, reject: Callable[..., web.Response], principal: auth.Principal | None
    ) -> web.StreamResponse:
        relay = request.app[RELAY]
        run = request.match_info.get("run") or request.headers.get("x-tokenrelay-run") or ""
        if len(run) > MAX_RUN_ID:
            return reject(400, f"the run id is longer than {MAX_RUN_ID} characters")
        outcome.run = run
        tags = _parse_tags(request.headers.get("x-tokenrelay-tags", ""))
        if tags is None:
            return reject(400, f"X-Tokenrelay-Tags allows at most {MAX_TAGS} tags of {MAX_TAG_LENGTH} characters")
        outcome.tags = tags
        timeout = relay.config.body_timeout_s
        limit = relay.config.max_body_bytes
        content = request.content
        try:
            if content.is_eof():
                # The whole body has arrived (the usual case): taken at once, no coroutine (aiohttp's read() would
                # be two readany() awaits and a copy through a bytearray). Its size limit is checked here then.
                raw = content.read_nowait()
                if len(raw) > limit:
                    return reject(413, _too_large(limit), "request_too_large")
            else:
                async with asyncio.timeout(timeout):
                    raw = await request.read()
        except TimeoutError:
            # A slowloris body: drop the connection too, the rest of the body may never come.
            response = reject(408, f"the request body did not arrive within body_timeout_s ({timeout:g} s)")
            response.force_close()
            return response
        except web.HTTPRequestEntityTooLarge:
            return reject(413, _too_large(limit), "request_too_large")
        try:
            # Validated whole; only the top-level fields the proxy reads are built, and where each member lies
            # (patched for the upstream without a second parse).
            body, spans = read_body(raw)
        except ValueError as exc:
            return reject(400, str(exc), "invalid_json")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return reject(400, "you must provide a model parameter (the route name)", "missing_model", "model")
        outcome.requested_model = model
        outcome.route = model
        route = relay.config.find_route(model)
        if route is None:
            names = ", ".join(sorted(relay.config.routes)) or "(none)"
            return reject(
                404,
                f"The model {model!r} does not exist: no route of that name. Routes: {names}",
                "model_not_found",
                "model",
            )
        kind = API_KIND[api]
        if not any(d.kind == kind or (api, d.kind) in TRANSLATED for d in route.deployments):
            return reject(
                400,
                f"route {route.name!r} has no {kind}-kind deployment to serve {request.path}",
                "unsupported_api",
            )
        stream = body.get("stream") is True and api not in ("embeddings", "count_tokens")
        outcome.stream = stream
        if principal is not None:
            denial = await request.app[auth.GATE].admit(principal, api, body, raw, route, outcome)
            if denial is not None:
                return reject(denial.status, denial.message, denial.code, headers=denial.headers())
        if refusal := await runs.admit(request.app, relay.config, outcome, route, api, body, raw):
            refused = reject(429, refusal, "run_budget_exceeded")
            refused.headers["x-should-retry"] = "false"  # the SDKs would retry a 429 otherwise
            return refused
        call = Call(request, api, ENDPOINTS[api], body, raw, spans, stream, outcome)
        return await relay.handle(call, route)

    return handle


def add_routes(app: web.Application) -> None:
    """Registers the relayed APIs under /v1 and under the run-scoped prefix /run/{run}/v1."""
    app[IN_FLIGHT_BY_KEY] = collections.Counter()
    handlers = app[FAST_ROUTES] = {path: endpoint(api) for api, path in ENDPOINTS.items()}
    for prefix in ("/v1", "/run/{run}/v1"):
        for path, handler in handlers.items():
            app.router.add_post(f"{prefix}{path}", handler)
