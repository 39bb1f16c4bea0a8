"""Anthropic Messages passthrough: the anthropic SDK on an Anthropic-kind deployment, nothing translated."""

from __future__ import annotations

import json
from collections.abc import Callable

import anthropic
import pytest

from tests.conftest import Daemon, MockUpstream
from tests.test_translate import (
    TOOL_ARGS,
    WEATHER_TOOL_ANTHROPIC,
    anthropic_client,
    expected_text,
    kinds_config,
    last_request,
    last_usage,
)


@pytest.fixture
def upstream(mock_factory: Callable[..., MockUpstream]) -> MockUpstream:
    return mock_factory(delay_ms=1.0, cached_tokens=3)


@pytest.fixture
def relay(upstream: MockUpstream, daemon_factory: Callable[..., Daemon]) -> Daemon:
    return daemon_factory(kinds_config("claude", (upstream, "anthropic")))


def test_create_passes_through_with_the_deployments_credentials(relay: Daemon, upstream: MockUpstream) -> None:
    msg = anthropic_client(relay).messages.create(
        model="claude",
        max_tokens=100,
        messages=[{"role": "user", "content": "Say something about foxes."}],
        extra_headers={"anthropic-beta": "prompt-caching-2024-07-31"},
    )
    assert msg.content[0].text == expected_text()  # type: ignore[union-attr]
    assert (msg.usage.output_tokens, msg.usage.cache_read_input_tokens) == (24, 3)
    seen = last_request(upstream)
    assert seen["path"] == "/v1/messages" and seen["body"]["model"] == "upstream-anthropic"
    headers = seen["headers"]
    assert headers["x-api-key"] == "sk-upstream-secret-123"
    assert headers["anthropic-version"]  # the client's SDK's version (the deployment's when the client sends none)
    assert headers["anthropic-beta"] == "prompt-caching-2024-07-31"
    assert "agent-key-1" not in json.dumps(headers)
    usage = last_usage(relay, 1)
    # Anthropic's input_tokens excludes cache reads; the meter's `input` includes them.
    assert usage["input"] == msg.usage.input_tokens + 3 and usage["cached_input"] == 3
    assert usage["output"] == 24 and usage["output_source"] == "reported"


def test_stream_get_final_message(relay: Daemon) -> None:
    with anthropic_client(relay).messages.stream(
        model="claude", max_tokens=100, messages=[{"role": "user", "content": "Hi"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == expected_text() == final.content[0].text  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 24
    usage = last_usage(relay, 1)
    assert usage["output"] == 24 and usage["input"] == final.usage.input_tokens + 3


def test_stream_with_thinking_and_tool_use(relay: Daemon) -> None:
    with anthropic_client(relay).messages.stream(
        model="claude",
        max_tokens=2000,
        tools=[WEATHER_TOOL_ANTHROPIC],
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        extra_body={"mock": {"tokens": 2, "thinking": 2, "tool_call": "get_weather"}},
    ) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use"]
    thinking, _, tool = final.content
    assert thinking.type == "thinking" and thinking.thinking == "step 1 step 2 " and thinking.signature
    assert tool.type == "tool_use" and tool.input == json.loads(TOOL_ARGS)
    assert final.stop_reason == "tool_use"
    usage = last_usage(relay, 1)
    assert usage["output"] == 2 + 2 + 3 and usage["reasoning"] > 0


def test_count_tokens_passes_through(relay: Daemon, upstream: MockUpstream) -> None:
    count = anthropic_client(relay).messages.count_tokens(
        model="claude", messages=[{"role": "user", "content": "one two three four"}]
    )
    assert count.input_tokens == 4 + 3 + 1  # the mock's own count: words + per-message overhead + 1
    seen = last_request(upstream)
    assert seen["path"] == "/v1/messages/count_tokens" and seen["headers"]["x-api-key"] == "sk-upstream-secret-123"


def test_error_passes_through_in_anthropic_shape(relay: Daemon, upstream: MockUpstream) -> None:
    upstream.control(fail_status=529)
    with pytest.raises(anthropic.APIStatusError) as info:
        anthropic_client(relay).messages.create(
            model="claude", max_tokens=10, messages=[{"role": "user", "content": "Hi"}]
        )
    assert info.value.status_code == 529
    assert info.value.body == {"type": "error", "error": {"type": "overloaded_error", "message": "mock failure"}}
