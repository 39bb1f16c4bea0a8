"""A few seconds of fuzzing in the normal suite: hypothesis drives the Rust SSE parser and event decoders through
the Python API with hostile bytes split at random points. The long runs are `make fuzz` (cargo-fuzz, see
fuzz/README.md); HYPOTHESIS_PROFILE=slow makes these run 2000 examples each."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from tokenrelay._core import StreamMeter, decode_body

# A few seconds in the default ("fast") profile; the slow profile's count when it is larger.
SMOKE = settings(max_examples=max(settings().max_examples, 400))
APIS = ("chat", "completions", "responses", "messages")

# Pieces a hostile or broken stream is made of: SSE syntax, JSON fragments of each API's events, bad bytes.
PIECES = st.sampled_from(
    [
        b"data: ",
        b"data:",
        b"event: ",
        b"id: 1",
        b"retry: 10",
        b": comment",
        b"\n",
        b"\r\n",
        b"\r",
        b"\n\n",
        b"\xef\xbb\xbf",
        b"[DONE]",
        b"\xff\xfe",
        b"\xc3(",
        b"\x00",
        b'{"choices":[{"index":0,"delta":{"content":"hi"}}]}',
        b'{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}',
        b'{"choices":[{"text":"x","finish_reason":"stop"}]}',
        b'{"type":"message_start","message":{"usage":{"input_tokens":5}}}',
        b'{"type":"content_block_delta","delta":{"type":"text_delta","text":"yo"}}',
        b'{"type":"message_delta","usage":{"output_tokens":7}}',
        b"message_stop",
        b'{"type":"response.output_text.delta","delta":"z"}',
        b'{"type":"response.completed","response":{"usage":{"input_tokens":1,"output_tokens":2}}}',
        b'{"error":{"message":"boom","type":"server_error"}}',
        b'{"usage":{"prompt_tokens":-1,"completion_tokens":1e400}}',
        b'{"choices":[{"delta":{"content":"\\ud800"}}]}',
        b"{",
        b"}",
        b'"',
        b"x" * 300,
    ]
)
STREAMS = st.one_of(st.binary(max_size=2048), st.lists(PIECES, max_size=60).map(b"".join))


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@SMOKE
@given(STREAMS, st.lists(st.integers(0, 1 << 16), max_size=12), st.sampled_from(APIS), st.booleans())
def test_stream_meter_survives_anything(data: bytes, cuts: list[int], api: str, strip: bool) -> None:
    meter = StreamMeter(api, "gpt-4o", strip)
    out = b""
    for chunk in split(data, cuts):
        forwarded = meter.feed(chunk)
        out += chunk if forwarded is None else forwarded
    out += meter.flush()
    usage = meter.finish(b'{"messages":[{"role":"user","content":"hi"}]}')
    assert usage.input >= 0 and usage.output >= 0
    if strip and api in ("chat", "completions"):
        assert len(out) <= len(data)  # whole usage events removed, nothing invented
    else:
        assert out == data  # relayed byte for byte


@SMOKE
@given(STREAMS, st.lists(st.integers(0, 1 << 16), max_size=12), st.sampled_from(APIS))
def test_metering_does_not_depend_on_how_reads_are_split(data: bytes, cuts: list[int], api: str) -> None:
    def meter_of(chunks: list[bytes]) -> tuple[object, ...]:
        meter = StreamMeter(api, "gpt-4o")
        for chunk in chunks:
            meter.feed(chunk)
        meter.flush()
        usage = meter.finish(None)
        return (meter.events, meter.done, meter.content_started, meter.error, usage.to_dict())

    assert meter_of([data]) == meter_of(split(data, cuts))


@SMOKE
@given(st.one_of(st.binary(max_size=2048), st.lists(PIECES, max_size=40).map(b"".join)), st.sampled_from(APIS))
def test_decode_body_survives_anything(body: bytes, api: str) -> None:
    usage = decode_body(api, body, "gpt-4o", body)
    assert usage.input >= 0 and usage.output >= 0
