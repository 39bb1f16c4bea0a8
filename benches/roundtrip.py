"""The machine's own cost of a first byte across cores: a bare uvloop client sends one streaming request at a time
to the mock and times the first `data_received`. Run it pinned to the proxy's core and to the rig's, e.g.

    taskset -c 0 benches/rig/target/release/fastmock --port 23101 &
    taskset -c 1 python benches/roundtrip.py --port 23101   # across cores, as a proxy on core 1 talks to the mock
    taskset -c 0 python benches/roundtrip.py --port 23101   # on the mock's core, as `direct` does

What a proxy adds to a first token beyond its own work is the difference between the two, per crossing.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import time

import uvloop

BODY = b'{"model":"mock-gpt","stream":true,"messages":[{"role":"user","content":"say something"}]}'
REQUEST = b"POST /v1/chat/completions HTTP/1.1\r\nhost: mock\r\ncontent-type: application/json\r\n"
REQUEST += b"content-length: %d\r\n\r\n%s" % (len(BODY), BODY)


class _Client(asyncio.Protocol):
    def __init__(self) -> None:
        self.first: asyncio.Future[int] | None = None
        self.sent = 0

    def data_received(self, data: bytes) -> None:
        if self.first is not None and not self.first.done():
            self.first.set_result(time.perf_counter_ns() - self.sent)


async def measure(port: int, requests: int, gap_s: float) -> list[float]:
    loop = asyncio.get_running_loop()
    times = []
    for _ in range(requests):
        transport, client = await loop.create_connection(_Client, "127.0.0.1", port)
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.sleep(gap_s)  # the core goes idle between requests, as a lightly loaded proxy's does
        client.first = loop.create_future()
        client.sent = time.perf_counter_ns()
        transport.write(REQUEST)
        times.append(await client.first / 1000)
        transport.close()
    return sorted(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=23101)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--gap-ms", type=float, default=5.0)
    args = parser.parse_args()
    times = uvloop.run(measure(args.port, args.requests, args.gap_ms / 1000))
    n = len(times)
    print(f"write -> first byte: p50 {times[n // 2]:.0f} us, p90 {times[n * 9 // 10]:.0f} us ({n} requests)")


if __name__ == "__main__":
    main()
