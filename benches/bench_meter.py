"""ns per Meters.record() from Python (the relay's call at the end of every request), drain() and flush cost.

Run: python benches/bench_meter.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from tokenrelay._core import Meters
from tokenrelay.ledger import Ledger

N = 200_000


def _noop(**_: Any) -> None:
    pass


def bench_record(label: str, runs: int) -> None:
    m = Meters()
    rec = m.record
    ts = time.time()
    run_names = [f"run-{i}" for i in range(runs)]
    t = time.perf_counter()
    for i in range(N):
        rec(ts=ts, route="chat", deployment="openai-1", model="gpt-4o", key_id="k1", key_name="team",
            run=run_names[i % runs], tags="", status=200, error_class="", input=1200, output=300,
            cached_input=800, cache_write=0, reasoning=0, input_estimated=False, output_estimated=False,
            cached_estimated=False, cache_write_estimated=False, reasoning_estimated=False,
            cost_usd=0.004, ttft_s=0.25, duration_s=3.1, stream=True, api="chat")  # fmt: skip
    dt = time.perf_counter() - t
    print(f"record() {label:<28} {dt / N * 1e9:8.0f} ns/call")
    t = time.perf_counter()
    rows = m.drain()
    print(f"drain() of {len(rows):>6} buckets          {(time.perf_counter() - t) * 1e3:8.2f} ms")


def bench_python_baseline() -> None:
    f = _noop
    ts = time.time()
    t = time.perf_counter()
    for _ in range(N):
        f(ts=ts, route="chat", deployment="openai-1", model="gpt-4o", key_id="k1", key_name="team",
          run="run-1", tags="", status=200, error_class="", input=1200, output=300,
          cached_input=800, cache_write=0, reasoning=0, input_estimated=False, output_estimated=False,
          cached_estimated=False, cache_write_estimated=False, reasoning_estimated=False,
          cost_usd=0.004, ttft_s=0.25, duration_s=3.1, stream=True, api="chat")  # fmt: skip
    dt = time.perf_counter() - t
    print(f"baseline: Python no-op with the same 25 kwargs {dt / N * 1e9:8.0f} ns/call")


def bench_flush() -> None:
    with tempfile.TemporaryDirectory() as d:
        m = Meters()
        ledger = Ledger(m, Path(d) / "usage.db", interval=3600, max_pending_requests=N + 1)
        ledger.start()
        ts = time.time()
        for i in range(1000):
            m.record(ts=ts, route="chat", deployment="openai-1", model="gpt-4o", key_id="k1", key_name="team",
                     run=f"run-{i}", tags="", status=200, error_class="", input=1, output=1, cached_input=0,
                     cache_write=0, reasoning=0, input_estimated=False, output_estimated=False,
                     cached_estimated=False, cache_write_estimated=False, reasoning_estimated=False,
                     cost_usd=0.0, ttft_s=0.1, duration_s=1.0, stream=True, api="chat")  # fmt: skip
            ledger.log_request({"ts": ts, "request_id": f"r{i}", "run": f"run-{i}"})
        t = time.perf_counter()
        ledger.flush()
        ms = (time.perf_counter() - t) * 1e3
        print(f"flush: 1000 buckets + 1000 request rows, one transaction {ms:8.1f} ms")
        t = time.perf_counter()
        row = {"ts": ts, "request_id": "x"}
        for _ in range(N):
            ledger.log_request(row)
        print(f"log_request()                  {(time.perf_counter() - t) / N * 1e9:8.0f} ns/call")
        ledger.close()


if __name__ == "__main__":
    bench_python_baseline()
    bench_record("(1 bucket, hot)", 1)
    bench_record("(1000 distinct runs)", 1000)
    bench_flush()
