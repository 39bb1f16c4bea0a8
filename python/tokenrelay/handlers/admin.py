"""The daemon's own endpoints: health, the model list, the routes' live state."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from aiohttp import web

from tokenrelay import __version__
from tokenrelay.handlers import ui
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
    """Each route's deployments and their live balancing state. With several workers, each worker balances on its
    own: a deployment's state is then the most severe any worker sees (`ui.merge_states`, the outstanding
    requests summed), with each worker's in `by_worker`."""
    relay = request.app[RELAY]
    hub = request.app[ui.UI_HUB]
    others: list[dict[str, Any]] = []
    if relay.exporter is not None:
        others = await asyncio.get_running_loop().run_in_executor(None, relay.exporter.read_ui_parts)
    mine = hub.part(time.time()) if others else None
    out = []
    for name, route in sorted(relay.config.routes.items()):
        deployments = []
        for i, (d, state) in enumerate(zip(route.deployments, relay.pools[name].snapshot(), strict=True)):
            entry = {**state, "kind": d.kind, "model": d.model}
            if mine is not None:
                seen = [
                    {"pid": p["pid"], **{k: v for k, v in p["routes"][name][i].items() if k != "ttfts"}}
                    for p in (mine, *others)
                    if len(p["routes"].get(name, ())) > i
                ]
                merged = ui.merge_states(seen)
                entry.update({k: merged[k] for k in ("state", "until_s", "outstanding", "requests", "error_rate")})
                entry["by_worker"] = seen
            deployments.append(entry)
        out.append(
            {
                "route": name,
                "strategy": route.strategy,
                "fallbacks": list(route.fallbacks),
                "deployments": deployments,
            }
        )
    return web.json_response({"routes": out})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    for prefix in ("/v1", "/run/{run}/v1"):
        app.router.add_get(f"{prefix}/models", models)
    app.router.add_get("/v1/routes", routes)
    app.router.add_get("/admin/routes", routes)
