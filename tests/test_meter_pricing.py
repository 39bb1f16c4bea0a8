"""Price lookup and cost arithmetic."""

from __future__ import annotations

import pytest
from tokenrelay.pricing import (
    BUILTIN_PRICES,
    Price,
    builtin_price,
    cost_usd,
    normalize_model,
    price_for,
    provider_from_url,
)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("claude-3-5-haiku-latest", "claude-3-5-haiku"),
        ("us.anthropic.claude-3-5-sonnet-20240620-v1:0", "claude-3-5-sonnet"),
        ("claude-3-5-sonnet-v2@20241022", "claude-3-5-sonnet-v2"),
        ("claude-opus-4.1", "claude-opus-4-1"),
        ("meta-llama/Llama-3.3-70B-Instruct-Turbo", "llama-3.3-70b-instruct-turbo"),
        ("accounts/fireworks/models/llama-v3p3-70b-instruct", "llama-v3p3-70b-instruct"),
        ("deepseek-ai/DeepSeek-V3", "deepseek-v3"),
    ],
)
def test_normalize_model(model: str, expected: str) -> None:
    assert normalize_model(model) == expected


def test_longest_prefix_wins_and_needs_a_boundary() -> None:
    table = BUILTIN_PRICES["openai"]
    assert builtin_price("gpt-4o-mini-2024-07-18") == table["gpt-4o-mini"]
    assert builtin_price("gpt-4o-2024-11-20") == table["gpt-4o"]
    assert builtin_price("gpt-4.1-nano") == table["gpt-4.1-nano"]
    assert builtin_price("gpt-5-chat-latest") == table["gpt-5"]
    assert builtin_price("o3-pro-2025-06-10") == table["o3-pro"]
    assert builtin_price("o4-mini") == table["o4-mini"]
    # "o1" must not price "o1x", and "gpt-4" must not price "gpt-4o-something-new" as gpt-4.
    assert builtin_price("o1x") is None
    assert builtin_price("gpt-4o-realtime") == table["gpt-4o"]
    anthropic = BUILTIN_PRICES["anthropic"]
    assert builtin_price("claude-sonnet-4-5-20250929") == anthropic["claude-sonnet-4-5"]
    assert builtin_price("claude-opus-4-1-20250805") == anthropic["claude-opus-4-1"]
    assert builtin_price("claude-haiku-4-5") == anthropic["claude-haiku-4-5"]
    assert builtin_price("claude-3-7-sonnet-latest") == anthropic["claude-3-7-sonnet"]
    assert builtin_price("my-finetune") is None


def test_provider_hint_picks_that_providers_price() -> None:
    assert builtin_price("deepseek-ai/DeepSeek-R1", "together") == BUILTIN_PRICES["together"]["deepseek-r1"]
    assert builtin_price("DeepSeek-R1", "sambanova") == BUILTIN_PRICES["sambanova"]["deepseek-r1"]
    assert builtin_price("accounts/fireworks/models/deepseek-r1", "fireworks") == Price(3.0, 8.0)
    assert builtin_price("qwen/qwen3-32b", "groq") == Price(0.29, 0.59)
    # Without a hint, a tie goes to the earlier provider in the table (never None).
    assert builtin_price("deepseek-r1") is not None
    assert provider_from_url("https://api.groq.com/openai/v1") == "groq"
    assert provider_from_url("https://api.together.xyz/v1") == "together"
    assert provider_from_url("http://127.0.0.1:8000/v1") is None


def test_anthropic_cache_prices_follow_the_multipliers() -> None:
    p = builtin_price("claude-sonnet-4-5")
    assert p == Price(input=3.0, output=15.0, cached_input=0.3, cache_write=3.75)


def test_override_replaces_fields_and_prices_unknown_models() -> None:
    assert price_for("gpt-4o", {"input": 1.0}) == Price(1.0, 10.0, 1.25)
    assert price_for("local-llama", {"input": 0.1, "output": 0.2}) == Price(0.1, 0.2)
    assert price_for("local-llama") is None
    with pytest.raises(ValueError, match="input and output"):
        price_for("local-llama", {"input": 0.1})
    with pytest.raises(ValueError, match="unknown price fields"):
        price_for("gpt-4o", {"inptu": 1.0})
    with pytest.raises(ValueError):
        Price(input=-1.0, output=1.0)
    with pytest.raises(TypeError):
        Price(input="1", output=1.0)  # type: ignore[arg-type]


def test_cost_counts_cached_and_cache_writes_at_their_prices() -> None:
    p = Price(input=3.0, output=15.0, cached_input=0.3, cache_write=3.75)
    # 10k input of which 6k cache reads and 1k cache writes; 2k output (reasoning included).
    got = cost_usd(p, input=10_000, output=2_000, cached_input=6_000, cache_write=1_000)
    want = (3_000 * 3.0 + 6_000 * 0.3 + 1_000 * 3.75 + 2_000 * 15.0) / 1e6
    assert got == pytest.approx(want)
    # No cache prices: cached and written tokens fall back to the input price.
    plain = Price(input=1.0, output=2.0)
    assert cost_usd(plain, input=1_000, output=500, cached_input=400) == pytest.approx((1_000 + 1_000) / 1e6)
    assert cost_usd(None, input=1, output=1) is None
    assert cost_usd(plain, input=0, output=0) == 0.0
    # Inconsistent counts never make the uncached part negative.
    assert cost_usd(plain, input=10, output=0, cached_input=50) == pytest.approx(50 / 1e6)
