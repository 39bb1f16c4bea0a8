"""Where a request goes: each route's pool of deployments, a bounded wait when all are at their limits, and
optional active health checks. The balancing state itself lives in Rust (`_core.Pool`); this module adds
the parts that need the event loop."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tokenrelay._core import Pool
from tokenrelay.config import Route
from tokenrelay.h1client import Client, UpstreamError

log = logging.getLogger("tokenrelay.routing")

# Outcomes reported back to the pool when an attempt ends.
SUCCESS = "success"
FAILURE = "failure"
RATE_LIMITED = "rate_limited"
CANCELLED = "cancelled"


@dataclass(frozen=True)
class Pick:
    """The pool's answer: a deployment index (a slot reserved), or why none, and when to try again."""

    index: int
    busy: bool = False
    retry_after_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.index >= 0


def shared_pool_path(directory: Path, route: str) -> Path:
    """The file of a route's balancing state that a daemon's workers share, in their directory."""
    return directory / f"pool-{hashlib.sha256(route.encode()).hexdigest()[:24]}.shm"


class Waker:
    """With several workers: wakes the requests another worker has queued at a shared deployment's limits when
    this worker frees room there. Each worker binds a datagram socket `wake-<index>.sock` in the workers'
    directory; a release that finds no waiter of its own but others' (`Pool.others_waiting()`) sends the route's
    name to theirs, and the receiver lets its oldest waiter on that route try again. Best effort: a lost
    datagram leaves the waiter to its next poll."""

    def __init__(self, directory: Path, worker: int, pools: Mapping[str, RoutePool]) -> None:
        self.directory, self.pools = directory, pools
        self.loop = asyncio.get_running_loop()
        self.sent = self.received = 0
        path = self.path(worker)
        path.unlink(missing_ok=True)  # (left by a predecessor of this index that died)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.setblocking(False)
            self.sock.bind(str(path))
        except OSError:
            self.sock.close()
            raise
        self.loop.add_reader(self.sock.fileno(), self._readable)
        for pool in pools.values():
            pool.waker = self

    def path(self, worker: int) -> Path:
        return self.directory / f"wake-{worker}.sock"

    def notify(self, workers: int, route: str) -> None:
        """Tells each worker in the bit set `workers` that `route` has room."""
        name = route.encode()
        w = 0
        while workers:
            if workers & 1:
                try:
                    self.sock.sendto(name, str(self.path(w)))
                    self.sent += 1
                except OSError:  # (gone, or its queue full: it polls)
                    pass
            workers >>= 1
            w += 1

    def _readable(self) -> None:
        while True:
            try:
                name = self.sock.recv(1024)
            except OSError:  # (drained: BlockingIOError; or the socket is gone)
                return
            self.received += 1
            pool = self.pools.get(name.decode("utf-8", "replace"))
            if pool is not None:
                pool.wake_one()

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


class RoutePool:
    """A route's deployments and their balancing state (the Rust `Pool`), plus the wait queue.

    With `shared` (the directory of a daemon's workers, `workermetrics.directory()`) the state is in a file
    there that every worker maps (as worker `worker`): a deployment's `max_concurrent`, rpm and tpm, its
    breaker and cooldowns hold for the daemon, not for each worker. The wait queue stays each worker's: a
    release in another worker reaches a waiter here through `Waker` (and a waiter polls again when the pool
    says anyway: 50 ms while only concurrency is in the way)."""

    def __init__(self, route: Route, shared: Path | None = None, worker: int = 0) -> None:
        self.route = route
        b = route.breaker
        specs: list[dict[str, object]] = [
            {
                "name": d.name,
                "weight": d.weight,
                "tier": d.tier,
                "max_concurrent": d.max_concurrent,
                "rpm": d.rpm,
                "tpm": d.tpm,
            }
            for d in route.deployments
        ]

        def build(path: Path | None) -> Pool:
            return Pool(
                specs,
                route.strategy,
                breaker_failures=b.failures,
                breaker_error_rate=b.error_rate,
                breaker_window_s=b.window_s,
                breaker_min_requests=b.min_requests,
                cooldown_s=b.cooldown_s,
                max_cooldown_s=b.max_cooldown_s,
                shared=path,
                worker=worker,
            )

        if shared is None:
            self.pool = build(None)
        else:
            try:
                self.pool = build(shared_pool_path(shared, route.name))
            except ValueError as exc:  # (the file cannot be made or mapped: the worker still serves)
                log.warning(
                    "route %s: its deployments' limits and breakers are this worker's alone: %s", route.name, exc
                )
                self.pool = build(None)  # (raises again if it was the configuration)
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.waiting = 0
        self.waker: Waker | None = None  # (shared: tells the other workers when room is freed here)
        self._ttfts: collections.deque[float] = collections.deque(maxlen=200)

    def pick(self, exclude: list[int]) -> Pick:
        idx = self.pool.pick(exclude)
        if idx >= 0:
            return Pick(idx)
        retry_after = self.pool.retry_after(exclude)
        return Pick(-1, busy=idx == Pool.BUSY, retry_after_s=retry_after if retry_after is not None else 0.0)

    async def acquire(self, exclude: list[int]) -> Pick:
        """Picks a deployment, waiting in a bounded FIFO queue (up to the route's queue timeout) while every
        eligible deployment is at its concurrency or rate limit."""
        pick = self.pick(exclude)
        if pick.ok or not pick.busy or self.waiting >= self.route.queue_size:
            return pick
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.route.queue_timeout_s
        self.waiting += 1
        if self.waiting == 1:
            self.pool.set_waiting(True)  # (shared: a worker that frees room tells this one, `Waker`)
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return pick
                waiter: asyncio.Future[None] = loop.create_future()
                self._waiters.append(waiter)
                # A limit that frees itself with time (rpm, tpm, a cooldown) wakes nobody: poll at its horizon.
                wait_s = min(remaining, pick.retry_after_s) if pick.retry_after_s > 0 else remaining
                try:
                    await asyncio.wait_for(waiter, wait_s)
                except TimeoutError:
                    pass
                finally:
                    if not waiter.done():
                        waiter.cancel()
                pick = self.pick(exclude)
                if pick.ok or not pick.busy:
                    return pick
        finally:
            self.waiting -= 1
            if not self.waiting:
                self.pool.set_waiting(False)

    def wake_one(self) -> None:
        """Lets the oldest queued request try again (room was freed here, or in another worker)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def first_token(self, idx: int, ttft_s: float) -> None:
        self.pool.first_token(idx, ttft_s)
        self._ttfts.append(ttft_s)

    def release(
        self, idx: int, outcome: str, output_tokens: int = 0, total_tokens: int = 0, duration_s: float = 0.0
    ) -> None:
        self.pool.release(idx, outcome, output_tokens, total_tokens, duration_s)  # type: ignore[arg-type]
        if self._waiters:
            self.wake_one()
        elif self.waker is not None and (others := self.pool.others_waiting()):
            self.waker.notify(others, self.route.name)

    def cooldown(self, idx: int, seconds: float) -> None:
        self.pool.cooldown(idx, seconds)

    def set_health(self, idx: int, up: bool) -> None:
        self.pool.set_health(idx, up)

    def ttft_quantile(self, q: float) -> float | None:
        """A quantile of this route's recent times to first token (for hedging after the route's p95)."""
        if len(self._ttfts) < 20:
            return None
        ordered = sorted(self._ttfts)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def snapshot(self) -> list[dict[str, object]]:
        return self.pool.snapshot()


async def health_check_loop(pool: RoutePool, client: Client) -> None:
    """Active health checks: GET each deployment's `health_check_path` on its interval; mark it up or down."""
    checked = [(i, d) for i, d in enumerate(pool.route.deployments) if d.health_check_path]
    if not checked:
        return

    async def check(idx: int) -> None:
        deployment = pool.route.deployments[idx]
        path = deployment.health_check_path or ""
        headers = {"authorization": f"Bearer {deployment.api_key}"} if deployment.api_key else {}
        up = False
        while True:
            try:
                async with asyncio.timeout(5):
                    resp = await client.request("GET", deployment.base_url, path, headers, b"", connect_timeout=5)
                    try:
                        await resp.read()
                    finally:
                        resp.release()
                now_up = 200 <= resp.status < 300
            except (UpstreamError, TimeoutError):
                now_up = False
            if now_up != up:
                log.info("deployment %s is %s (health check)", deployment.name, "up" if now_up else "down")
            up = now_up
            pool.set_health(idx, up)
            await asyncio.sleep(deployment.health_check_interval_s)

    await asyncio.gather(*(check(i) for i, _ in checked))
