"""How long a server takes to accept a burst of connections: opens N connections at once, asks `GET /healthz` on
the last one and times the answer (it comes once the server's loop has worked through the accepts). A developer's
probe for the connection burst at the start of each paced measurement (benches/README.md). Use against a running
daemon (or anything answering that path):

    python benches/accept_burst.py --port 4141 --connections 256 --rounds 4
"""

from __future__ import annotations

import argparse
import asyncio
import time


async def burst(host: str, port: int, n: int, path: str) -> float:
    started = time.perf_counter()
    conns = await asyncio.gather(*(asyncio.open_connection(host, port) for _ in range(n)))
    reader, writer = conns[-1]
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    await writer.drain()
    await reader.readuntil(b"\r\n\r\n")
    elapsed = time.perf_counter() - started
    for _, w in conns:
        w.close()
    return elapsed


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--connections", type=int, default=256)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--path", default="/healthz")
    args = p.parse_args()
    for _ in range(args.rounds):
        elapsed = await burst(args.host, args.port, args.connections, args.path)
        print(f"{args.connections} connections + 1 answer: {elapsed * 1000:.1f} ms", flush=True)
        await asyncio.sleep(0.5)


if __name__ == "__main__":
    asyncio.run(main())
