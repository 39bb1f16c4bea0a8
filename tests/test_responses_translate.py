"""The OpenAI Responses API reaching deployments that do not speak it: an anthropic-kind deployment, and an
openai-kind one with `api = "chat"` (a server with chat completions only). The official openai SDK as the
client (`responses.create`, streaming and not, `responses.stream(...).get_final_response()`, a function call
round trip); the mock provider emitting each upstream's real event sequence; usage from the request log."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import openai
import pytest
from tokenrelay.config import ConfigError, parse_config

from tests.conftest import Daemon, MockUpstream
from tests.test_translate import TOOL_ARGS, expected_text, kinds_config, last_request, last_usage, openai_client

WEATHER_TOOL: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@dataclass
class Target:
    daemon: Daemon
    upstream: MockUpstream
    kind: str  # "anthropic" | "chat"

    @property
    def path(self) -> str:
        return "/v1/messages" if self.kind == "anthropic" else "/v1/chat/completions"

    def client(self) -> openai.OpenAI:
        return openai_client(self.daemon)


def make_target(kind: str, upstream: MockUpstream, daemon_factory: Callable[..., Daemon], extra: str = "") -> Target:
    if kind == "anthropic":
        config = kinds_config("agent", (upstream, "anthropic"), extra=extra)
    else:
        config = kinds_config("agent", (upstream, "openai"), extra=extra, deployment_extra=['api = "chat"'])
    return Target(daemon_factory(config), upstream, kind)


@pytest.fixture(params=["anthropic", "chat"])
def target(
    request: pytest.FixtureRequest, mock_factory: Callable[..., MockUpstream], daemon_factory: Callable[..., Daemon]
) -> Target:
    return make_target(request.param, mock_factory(delay_ms=1.0), daemon_factory)


def test_create(target: Target) -> None:
    response = target.client().responses.create(
        model="agent",
        input="Say something about foxes.",
        instructions="Be brief.",
        max_output_tokens=200,
        temperature=0.5,
    )
    assert response.object == "response" and response.status == "completed"
    assert response.output_text == expected_text()
    assert [item.type for item in response.output] == ["message"]
    assert response.usage is not None and response.usage.output_tokens == 24 and response.usage.input_tokens > 0
    seen = last_request(target.upstream)
    assert seen["path"] == target.path
    body = seen["body"]
    assert body["max_tokens"] == 200 and body["temperature"] == 0.5
    if target.kind == "anthropic":
        assert body["model"] == "upstream-anthropic"
        assert body["system"] == [{"type": "text", "text": "Be brief."}]
        assert body["messages"] == [
            {"role": "user", "content": [{"type": "text", "text": "Say something about foxes."}]}
        ]
    else:
        assert body["model"] == "upstream-openai"
        assert body["messages"] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say something about foxes."},
        ]
    usage = last_usage(target.daemon, 1)
    assert (usage["input"], usage["output"]) == (response.usage.input_tokens, 24)
    assert usage["input_source"] == usage["output_source"] == "reported"


def test_stream(target: Target) -> None:
    stream = target.client().responses.create(model="agent", input="Hi", stream=True)
    events = list(stream)
    types = [e.type for e in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == expected_text()
    completed = events[-1]
    assert completed.type == "response.completed"
    assert completed.response.output_text == text
    assert completed.response.usage is not None
    usage = last_usage(target.daemon, 1)
    assert usage["output"] == completed.response.usage.output_tokens == 24
    assert usage["input"] == completed.response.usage.input_tokens
    assert usage["output_source"] == "reported"
    if target.kind == "chat":
        assert last_request(target.upstream)["body"]["stream_options"] == {"include_usage": True}


def test_stream_helper_final_response(target: Target) -> None:
    with target.client().responses.stream(model="agent", input="Hi", instructions="Be brief.") as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == expected_text() == final.output_text
    assert final.status == "completed"
    assert final.usage is not None and final.usage.output_tokens == 24


@pytest.mark.parametrize("streaming", [False, True])
def test_function_call_round_trip(target: Target, streaming: bool) -> None:
    client = target.client()
    kwargs: Any = {
        "model": "agent",
        "input": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [WEATHER_TOOL],
        "tool_choice": "required",
        "extra_body": {"mock": {"tokens": 2, "tool_call": "get_weather", "thinking": 2}},
    }
    if streaming:
        with client.responses.stream(**kwargs) as stream:
            arg_deltas = "".join(e.delta for e in stream if e.type == "response.function_call_arguments.delta")
            response = stream.get_final_response()
        assert arg_deltas == TOOL_ARGS
    else:
        response = client.responses.create(**kwargs)
    assert [item.type for item in response.output] == ["reasoning", "message", "function_call"]
    reasoning, message, call = response.output
    assert reasoning.type == "reasoning" and reasoning.content is not None
    assert reasoning.content[0].text == "step 1 step 2 "
    assert message.type == "message" and response.output_text == expected_text(2)
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == json.loads(TOOL_ARGS)
    assert call.call_id
    sent = last_request(target.upstream)["body"]
    if target.kind == "anthropic":
        assert sent["tools"] == [
            {"name": "get_weather", "description": "Weather in a city", "input_schema": WEATHER_TOOL["parameters"]}
        ]
        assert sent["tool_choice"] == {"type": "any"}
    else:
        assert sent["tools"] == [
            {
                "type": "function",
                "function": {k: WEATHER_TOOL[k] for k in ("name", "description", "parameters")},
            }
        ]
        assert sent["tool_choice"] == "required"
    usage = last_usage(target.daemon, 1)
    assert usage["output"] == (response.usage.output_tokens if response.usage else -1)

    # The agent's next turn: the whole conversation, the model's output items as they came, the tool's result.
    follow_up = client.responses.create(
        model="agent",
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            *[cast(Any, item.model_dump(exclude_none=True)) for item in response.output],
            {"type": "function_call_output", "call_id": call.call_id, "output": "18 C and sunny"},
        ],
        tools=[WEATHER_TOOL],
    )
    assert follow_up.output_text == expected_text()
    sent = last_request(target.upstream)["body"]
    if target.kind == "anthropic":
        assert sent["messages"][1:] == [
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": expected_text(2)},
                    {"type": "tool_use", "id": call.call_id, "name": "get_weather", "input": json.loads(TOOL_ARGS)},
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": call.call_id, "content": "18 C and sunny"}],
            },
        ]
    else:
        assert sent["messages"][1:] == [
            {
                "role": "assistant",
                "content": expected_text(2),
                "tool_calls": [
                    {
                        "id": call.call_id,
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": call.arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.call_id, "content": "18 C and sunny"},
        ]
    assert len(last_usage(target.daemon, 2)) > 0


def test_stateful_parameter_is_a_clear_400_unless_dropped(
    mock_factory: Callable[..., MockUpstream], daemon_factory: Callable[..., Daemon]
) -> None:
    upstream = mock_factory(delay_ms=1.0)
    strict = make_target("anthropic", upstream, daemon_factory)
    with pytest.raises(openai.BadRequestError) as info:
        strict.client().responses.create(model="agent", input="Hi", previous_response_id="resp_123")
    assert "previous_response_id" in str(info.value)
    assert isinstance(info.value.body, dict) and info.value.body.get("param") == "previous_response_id"
    assert upstream.stats()["requests"] == 0
    lenient = make_target("chat", upstream, daemon_factory, extra="drop_unsupported = true")
    response = lenient.client().responses.create(model="agent", input="Hi", previous_response_id="resp_123")
    assert response.output_text == expected_text()
    assert "previous_response_id" not in last_request(upstream)["body"]


def test_upstream_error_is_in_the_openai_shape(target: Target) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        target.client().responses.create(model="agent", input="Hi", extra_body={"mock": {"fail_status": 400}})
    assert "mock failure" in str(info.value)


def test_native_responses_still_pass_through(
    mock_factory: Callable[..., MockUpstream], daemon_factory: Callable[..., Daemon]
) -> None:
    upstream = mock_factory(delay_ms=1.0)
    d = daemon_factory(kinds_config("agent", (upstream, "openai")))
    response = openai_client(d).responses.create(model="agent", input="Hi")
    assert response.output_text == expected_text()
    assert last_request(upstream)["path"] == "/v1/responses"


def test_api_setting_is_validated() -> None:
    def errors(**extra: object) -> list[str]:
        deployment = {"base_url": "http://127.0.0.1:9/v1", "model": "m", **extra}
        with pytest.raises(ConfigError) as info:
            parse_config({"routes": {"a": {"deployments": [deployment]}}}, env={})
        return info.value.errors

    assert errors(api="responses") == [
        "routes.a.deployments[0].api: must be \"chat\" (a server with chat completions only), got 'responses'"
    ]
    assert errors(api="chat", kind="anthropic") == [
        "routes.a.deployments[0].api: only applies to kind = \"openai\" deployments, not 'anthropic'"
    ]
    assert errors(api=1) == ["routes.a.deployments[0].api: expected a string, got int 1"]
    config = parse_config(
        {"routes": {"a": {"deployments": [{"base_url": "http://h/v1", "model": "m", "api": "chat"}]}}}
    )
    assert config.routes["a"].deployments[0].api == "chat"
