"""Throughput of StreamMeter (SSE split + usage/delta extraction) per API format.

Builds a long stream per format from the recorded fixtures (the content events repeated), feeds it in
realistic reads, and reports MB/s and ns per event. Run after `maturin develop --release`:

    python benches/bench_stream.py [--events 200000] [--read 16384]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tokenrelay._core import StreamMeter

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"

# format -> (api, fixture, marker of the events to repeat)
FORMATS = {
    "chat": ("chat", "openai_chat_stream.sse", b'"content":"'),
    "chat_tools": ("chat", "openai_chat_tools.sse", b'"arguments":"'),
    "completions": ("completions", "openai_completions.sse", b'"text":"'),
    "responses": ("responses", "responses_stream.sse", b"response.output_text.delta"),
    "messages": ("messages", "anthropic_stream.sse", b"text_delta"),
}


def build(fixture: str, marker: bytes, n_events: int) -> tuple[bytes, int]:
    """The fixture with its content events repeated up to about `n_events` events in all."""
    events = [e + b"\n\n" for e in (FIXTURES / fixture).read_bytes().split(b"\n\n") if e.strip()]
    body = [e for e in events if marker in e]
    first = events.index(body[0])
    head, tail = events[:first], events[first + len(body) :]
    reps = max(1, (n_events - len(head) - len(tail)) // len(body))
    out = b"".join(head) + b"".join(body) * reps + b"".join(tail)
    return out, len(head) + len(tail) + reps * len(body)


def reads(data: bytes, size: int) -> list[bytes]:
    if size <= 0:  # one read per event: the common case for a token stream
        return [e + b"\n\n" for e in data.split(b"\n\n") if e]
    return [data[i : i + size] for i in range(0, len(data), size)]


def bench(api: str, chunks: list[bytes], strip: bool, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        m = StreamMeter(api, strip_usage=strip)
        for c in chunks:
            m.feed(c)
        m.flush()
        m.finish()
        best = min(best, time.perf_counter_ns() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"{'format':<12} {'reads':<12} {'strip':<6} {'events':>8} {'MB':>7} {'MB/s':>8} {'ns/event':>9}")
    for name, (api, fixture, marker) in FORMATS.items():
        data, n = build(fixture, marker, args.events)
        for read_size, label in ((0, "per-event"), (16384, "16KiB")):
            chunks = reads(data, read_size)
            for strip in (False, True) if api in ("chat", "completions") else (False,):
                ns = bench(api, chunks, strip, args.repeat)
                mb = len(data) / 1e6
                rate = mb / (ns / 1e9)
                print(f"{name:<12} {label:<12} {strip!s:<6} {n:>8} {mb:>7.1f} {rate:>8.0f} {ns / n:>9.0f}")


if __name__ == "__main__":
    main()
