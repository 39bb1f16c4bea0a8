"""The data plane, wired to the event loop: committed streams relayed socket to socket by a Rust thread.

Once a stream is committed, the upstream response hands the rest of it to `DataPlane.relay` (plaintext sockets
on both sides, an uncompressed body): the thread reads the upstream socket, meters each read and writes the
client socket, and the event loop does nothing per read — it wakes once, when the relay ends (`on_done`). The
sockets stay the event loop's (their transports open, the upstream's reading paused); the deadlines stay the
watchdog's, which reads `Relay.last_read` and `Relay.buffered` and cancels (see `rust/src/plane.rs`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from tokenrelay._core import RELAY_BROKEN, Plane, Relay, StreamMeter

log = logging.getLogger("tokenrelay.plane")

# Set to 0 to relay every stream in the event loop (the in-loop `Pump`), e.g. to compare the two.
ENV = "TOKENRELAY_DATA_PLANE"

OnDone = Callable[[int, Any, bytes], None]


def enabled(env: Mapping[str, str] | None = None) -> bool:
    """Whether committed streams go to the data plane (`TOKENRELAY_DATA_PLANE`, on unless 0/false/no/off)."""
    value = (os.environ if env is None else env).get(ENV, "1").strip().lower()
    return value not in ("0", "false", "no", "off")


class DataPlane:
    """A worker's data plane thread and the relays waiting on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._plane = Plane()
        self._waiting: dict[int, OnDone] = {}
        self._fd = self._plane.fileno()
        loop.add_reader(self._fd, self._ready)
        self.closed = False
        self.relays = 0  # relays started

    def relay(self, meter: StreamMeter, upstream_fd: int, client_fd: int, high: int, on_done: OnDone) -> Relay:
        """Relays the rest of a stream (see `Plane.relay`); `on_done(kind, arg, rest)` is called in the event loop
        when it ended, unless it was `cancel()`led first."""
        if self.closed:
            raise OSError("the data plane is closed")
        relay = self._plane.relay(meter, upstream_fd, client_fd, high)
        self._waiting[relay.id] = on_done
        self.relays += 1
        return relay

    def cancel(self, relay: Relay) -> bytes:
        """Stops a relay now: nothing more is metered or written; its `on_done` is not called. Returns the bytes
        it had metered and not written: the caller's to write to the client before anything else."""
        self._waiting.pop(relay.id, None)
        return relay.cancel()

    @property
    def in_flight(self) -> int:
        return len(self._waiting)

    def _ready(self) -> None:
        for relay_id, kind, arg, rest in self._plane.completed():
            on_done = self._waiting.pop(relay_id, None)
            if on_done is None:
                continue  # cancelled meanwhile
            try:
                on_done(kind, arg, rest)
            except Exception:  # one relay's owner failing must not lose the others' ends
                log.exception("a relay's end could not be handled")

    def close(self) -> None:
        """Stops the thread; the relays still in progress end as broken (their `on_done` is called)."""
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self._fd)
        self._plane.close()  # (the relays still in progress end as broken)
        self._ready()
        for on_done in list(self._waiting.values()):
            on_done(RELAY_BROKEN, "the data plane stopped", b"")
        self._waiting.clear()
