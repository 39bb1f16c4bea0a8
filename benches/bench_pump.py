"""CPU per upstream read on the relay's streaming path: `Pump` (the read goes from the event loop to Rust) against
the same path in Python (`Response._push`, what every read went through before, and still does for a compressed
stream), in one run on the same reads.

Each read is one chat chunk event in chunked framing (~200 bytes, as a paced provider sends them), fed to the
connection's protocol as the event loop would: `_Conn.data_received` -> `push` for Python, `Pump.data_received`
for Rust. The client transport is a stand-in whose `write` and `get_write_buffer_size` are C callables, so the
figure is the relay's own work per read (metering included), not the socket's. Minimum of `--repeat` runs.

    python benches/bench_pump.py [--reads 200000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from tokenrelay._core import Pump, StreamMeter
from tokenrelay.h1client import Client, Response, _Conn

EVENT = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"tok "}}]}\n\n'
READ = b"%x\r\n%b\r\n" % (len(EVENT), EVENT)


class _Sink:
    """A client transport whose methods cost next to nothing (C callables)."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.write = self.out.append
        self.get_write_buffer_size = int  # int() == 0: never past the high-water mark


def setup(loop: asyncio.AbstractEventLoop) -> tuple[_Conn, Response, StreamMeter, _Sink]:
    client = Client(loop)
    conn = _Conn(client, (False, "127.0.0.1", 1))
    response = Response(client, conn)
    conn.response = response
    meter = StreamMeter("chat", "gpt-4o")
    meter.frame("chunked")
    meter.client_chunked = True
    return conn, response, meter, _Sink()


def unexpected(kind: int, arg: Any) -> None:
    raise AssertionError(f"the stream ended or broke: {kind} {arg!r}")


def run(loop: asyncio.AbstractEventLoop, reads: int, rust: bool) -> float:
    """ns per read."""
    conn, response, meter, sink = setup(loop)
    if rust:
        receive = Pump(meter, response, loop.time, sink.write, sink.get_write_buffer_size, 1 << 16, conn, unexpected)
        feed = receive.data_received
    else:
        response.sink = response._push(meter, sink, 1 << 16, unexpected)  # type: ignore[arg-type]
        feed = conn.data_received
    data = READ
    t = time.perf_counter_ns()
    for _ in range(reads):
        feed(data)
    elapsed = time.perf_counter_ns() - t
    assert len(sink.out) == reads and sink.out[-1] is data  # relayed as it came, no copy
    assert meter.events == reads
    return elapsed / reads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reads", type=int, default=200_000)
    p.add_argument("--repeat", type=int, default=7)
    args = p.parse_args()
    loop = asyncio.new_event_loop()
    best = {"python": float("inf"), "rust": float("inf")}
    for _ in range(args.repeat):
        for name in best:  # alternated, so a slow spell of the machine hits both
            best[name] = min(best[name], run(loop, args.reads, name == "rust"))
    py, rs = best["python"], best["rust"]
    print(f"read of {len(READ)} bytes, {args.reads} reads, min of {args.repeat}")
    print(f"  python push (_Conn.data_received -> push): {py:7.0f} ns per read")
    print(f"  Pump.data_received (Rust):                 {rs:7.0f} ns per read   ({py / rs:.2f}x less)")
    loop.close()


if __name__ == "__main__":
    main()
