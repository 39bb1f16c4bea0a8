"""The daemon's configuration: a TOML file (or the environment alone), validated into frozen dataclasses.

Every error names the key path (`routes.fast-llama.deployments[0].weight`) and all errors are reported at once,
before the daemon binds a socket. Secrets are only ever referenced by environment variable name.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from tokenrelay._core import Pool
from tokenrelay.pricing import builtin_price

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4141
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
KINDS = ("openai", "anthropic")
STRATEGIES = ("p2c", "least_outstanding", "round_robin", "weighted", "latency", "fastest", "priority")
# The model name `*` in a deployment means: pass through what the client asked for (for wildcard routes).
PASSTHROUGH_MODEL = "*"
MOCK_ROUTE = "mock"
MOCK_ANTHROPIC_ROUTE = "mock-anthropic"


class ConfigError(Exception):
    """A configuration that cannot be used; `errors` holds one message per problem, each with its key path."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class Timeouts:
    """Per-route timeouts in seconds; None means no limit."""

    connect: float = 10.0
    first_token: float = 300.0
    idle: float = 300.0
    total: float | None = None


@dataclass(frozen=True)
class Breaker:
    """Passive circuit breaker per deployment: open after `failures` consecutive failures (or an error rate over
    `error_rate` across at least `min_requests` in `window_s`), for `cooldown_s` doubling up to `max_cooldown_s`;
    then one probe request (half-open)."""

    failures: int = 3
    error_rate: float = 0.5
    window_s: float = 30.0
    min_requests: int = 10
    cooldown_s: float = 10.0
    max_cooldown_s: float = 120.0


@dataclass(frozen=True)
class Deployment:
    """One upstream endpoint: where to connect, which model to ask for, with which key and limits."""

    name: str
    kind: str
    base_url: str
    model: str
    api_key_env: str | None = None
    api_key: str | None = field(default=None, repr=False)
    weight: int = 1
    tier: int = 1
    max_concurrent: int | None = None
    rpm: int | None = None
    tpm: int | None = None
    price: Mapping[str, float] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    anthropic_version: str = "2023-06-01"
    health_check_path: str | None = None
    health_check_interval_s: float = 30.0
    # "chat": an OpenAI-compatible server without /responses (vLLM, Groq...): Responses requests are translated.
    api: str | None = None

    def upstream_model(self, requested: str, route_name: str) -> str:
        """The model name sent upstream: the deployment's own, or the wildcard part of a passthrough route."""
        if self.model != PASSTHROUGH_MODEL:
            return self.model
        # `groq/*` routes strip their provider prefix; bare-name patterns like `gpt-*` pass the name as it is.
        prefix = route_name[:-1] if route_name.endswith("/*") else ""
        return requested[len(prefix) :] if prefix and requested.startswith(prefix) else requested


@dataclass(frozen=True)
class Route:
    """The name agents put in `model`, and the pool of deployments that serve it."""

    name: str
    deployments: tuple[Deployment, ...]
    strategy: str = "p2c"
    fallbacks: tuple[str, ...] = ()
    timeouts: Timeouts = field(default_factory=Timeouts)
    breaker: Breaker = field(default_factory=Breaker)
    max_attempts: int = 3
    retry_budget_s: float = 60.0
    queue_timeout_s: float = 10.0
    queue_size: int = 1000
    keepalive_interval_s: float | None = 15.0
    hedge_after_ms: float | None = None
    hedge_after_p95: bool = False
    drop_unsupported: bool = False

    @property
    def is_pattern(self) -> bool:
        return self.name.endswith("*")


@dataclass(frozen=True)
class Config:
    """Everything the daemon needs to run."""

    routes: Mapping[str, Route]
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    db: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    workers: int = 1
    log_level: str = "info"
    log_requests: bool = True
    flush_interval_s: float = 1.0
    request_log_retention_days: float = 7.0
    shutdown_grace_s: float = 30.0
    # Hostile clients: a request body must arrive within body_timeout_s (slowloris: 408); a client that reads
    # nothing of its response for write_timeout_s is disconnected; at most max_connections_per_key requests in
    # flight per client key (None: no cap; over it: 429).
    body_timeout_s: float = 60.0
    write_timeout_s: float = 120.0
    max_connections_per_key: int | None = None
    # Each worker pinned to a core it keeps awake (an idle-priority spinning thread) while it has client
    # connections: lower, steadier latency for a core at 100 % meanwhile (`tokenrelay.busypoll`).
    busy_poll: bool = False
    source: str = "environment"

    def find_route(self, model: str) -> Route | None:
        """The route for a requested model: an exact name first, then the longest matching `prefix*` pattern."""
        route = self.routes.get(model)
        if route is not None:
            return route
        best: Route | None = None
        for candidate in self.routes.values():
            if (
                candidate.is_pattern
                and model.startswith(candidate.name[:-1])
                and (best is None or len(candidate.name) > len(best.name))
            ):
                best = candidate
        return best

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


# --- providers known without a config file ------------------------------------------------------------------


@dataclass(frozen=True)
class KnownProvider:
    """A provider whose key in the environment makes routes appear with no config file."""

    prefix: str
    kind: str
    base_url: str
    api_key_env: str
    bare_prefixes: tuple[str, ...] = ()


KNOWN_PROVIDERS: tuple[KnownProvider, ...] = (
    KnownProvider(
        "openai",
        "openai",
        "https://api.openai.com/v1",
        "OPENAI_API_KEY",
        ("gpt-", "o1", "o3", "o4", "chatgpt-", "text-embedding-", "davinci", "babbage"),
    ),
    KnownProvider("anthropic", "anthropic", "https://api.anthropic.com/v1", "ANTHROPIC_API_KEY", ("claude-",)),
    KnownProvider("groq", "openai", "https://api.groq.com/openai/v1", "GROQ_API_KEY"),
    KnownProvider("sambanova", "openai", "https://api.sambanova.ai/v1", "SAMBANOVA_API_KEY"),
    KnownProvider("together", "openai", "https://api.together.xyz/v1", "TOGETHER_API_KEY"),
    KnownProvider("fireworks", "openai", "https://api.fireworks.ai/inference/v1", "FIREWORKS_API_KEY"),
    KnownProvider("deepseek", "openai", "https://api.deepseek.com/v1", "DEEPSEEK_API_KEY", ("deepseek-",)),
    KnownProvider("mistral", "openai", "https://api.mistral.ai/v1", "MISTRAL_API_KEY"),
    KnownProvider("openrouter", "openai", "https://openrouter.ai/api/v1", "OPENROUTER_API_KEY"),
    KnownProvider("cerebras", "openai", "https://api.cerebras.ai/v1", "CEREBRAS_API_KEY"),
)


def mock_routes(host: str, port: int) -> dict[str, Route]:
    """The built-in mock provider, served by the daemon itself under /_mock and relayed like any upstream."""
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    if ":" in connect_host and not connect_host.startswith("["):
        connect_host = f"[{connect_host}]"
    base = f"http://{connect_host}:{port}/_mock"
    return {
        MOCK_ROUTE: Route(
            MOCK_ROUTE,
            (Deployment("mock", "openai", f"{base}/openai/v1", "mock-gpt", price={"input": 0.0, "output": 0.0}),),
        ),
        MOCK_ANTHROPIC_ROUTE: Route(
            MOCK_ANTHROPIC_ROUTE,
            (
                Deployment(
                    "mock-anthropic",
                    "anthropic",
                    f"{base}/anthropic/v1",
                    "mock-claude",
                    price={"input": 0.0, "output": 0.0},
                ),
            ),
        ),
    }


def routes_from_environment(env: Mapping[str, str]) -> dict[str, Route]:
    """Routes for every known provider whose key is set: `<provider>/<model>` and bare model-name prefixes."""
    routes: dict[str, Route] = {}
    for provider in KNOWN_PROVIDERS:
        key = env.get(provider.api_key_env)
        if not key:
            continue
        base_url = env.get(f"{provider.prefix.upper()}_BASE_URL", provider.base_url)
        deployment = Deployment(
            provider.prefix,
            provider.kind,
            base_url.rstrip("/"),
            PASSTHROUGH_MODEL,
            api_key_env=provider.api_key_env,
            api_key=key,
        )
        pattern = f"{provider.prefix}/*"
        routes[pattern] = Route(pattern, (deployment,))
        for bare in provider.bare_prefixes:
            routes[f"{bare}*"] = Route(f"{bare}*", (deployment,))
    return routes


# --- validation -------------------------------------------------------------------------------------------------

T = TypeVar("T")


class _Checker:
    """Collects typed values from a TOML table and every problem found, each with its key path."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.errors: list[str] = []
        self.env = env

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")

    def table(self, value: object, path: str) -> dict[str, Any]:
        if isinstance(value, dict):
            return value
        self.error(path, f"expected a table, got {_describe(value)}")
        return {}

    def unknown(self, table: Mapping[str, Any], allowed: set[str], path: str) -> None:
        for key in table:
            if key not in allowed:
                hint = _closest(key, allowed)
                self.error(_join(path, key), "unknown key" + (f" (did you mean {hint!r}?)" if hint else ""))

    def get(
        self,
        table: Mapping[str, Any],
        key: str,
        path: str,
        kind: type[T] | tuple[type, ...],
        default: T,
        check: Callable[[Any], str | None] | None = None,
    ) -> T:
        if key not in table:
            return default
        value = table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            names = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
            self.error(_join(path, key), f"expected {names}, got {_describe(value)}")
            return default
        if check is not None and (problem := check(value)) is not None:
            self.error(_join(path, key), problem)
            return default
        return value  # type: ignore[no-any-return]


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list"}


def _describe(value: object) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _closest(key: str, allowed: set[str]) -> str | None:
    import difflib

    matches = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.75)
    return matches[0] if matches else None


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


# The workers' shared state (deployments' balancing state, client keys' counters) keeps one row per worker.
MAX_WORKERS = Pool.MAX_WORKERS


def workers_error(value: int) -> str | None:
    return None if 1 <= value <= MAX_WORKERS else f"must be between 1 and {MAX_WORKERS}"


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else "must not be negative"


def _fraction(value: float) -> str | None:
    return None if 0 < value <= 1 else "must be in (0, 1]"


def _url(value: str) -> str | None:
    if not value.startswith(("http://", "https://")):
        return "must be an http:// or https:// URL"
    return None


def _listen(value: str) -> str | None:
    try:
        parse_listen(value)
    except ValueError as exc:
        return str(exc)
    return None


def parse_listen(value: str) -> tuple[str, int]:
    """`HOST:PORT`, `[IPv6]:PORT` or `:PORT` into (host, port)."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host = host.strip("[]") or DEFAULT_HOST
    return host, int(port_text)


_TOP_KEYS = {
    "listen",
    "db",
    "max_body_bytes",
    "workers",
    "log_level",
    "log_requests",
    "flush_interval_s",
    "request_log_retention_days",
    "shutdown_grace_s",
    "body_timeout_s",
    "write_timeout_s",
    "max_connections_per_key",
    "busy_poll",
    "routes",
    "mock",
}
_ROUTE_KEYS = {
    "strategy",
    "deployments",
    "fallbacks",
    "timeouts",
    "breaker",
    "max_attempts",
    "retry_budget_s",
    "queue_timeout_s",
    "queue_size",
    "keepalive_interval_s",
    "hedge_after_ms",
    "hedge_after",
    "drop_unsupported",
}
_TIMEOUT_KEYS = {"connect", "first_token", "idle", "total"}
_BREAKER_KEYS = {"failures", "error_rate", "window_s", "min_requests", "cooldown_s", "max_cooldown_s"}
_DEPLOYMENT_KEYS = {
    "name",
    "kind",
    "base_url",
    "model",
    "api_key_env",
    "weight",
    "tier",
    "max_concurrent",
    "rpm",
    "tpm",
    "price",
    "headers",
    "anthropic_version",
    "health_check_path",
    "health_check_interval_s",
    "api",
}
# `api` values: which OpenAI APIs an openai-kind deployment lacks and gets translated to (see relay.TRANSLATED).
DEPLOYMENT_APIS = ("chat",)
_PRICE_KEYS = {"input", "output", "cached_input", "cache_write"}


def _parse_deployment(c: _Checker, raw: object, path: str, index: int) -> Deployment | None:
    table = c.table(raw, path)
    c.unknown(table, _DEPLOYMENT_KEYS, path)
    kind = c.get(table, "kind", path, str, "openai")
    if kind not in KINDS:
        c.error(_join(path, "kind"), f"must be one of {', '.join(KINDS)}, got {kind!r}")
    base_url = c.get(table, "base_url", path, str, "", _url)
    if "base_url" not in table:
        c.error(_join(path, "base_url"), "missing (the upstream's API base, e.g. https://api.openai.com/v1)")
    model = c.get(table, "model", path, str, "")
    if "model" not in table:
        c.error(_join(path, "model"), "missing (the upstream's model name, or \"*\" to pass the client's through)")
    api_key_env = c.get(table, "api_key_env", path, str, "")
    api_key: str | None = None
    if api_key_env:
        api_key = c.env.get(api_key_env)
        if not api_key:
            c.error(_join(path, "api_key_env"), f"environment variable {api_key_env} is not set")
    price_table = c.get(table, "price", path, dict, {})
    price: dict[str, float] | None = None
    if "price" in table:
        price = {}
        ppath = _join(path, "price")
        c.unknown(price_table, _PRICE_KEYS, ppath)
        for key in _PRICE_KEYS & price_table.keys():
            price[key] = c.get(price_table, key, ppath, float, 0.0, _non_negative)
        if not {"input", "output"} <= price.keys() and model and builtin_price(model) is None:
            c.error(ppath, f"no built-in price for {model!r}: give both input and output (USD per 1M tokens)")
    headers_table = c.get(table, "headers", path, dict, {})
    headers: dict[str, str] = {}
    for key, value in headers_table.items():
        if isinstance(value, str):
            headers[key] = value
        else:
            c.error(_join(_join(path, "headers"), key), f"expected a string, got {_describe(value)}")
    api = c.get(table, "api", path, str, "") or None
    if api is not None and api not in DEPLOYMENT_APIS:
        c.error(_join(path, "api"), f'must be "chat" (a server with chat completions only), got {api!r}')
    elif api is not None and kind != "openai":
        c.error(_join(path, "api"), f'only applies to kind = "openai" deployments, not {kind!r}')
    host = base_url.split("//", 1)[-1].split("/", 1)[0]
    return Deployment(
        name=c.get(table, "name", path, str, f"{host}/{model}" if model else f"deployment-{index}"),
        kind=kind,
        base_url=base_url.rstrip("/"),
        model=model,
        api_key_env=api_key_env or None,
        api_key=api_key,
        weight=c.get(table, "weight", path, int, 1, _positive),
        tier=c.get(table, "tier", path, int, 1, _positive),
        max_concurrent=c.get(table, "max_concurrent", path, (int, type(None)), None, _positive),
        rpm=c.get(table, "rpm", path, (int, type(None)), None, _positive),
        tpm=c.get(table, "tpm", path, (int, type(None)), None, _positive),
        price=price,
        headers=headers,
        anthropic_version=c.get(table, "anthropic_version", path, str, "2023-06-01"),
        health_check_path=c.get(table, "health_check_path", path, (str, type(None)), None),
        health_check_interval_s=c.get(table, "health_check_interval_s", path, float, 30.0, _positive),
        api=api,
    )


def _parse_route(c: _Checker, name: str, raw: object, path: str) -> Route | None:
    table = c.table(raw, path)
    c.unknown(table, _ROUTE_KEYS, path)
    strategy = c.get(table, "strategy", path, str, "p2c")
    if strategy not in STRATEGIES:
        c.error(_join(path, "strategy"), f"must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    raw_deployments = c.get(table, "deployments", path, list, [])
    if not raw_deployments:
        c.error(_join(path, "deployments"), "a route needs at least one deployment")
    deployments: list[Deployment] = []
    for i, raw_deployment in enumerate(raw_deployments):
        deployment = _parse_deployment(c, raw_deployment, f"{path}.deployments[{i}]", i)
        if deployment is not None:
            deployments.append(deployment)
    names = [d.name for d in deployments]
    for dup in {n for n in names if names.count(n) > 1}:
        c.error(_join(path, "deployments"), f"two deployments are named {dup!r}; give each a distinct `name`")
    fallbacks = c.get(table, "fallbacks", path, list, [])
    for i, fallback in enumerate(fallbacks):
        if not isinstance(fallback, str):
            c.error(f"{path}.fallbacks[{i}]", f"expected a route name, got {_describe(fallback)}")
    ttable = c.get(table, "timeouts", path, dict, {})
    tpath = _join(path, "timeouts")
    c.unknown(ttable, _TIMEOUT_KEYS, tpath)
    timeouts = Timeouts(
        connect=c.get(ttable, "connect", tpath, float, 10.0, _positive),
        first_token=c.get(ttable, "first_token", tpath, float, 300.0, _positive),
        idle=c.get(ttable, "idle", tpath, float, 300.0, _positive),
        total=c.get(ttable, "total", tpath, (float, type(None)), None, _positive),
    )
    btable = c.get(table, "breaker", path, dict, {})
    bpath = _join(path, "breaker")
    c.unknown(btable, _BREAKER_KEYS, bpath)
    breaker = Breaker(
        failures=c.get(btable, "failures", bpath, int, 3, _positive),
        error_rate=c.get(btable, "error_rate", bpath, float, 0.5, _fraction),
        window_s=c.get(btable, "window_s", bpath, float, 30.0, _positive),
        min_requests=c.get(btable, "min_requests", bpath, int, 10, _positive),
        cooldown_s=c.get(btable, "cooldown_s", bpath, float, 10.0, _positive),
        max_cooldown_s=c.get(btable, "max_cooldown_s", bpath, float, 120.0, _positive),
    )
    hedge_after = c.get(table, "hedge_after", path, str, "")
    if hedge_after and hedge_after != "p95":
        c.error(_join(path, "hedge_after"), 'must be "p95" (or use hedge_after_ms for a fixed delay)')
    return Route(
        name=name,
        deployments=tuple(deployments),
        strategy=strategy,
        fallbacks=tuple(f for f in fallbacks if isinstance(f, str)),
        timeouts=timeouts,
        breaker=breaker,
        max_attempts=c.get(table, "max_attempts", path, int, 3, _positive),
        retry_budget_s=c.get(table, "retry_budget_s", path, float, 60.0, _positive),
        queue_timeout_s=c.get(table, "queue_timeout_s", path, float, 10.0, _non_negative),
        queue_size=c.get(table, "queue_size", path, int, 1000, _non_negative),
        keepalive_interval_s=c.get(table, "keepalive_interval_s", path, (float, type(None)), 15.0, _positive),
        hedge_after_ms=c.get(table, "hedge_after_ms", path, (float, type(None)), None, _positive),
        hedge_after_p95=hedge_after == "p95",
        drop_unsupported=c.get(table, "drop_unsupported", path, bool, False),
    )


def parse_config(data: Mapping[str, Any], env: Mapping[str, str] | None = None, source: str = "") -> Config:
    """Validates a parsed TOML document; raises ConfigError listing every problem with its key path."""
    env = os.environ if env is None else env
    c = _Checker(env)
    c.unknown(data, _TOP_KEYS, "")
    host, port = DEFAULT_HOST, DEFAULT_PORT
    listen = c.get(data, "listen", "", str, "", _listen)
    if listen:
        host, port = parse_listen(listen)
    routes_table = c.get(data, "routes", "", dict, {})
    routes: dict[str, Route] = {}
    for name, raw in routes_table.items():
        route = _parse_route(c, name, raw, f"routes.{name}")
        if route is not None:
            routes[name] = route
    for name, route in routes.items():
        for i, fallback in enumerate(route.fallbacks):
            if fallback not in routes:
                c.error(f"routes.{name}.fallbacks[{i}]", f"no route named {fallback!r}")
            elif fallback == name:
                c.error(f"routes.{name}.fallbacks[{i}]", "a route cannot fall back to itself")
    log_level = c.get(data, "log_level", "", str, "info")
    if log_level.lower() not in ("debug", "info", "warning", "error"):
        c.error("log_level", "must be one of debug, info, warning, error")
    config = Config(
        routes=routes,
        host=host,
        port=port,
        db=c.get(data, "db", "", (str, type(None)), None),
        max_body_bytes=c.get(data, "max_body_bytes", "", int, DEFAULT_MAX_BODY_BYTES, _positive),
        workers=c.get(data, "workers", "", int, 1, workers_error),
        log_level=log_level.lower(),
        log_requests=c.get(data, "log_requests", "", bool, True),
        flush_interval_s=c.get(data, "flush_interval_s", "", float, 1.0, _positive),
        request_log_retention_days=c.get(data, "request_log_retention_days", "", float, 7.0, _positive),
        shutdown_grace_s=c.get(data, "shutdown_grace_s", "", float, 30.0, _non_negative),
        body_timeout_s=c.get(data, "body_timeout_s", "", float, 60.0, _positive),
        write_timeout_s=c.get(data, "write_timeout_s", "", float, 120.0, _positive),
        max_connections_per_key=c.get(data, "max_connections_per_key", "", (int, type(None)), None, _positive),
        busy_poll=c.get(data, "busy_poll", "", bool, False),
        source=source,
    )
    if c.errors:
        raise ConfigError(c.errors)
    return config


def load_config(path: str | Path | None, env: Mapping[str, str] | None = None) -> Config:
    """The config from a TOML file, or, with no file, routes made from provider keys in the environment."""
    env = os.environ if env is None else env
    if path is None:
        return Config(routes=routes_from_environment(env), source="environment")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from None
    return parse_config(data, env, source=str(path))


def with_builtin_routes(config: Config) -> Config:
    """Adds the mock routes (unless the config defines routes of those names) for the address actually bound."""
    routes = dict(mock_routes(config.host, config.port))
    routes.update(config.routes)
    return replace(config, routes=routes)
