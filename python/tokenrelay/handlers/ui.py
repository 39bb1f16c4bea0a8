"""The live meters page: `GET /ui` (one self-contained HTML page), `GET /ui/events` (server-sent events, one
snapshot a second) and `GET /ui/snapshot` (the same snapshot once, as JSON).

One snapshot is computed per second and shared by every watcher, and only while at least one watches; the
ledger (cost so far today) is read in a thread at most every `COST_REFRESH_S` seconds.

Auth: every path is under `/ui`. A browser cannot put a bearer header on an EventSource, so `ui_credential()`
also reads the admin key from `?key=` or from the `tokenrelay_ui` cookie that `GET /ui?key=...` sets; an auth
middleware that guards `/ui*` should accept it, and may answer an unauthenticated `GET /ui` with
`login_response()` (a form that comes back as `/ui?key=...`)."""

from __future__ import annotations

import asyncio
import base64
import bisect
import datetime as dt
import hashlib
import logging
import os
import time
from importlib import resources
from typing import Any

import orjson
from aiohttp import web

from tokenrelay import __version__, ledger_query
from tokenrelay.state import RELAY, STARTED

log = logging.getLogger("tokenrelay.ui")

TICK_S = 1.0
COST_REFRESH_S = 5.0
SERIES_S = 300  # tokens/s history sent to the page
RECENT_SHOWN = 30
TTFT_BOUNDS_MS = (50, 100, 200, 400, 800, 1600, 3200, 6400)  # TTFT histogram bucket upper bounds
UI_COOKIE = "tokenrelay_ui"


def ui_credential(request: web.Request) -> str | None:
    """The admin key a browser presents on `/ui*`: the `key` query parameter, else the `tokenrelay_ui` cookie."""
    return request.query.get("key") or request.cookies.get(UI_COOKIE) or None


def _quantile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _local_midnight(now: float) -> float:
    today = dt.datetime.fromtimestamp(now).replace(hour=0, minute=0, second=0, microsecond=0)
    return today.timestamp()


def _cost_rows(result: dict[str, Any], names: tuple[str, ...]) -> list[dict[str, Any]]:
    rows = []
    for row in result["rows"]:
        label = next((str(row[n]) for n in names if row.get(n)), "")
        tokens = row["tokens"]
        rows.append(
            {
                "name": label,
                "requests": row["requests"],
                "input": tokens["input"]["total"],
                "output": tokens["output"]["total"],
                "cost_usd": row["cost_usd"],
            }
        )
    rows.sort(key=lambda r: (-(r["cost_usd"] or 0.0), -r["requests"]))
    return rows


def cost_today(db: str, now: float) -> dict[str, Any]:
    """Cost so far today (local time) by route, client key and run, from the ledger. Blocking: run in a thread."""
    since = _local_midnight(now)
    by = {group: ledger_query.query_usage(db, since=since, group_by=[group]) for group in ("route", "key", "run")}
    totals = by["route"]["totals"]
    return {
        "since": since,
        "updated": now,
        "requests": totals["requests"],
        "cost_usd": totals["cost_usd"],
        "by_route": _cost_rows(by["route"], ("route",)),
        "by_key": _cost_rows(by["key"], ("key_name", "key_id")),
        "by_run": _cost_rows(by["run"], ("run",)),
    }


class Hub:
    """Computes the snapshot once a second while anyone watches and hands the same bytes to every watcher."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.clients = 0
        self.closing = False
        self.latest = b"{}"
        self.seq = 0
        self.cost: dict[str, Any] | None = None
        self._cost_at = 0.0
        self._cost_task: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self.others: list[dict[str, Any]] = []  # the other workers' parts (`--workers N`), as last read

    # -- watchers ---------------------------------------------------------------------------------------------

    def join(self) -> None:
        self.clients += 1
        if self._ticker is None:
            self.publish()  # the snapshot may be stale: nobody watched
            self._ticker = asyncio.ensure_future(self._tick())

    def leave(self) -> None:
        self.clients -= 1

    async def changed(self) -> None:
        await self._changed.wait()

    async def close(self) -> None:
        """Ends every event stream (on shutdown, so a graceful stop does not wait for watchers)."""
        self.closing = True
        self._wake()
        for task in (self._ticker, self._cost_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.clients > 0 and not self.closing:
                await asyncio.sleep(TICK_S - (loop.time() % TICK_S))
                await self.read_others()
                self.publish()
        finally:
            self._ticker = None

    def publish(self) -> None:
        """Computes the snapshot now and wakes the watchers; starts a ledger read if the costs are old."""
        now = time.time()
        if self._cost_task is None and now - self._cost_at >= COST_REFRESH_S:
            self._cost_task = asyncio.ensure_future(self._refresh_cost())
        self.latest = orjson.dumps(self.snapshot(now))
        self.seq += 1
        self._wake()

    async def _refresh_cost(self) -> None:
        relay = self.app[RELAY]
        try:
            await self.refresh_cost(relay.db_path)
        finally:
            self._cost_task = None

    async def refresh_cost(self, db: str) -> None:
        self._cost_at = time.time()
        if not db:
            return
        relay = self.app[RELAY]
        try:
            await relay.flush()
            self.cost = await relay.run_in_ledger(cost_today, db, time.time())
        except Exception as exc:  # a busy or missing ledger must not take the page down
            log.warning("cannot read today's cost from the ledger: %s", exc)

    # -- the snapshot -----------------------------------------------------------------------------------------

    def part(self, now: float) -> dict[str, Any]:
        """This worker's share of the snapshot, in a form the parts of several workers add up from (and that
        `workermetrics.Exporter` writes for the others once a second)."""
        relay = self.app[RELAY]
        live = relay.meter.live
        totals = relay.meter.meters.totals()

        def total(kind: str) -> int:
            return sum(int(str(totals.get(f"{kind}_{source}", 0))) for source in ("reported", "estimated"))

        ins, outs = live.tokens.series(SERIES_S + 1, now)
        routes = {}
        for name, route in relay.config.routes.items():
            deployments = []
            for d, state in zip(route.deployments, relay.pools[name].snapshot(), strict=True):
                deployments.append(
                    {
                        "state": state["state"],
                        "until_s": state.get("until_s"),
                        "outstanding": state["outstanding"],
                        "requests": state.get("requests"),
                        "error_rate": state.get("error_rate"),
                        "tokens_per_s": state.get("ewma_tokens_per_s"),
                        "ewma_ttft_s": state.get("ewma_ttft_s"),
                        "ttfts": list(live.ttfts.get((name, d.name), ())),
                    }
                )
            routes[name] = deployments
        return {
            "now": now,
            "pid": os.getpid(),
            "in_flight": relay.in_flight,
            "watchers": self.clients,
            "totals": {
                "requests": totals.get("requests", 0),
                "successes": totals.get("successes", 0),
                "errors": totals.get("errors", 0),
                "input": total("input"),
                "output": total("output"),
                "cost_usd": totals.get("cost_usd", 0.0),
            },
            "in": ins,
            "out": outs,
            "routes": routes,
            "recent": live.recent_requests(RECENT_SHOWN),
            "seen": live.seq,
        }

    def snapshot(self, now: float) -> dict[str, Any]:
        """What the page shows: this worker's part, with the other workers' latest (`--workers N`) added."""
        return self.view([self.part(now), *self.others], now)

    async def read_others(self) -> None:
        """The other workers' latest parts (with `--workers N`), read off the loop."""
        exporter = self.app[RELAY].exporter
        if exporter is not None:
            self.others = await asyncio.get_running_loop().run_in_executor(None, exporter.read_ui_parts)

    def view(self, parts: list[dict[str, Any]], now: float) -> dict[str, Any]:
        """The snapshot from the parts of one or more workers (the first is this one's)."""
        relay = self.app[RELAY]
        n = SERIES_S + 1
        ins, outs = [0.0] * n, [0.0] * n
        end = int(parts[0]["now"])
        for p in parts:  # (a part written a second earlier ends a second earlier: aligned by the second)
            shift = end - int(p["now"])
            for merged, series in ((ins, p["in"]), (outs, p["out"])):
                for i, v in enumerate(series):
                    if 0 <= i - shift < n:
                        merged[i - shift] += v
        ins, outs = ins[:-1], outs[:-1]  # whole seconds only: the current one is still filling
        last = 5  # the headline rate: the mean of the last 5 whole seconds
        routes = []
        all_ttfts: list[float] = []
        for name, route in relay.config.routes.items():
            deployments = []
            for i, d in enumerate(route.deployments):
                states = [p["routes"][name][i] for p in parts if len(p["routes"].get(name, ())) > i]
                ordered = sorted(t for st in states for t in st["ttfts"])
                all_ttfts.extend(ordered)
                deployments.append(
                    {
                        "name": d.name,
                        "kind": d.kind,
                        "model": d.model,
                        **merge_states(states),
                        "ttft_p50_s": _quantile(ordered, 0.5),
                        "ttft_p99_s": _quantile(ordered, 0.99),
                        "ttft_samples": len(ordered),
                    }
                )
            routes.append(
                {
                    "route": name,
                    "strategy": route.strategy,
                    "outstanding": sum(int(str(d["outstanding"])) for d in deployments),
                    "deployments": deployments,
                }
            )
        counts = [0] * (len(TTFT_BOUNDS_MS) + 1)
        for ttft in all_ttfts:
            counts[bisect.bisect_left(TTFT_BOUNDS_MS, ttft * 1000.0)] += 1
        recent = [r for p in parts for r in p["recent"]]
        if len(parts) > 1:  # newest first across workers; each row numbered by its end (per worker they collide)
            recent.sort(key=lambda r: float(r["ts"]) + float(r["duration_s"]), reverse=True)
            recent = [{**r, "seq": int((float(r["ts"]) + float(r["duration_s"])) * 1e6)} for r in recent]
        totals = {k: sum(p["totals"][k] for p in parts) for k in parts[0]["totals"]}
        return {
            "now": now,
            "version": __version__,
            "uptime_s": round(time.monotonic() - self.app[STARTED], 1),
            "workers": len(parts),
            "watchers": sum(int(p["watchers"]) for p in parts),
            "in_flight": sum(int(p["in_flight"]) for p in parts),
            "totals": totals,
            "rate": {"in": sum(ins[-last:]) / last, "out": sum(outs[-last:]) / last},
            "series": {"step_s": 1, "in": [round(v, 2) for v in ins], "out": [round(v, 2) for v in outs]},
            "ttft_hist": {"bounds_ms": list(TTFT_BOUNDS_MS), "counts": counts},
            "routes": routes,
            "recent": recent[:RECENT_SHOWN],
            "seen": sum(int(p["seen"]) for p in parts),
            "cost_today": self.cost,
        }


# A deployment's state across workers: the most severe one any worker sees.
_SEVERITY = {"healthy": 0, "half_open": 1, "cooling_down": 2, "open": 3, "down": 4}


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One deployment as several workers see it (`Hub.part`'s entries): the most severe state and its end, the
    outstanding requests and the breaker's window summed, rates and averages weighted by requests."""
    worst = max(states, key=lambda st: _SEVERITY.get(str(st["state"]), 0))
    requests = sum(int(st["requests"] or 0) for st in states)
    return {
        "state": worst["state"],
        "until_s": worst["until_s"],
        "outstanding": sum(int(st["outstanding"]) for st in states),
        "requests": requests if any(st["requests"] is not None for st in states) else None,
        "error_rate": _weighted(states, "error_rate"),
        "tokens_per_s": _weighted(states, "tokens_per_s"),
        "ewma_ttft_s": _weighted(states, "ewma_ttft_s"),
    }


def _weighted(states: list[dict[str, Any]], field: str) -> float | None:
    """A per-worker rate or average across workers, weighted by each worker's requests (None where none has it)."""
    known = [(float(st[field]), max(1, int(st["requests"] or 0))) for st in states if st[field] is not None]
    if not known:
        return None
    return sum(v * w for v, w in known) / sum(w for _, w in known)


UI_HUB: web.AppKey[Hub] = web.AppKey("ui_hub", Hub)
_PAGE: list[tuple[bytes, str]] = []


def page() -> tuple[bytes, str]:
    """The page with its stylesheet and script inlined (one request, nothing else to fetch or to guard), and a
    Content-Security-Policy that lets only that script run and only this origin be contacted."""
    if not _PAGE:
        files = resources.files("tokenrelay") / "ui"
        script = (files / "ui.js").read_text("utf-8")
        html = (files / "index.html").read_text("utf-8")
        html = html.replace("/*STYLE*/", (files / "ui.css").read_text("utf-8"))
        html = html.replace("/*SCRIPT*/", script)
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        csp = (
            f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; connect-src 'self'; "
            "img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
        )
        _PAGE.append((html.encode(), csp))
    return _PAGE[0]


async def index(request: web.Request) -> web.Response:
    body, csp = page()
    response = web.Response(body=body, content_type="text/html", charset="utf-8")
    response.headers["cache-control"] = "no-cache"
    response.headers["content-security-policy"] = csp
    response.headers["referrer-policy"] = "no-referrer"
    key = request.query.get("key")
    if key:  # so the page's EventSource (which cannot send a header) carries the key without it in the URL
        response.set_cookie(UI_COOKIE, key, path="/ui", httponly=True, samesite="Strict")
    return response


async def snapshot(request: web.Request) -> web.Response:
    """The snapshot once, with today's cost read now (for scripts and tests)."""
    hub = request.app[UI_HUB]
    await hub.refresh_cost(request.app[RELAY].db_path)
    await hub.read_others()
    return web.json_response(body=orjson.dumps(hub.snapshot(time.time())))


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: the shared snapshot each second, until the browser goes away or the daemon stops."""
    hub = request.app[UI_HUB]
    response = web.StreamResponse(
        headers={"content-type": "text/event-stream", "cache-control": "no-cache", "x-accel-buffering": "no"}
    )
    await response.prepare(request)
    hub.join()
    try:
        await response.write(b"retry: 2000\n\n")
        sent = -1
        while not hub.closing:
            if hub.seq != sent:
                sent = hub.seq
                await response.write(b"data: " + hub.latest + b"\n\n")
            await hub.changed()
    except (ConnectionResetError, ConnectionError):
        pass  # the browser went away
    finally:
        hub.leave()
    return response


def login_response(status: int = 401) -> web.Response:
    """A minimal form that asks for the admin key and comes back as `GET /ui?key=...` (for an auth middleware)."""
    html = (
        "<!doctype html><meta charset=utf-8><title>tokenrelay</title>"
        "<meta name=viewport content='width=device-width'>"
        "<style>body{font:15px system-ui,sans-serif;display:grid;place-items:center;height:90vh}"
        "@media(prefers-color-scheme:dark){body{background:#15171a;color:#e6e6e6}}</style>"
        "<form method=get action=/ui><p>tokenrelay admin key</p>"
        "<input name=key type=password autofocus size=40> <button>Open</button></form>"
    )
    return web.Response(status=status, text=html, content_type="text/html")


def add_routes(app: web.Application) -> None:
    """Registers `/ui`, `/ui/events` and `/ui/snapshot`; an auth middleware must cover `/ui*`."""
    hub = app[UI_HUB] = Hub(app)

    async def close_hub(_app: web.Application) -> None:
        await hub.close()

    app.on_shutdown.append(close_hub)
    app.router.add_get("/ui", index)
    app.router.add_get("/ui/", index)
    app.router.add_get("/ui/events", events)
    app.router.add_get("/ui/snapshot", snapshot)
