"""Agent runs over HTTP: `POST /runs` registers one (name, budget), `POST /runs/{id}/end` closes it,
`GET /runs` lists recent runs with their totals, `GET /runs/{id}` is one run's summary (usage per route and
deployment, read after a ledger flush so it is exact)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from tokenrelay import ledger_query
from tokenrelay.errors import error_response
from tokenrelay.runs import RUN_ID, RUNS, Run, RunRegistry, load_runs
from tokenrelay.sharedkeys import SharedKeyStates
from tokenrelay.state import RELAY


async def _json_body(request: web.Request) -> dict[str, Any] | None:
    try:
        body = orjson.loads(await request.read() or b"{}")
    except orjson.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else None


async def create_run(request: web.Request) -> web.Response:
    registry = request.app[RUNS]
    body = await _json_body(request)
    if body is None:
        return error_response(400, "the body must be a JSON object")
    run_id = body.get("id")
    if not isinstance(run_id, str) or not RUN_ID.match(run_id):
        return error_response(400, "id must be 1-128 characters of letters, digits, '.', '_' or '-'")
    if await registry.lookup(run_id) is not None:
        return error_response(409, f"run {run_id!r} already exists")
    budget = body.get("budget_usd")
    if budget is not None and (
        isinstance(budget, bool) or not isinstance(budget, int | float) or not math.isfinite(budget) or budget < 0
    ):
        return error_response(400, "budget_usd must be a number >= 0")
    texts = {k: body.get(k) or "" for k in ("name", "route_default", "command")}
    if not all(isinstance(v, str) for v in texts.values()):
        return error_response(400, "name, route_default and command must be strings")
    run = Run(
        run_id,
        name=str(texts["name"])[:200],
        budget_usd=None if budget is None else float(budget),
        route_default=str(texts["route_default"])[:200],
        command=str(texts["command"])[:2000],
    )
    await registry.create(run)
    return web.json_response(run.to_dict(), status=201)


async def end_run(request: web.Request) -> web.Response:
    registry = request.app[RUNS]
    run = await registry.lookup(request.match_info["run"])
    if run is None:
        return error_response(404, f"no run {request.match_info['run']!r} in this daemon")
    body = await _json_body(request) or {}
    code = body.get("exit_code")
    await registry.end(run, code if isinstance(code, int) and not isinstance(code, bool) else None)
    return web.json_response(run.to_dict())


async def list_runs(request: web.Request) -> web.Response:
    relay = request.app[RELAY]
    registry = request.app[RUNS]
    try:
        since = ledger_query.parse_since(request.query["since"]) if "since" in request.query else None
    except ValueError as exc:
        return error_response(400, str(exc))
    await relay.flush()
    rows = await relay.run_in_ledger(runs_with_totals, Path(relay.db_path), since, registry)
    return web.json_response({"runs": rows})


async def show_run(request: web.Request) -> web.Response:
    relay = request.app[RELAY]
    registry = request.app[RUNS]
    run_id = request.match_info["run"]
    await relay.flush()
    usage = await relay.run_in_ledger(
        ledger_query.query_usage, relay.db_path, None, None, ["route", "deployment"], run_id
    )
    run = await registry.lookup(run_id)
    if run is not None and registry.shared is not None:  # (another worker may have ended it: the ledger says)
        await relay.run_in_ledger(registry.refresh, run)
    if run is None and usage["totals"]["requests"] == 0:
        return error_response(404, f"no run {run_id!r}: not registered here and nothing metered under it")
    return web.json_response({"run": run.to_dict() if run is not None else {"id": run_id}, "usage": usage})


def runs_with_totals(db: Path, since: float | None, registry: RunRegistry | None = None) -> list[dict[str, Any]]:
    """Recent runs, newest first: registered runs (name, budget, start, end) joined with metered totals; runs
    metered only through the `X-Tokenrelay-Run` header appear too, with no registration details."""
    registered = {r.id: r for r in load_runs(db, since)}
    if registry is not None:
        for k, v in registry.runs.items():
            if since is not None and v.started < since:
                continue
            stored = registered.get(k)
            if stored is not None and registry.shared is not None:  # (ended maybe by another worker)
                stored.budget = v.budget
            else:
                registered[k] = v
    usage = ledger_query.query_usage(db, since=since, group_by=["run"])
    totals = {row["run"]: row for row in usage["rows"] if row["run"]}
    out: list[dict[str, Any]] = []
    for run_id in set(registered) | set(totals):
        run = registered.get(run_id)
        info = run.to_dict() if run is not None else {"id": run_id}
        out.append({**info, "usage": totals.get(run_id)})
    out.sort(key=lambda r: -(r.get("started") or 0.0))
    return out


def add_routes(app: web.Application, db: Path, shared: SharedKeyStates | None = None) -> None:
    registry = app[RUNS] = RunRegistry(db, shared)

    async def restore(_app: web.Application) -> None:
        import asyncio

        await asyncio.to_thread(registry.restore)

    app.on_startup.append(restore)
    app.router.add_post("/runs", create_run)
    app.router.add_get("/runs", list_runs)
    app.router.add_get("/runs/{run}", show_run)
    app.router.add_post("/runs/{run}/end", end_run)
