"""The daemon's own endpoints: health, the model list, the routes' live state."""

from __future__ import annotations

import os
import time

from aiohttp import web

from tokenrelay import __version__
from tokenrelay.state import RELAY, STARTED


async def healthz(request: web.Request) -> web.Response:
    relay = request.app[RELAY]
    return web.json_response(
        {
            "status": "ok",
            "version": __version__,
            "uptime_s": round(time.monotonic() - request.app[STARTED], 3),
            "in_flight": relay.in_flight,
            "worker_pid": os.getpid(),
            "routes": len(relay.config.routes),
        }
    )


async def models(request: web.Request) -> web.Response:
    """The routes, as OpenAI's model list (what `client.models.list()` shows)."""
    relay = request.app[RELAY]
    data = [
        {"id": name, "object": "model", "created": 0, "owned_by": "tokenrelay"} for name in sorted(relay.config.routes)
    ]
    return web.json_response({"object": "list", "data": data})


async def routes(request: web.Request) -> web.Response:
    """Each route's deployments and their live balancing state."""
    relay = request.app[RELAY]
    out = []
    for name, route in sorted(relay.config.routes.items()):
        out.append(
            {
                "route": name,
                "strategy": route.strategy,
                "fallbacks": list(route.fallbacks),
                "deployments": [
                    {**state, "kind": d.kind, "model": d.model}
                    for d, state in zip(route.deployments, relay.pools[name].snapshot(), strict=True)
                ],
            }
        )
    return web.json_response({"routes": out})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    for prefix in ("/v1", "/run/{run}/v1"):
        app.router.add_get(f"{prefix}/models", models)
    app.router.add_get("/v1/routes", routes)
    app.router.add_get("/admin/routes", routes)
