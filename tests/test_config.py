"""Config validation and route lookup, as `tokenrelay check` and the daemon apply them."""

from __future__ import annotations

import pytest
from tokenrelay.config import ConfigError, load_config, parse_config, routes_from_environment


def deployment(**extra: object) -> dict[str, object]:
    return {"base_url": "http://127.0.0.1:9/v1", "model": "m", **extra}


def errors_of(data: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, env={})
    return info.value.errors


def test_fallback_to_an_unknown_or_the_same_route() -> None:
    errors = errors_of({"routes": {"a": {"fallbacks": ["b", "a"], "deployments": [deployment()]}}})
    assert "routes.a.fallbacks[0]: no route named 'b'" in errors
    assert "routes.a.fallbacks[1]: a route cannot fall back to itself" in errors


def test_price_needs_input_and_output_for_unknown_models() -> None:
    errors = errors_of({"routes": {"a": {"deployments": [deployment(model="my-llm", price={"input": 1})]}}})
    assert errors == [
        "routes.a.deployments[0].price: no built-in price for 'my-llm': give both input and output (USD per 1M tokens)"
    ]
    config = parse_config({"routes": {"a": {"deployments": [deployment(model="gpt-4o", price={"input": 1})]}}}, env={})
    assert config.routes["a"].deployments[0].price == {"input": 1.0}


def test_breaker_and_timeouts_are_checked() -> None:
    errors = errors_of(
        {
            "routes": {
                "a": {
                    "breaker": {"failures": 0, "error_rate": 2, "cooldwn_s": 1},
                    "timeouts": {"idle": -1},
                    "deployments": [deployment()],
                }
            }
        }
    )
    assert "routes.a.breaker.failures: must be greater than 0" in errors
    assert "routes.a.breaker.error_rate: must be in (0, 1]" in errors
    assert "routes.a.breaker.cooldwn_s: unknown key (did you mean 'cooldown_s'?)" in errors
    assert "routes.a.timeouts.idle: must be greater than 0" in errors


def test_duplicate_deployment_names() -> None:
    errors = errors_of({"routes": {"a": {"deployments": [deployment(name="x"), deployment(name="x")]}}})
    assert any("two deployments are named 'x'" in e for e in errors)


def test_routes_from_environment_and_pattern_lookup() -> None:
    routes = routes_from_environment({"GROQ_API_KEY": "gsk", "OPENAI_API_KEY": "sk"})
    config = parse_config({}, env={})
    config = type(config)(routes=routes)
    groq = config.find_route("groq/llama-3.3-70b-versatile")
    assert groq is not None and groq.name == "groq/*"
    assert groq.deployments[0].upstream_model("groq/llama-3.3-70b-versatile", groq.name) == "llama-3.3-70b-versatile"
    gpt = config.find_route("gpt-4o-mini")
    assert gpt is not None and gpt.deployments[0].upstream_model("gpt-4o-mini", gpt.name) == "gpt-4o-mini"
    assert config.find_route("claude-sonnet-4") is None  # no ANTHROPIC_API_KEY
    assert config.find_route("sambanova/x") is None


def test_no_config_file_means_environment_routes() -> None:
    config = load_config(None, env={"ANTHROPIC_API_KEY": "sk-ant"})
    route = config.find_route("claude-sonnet-4-5")
    assert route is not None and route.deployments[0].kind == "anthropic"
    assert route.deployments[0].api_key == "sk-ant"
    assert "sk-ant" not in repr(route)  # secrets stay out of reprs and logs
