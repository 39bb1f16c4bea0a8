"""Throughput of StreamMeter (SSE split + usage/delta extraction) per API format.

Builds a long stream per format from the recorded fixtures (the content events repeated), feeds it in
realistic reads, and reports MB/s and ns per event. `--wire` also measures what the relay does since it has its
own upstream client: `feed_wire` on the same reads as chunked framing (one chunk per event, the framing decoded
in Rust and whole chunks passed through), against `feed` on the bare payload in the same run. Run after
`maturin develop --release`:

    python benches/bench_stream.py [--events 200000] [--wire]
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


def bench(api: str, chunks: list[bytes], strip: bool, repeat: int, wire: bool = False) -> float:
    """Best time to meter `chunks`; `wire`: they are chunked wire reads, fed to `feed_wire`."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        m = StreamMeter(api, strip_usage=strip)
        if wire:
            m.frame("chunked")
            m.client_chunked = True
            feed = m.feed_wire
        else:
            feed = m.feed
        for c in chunks:
            feed(c)
        m.flush()
        m.finish()
        best = min(best, time.perf_counter_ns() - t0)
    return best


def chunked(reads: list[bytes]) -> list[bytes]:
    """Each read as one chunk of chunked framing, as an upstream writes one event per chunk."""
    return [b"%x\r\n%b\r\n" % (len(r), r) for r in reads]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--wire", action="store_true", help="feed_wire on chunked reads vs feed, per event")
    args = ap.parse_args()
    if args.wire:
        print(f"{'format':<12} {'feed ns/event':>14} {'feed_wire ns/event':>19} {'ratio':>6}")
        for name, (api, fixture, marker) in FORMATS.items():
            data, n = build(fixture, marker, args.events)
            payload = reads(data, 0)
            plain = bench(api, payload, False, args.repeat)
            framed = bench(api, chunked(payload), False, args.repeat, wire=True)
            print(f"{name:<12} {plain / n:>14.0f} {framed / n:>19.0f} {framed / plain:>6.2f}")
        return
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
