"""Routes that translate: the anthropic SDK on OpenAI-kind deployments, the openai SDK on Anthropic-kind ones.

Real processes: a mock provider that emits each provider's own event sequence (thinking, text, tool use) and
the tokenrelay daemon translating between them; the official SDKs as clients.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from typing import Any

import anthropic
import openai
import pytest

from tests.conftest import Daemon, MockUpstream

TOOL_ARGS = '{"city": "Paris", "unit": "celsius"}'
WEATHER_TOOL_OPENAI: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
WEATHER_TOOL_ANTHROPIC: Any = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def expected_text(tokens: int = 24) -> str:
    from tokenrelay.mock import Behaviour, MockProvider

    return "".join(MockProvider()._text(Behaviour(tokens=tokens)))


def kinds_config(
    name: str, *deployments: tuple[MockUpstream, str], extra: str = "", deployment_extra: list[str] | None = None
) -> str:
    """A route over mock upstreams, each with its own kind ("openai" or "anthropic")."""
    out = f"[routes.{name}]\n{extra}\n"
    for i, (m, kind) in enumerate(deployments):
        more = deployment_extra[i] if deployment_extra else ""
        out += textwrap.dedent(f"""
            [[routes.{name}.deployments]]
            name = "d{i}-{kind}"
            kind = "{kind}"
            base_url = "{m.url}/v1"
            model = "upstream-{kind}"
            api_key_env = "TEST_UPSTREAM_KEY"
            {more}
            """)
    return out


def anthropic_client(d: Daemon, key: str = "agent-key-1") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=d.url, api_key=key, max_retries=0)


def openai_client(d: Daemon, key: str = "agent-key-1") -> openai.OpenAI:
    return openai.OpenAI(base_url=d.base_url, api_key=key, max_retries=0)


def last_request(m: MockUpstream) -> dict[str, Any]:
    seen: dict[str, Any] = m.stats()["last_request"]
    return seen


def last_usage(d: Daemon, count: int) -> dict[str, Any]:
    records = d.wait_records(count)
    assert len(records) >= count, records
    usage: dict[str, Any] = records[count - 1]["usage"]
    return usage


@pytest.fixture
def openai_upstream(mock_factory: Callable[..., MockUpstream]) -> MockUpstream:
    return mock_factory(delay_ms=1.0)


@pytest.fixture
def to_openai(openai_upstream: MockUpstream, daemon_factory: Callable[..., Daemon]) -> Daemon:
    """A route whose only deployment is OpenAI-kind."""
    return daemon_factory(kinds_config("claude-ish", (openai_upstream, "openai")))


@pytest.fixture
def to_anthropic(openai_upstream: MockUpstream, daemon_factory: Callable[..., Daemon]) -> Daemon:
    """A route whose only deployment is Anthropic-kind."""
    return daemon_factory(kinds_config("gpt-ish", (openai_upstream, "anthropic")))


# --- the anthropic SDK on an OpenAI-kind deployment -------------------------------------------------------------


def test_messages_create_on_openai_kind(to_openai: Daemon, openai_upstream: MockUpstream) -> None:
    msg = anthropic_client(to_openai).messages.create(
        model="claude-ish",
        max_tokens=300,
        system="You are terse.",
        messages=[{"role": "user", "content": "Say something about foxes."}],
        stop_sequences=["END"],
        metadata={"user_id": "u-42"},
    )
    assert msg.type == "message" and msg.role == "assistant"
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text == expected_text()  # type: ignore[union-attr]
    assert msg.stop_reason == "end_turn"
    assert msg.usage.output_tokens == 24 and msg.usage.input_tokens > 0
    seen = last_request(openai_upstream)
    assert seen["path"] == "/v1/chat/completions"
    body = seen["body"]
    assert body["model"] == "upstream-openai"
    assert body["messages"][0] == {"role": "system", "content": "You are terse."}
    assert body["messages"][1] == {"role": "user", "content": "Say something about foxes."}
    assert body["max_tokens"] == 300 and body["stop"] == ["END"] and body["user"] == "u-42"
    assert seen["headers"]["Authorization"] == "Bearer sk-upstream-secret-123"
    usage = last_usage(to_openai, 1)
    assert (usage["output"], usage["output_source"]) == (24, "reported")
    assert usage["input"] == msg.usage.input_tokens and usage["input_source"] == "reported"


def test_messages_stream_on_openai_kind(to_openai: Daemon, openai_upstream: MockUpstream) -> None:
    client = anthropic_client(to_openai)
    with client.messages.stream(
        model="claude-ish", max_tokens=300, messages=[{"role": "user", "content": "Hi"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == expected_text()
    assert final.content[0].text == text  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 24 and final.usage.input_tokens > 0
    body = last_request(openai_upstream)["body"]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    usage = last_usage(to_openai, 1)
    assert (usage["output"], usage["input"]) == (24, final.usage.input_tokens)
    assert usage["output_source"] == "reported"


def test_messages_tool_use_stream_and_not_on_openai_kind(to_openai: Daemon, openai_upstream: MockUpstream) -> None:
    client = anthropic_client(to_openai)
    kwargs: Any = {
        "model": "claude-ish",
        "max_tokens": 300,
        "tools": [WEATHER_TOOL_ANTHROPIC],
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "extra_body": {"mock": {"tokens": 3, "tool_call": "get_weather"}},
    }
    with client.messages.stream(**kwargs) as stream:
        final = stream.get_final_message()
    plain = client.messages.create(**kwargs)
    for msg in (final, plain):
        assert [b.type for b in msg.content] == ["text", "tool_use"]
        assert msg.content[0].text == expected_text(3)  # type: ignore[union-attr]
        tool = msg.content[1]
        assert tool.type == "tool_use" and tool.name == "get_weather"
        assert tool.input == json.loads(TOOL_ARGS) and tool.id.startswith("call_")
        assert msg.stop_reason == "tool_use"
    body = last_request(openai_upstream)["body"]
    assert body["tools"] == [WEATHER_TOOL_OPENAI]
    assert body["tool_choice"] == "auto" and body["parallel_tool_calls"] is False

    # The tool result goes back as a `tool` message answering the assistant's tool call.
    tool = final.content[1]
    assert tool.type == "tool_use"
    client.messages.create(
        model="claude-ish",
        max_tokens=100,
        tools=[WEATHER_TOOL_ANTHROPIC],
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [b.model_dump() for b in final.content]},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": tool.id, "content": "18 C and sunny"},
                    {"type": "text", "text": "Thanks!"},
                ],
            },
        ],
    )
    sent = last_request(openai_upstream)["body"]["messages"]
    assert sent[1]["role"] == "assistant" and sent[1]["content"] == expected_text(3)
    assert sent[1]["tool_calls"] == [
        {
            "id": tool.id,
            "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps(tool.input, separators=(",", ":"))},
        }
    ]
    assert sent[2] == {"role": "tool", "tool_call_id": tool.id, "content": "18 C and sunny"}
    assert sent[3] == {"role": "user", "content": "Thanks!"}


def test_reasoning_content_becomes_a_thinking_block(to_openai: Daemon) -> None:
    client = anthropic_client(to_openai)
    with client.messages.stream(
        model="claude-ish",
        max_tokens=300,
        messages=[{"role": "user", "content": "Think first."}],
        extra_body={"mock": {"tokens": 4, "thinking": 3}},
    ) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "step 1 step 2 step 3 "  # type: ignore[union-attr]
    assert final.content[1].text == expected_text(4)  # type: ignore[union-attr]
    usage = last_usage(to_openai, 1)
    assert (usage["output"], usage["reasoning"]) == (4 + 3, 3)


def test_count_tokens_on_openai_kind_is_estimated(to_openai: Daemon) -> None:
    count = anthropic_client(to_openai).messages.count_tokens(
        model="claude-ish", messages=[{"role": "user", "content": "How many tokens is this sentence, roughly?"}]
    )
    assert 5 < count.input_tokens < 100


def test_untranslatable_parameter_is_a_clear_400(to_openai: Daemon, openai_upstream: MockUpstream) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        anthropic_client(to_openai).messages.create(
            model="claude-ish", max_tokens=10, messages=[{"role": "user", "content": "Hi"}], extra_body={"top_k": 5}
        )
    body: Any = info.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "`top_k`" in body["error"]["message"]
    assert openai_upstream.stats()["requests"] == 0


# --- the openai SDK on an Anthropic-kind deployment -------------------------------------------------------------


def test_chat_create_on_anthropic_kind(to_anthropic: Daemon, openai_upstream: MockUpstream) -> None:
    answer = openai_client(to_anthropic).chat.completions.create(
        model="gpt-ish",
        messages=[
            {"role": "system", "content": "You are terse."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this image?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                ],
            },
        ],
        temperature=1.5,
        stop="END",
        user="u-7",
    )
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.content == expected_text()
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.completion_tokens == 24
    seen = last_request(openai_upstream)
    assert seen["path"] == "/v1/messages"
    assert seen["headers"]["x-api-key"] == "sk-upstream-secret-123"
    assert seen["headers"]["anthropic-version"] == "2023-06-01"
    assert "Authorization" not in seen["headers"] and "agent-key-1" not in str(seen["headers"])
    body = seen["body"]
    assert body["model"] == "upstream-anthropic"
    assert body["system"] == [{"type": "text", "text": "You are terse."}]
    assert body["max_tokens"] == 4096  # Anthropic requires it: the documented default
    assert body["temperature"] == 1.0 and body["stop_sequences"] == ["END"]
    assert body["metadata"] == {"user_id": "u-7"}
    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this image?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
            ],
        }
    ]
    usage = last_usage(to_anthropic, 1)
    assert (usage["output"], usage["input"]) == (24, answer.usage.prompt_tokens)


@pytest.mark.parametrize("include_usage", [True, False])
def test_chat_stream_on_anthropic_kind(to_anthropic: Daemon, include_usage: bool) -> None:
    stream = openai_client(to_anthropic).chat.completions.create(
        model="gpt-ish",
        messages=[{"role": "user", "content": "Hi"}],
        stream=True,
        stream_options={"include_usage": include_usage},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_text()
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    usage_chunks = [c for c in chunks if c.usage is not None]
    if include_usage:
        assert len(usage_chunks) == 1 and chunks[-1].choices == []
        assert usage_chunks[0].usage is not None and usage_chunks[0].usage.completion_tokens == 24
    else:
        assert usage_chunks == []
    usage = last_usage(to_anthropic, 1)
    assert (usage["output"], usage["output_source"]) == (24, "reported")


def test_chat_tools_on_anthropic_kind(to_anthropic: Daemon, openai_upstream: MockUpstream) -> None:
    client = openai_client(to_anthropic)
    kwargs: Any = {
        "model": "gpt-ish",
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [WEATHER_TOOL_OPENAI],
        "tool_choice": "required",
        "extra_body": {"mock": {"tokens": 2, "tool_call": "get_weather", "thinking": 2}},
    }
    stream = client.chat.completions.create(stream=True, **kwargs)
    calls: dict[int, dict[str, str]] = {}
    reasoning = ""
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        reasoning += getattr(delta, "reasoning_content", None) or ""
        for call in delta.tool_calls or []:
            slot = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
            if call.id:
                slot["id"] = call.id
            if call.function and call.function.name:
                slot["name"] += call.function.name
            if call.function and call.function.arguments:
                slot["arguments"] += call.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and reasoning == "step 1 step 2 "
    assert list(calls) == [0] and calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == json.loads(TOOL_ARGS) and calls[0]["id"].startswith("toolu_")
    body = last_request(openai_upstream)["body"]
    assert body["tools"] == [WEATHER_TOOL_ANTHROPIC] and body["tool_choice"] == {"type": "any"}

    answer = client.chat.completions.create(**kwargs)
    message = answer.choices[0].message
    assert answer.choices[0].finish_reason == "tool_calls"
    assert message.tool_calls is not None and message.tool_calls[0].function.name == "get_weather"
    assert json.loads(message.tool_calls[0].function.arguments) == json.loads(TOOL_ARGS)

    # The assistant's tool call and the tool's answer go back as tool_use / tool_result blocks.
    client.chat.completions.create(
        model="gpt-ish",
        tools=[WEATHER_TOOL_OPENAI],
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            message.model_dump(exclude_none=True),  # type: ignore[list-item]
            {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "18 C"},
        ],
    )
    sent = last_request(openai_upstream)["body"]["messages"]
    assert sent[1]["role"] == "assistant"
    assert sent[1]["content"][-1] == {
        "type": "tool_use",
        "id": message.tool_calls[0].id,
        "name": "get_weather",
        "input": json.loads(TOOL_ARGS),
    }
    assert sent[2] == {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": message.tool_calls[0].id, "content": "18 C"}],
    }


def test_upstream_error_is_in_the_clients_shape(to_anthropic: Daemon, openai_upstream: MockUpstream) -> None:
    openai_upstream.control(fail_status=400)
    with pytest.raises(openai.BadRequestError) as info:
        openai_client(to_anthropic).chat.completions.create(
            model="gpt-ish", messages=[{"role": "user", "content": "Hi"}]
        )
    body: Any = info.value.body
    assert body["message"] == "mock failure" and body["type"] == "api_error"


def test_unsupported_parameter_400_or_dropped(
    openai_upstream: MockUpstream, daemon_factory: Callable[..., Daemon]
) -> None:
    strict = daemon_factory(kinds_config("gpt-ish", (openai_upstream, "anthropic")))
    with pytest.raises(openai.BadRequestError) as info:
        openai_client(strict).chat.completions.create(
            model="gpt-ish", messages=[{"role": "user", "content": "Hi"}], seed=7, n=1, presence_penalty=0
        )
    body: Any = info.value.body
    assert body["param"] == "seed" and "`seed`" in body["message"] and body["code"] == "unsupported_parameter"
    lenient = daemon_factory(kinds_config("gpt-ish", (openai_upstream, "anthropic"), extra="drop_unsupported = true"))
    answer = openai_client(lenient).chat.completions.create(
        model="gpt-ish", messages=[{"role": "user", "content": "Hi"}], seed=7, logit_bias={"1": 2}
    )
    assert answer.choices[0].message.content == expected_text()
    assert "seed" not in last_request(openai_upstream)["body"]


# --- mixed routes: failover across kinds ----------------------------------------------------------------------


@pytest.mark.parametrize("client_api", ["messages", "chat"])
def test_failover_across_kinds(
    mock_factory: Callable[..., MockUpstream], daemon_factory: Callable[..., Daemon], client_api: str
) -> None:
    overloaded = mock_factory(delay_ms=1.0, fail_status=529)
    healthy = mock_factory(delay_ms=1.0)
    # The failing deployment speaks the client's own format; the healthy one the other, so it is translated.
    first, second = ("anthropic", "openai") if client_api == "messages" else ("openai", "anthropic")
    d = daemon_factory(
        kinds_config(
            "mixed",
            (overloaded, first),
            (healthy, second),
            extra='strategy = "priority"',
            deployment_extra=["tier = 1", "tier = 2"],
        )
    )
    if client_api == "messages":
        with anthropic_client(d).messages.stream(
            model="mixed", max_tokens=100, messages=[{"role": "user", "content": "Hi"}]
        ) as stream:
            final = stream.get_final_message()
        assert final.content[0].text == expected_text()  # type: ignore[union-attr]
        assert last_request(healthy)["path"] == "/v1/chat/completions"
    else:
        stream = openai_client(d).chat.completions.create(
            model="mixed", messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected_text()
        assert last_request(healthy)["path"] == "/v1/messages"
    assert overloaded.stats()["requests"] == 1
    record = d.wait_records(1)[0]
    assert record["deployment"] == f"d1-{second}" and record["attempts"] == 2
    assert record["usage"]["output"] == 24


def test_completions_on_anthropic_only_route_is_400(to_anthropic: Daemon) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        openai_client(to_anthropic).completions.create(model="gpt-ish", prompt="Hi")
    body: Any = info.value.body
    assert "no openai-kind deployment" in body["message"]


def test_input_is_estimated_from_the_translated_body_when_no_usage_is_reported(
    to_openai: Daemon, openai_upstream: MockUpstream
) -> None:
    """An Anthropic request sent to an OpenAI-kind upstream that reports no usage: the input estimate must count
    what was sent (the system prompt became a system message), not misread the client's body as chat."""
    from tokenrelay._core import estimate_input_tokens

    openai_upstream.control(usage=False)
    system = "You are a careful assistant who answers in plain words. " * 60
    anthropic_client(to_openai).messages.create(
        model="claude-ish", max_tokens=64, system=system, messages=[{"role": "user", "content": "hi"}]
    )
    usage = last_usage(to_openai, 1)
    assert usage["input_source"] == "estimated"
    sent = json.dumps(last_request(openai_upstream)["body"]).encode()
    assert usage["input"] == estimate_input_tokens("chat", sent, "upstream-openai")
    assert usage["input"] > 500  # the ~600-token system prompt is counted
