"""ns per Pool.pick() + Pool.release() from Python, per strategy and pool size.

    python benches/bench_balance.py [--n 200000]
"""

from __future__ import annotations

import argparse
import time

from tokenrelay._core import Pool

STRATEGIES = ("p2c", "least_outstanding", "round_robin", "weighted", "latency", "fastest", "priority")
SIZES = (2, 8, 16)


def pool_of(size: int, strategy: str) -> Pool:
    deployments: list[dict[str, object]] = [
        {"name": f"d{i}", "weight": 1 + i % 3, "tier": 1 + i % 2, "rpm": 10**9, "max_concurrent": 10**6}
        for i in range(size)
    ]
    pool = Pool(deployments, strategy)
    for i in range(size):  # every deployment has samples, so no strategy is stuck exploring
        pool.pick([j for j in range(size) if j != i])
        pool.first_token(i, 0.1 + i / 100)
        pool.release(i, "success", 100, 200, 1.0 + i / 10)
    return pool


def ns_per_round_trip(pool: Pool, n: int, exclude: list[int] | None) -> float:
    pick, release = pool.pick, pool.release
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter_ns()
        for _ in range(n):
            release(pick(exclude), "success")
        best = min(best, (time.perf_counter_ns() - start) / n)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=200_000, help="round trips per measurement")
    args = parser.parse_args()
    noop = Pool([{"name": "x"}])
    length = noop.__len__
    start = time.perf_counter_ns()
    for _ in range(args.n):
        length()
    print(f"baseline: a no-op method call costs {(time.perf_counter_ns() - start) / args.n:.0f} ns\n")
    print(f"{'strategy':<18}" + "".join(f"{f'{s} deps':>10}{f'{s} excl':>10}" for s in SIZES))
    for strategy in STRATEGIES:
        row = f"{strategy:<18}"
        for size in SIZES:
            pool = pool_of(size, strategy)
            row += f"{ns_per_round_trip(pool, args.n, None):>10.0f}{ns_per_round_trip(pool, args.n, [0]):>10.0f}"
        print(row)
    print("\nns per pick() + release(\"success\") pair; 'excl' passes exclude=[0]; best of 5 runs")


if __name__ == "__main__":
    main()
