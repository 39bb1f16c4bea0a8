"""Where a stream's time to first token goes inside the daemon, and how long the cyclic GC stops the loop.

Runs `tokenrelay serve ARGS...` in this process with timestamps at the steps of a streamed request (request bytes
in, upstream request sent, upstream head in, the hold, the commit, the response head, the first write) and a
`gc.callbacks` timer; at exit (SIGTERM or Ctrl-C) prints each step's p50/p90 and the GC passes. (Since the
head of a stream is held in the upstream's callbacks until the first content, "upstream head -> hold" includes
the wait for that content, and "hold -> first token" is only the handler's own step.) A developer's
tool: it wraps private functions, so it follows the code, not an API. Use with any load, e.g.

    python benches/phases.py serve --listen 127.0.0.1:18005 --config bench.toml &
    python benches/loadgen.py --port 18005 --mode stream --streams 128 --pace-ms 20 ...; kill %1
"""

from __future__ import annotations

import atexit
import gc
import inspect
import itertools
import sys
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web, web_protocol
from tokenrelay import h1client, relay, server

STEPS = [
    "request in",
    "handler",
    "attempt",
    "upstream sent",
    "upstream head",
    "hold",
    "first token",
    "commit",
    "prepare",
    "first write",
]
marks: list[tuple[str, int]] = []
gc_passes: dict[int, list[float]] = {0: [], 1: [], 2: []}
_gc_start = [0.0]


def _mark(cls: Any, name: str, step: str) -> None:
    original: Callable[..., Any] = getattr(cls, name)
    if name.startswith("_first_token"):  # a staticmethod

        def plain(*args: Any) -> Any:
            marks.append((step, time.perf_counter_ns()))
            return original(*args)

        setattr(cls, name, staticmethod(plain))
        return

    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        marks.append((step, time.perf_counter_ns()))
        return await original(*args, **kwargs)

    def wrapped_sync(*args: Any, **kwargs: Any) -> Any:
        marks.append((step, time.perf_counter_ns()))
        return original(*args, **kwargs)

    setattr(cls, name, wrapped if inspect.iscoroutinefunction(original) else wrapped_sync)


durations: dict[str, list[float]] = {}


def _time(cls: Any, name: str, label: str) -> None:
    """How long each call of an async method takes (steps not every request has, e.g. a new upstream connection)."""
    original: Callable[..., Any] = getattr(cls, name)

    async def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter_ns()
        try:
            return await original(*args, **kwargs)
        finally:
            durations.setdefault(label, []).append((time.perf_counter_ns() - start) / 1000)

    setattr(cls, name, timed)


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _gc_start[0] = time.perf_counter()
    else:
        gc_passes[info["generation"]].append((time.perf_counter() - _gc_start[0]) * 1e3)


def _report() -> None:
    rows: list[dict[str, int]] = []
    current: dict[str, int] = {}
    for step, t in marks:
        if step == "request in":
            if current:
                rows.append(current)
            current = {step: t}
        elif step not in current:
            current[step] = t
    rows.append(current)
    complete = [r for r in rows if all(s in r for s in STEPS)][5:]  # the first few warm the caches
    out = sys.stderr
    print(f"{len(complete)} streamed requests with every step", file=out)
    for a, b in itertools.pairwise(STEPS):
        d = sorted((r[b] - r[a]) / 1000 for r in complete)
        if d:
            p50, p90, p99 = (d[min(len(d) - 1, int(len(d) * q))] for q in (0.5, 0.9, 0.99))
            print(f"  {a:>14} -> {b:<14} p50 {p50:8.1f} us   p90 {p90:8.1f} us   p99 {p99:8.1f} us", file=out)
    for label, d in durations.items():
        d.sort()
        print(f"  {label}: {len(d)} calls, p50 {d[len(d) // 2]:.1f} us, p90 {d[int(len(d) * 0.9)]:.1f} us", file=out)
    for generation, passes in gc_passes.items():
        if passes:
            passes.sort()
            print(
                f"  gc gen{generation}: {len(passes)} passes, p50 {passes[len(passes) // 2]:.2f} ms, "
                f"max {passes[-1]:.2f} ms, total {sum(passes):.1f} ms",
                file=out,
            )


def main() -> int:
    # (either front end: the own one, `tokenrelay.server`, or aiohttp's with TOKENRELAY_FRONT_END=aiohttp)
    _mark(server.Connection, "data_received", "request in")
    _mark(web_protocol.RequestHandler, "data_received", "request in")
    _mark(relay.Relay, "handle", "handler")
    _mark(relay.Relay, "_open", "attempt")
    _mark(h1client.Client, "send", "upstream sent")
    _mark(h1client.Response, "_head", "upstream head")
    _mark(relay.Relay, "_open_stream", "hold")
    _mark(relay.Relay, "_first_token", "first token")
    _mark(relay.Relay, "_deliver", "commit")
    _mark(server.FastRequest, "stream", "prepare")
    _mark(web.StreamResponse, "prepare", "prepare")
    _mark(server.FastStream, "write", "first write")
    _mark(relay._StreamHead, "write", "first write")
    _time(h1client.Client, "_connect", "new upstream connection (inside upstream sent -> head)")
    gc.callbacks.append(_on_gc)
    atexit.register(_report)
    from tokenrelay.cli import main as cli

    return cli(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
