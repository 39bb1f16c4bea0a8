"""Throughput of stream translation (StreamMeter with translate_to) against plain metering of the same stream.

Builds long streams from the recorded fixtures (content events repeated), feeds them in realistic reads, and
reports MB/s and ns per event for each direction. Run after `maturin develop --release`:

    python benches/bench_translate.py [--events 100000] [--read 16384]
"""

from __future__ import annotations

import argparse
import time

from bench_stream import build
from tokenrelay._core import StreamMeter

# name -> (upstream api, client api, fixture, marker of the events to repeat)
CASES = {
    "chat->messages text": ("chat", "messages", "openai_chat_stream.sse", b'"content":"'),
    "chat->messages tools": ("chat", "messages", "openai_chat_tools.sse", b'"arguments":"'),
    "messages->chat text": ("messages", "chat", "anthropic_stream.sse", b"text_delta"),
    "messages->chat tools": ("messages", "chat", "anthropic_tool_use.sse", b"input_json_delta"),
}


def run(upstream: str, client: str | None, data: bytes, read: int) -> float:
    meter = StreamMeter(upstream, "", False, client)
    feed = meter.feed
    start = time.perf_counter()
    for i in range(0, len(data), read):
        feed(data[i : i + read])
    meter.flush()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--read", type=int, default=16384)
    args = parser.parse_args()
    print(f"{'case':24} {'plain MB/s':>11} {'translated MB/s':>16} {'ns/event':>9}")
    for name, (upstream, client, fixture, marker) in CASES.items():
        data, events = build(fixture, marker, args.events)
        plain = min(run(upstream, None, data, args.read) for _ in range(3))
        translated = min(run(upstream, client, data, args.read) for _ in range(3))
        mb = len(data) / 1e6
        print(f"{name:24} {mb / plain:11.0f} {mb / translated:16.0f} {translated / events * 1e9:9.0f}")


if __name__ == "__main__":
    main()
