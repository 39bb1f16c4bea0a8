"""Reading the meters over HTTP: `/usage` (JSON or CSV), `/usage/requests`, and `/metrics` (Prometheus)."""

from __future__ import annotations

from aiohttp import web

from tokenrelay import ledger_query
from tokenrelay.errors import error_response
from tokenrelay.state import RELAY

GROUPS = ("route", "deployment", "key", "run", "model", "tag", "minute", "hour", "day")


async def usage(request: web.Request) -> web.StreamResponse:
    relay = request.app[RELAY]
    q = request.query
    try:
        since = ledger_query.parse_since(q["since"]) if "since" in q else None
        until = ledger_query.parse_since(q["until"]) if "until" in q else None
    except ValueError as exc:
        return error_response(400, str(exc))
    group_by = [g for g in q.get("group_by", "").split(",") if g]
    unknown = [g for g in group_by if g not in GROUPS]
    if unknown:
        return error_response(400, f"unknown group_by {unknown}; choose from {', '.join(GROUPS)}")
    # A client key reads only its own usage (the auth middleware sets the scope); the admin reads any.
    key_id = request.get("key_scope") or q.get("key_id")
    await relay.flush()
    result = await relay.run_in_ledger(
        ledger_query.query_usage, relay.db_path, since, until, group_by, q.get("run"), key_id, q.get("route")
    )
    if q.get("format") == "csv":
        return web.Response(text=ledger_query.rows_to_csv(result["rows"]), content_type="text/csv")
    return web.json_response(result)


async def recent(request: web.Request) -> web.Response:
    relay = request.app[RELAY]
    try:
        limit = max(1, min(1000, int(request.query.get("limit", "50"))))
    except ValueError:
        return error_response(400, "limit must be an integer")
    await relay.flush()
    key_id = request.get("key_scope") or request.query.get("key_id")
    rows = await relay.run_in_ledger(
        ledger_query.recent_requests, relay.db_path, limit, request.query.get("run"), key_id
    )
    return web.json_response({"requests": rows})


async def metrics(request: web.Request) -> web.Response:
    relay = request.app[RELAY]
    text = relay.prometheus() if relay.exporter is None else await relay.exporter.scrape()
    response = web.Response(body=text.encode())
    response.headers["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_get("/usage", usage)
    app.router.add_get("/usage/requests", recent)
    app.router.add_get("/metrics", metrics)
