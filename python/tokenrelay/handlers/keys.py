"""The admin API for client keys (admin key only): GET /admin/keys, POST /admin/keys, DELETE /admin/keys/{key}."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from tokenrelay import keys
from tokenrelay.auth import GATE
from tokenrelay.errors import error_response


async def list_keys(request: web.Request) -> web.Response:
    """Every key (revoked ones too) with this worker's view of its spend and reservations."""
    gate = request.app[GATE]
    await gate.reload()
    out = []
    for key in gate.keys.values():
        item = key.public()
        state = gate.admission.states.get(key.id)
        item["spent_usd"] = state.spent_usd if state is not None else gate.admission.ledger_spent.get(key.id, (0, 0))[1]
        item["reserved_usd"] = state.reserved_usd if state is not None else 0.0
        item["in_flight"] = state.in_flight if state is not None else 0
        out.append(item)
    return web.json_response({"keys": out})


def _int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise keys.KeyProblem(f"{name} must be an integer")
    return value


async def create_key(request: web.Request) -> web.Response:
    """Creates a key from a JSON body {name, routes?, budget_usd?, period?, tpm?, rpm?, expires?}; the response
    holds the key itself, the only time it is ever shown."""
    gate = request.app[GATE]
    try:
        body = orjson.loads(await request.read())
        if not isinstance(body, dict):
            raise keys.KeyProblem("the body must be a JSON object")
        name = body.get("name")
        if not isinstance(name, str):
            raise keys.KeyProblem("name (a string) is required")
        routes = body.get("routes") or []
        if isinstance(routes, str):
            routes = [r.strip() for r in routes.split(",") if r.strip()]
        if not isinstance(routes, list) or not all(isinstance(r, str) for r in routes):
            raise keys.KeyProblem("routes must be a list of route names")
        budget = body.get("budget_usd")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int | float)):
            raise keys.KeyProblem("budget_usd must be a number")
        period = body.get("period")
        if period is not None and not isinstance(period, str):
            raise keys.KeyProblem("period must be day or month")
        expires = body.get("expires")
        expires_at = keys.parse_expires(str(expires)) if expires is not None else None
        secret, record = await asyncio.to_thread(
            keys.create_key,
            gate.db,
            name,
            routes=routes,
            budget_usd=float(budget) if budget is not None else None,
            period=period,
            tpm=_int(body, "tpm"),
            rpm=_int(body, "rpm"),
            expires_at=expires_at,
        )
    except orjson.JSONDecodeError as exc:
        return error_response(400, f"the request body is not valid JSON: {exc}")
    except keys.KeyProblem as exc:
        return error_response(400, str(exc))
    await gate.reload(force=True)
    return web.json_response({"key": secret, **record.public()}, status=201)


async def revoke_key(request: web.Request) -> web.Response:
    gate = request.app[GATE]
    try:
        record = await asyncio.to_thread(keys.revoke_key, gate.db, request.match_info["key"])
    except keys.KeyProblem as exc:
        return error_response(404 if "no active key" in str(exc) else 400, str(exc))
    await gate.reload(force=True)
    return web.json_response({"revoked": record.public()})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/keys", list_keys)
    app.router.add_post("/admin/keys", create_key)
    app.router.add_delete("/admin/keys/{key}", revoke_key)
