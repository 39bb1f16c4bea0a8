"""StreamMeter and decode_body against recorded-style provider streams (tests/fixtures/)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenrelay._core import StreamMeter, Usage, decode_body

FIXTURES = Path(__file__).parent / "fixtures"
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

R, E = "reported", "estimated"

# fixture -> (api, reported figures, finish_reason, done, error type)
STREAMS: dict[str, tuple[str, dict[str, int | str], str | None, bool, str | None]] = {
    "openai_chat_stream.sse": (
        "chat",
        {"input": 24, "output": 8, "cached_input": 0, "reasoning": 0, "input_source": R, "output_source": R},
        "stop",
        True,
        None,
    ),
    "openai_chat_tools.sse": (
        "chat",
        {"input": 2100, "output": 52, "cached_input": 1920, "cache_write": 0, "cached_input_source": R},
        "tool_calls",
        True,
        None,
    ),
    "openai_chat_reasoning_deepseek.sse": (
        "chat",
        {"input": 13, "output": 96, "reasoning": 84, "reasoning_source": R},
        "stop",
        True,
        None,
    ),
    "openai_chat_usage_every_chunk.sse": (
        "chat",
        {"input": 31, "output": 10, "output_source": R},
        "length",
        True,
        None,
    ),
    "openai_chat_error_midstream.sse": (
        "chat",
        {"input_source": E, "output_source": E},
        None,
        False,
        "server_error",
    ),
    "openai_completions.sse": (
        "completions",
        {"input": 5, "output": 7, "output_source": R},
        "stop",
        True,
        None,
    ),
    "responses_stream.sse": (
        "responses",
        {"input": 36, "output": 187, "reasoning": 128, "cached_input": 0, "output_source": R},
        "completed",
        True,
        None,
    ),
    "responses_function_call.sse": (
        "responses",
        {"input": 291, "output": 23, "cached_input": 256, "cached_input_source": R},
        "completed",
        True,
        None,
    ),
    "responses_failed.sse": ("responses", {"output_source": E}, "failed", True, "server_error"),
    # Anthropic: input = input_tokens + cache reads + cache writes.
    "anthropic_stream.sse": (
        "messages",
        {"input": 21 + 3012 + 188, "cached_input": 3012, "cache_write": 188, "output": 12},
        "end_turn",
        True,
        None,
    ),
    "anthropic_tool_use.sse": ("messages", {"input": 472, "output": 89}, "tool_use", True, None),
    "anthropic_thinking.sse": (
        "messages",
        {"input": 85, "output": 117, "output_source": R, "reasoning_source": E},
        "end_turn",
        True,
        None,
    ),
    "anthropic_error.sse": (
        "messages",
        {"input": 40, "input_source": R, "output_source": E},
        None,
        False,
        "overloaded_error",
    ),
}


def load(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def run(api: str, chunks: list[bytes], strip: bool = False) -> tuple[StreamMeter, bytes, Usage]:
    """Feed `chunks` like the relay would; return the meter, the bytes forwarded and the usage."""
    m = StreamMeter(api, strip_usage=strip)
    out = bytearray()
    for c in chunks:
        r = m.feed(c)
        out += c if r is None else r
    out += m.flush()
    return m, bytes(out), m.finish()


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    parts, prev = [], 0
    for p in points:
        parts.append(data[prev:p])
        prev = p
    parts.append(data[prev:])
    return parts


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_fixture_usage(name: str) -> None:
    api, expected, finish_reason, done, error = STREAMS[name]
    m, out, usage = run(api, [load(name)])
    got = usage.to_dict()
    assert {k: got[k] for k in expected} == expected
    assert out == load(name)
    assert m.finish_reason == finish_reason
    assert m.done is done
    assert (m.error or {}).get("type") == error
    assert m.malformed == 0
    assert m.content_started
    assert m.events == load(name).count(b"data:")
    if usage.output_source == E:
        assert usage.output > 0 and m.estimate_bytes > 0


def test_error_dict_and_estimates() -> None:
    m, _, usage = run("chat", [load("openai_chat_error_midstream.sse")])
    assert m.error == {
        "type": "server_error",
        "message": "The server had an error while processing your request. Sorry about that!",
    }
    assert m.estimate_bytes == len("Once upon a")
    body = b'{"model":"gpt-4o","messages":[{"role":"user","content":"Tell me a story about a dragon."}]}'
    with_body = m.finish(body)
    assert usage.input == 0
    assert with_body.input > 0 and with_body.input_source == E
    assert with_body.output == usage.output


def test_reported_usage_needs_no_counting() -> None:
    m, _, _ = run("chat", [load("openai_chat_stream.sse")])
    assert m.estimate_bytes == 0


def test_anthropic_thinking_estimate_excludes_signature() -> None:
    m, _, usage = run("messages", [load("anthropic_thinking.sse")])
    thinking = (
        "I need to find the GCD of 1071 and 462 using the Euclidean algorithm.\n\n"
        "1071 = 2 \u00d7 462 + 147\n462 = 3 \u00d7 147 + 21\n147 = 7 \u00d7 21 + 0"
    )
    # Output is reported; only the reasoning text (not the signature) would be counted.
    assert m.estimate_bytes == len(thinking.encode())
    assert 0 < usage.reasoning <= usage.output


@pytest.mark.parametrize(
    ("name", "api", "expected"),
    [
        ("openai_chat.json", "chat", {"input": 1117, "output": 46, "cached_input": 1024, "reasoning": 0}),
        ("openai_completion.json", "completions", {"input": 5, "output": 7}),
        ("responses.json", "responses", {"input": 36, "output": 187, "reasoning": 128}),
        (
            "anthropic_message.json",
            "messages",
            {"input": 2095 + 2051, "cache_write": 2051, "cached_input": 0, "output": 503, "output_source": R},
        ),
        ("openai_embeddings.json", "embeddings", {"input": 8, "output": 0, "output_source": R}),
    ],
)
def test_decode_body(name: str, api: str, expected: dict[str, int | str]) -> None:
    got = decode_body(api, load(name)).to_dict()
    assert {k: got[k] for k in expected} == expected


def test_decode_body_bad_json_is_estimated() -> None:
    u = decode_body("chat", b"<html>502 Bad Gateway</html>", request_body=b'{"messages":[]}')
    assert (u.output, u.output_source, u.input_source) == (0, E, E)
    assert u.input > 0


def test_unknown_api_is_value_error() -> None:
    with pytest.raises(ValueError, match="unknown api"):
        StreamMeter("gemini")
    with pytest.raises(ValueError):
        StreamMeter("embeddings")
    with pytest.raises(ValueError):
        decode_body("nope", b"{}")


def test_usage_is_frozen_and_comparable() -> None:
    a = decode_body("chat", load("openai_chat.json"))
    b = decode_body("chat", load("openai_chat.json"))
    assert a == b
    with pytest.raises(AttributeError):
        a.input = 3  # type: ignore[misc]
    assert "input=1117 (reported)" in repr(a)


def test_first_token_time_uses_monotonic_clock() -> None:
    data = load("openai_chat_stream.sse")
    events = [e + b"\n\n" for e in data.split(b"\n\n") if e]
    m = StreamMeter("chat")
    m.feed(events[0])  # role chunk with empty content: not yet content
    assert not m.content_started and m.first_token_ns is None
    before = time.monotonic_ns()
    m.feed(events[1])
    after = time.monotonic_ns()
    assert m.content_started
    assert m.first_token_ns is not None and before <= m.first_token_ns <= after


def test_malformed_and_unknown_events_are_counted_and_forwarded() -> None:
    stream = (
        b"data: {broken\n\n"
        b'event: surprise\ndata: {"type":"surprise"}\n\n'
        b'event: ping\ndata: {"type":"ping"}\n\n'
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    m, out, _ = run("messages", [stream])
    assert out == stream
    assert (m.events, m.malformed, m.done) == (4, 2, True)


def test_oversized_event_is_reported_not_buffered() -> None:
    big = b"data: " + b"x" * (17 * 1024 * 1024)
    m = StreamMeter("chat")
    assert m.feed(big) is None
    assert m.oversized == 1 and m.malformed == 1
    m.feed(b'\n\ndata: {"choices":[{"delta":{"content":"ok"}}]}\n\ndata: [DONE]\n\n')
    assert m.done and m.content_started


def test_oversized_strip_mode_forwards_instead_of_holding() -> None:
    big = b"data: " + b"x" * (17 * 1024 * 1024)
    m = StreamMeter("chat", strip_usage=True)
    out = m.feed(big)
    assert out is not None and out == big


# ---------------------------------------------------------------- strip_usage

USAGE_ONLY = {"openai_chat_stream.sse": "chat", "openai_completions.sse": "completions"}


def without_usage_only_event(data: bytes) -> bytes:
    events = data.split(b"\n\n")
    kept = [e for e in events if not (b'"choices":[]' in e and b'"usage":{' in e)]
    assert len(kept) == len(events) - 1
    return b"\n\n".join(kept)


@pytest.mark.parametrize("name", sorted(USAGE_ONLY))
def test_strip_usage_removes_exactly_the_usage_only_event(name: str) -> None:
    data = load(name)
    _, out, usage = run(USAGE_ONLY[name], [data], strip=True)
    assert out == without_usage_only_event(data)
    assert usage.output_source == R  # still metered


def test_strip_usage_fast_path_per_event() -> None:
    data = load("openai_chat_stream.sse")
    events = [e + b"\n\n" for e in data.split(b"\n\n") if e]
    m = StreamMeter("chat", strip_usage=True)
    results = [m.feed(e) for e in events]
    stripped = [i for i, r in enumerate(results) if r is not None]
    assert stripped == [len(events) - 2]  # only the usage-only chunk, just before [DONE]
    assert results[-2] == b""
    assert m.flush() == b""


@pytest.mark.parametrize(
    ("name", "api"),
    [
        ("openai_chat_usage_every_chunk.sse", "chat"),
        ("openai_chat_reasoning_deepseek.sse", "chat"),
        ("openai_chat_tools.sse", "chat"),
        ("anthropic_stream.sse", "messages"),
        ("responses_stream.sse", "responses"),
    ],
)
def test_strip_usage_leaves_other_streams_alone(name: str, api: str) -> None:
    # Usage on chunks that still have choices is not an injected usage-only chunk; other APIs ignore the flag.
    data = load(name)
    if name == "openai_chat_tools.sse":
        data = without_usage_only_event(data)
    _, out, _ = run(api, [data], strip=True)
    assert out == data


def test_strip_holds_incomplete_tail_until_complete() -> None:
    data = load("openai_chat_stream.sse")
    m = StreamMeter("chat", strip_usage=True)
    first = m.feed(data[:50])
    assert first == b""  # incomplete first event held back
    rest = m.feed(data[50:])
    assert rest is not None and (first + rest + m.flush()) == without_usage_only_event(data)


# ---------------------------------------------------------------- properties


@SETTINGS
@given(
    name=st.sampled_from(sorted(STREAMS)),
    cuts=st.lists(st.integers(min_value=0, max_value=8000), max_size=30),
    strip=st.booleans(),
)
def test_rechunking_gives_same_usage_and_bytes(name: str, cuts: list[int], strip: bool) -> None:
    api = STREAMS[name][0]
    data = load(name)
    m1, out1, u1 = run(api, [data], strip)
    m2, out2, u2 = run(api, split_at(data, cuts), strip)
    assert out2 == out1
    assert u2 == u1
    assert (m2.events, m2.malformed, m2.done, m2.finish_reason, m2.error) == (
        m1.events,
        m1.malformed,
        m1.done,
        m1.finish_reason,
        m1.error,
    )


@SETTINGS
@given(name=st.sampled_from(sorted(USAGE_ONLY)))
def test_byte_at_a_time_strip(name: str) -> None:
    data = load(name)
    _, out, _ = run(USAGE_ONLY[name], [data[i : i + 1] for i in range(len(data))], strip=True)
    assert out == without_usage_only_event(data)


@SETTINGS
@given(
    api=st.sampled_from(["chat", "completions", "responses", "messages"]),
    chunks=st.lists(st.binary(max_size=300), max_size=20),
    strip=st.booleans(),
)
def test_random_bytes_never_crash(api: str, chunks: list[bytes], strip: bool) -> None:
    m, out, usage = run(api, chunks, strip)
    if not strip:
        assert out == b"".join(chunks)
    assert usage.output >= 0 and m.events >= 0


@SETTINGS
@given(
    api=st.sampled_from(["chat", "completions", "responses", "messages"]),
    lines=st.lists(
        st.sampled_from(
            [
                b"data: {}",
                b'data: {"choices":[],"usage":{"prompt_tokens":1}}',
                b'data: {"type":"message_delta","usage":{"output_tokens":"x"}}',
                b'data: {"choices":[{"delta":{"content":7}}]}',
                b"data: [DONE]",
                b": c",
                b"event: error",
                b"data: null",
                b"",
                b"\r",
            ]
        ),
        max_size=30,
    ),
)
def test_sse_shaped_garbage_never_crashes(api: str, lines: list[bytes]) -> None:
    data = b"\n".join(lines)
    _, out, _ = run(api, [data], strip=True)
    assert len(out) <= len(data)
