"""How steady this machine's CPUs are: a fixed piece of work repeated on each core, timed per 50 ms window.

On a shared virtual machine the host takes the cores away now and then: for ~100-150 ms a core runs the same
work several times slower, with no steal time reported and nothing else running in the guest. A stream that is
relayed during such a window is late by that much, whatever the proxy; at 256 streams ~1-4 % of the requests of
a measurement fall in one, which is a p99. The benchmark runs this before its rounds and prints the figures with
the results, so that a p99 can be read against the machine it came from.

    python benches/noise.py [--seconds 5] [--cores 0,1]

Prints one JSON object: per core, the share of 50 ms windows whose work ran ≥ 1.5x slower than the median and the
slowest window's factor; and the share of windows slow on every core at once (the host, not a neighbour process).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

WINDOW_S = 0.05
SLOW = 1.5


def spin(seconds: float) -> list[tuple[float, float]]:
    """(monotonic start, duration) of each piece of work, back to back for `seconds`."""
    clock = time.perf_counter
    mono = time.monotonic
    out = []
    end = clock() + seconds
    while (t := clock()) < end:
        start = mono()
        sum(range(20_000))  # ~0.3-0.5 ms of interpreter work
        out.append((start, clock() - t))
    return out


def slow_windows(samples: list[tuple[float, float]]) -> tuple[set[int], int, float]:
    """The 50 ms windows (by number) whose mean duration is ≥ SLOW x the median; all windows; the worst factor."""
    median = statistics.median(d for _, d in samples)
    windows: dict[int, list[float]] = {}
    for start, d in samples:
        windows.setdefault(int(start / WINDOW_S), []).append(d)
    factors = {k: statistics.mean(v) / median for k, v in windows.items()}
    return {k for k, f in factors.items() if f >= SLOW}, len(windows), max(factors.values(), default=1.0)


def measure(seconds: float, cores: list[int]) -> dict[str, Any]:
    """Runs the probe on every core at once (one pinned process each) and summarises the windows."""
    procs = []
    for core in cores:
        cmd = [sys.executable, __file__, "--child", str(seconds)]
        pin = (lambda c=core: os.sched_setaffinity(0, {c})) if hasattr(os, "sched_setaffinity") else None
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, preexec_fn=pin))
    per_core: dict[str, Any] = {}
    slow_sets = []
    for core, p in zip(cores, procs, strict=True):
        out, _ = p.communicate(timeout=seconds + 30)
        slow, total, worst = slow_windows([tuple(x) for x in json.loads(out)])
        slow_sets.append(slow)
        per_core[str(core)] = {"slow_share": len(slow) / max(total, 1), "worst_factor": worst, "windows": total}
    everywhere = set.intersection(*slow_sets) if slow_sets else set()
    total = min((c["windows"] for c in per_core.values()), default=1)
    return {
        "seconds": seconds,
        "window_ms": WINDOW_S * 1000,
        "slow_factor": SLOW,
        "cores": per_core,
        "slow_on_all_cores_share": len(everywhere) / max(total, 1),
    }


def describe(noise: dict[str, Any]) -> str:
    cores = noise["cores"]
    parts = [
        f"core {c}: {v['slow_share'] * 100:.1f} % (worst {v['worst_factor']:.1f}x)" for c, v in sorted(cores.items())
    ]
    return (
        f"{noise['seconds']:.0f} s of fixed work per core before the run; share of {noise['window_ms']:.0f}-ms windows "
        f"≥ {noise['slow_factor']}x slower than the median: {', '.join(parts)}; on all cores at once "
        f"{noise['slow_on_all_cores_share'] * 100:.1f} %"
    )


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(spin(float(sys.argv[2]))))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--cores", default=",".join(str(c) for c in range(min(os.cpu_count() or 1, 2))))
    args = p.parse_args()
    noise = measure(args.seconds, [int(c) for c in args.cores.split(",")])
    print(json.dumps(noise, indent=2))
    print(describe(noise), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
