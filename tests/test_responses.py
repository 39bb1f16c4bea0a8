"""OpenAI Responses API passthrough: the openai SDK's `responses.create`, streaming and not, metered from
`response.completed`."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.conftest import Daemon, MockUpstream
from tests.test_translate import expected_text, kinds_config, last_request, last_usage, openai_client


@pytest.fixture
def upstream(mock_factory: Callable[..., MockUpstream]) -> MockUpstream:
    return mock_factory(delay_ms=1.0, reasoning_tokens=5, cached_tokens=2)


@pytest.fixture
def relay(upstream: MockUpstream, daemon_factory: Callable[..., Daemon]) -> Daemon:
    return daemon_factory(kinds_config("agent", (upstream, "openai")))


def test_responses_create(relay: Daemon, upstream: MockUpstream) -> None:
    response = openai_client(relay).responses.create(model="agent", input="Say something about foxes.")
    assert response.output_text == expected_text()
    assert response.usage is not None and response.usage.output_tokens == 24 + 5
    seen = last_request(upstream)
    assert seen["path"] == "/v1/responses" and seen["body"]["model"] == "upstream-openai"
    usage = last_usage(relay, 1)
    assert (usage["input"], usage["output"]) == (response.usage.input_tokens, 29)
    assert (usage["reasoning"], usage["cached_input"]) == (5, 2)


def test_responses_stream(relay: Daemon) -> None:
    stream = openai_client(relay).responses.create(model="agent", input="Hi", instructions="Be brief.", stream=True)
    text = ""
    completed = None
    for event in stream:
        if event.type == "response.output_text.delta":
            text += event.delta
        elif event.type == "response.completed":
            completed = event.response
    assert text == expected_text()
    assert completed is not None and completed.usage is not None
    usage = last_usage(relay, 1)
    assert usage["output"] == completed.usage.output_tokens == 29
    assert usage["output_source"] == "reported" and usage["reasoning"] == 5
