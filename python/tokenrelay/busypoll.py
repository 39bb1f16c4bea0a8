"""Busy polling (`busy_poll = true`, `--busy-poll`): a worker pinned to one core, kept awake while it has clients.

A stream's opening is a few hundred microseconds of Python. When the request finds its core idle, the sleep it
wakes from (the core's idle state, or on a VM the hypervisor lending the core to someone else) leaves caches and
branch predictors cold, and that Python runs several times slower than on a warm core: on the 2-core test VM
this is most of what tokenrelay adds to the first token (benches/README.md, "Busy polling"). With busy polling,
each worker pins itself (every thread of it) to one core of its CPU affinity (worker i to the i-th, round robin)
and runs a `SCHED_IDLE` thread there that spins while the worker has a client connection open, and for
LINGER_S after the last one closed (`_core.Spinner`, rust/src/spin.rs): the SDKs close their connection after
each stream, and an agent's next call comes a tool call later. The worker's own threads preempt it the moment
they wake; it only fills time the core would have spent idle.

The price: each worker's core shows 100 % busy, and draws the power of it, for as long as any client keeps a
connection open (and LINGER_S after). Off by default. Its CPU is counted in
`tokenrelay_busy_poll_cpu_seconds_total`.
"""

from __future__ import annotations

import contextlib
import logging
import os

from tokenrelay._core import Spinner

log = logging.getLogger("tokenrelay")

# The worker's index (0..workers-1) for its core, set by the supervisor.
WORKER_INDEX_ENV = "TOKENRELAY_WORKER_INDEX"
# How long the core is kept awake after the last client connection closed.
LINGER_S = 2.0


def core_for(index: int, allowed: set[int]) -> int:
    """The core worker `index` is pinned to: the index-th of the cores it may run on, round robin."""
    cores = sorted(allowed)
    return cores[index % len(cores)]


def _pin_process(core: int) -> None:
    """Pins every thread of this process (and so the threads it starts later) to `core`."""
    os.sched_setaffinity(0, {core})
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # (a thread that just ended)
            os.sched_setaffinity(int(tid), {core})


def start() -> Spinner | None:
    """Pins this worker and starts its spinner; None (after a warning) where the OS refuses either."""
    try:
        index = int(os.environ.get(WORKER_INDEX_ENV, "0"))
        core = core_for(index, os.sched_getaffinity(0))
        _pin_process(core)
        spinner = Spinner(core, LINGER_S)
    except (OSError, ValueError) as exc:
        log.warning("busy_poll is off: %s", exc)
        return None
    log.info("busy_poll: worker pinned to core %d, kept awake while clients are connected", core)
    return spinner
