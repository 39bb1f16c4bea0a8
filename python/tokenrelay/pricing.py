"""Model prices (USD per 1M tokens) and request cost. The built-in table is a convenience: list prices change,
so a deployment's `price = {...}` in the config always overrides it. An unknown price is None, never 0."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

#: When the built-in list prices below were last checked against the providers' public price pages.
PRICES_AS_OF = "2025-11-01"


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1M tokens. `cached_input`/`cache_write` None: billed at the input price."""

    input: float
    output: float
    cached_input: float | None = None
    cache_write: float | None = None

    def __post_init__(self) -> None:
        for name in ("input", "output", "cached_input", "cache_write"):
            value = getattr(self, name)
            if value is None and name in ("cached_input", "cache_write"):
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"price {name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"price {name} must be a finite number >= 0, got {value!r}")


def _p(inp: float, out: float, cached: float | None = None, write: float | None = None) -> Price:
    return Price(input=inp, output=out, cached_input=cached, cache_write=write)


def _claude(inp: float, out: float) -> Price:
    # Anthropic: cache reads at 0.1x input, 5-minute cache writes at 1.25x input.
    return _p(inp, out, round(inp * 0.1, 6), round(inp * 1.25, 6))


# Provider -> {normalized model prefix -> price}. First-party providers come first: without a provider
# hint, the longest matching prefix wins and ties go to the earlier provider.
BUILTIN_PRICES: dict[str, dict[str, Price]] = {
    "openai": {
        "gpt-5": _p(1.25, 10.0, 0.125),
        "gpt-5-mini": _p(0.25, 2.0, 0.025),
        "gpt-5-nano": _p(0.05, 0.40, 0.005),
        "gpt-5-pro": _p(15.0, 120.0),
        "gpt-4.1": _p(2.0, 8.0, 0.50),
        "gpt-4.1-mini": _p(0.40, 1.60, 0.10),
        "gpt-4.1-nano": _p(0.10, 0.40, 0.025),
        "gpt-4o": _p(2.50, 10.0, 1.25),
        "gpt-4o-mini": _p(0.15, 0.60, 0.075),
        "gpt-4-turbo": _p(10.0, 30.0),
        "gpt-4": _p(30.0, 60.0),
        "gpt-3.5-turbo": _p(0.50, 1.50),
        "o1": _p(15.0, 60.0, 7.50),
        "o1-mini": _p(1.10, 4.40, 0.55),
        "o1-pro": _p(150.0, 600.0),
        "o3": _p(2.0, 8.0, 0.50),
        "o3-mini": _p(1.10, 4.40, 0.55),
        "o3-pro": _p(20.0, 80.0),
        "o4-mini": _p(1.10, 4.40, 0.275),
        "text-embedding-3-small": _p(0.02, 0.0),
        "text-embedding-3-large": _p(0.13, 0.0),
    },
    "anthropic": {
        "claude-opus-4": _claude(15.0, 75.0),
        "claude-opus-4-1": _claude(15.0, 75.0),
        "claude-opus-4-5": _claude(5.0, 25.0),
        "claude-sonnet-4": _claude(3.0, 15.0),
        "claude-sonnet-4-5": _claude(3.0, 15.0),
        "claude-3-7-sonnet": _claude(3.0, 15.0),
        "claude-3-5-sonnet": _claude(3.0, 15.0),
        "claude-haiku-4-5": _claude(1.0, 5.0),
        "claude-3-5-haiku": _claude(0.80, 4.0),
        "claude-3-haiku": _p(0.25, 1.25, 0.03, 0.30),
        "claude-3-opus": _claude(15.0, 75.0),
    },
    "deepseek": {
        "deepseek-chat": _p(0.28, 0.42, 0.028),
        "deepseek-reasoner": _p(0.28, 0.42, 0.028),
    },
    "groq": {
        "llama-3.3-70b-versatile": _p(0.59, 0.79),
        "llama-3.1-8b-instant": _p(0.05, 0.08),
        "llama3-70b-8192": _p(0.59, 0.79),
        "llama3-8b-8192": _p(0.05, 0.08),
        "llama-4-scout-17b-16e-instruct": _p(0.11, 0.34),
        "llama-4-maverick-17b-128e-instruct": _p(0.20, 0.60),
        "deepseek-r1-distill-llama-70b": _p(0.75, 0.99),
        "qwen3-32b": _p(0.29, 0.59),
        "qwen-qwq-32b": _p(0.29, 0.39),
        "gpt-oss-120b": _p(0.15, 0.75),
        "gpt-oss-20b": _p(0.10, 0.50),
        "kimi-k2-instruct": _p(1.0, 3.0),
    },
    "together": {
        "llama-3.3-70b-instruct-turbo": _p(0.88, 0.88),
        "meta-llama-3.1-8b-instruct-turbo": _p(0.18, 0.18),
        "meta-llama-3.1-70b-instruct-turbo": _p(0.88, 0.88),
        "meta-llama-3.1-405b-instruct-turbo": _p(3.50, 3.50),
        "deepseek-v3": _p(1.25, 1.25),
        "deepseek-r1": _p(3.0, 7.0),
        "qwen2.5-72b-instruct-turbo": _p(1.20, 1.20),
        "qwen2.5-coder-32b-instruct": _p(0.80, 0.80),
    },
    "fireworks": {
        "llama-v3p3-70b-instruct": _p(0.90, 0.90),
        "llama-v3p1-8b-instruct": _p(0.20, 0.20),
        "llama-v3p1-70b-instruct": _p(0.90, 0.90),
        "llama-v3p1-405b-instruct": _p(3.0, 3.0),
        "deepseek-v3": _p(0.90, 0.90),
        "deepseek-r1": _p(3.0, 8.0),
        "qwen2p5-72b-instruct": _p(0.90, 0.90),
    },
    "sambanova": {
        "meta-llama-3.3-70b-instruct": _p(0.60, 1.20),
        "meta-llama-3.1-8b-instruct": _p(0.10, 0.20),
        "meta-llama-3.1-405b-instruct": _p(5.0, 10.0),
        "deepseek-r1": _p(5.0, 7.0),
        "deepseek-v3": _p(3.0, 4.50),
        "deepseek-r1-distill-llama-70b": _p(0.70, 1.40),
        "qwq-32b": _p(0.50, 1.0),
        "qwen3-32b": _p(0.40, 0.80),
    },
}

# Host fragments that name a provider, for `provider_from_url`.
_HOSTS = {
    "api.openai.com": "openai",
    "anthropic.com": "anthropic",
    "deepseek.com": "deepseek",
    "groq.com": "groq",
    "together.xyz": "together",
    "together.ai": "together",
    "fireworks.ai": "fireworks",
    "sambanova.ai": "sambanova",
}

_DATED = re.compile(
    r"(?:[-@](?:\d{4}-\d{2}-\d{2}|\d{8})|-latest|-v\d+:\d+)$"  # -2024-08-06, @20240620, Bedrock's -v1:0
)
_BEDROCK = re.compile(r"^(?:[a-z]{2}\.)?anthropic\.")
_BOUNDARY = frozenset("-:@._")


def normalize_model(model: str) -> str:
    """Lowercase, drop provider paths (`meta-llama/`, `accounts/fireworks/models/`), Bedrock prefixes and
    dated/version suffixes; Claude `4.1`-style versions become `4-1`."""
    name = model.strip().lower().rsplit("/", 1)[-1]
    name = _BEDROCK.sub("", name)
    while True:
        stripped = _DATED.sub("", name)
        if stripped == name:
            break
        name = stripped
    if name.startswith("claude"):
        name = re.sub(r"(\d)\.(\d)", r"\1-\2", name)
    return name


def provider_from_url(base_url: str) -> str | None:
    """The price-table provider a deployment's base URL belongs to, if it is one we know."""
    lowered = base_url.lower()
    return next((p for host, p in _HOSTS.items() if host in lowered), None)


def _match(name: str, table: Mapping[str, Price]) -> tuple[int, Price] | None:
    best: tuple[int, Price] | None = None
    for prefix, price in table.items():
        if not name.startswith(prefix) or (len(name) > len(prefix) and name[len(prefix)] not in _BOUNDARY):
            continue
        if best is None or len(prefix) > best[0]:
            best = (len(prefix), price)
    return best


def builtin_price(model: str, provider: str | None = None) -> Price | None:
    """The built-in list price: longest matching prefix, in `provider`'s table first when given."""
    name = normalize_model(model)
    if provider in BUILTIN_PRICES:
        found = _match(name, BUILTIN_PRICES[provider])
        if found:
            return found[1]
    best: tuple[int, Price] | None = None
    for table in BUILTIN_PRICES.values():
        found = _match(name, table)
        if found and (best is None or found[0] > best[0]):
            best = found
    return best[1] if best else None


def price_for(model: str, override: Mapping[str, float] | None = None, *, provider: str | None = None) -> Price | None:
    """The price of `model`: the config override's fields over the built-in price. With an override but no
    built-in price, the override must give at least `input` and `output`. None when unknown."""
    base = builtin_price(model, provider)
    if not override:
        return base
    unknown = set(override) - {"input", "output", "cached_input", "cache_write"}
    if unknown:
        raise ValueError(f"unknown price fields {sorted(unknown)}; expected input, output, cached_input, cache_write")
    if base is None and not {"input", "output"} <= set(override):
        raise ValueError(f"price for {model!r} is not built in: the override needs both input and output")
    fields: dict[str, float | None] = {}
    if base is not None:
        fields = {
            "input": base.input,
            "output": base.output,
            "cached_input": base.cached_input,
            "cache_write": base.cache_write,
        }
    fields.update(override)
    return Price(
        input=float(fields["input"] or 0.0),
        output=float(fields["output"] or 0.0),
        cached_input=fields.get("cached_input"),
        cache_write=fields.get("cache_write"),
    )


def cost_usd(
    price: Price | None, *, input: int, output: int, cached_input: int = 0, cache_write: int = 0
) -> float | None:
    """Cost of one request. `input` counts ALL input tokens, cache reads and writes included (OpenAI's
    `prompt_tokens`; for Anthropic pass input + cache_read + cache_creation); `output` includes reasoning."""
    if price is None:
        return None
    uncached = max(0, input - cached_input - cache_write)
    cached_rate = price.input if price.cached_input is None else price.cached_input
    write_rate = price.input if price.cache_write is None else price.cache_write
    total = uncached * price.input + cached_input * cached_rate + cache_write * write_rate + output * price.output
    return total / 1_000_000
