"""Who may do what: client keys on the relayed endpoints, the admin key on the admin API, and admission.

Rules (also in the README):
- No client key in the ledger database and a loopback address: any key an agent sends is only its metering
  identity. A non-loopback address without client keys refuses to start (see `startup_problem`).
- Once a client key exists (revoked ones count: revoking the last key must not open the proxy), every request
  except /healthz and the built-in mock needs a valid key, sent as `Authorization: Bearer` or `x-api-key`.
- The admin key (`TOKENRELAY_ADMIN_KEY`) guards /admin/*, /metrics and the usage of all keys whenever client
  keys exist or it is set; /admin/keys always needs it. It is also accepted on the relayed endpoints (metered
  as key "admin", no limits). A client key reads only its own usage.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from tokenrelay import _core, keys, sharedkeys
from tokenrelay.admission import Admission, Denial, Reservation
from tokenrelay.budget import max_output_tokens, worst_case_cost
from tokenrelay.config import Config, Deployment, Route
from tokenrelay.errors import api_of_path, error_response
from tokenrelay.ledger import default_db_path
from tokenrelay.metering import Metering, Outcome
from tokenrelay.pricing import Price, price_for, provider_from_url
from tokenrelay.relay import client_identity

log = logging.getLogger("tokenrelay.auth")

ADMIN_ENV = "TOKENRELAY_ADMIN_KEY"
ADMIN_KEY_MIN_LENGTH = 16
ADMIN_KEY_ID = "admin"
RELOAD_EVERY_S = 1.0
# Output tokens reserved for a request that sets no max_tokens / max_completion_tokens / max_output_tokens.
ESTIMATE_INLINE_BYTES = 16 * 1024
_ESTIMATE_APIS = ("chat", "completions", "responses", "messages", "embeddings")


@dataclass(frozen=True)
class Principal:
    """Who a request authenticated as: a client key, or the admin (key None)."""

    key_id: str
    key_name: str
    key: keys.ClientKey | None

    @property
    def admin(self) -> bool:
        return self.key is None


ADMIN = Principal(ADMIN_KEY_ID, ADMIN_KEY_ID, None)
PRINCIPAL = "tokenrelay_principal"  # request[PRINCIPAL]: set by the middleware when a key was checked


def startup_problem(config: Config, env: dict[str, str] | None = None) -> str | None:
    """Why the daemon must not start with this config (a message for the user), or None."""
    env = dict(os.environ) if env is None else env
    admin = env.get(ADMIN_ENV)
    if admin is not None and len(admin) < ADMIN_KEY_MIN_LENGTH:
        return (
            f"{ADMIN_ENV} is shorter than {ADMIN_KEY_MIN_LENGTH} characters; use a random value, e.g. "
            f'export {ADMIN_ENV}="$(python3 -c "import secrets; print(secrets.token_urlsafe(32))")"'
        )
    if config.is_loopback:
        return None
    db = Path(config.db) if config.db else default_db_path()
    if keys.keys_stamp(db)[0] > 0:
        return None
    db_flag = f" --db {config.db}" if config.db else ""
    return (
        f"refusing to listen on {config.host}:{config.port} without client keys: anyone who can reach that "
        f"address could spend your provider keys.\n"
        f"  Create a key for each agent (it is printed once), then start again:\n"
        f"    tokenrelay keys create --name my-agent{db_flag}\n"
        f"  or listen on loopback only: --listen 127.0.0.1:{config.port}"
    )


class Gate:
    """The daemon's view of the client keys (reloaded when they change) and their limits."""

    def __init__(
        self,
        db: Path,
        admin_key: str | None,
        meter: Metering,
        routes: Mapping[str, Route],
        shared: sharedkeys.SharedKeyStates | None = None,
    ) -> None:
        self.db = db
        self.routes = routes
        self.admin_key = admin_key or None
        self.meter = meter
        self.keys: dict[str, keys.ClientKey] = {}
        self.admission = Admission(shared)  # (with several workers, one table of the keys' counters for all)
        self._stamp: tuple[int, float] = (0, 0.0)
        self._task: asyncio.Task[None] | None = None
        self._reloading = asyncio.Lock()
        self._prices: dict[tuple[str, str, str], Price | None] = {}

    @property
    def client_auth(self) -> bool:
        """True once any client key exists: every request then needs a valid key."""
        return bool(self.keys)

    @property
    def admin_auth(self) -> bool:
        return self.client_auth or self.admin_key is not None

    # --- keeping the keys current -------------------------------------------------------------------------------

    def _load(self, force: bool) -> tuple[list[keys.ClientKey] | None, dict[str, tuple[float, float]]]:
        """In a thread: the keys if they changed, and the ledger's spend of each budgeted key."""
        stamp = keys.keys_stamp(self.db)
        loaded = keys.load_keys(self.db) if force or stamp != self._stamp else None
        self._stamp = stamp
        now = time.time()
        current = loaded if loaded is not None else list(self.keys.values())
        starts = {
            k.id: keys.period_start(k.period or "month", now)
            for k in current
            if k.budget_usd is not None and k.status(now) == "active"
        }
        spent = keys.spent_usd(self.db, starts)
        return loaded, {kid: (starts[kid], usd) for kid, usd in spent.items()}

    async def reload(self, force: bool = False) -> None:
        """Re-reads the keys (if they changed) and every budgeted key's spend; SQLite runs in a thread."""
        async with self._reloading:  # one at a time: an older read must never land after a newer one
            loaded, spent = await asyncio.to_thread(self._load, force)
            if loaded is not None:
                self.keys = {k.id: k for k in loaded}
            self.admission.sync_spent(spent)

    async def start(self) -> None:
        await self.reload(force=True)
        self._task = asyncio.ensure_future(self._reload_loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _reload_loop(self) -> None:
        while True:
            await asyncio.sleep(RELOAD_EVERY_S)
            try:
                await self.reload()
            except Exception as exc:  # a locked or broken file: keep the last view, try again
                log.warning("could not reload client keys from %s: %s", self.db, exc)

    # --- authentication -----------------------------------------------------------------------------------------

    def authenticate(self, secret: str) -> Principal | str:
        """The principal a presented key stands for, or why it is refused (a 401 message)."""
        if not secret:
            return "this tokenrelay needs a client key: send it as `Authorization: Bearer <key>` or `x-api-key`"
        if self.admin_key is not None and hmac.compare_digest(secret.encode(), self.admin_key.encode()):
            return ADMIN
        kid = keys.key_id_of(secret)
        record = self.keys.get(kid) if kid is not None else None
        if record is None or not record.matches(secret):
            return "invalid client key"
        status = record.status()
        if status == "revoked":
            return f"client key {record.name!r} was revoked"
        if status == "expired":
            assert record.expires_at is not None
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.expires_at))
            return f"client key {record.name!r} expired at {when}"
        return Principal(record.key_id, record.name, record)

    # --- admission ----------------------------------------------------------------------------------------------

    def _price(self, route: str, deployment: Deployment, model: str) -> Price | None:
        cache_key = (route, deployment.name, model)
        if cache_key not in self._prices:
            try:
                price = price_for(model, deployment.price, provider=provider_from_url(deployment.base_url))
            except ValueError:
                price = None
            self._prices[cache_key] = price
        return self._prices[cache_key]

    async def admit(
        self, principal: Principal, api: str, body: dict[str, Any], raw: bytes, route: Route, outcome: Outcome
    ) -> Denial | None:
        """Route permission and limits for one request; on success its reservation is settled when it ends."""
        key = principal.key
        if key is None:
            return None
        if key.routes and route.name not in key.routes:
            return Denial(
                403,
                f"client key {key.name!r} may not use route {route.name!r} (allowed: {', '.join(key.routes)})",
                "route_not_allowed",
            )
        if key.budget_usd is None and key.tpm is None and key.rpm is None:
            return None
        tokens, usd = 0, 0.0
        if (key.budget_usd is not None or key.tpm is not None) and api in _ESTIMATE_APIS:
            model = outcome.requested_model
            if len(raw) > ESTIMATE_INLINE_BYTES:
                input_tokens = await asyncio.to_thread(_core.estimate_input_tokens, api, raw, model)
            else:
                input_tokens = _core.estimate_input_tokens(api, raw, model)
            output_tokens = max_output_tokens(api, body)
            tokens = input_tokens + output_tokens
            if key.budget_usd is not None:
                usd, unknown = worst_case_cost(self.routes, route, model, input_tokens, output_tokens)
                if unknown is not None:
                    return Denial(
                        403,
                        f"a USD budget cannot be enforced on route {route.name!r}: deployment {unknown!r} has no "
                        "known price; give it `price = {input = ..., output = ...}` (USD per 1M tokens) in the config",
                        "price_unknown",
                    )
        result = self.admission.admit(key, usd, tokens)
        if isinstance(result, Denial):
            return result
        outcome.extra["settle"] = self._settler(result)
        return None

    def _settler(self, reservation: Reservation) -> Callable[[Outcome], None]:
        def settle(outcome: Outcome) -> None:
            usage = outcome.usage
            if usage is None:
                self.admission.settle(reservation, 0.0, 0)
                return
            cost = self.meter.cost(outcome)
            self.admission.settle(reservation, cost or 0.0, usage.input + usage.output)

        return settle


# --- the middleware ---------------------------------------------------------------------------------------------

GATE: web.AppKey[Gate] = web.AppKey("gate", Gate)


def _deny(status: int, message: str, path: str) -> web.Response:
    headers = {"www-authenticate": "Bearer"} if status == 401 else None
    return error_response(
        status, message, api_of_path(path), code="invalid_api_key" if status == 401 else None, headers=headers
    )


@web.middleware
async def middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Authenticates every request by the rules in this module's docstring."""
    gate = request.app[GATE]
    path = request.path
    if path == "/healthz" or path.startswith("/_mock/"):  # the built-in mock is reached by the relay itself
        return await handler(request)
    if path == "/ui" or path.startswith("/ui/"):
        return await _guard_ui(request, handler, gate)
    admin_only = path.startswith("/admin/") or path == "/metrics"
    all_usage = path.startswith("/usage")
    if path.startswith("/admin/keys") and gate.admin_key is None:
        return _deny(403, f"the admin API is off: set {ADMIN_ENV} (or use `tokenrelay keys` on this machine)", path)
    needs_admin = admin_only
    if not (gate.client_auth or (gate.admin_auth and (needs_admin or all_usage))):
        return await handler(request)
    who = gate.authenticate(client_identity(request.headers))
    if isinstance(who, str):
        return _deny(401, who, path)
    if needs_admin and not who.admin:
        return _deny(403, f"{path} needs the admin key ({ADMIN_ENV})", path)
    if all_usage and not who.admin:
        if not gate.client_auth:
            return _deny(403, f"{path} needs the admin key ({ADMIN_ENV})", path)
        request["key_scope"] = who.key_id  # a client key reads only its own usage
    request[PRINCIPAL] = who
    return await handler(request)


async def _guard_ui(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]], gate: Gate
) -> web.StreamResponse:
    """The meters page shows every key's and run's usage: with keys configured it needs the admin key, which a
    browser sends as `?key=` once (the page then keeps it in a cookie), since EventSource cannot send headers."""
    from tokenrelay.handlers.ui import login_response, ui_credential

    if not (gate.client_auth or gate.admin_auth):
        return await handler(request)
    who = gate.authenticate(ui_credential(request) or client_identity(request.headers))
    if isinstance(who, str) or not who.admin:
        return login_response(401)
    request[PRINCIPAL] = who
    return await handler(request)
