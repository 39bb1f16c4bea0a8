"""Hedged requests against a slow tail: p50/p99 time to first token with and without `hedge_after_ms`.

Two mock deployments behind one route; one of them gives every Nth answer a slow first token (a slow tail).
The same sequence of streaming requests runs through two daemons in the same run: one route without hedging,
one with it. Usage: `python benches/bench_hedge.py [--requests 200] [--tail-ms 1500] [--hedge-ms 150]`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import route_config, start_daemon, start_mock


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def ttfts(base_url: str, n: int, concurrency: int) -> list[float]:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0)
    out: list[float] = []
    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with sem:
            start = time.perf_counter()
            stream = await client.chat.completions.create(
                model="r", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            first = None
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - start
            assert first is not None
            out.append(first)

    await asyncio.gather(*(one() for _ in range(n)))
    await client.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--tail-every", type=int, default=10, help="every Nth answer of the slow deployment")
    parser.add_argument("--tail-ms", type=float, default=1500.0)
    parser.add_argument("--hedge-ms", type=float, default=150.0)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tokenrelay-hedge-"))
    tail = start_mock(delay_ms=2, tokens=8, slow_tail_every=args.tail_every, slow_tail_ms=args.tail_ms)
    steady = start_mock(delay_ms=2, tokens=8)
    import os

    os.environ["TEST_UPSTREAM_KEY"] = "sk-bench"
    plain = start_daemon(tmp, route_config("r", tail, steady, extra='strategy = "round_robin"'), name="plain")
    hedged = start_daemon(
        tmp,
        route_config("r", tail, steady, extra=f'strategy = "round_robin"\nhedge_after_ms = {args.hedge_ms}'),
        name="hedged",
    )
    try:
        results = {}
        for name, daemon in (("no hedging", plain), (f"hedge after {args.hedge_ms:g} ms", hedged)):
            values = asyncio.run(ttfts(daemon.base_url, args.requests, args.concurrency))
            results[name] = values
    finally:
        for d in (plain, hedged):
            d.stop()
        tail.stop()
        steady.stop()
    print(
        f"{args.requests} streams, {args.concurrency} at a time; one of two deployments delays every "
        f"{args.tail_every}th first token by {args.tail_ms:g} ms\n"
    )
    print("| route | TTFT p50 | TTFT p90 | TTFT p99 | max |")
    print("|---|---:|---:|---:|---:|")
    for name, values in results.items():
        ms = [v * 1000 for v in values]
        print(
            f"| {name} | {statistics.median(ms):.1f} ms | {quantile(ms, 0.9):.1f} ms | "
            f"{quantile(ms, 0.99):.1f} ms | {max(ms):.1f} ms |"
        )
    base, hedge = (quantile(v, 0.99) for v in results.values())
    print(f"\np99 ratio hedged / not hedged: {hedge / base:.2f}")


if __name__ == "__main__":
    main()
