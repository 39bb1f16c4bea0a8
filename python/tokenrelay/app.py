"""Builds the aiohttp application and runs it: one process, or N workers sharing the port (SO_REUSEPORT)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

from aiohttp import web

from tokenrelay import auth, busypoll, plane, server, sharedkeys, workermetrics
from tokenrelay._core import Meters, Spinner
from tokenrelay.config import Config, with_builtin_routes
from tokenrelay.h1client import Client
from tokenrelay.handlers import admin, api, keys, ui, usage
from tokenrelay.handlers import runs as run_handlers
from tokenrelay.ledger import Ledger, LedgerError
from tokenrelay.metering import Metering
from tokenrelay.mock import MockProvider
from tokenrelay.plane import DataPlane
from tokenrelay.relay import Relay
from tokenrelay.routing import health_check_loop
from tokenrelay.server import FrontEnd
from tokenrelay.state import BACKGROUND, RELAY, STARTED

# The cyclic GC's first generation is collected every GC_THRESHOLD_0 net allocations instead of Python's 700: each
# pass re-walks the objects of every request in flight, so at 700 a busy daemon spent ~5-8% of its loop there.
# Reference counting frees almost everything a request allocates; cycles wait a little longer, nothing more.
GC_THRESHOLD_0 = 10_000
# At shutdown, how long the ledger waits for cut requests to finish metering (a token count in a thread).
METERING_GRACE_S = 10.0
log = logging.getLogger("tokenrelay")


def build_app(config: Config) -> web.Application:
    """The daemon's application for a config whose host and port are the ones actually bound."""
    config = with_builtin_routes(config)
    app = web.Application(
        client_max_size=config.max_body_bytes,
        handler_args={"max_field_size": 64 * 1024},
        middlewares=[auth.middleware],
    )
    app[STARTED] = time.monotonic()
    meters = Meters()
    ledger = Ledger(
        meters,
        config.db,
        interval=config.flush_interval_s,
        retention_days=config.request_log_retention_days,
    )
    meter = Metering(meters, ledger, log_requests=config.log_requests)
    for route in config.routes.values():
        for deployment in route.deployments:
            meter.price_sources[route.name, deployment.name] = deployment.base_url
    # With several workers: one table of client keys' and runs' limit counters for all of them (else None).
    workers_dir = workermetrics.directory()
    worker = int(os.environ.get(busypoll.WORKER_INDEX_ENV) or 0)
    shared = sharedkeys.open_shared(workers_dir, worker)
    gate = auth.Gate(ledger.path, os.environ.get(auth.ADMIN_ENV), meter, config.routes, shared)
    app[auth.GATE] = gate

    async def start_relay(app: web.Application) -> None:
        await asyncio.to_thread(ledger.start)
        await gate.start()  # the ledger exists and is migrated: the keys can be read
        tls = any(d.base_url.startswith("https:") for r in config.routes.values() for d in r.deployments)
        client = await asyncio.to_thread(Client, asyncio.get_running_loop(), tls)  # loading CA certs blocks
        if plane.enabled():
            client.plane = DataPlane(asyncio.get_running_loop())
        relay = app[RELAY] = Relay(config, client, meter, workers_dir, worker)
        checks: list[asyncio.Future[None]] = [
            asyncio.ensure_future(health_check_loop(pool, relay.client))
            for pool in relay.pools.values()
            if any(d.health_check_path for d in pool.route.deployments)
        ]
        app[BACKGROUND] = checks

    async def stop_relay(app: web.Application) -> None:
        for task in app[BACKGROUND]:
            task.cancel()
        await asyncio.gather(*app[BACKGROUND], return_exceptions=True)
        await gate.stop()
        await app[RELAY].settled(METERING_GRACE_S)  # cut handlers may still be counting their tokens in a thread
        await app[RELAY].client.close()
        await ledger.aclose()  # the final flush: nothing recorded is lost on a graceful shutdown

    app.on_startup.append(start_relay)
    app.on_cleanup.append(stop_relay)
    api.add_routes(app)
    admin.add_routes(app)
    usage.add_routes(app)
    ui.add_routes(app)  # the live meters page under /ui (auth covers /ui*)
    keys.add_routes(app)
    run_handlers.add_routes(app, ledger.path, shared)
    app.add_subapp("/_mock", MockProvider().app())
    return app


# Connections the kernel queues before the loop accepts them. An agent fleet connects in bursts (hundreds of
# clients at start-up, each opening its pool); past the queue, a SYN is dropped and retried a second later, which
# the client sees as a one-second first token. Capped by net.core.somaxconn.
LISTEN_BACKLOG = 4096
# The exit code of a daemon (or worker) that could not start: a config it refuses, a port it cannot have.
CANNOT_START = 2
# A worker that exits this many times in a row, each time within QUICK_EXIT_S of its start, is not restarted again.
QUICK_EXIT_S = 5.0
MAX_QUICK_EXITS = 3


def _bound(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted sockets inherit SO_KEEPALIVE from the listener (Linux, BSDs): set once here, instead of
        # aiohttp's setsockopt on every connection it accepts (`tcp_keepalive=False` below). TCP_NODELAY the loop
        # sets itself.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def probe_port(host: str, port: int) -> None:
    """Raises the OSError of binding `host:port` if anything listens there: without SO_REUSEPORT, so that the
    workers of another tokenrelay on the port (same user, SO_REUSEPORT) count too, instead of being joined and
    silently sharing its connections. (Bound, never listening: no connection is queued to the probe.)"""
    _bound(host, port, reuse_port=False).close()


def bind_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A listening socket, bound before the app is built so the mock routes know the real port."""
    sock = _bound(host, port, reuse_port)
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


def _cannot_listen(config: Config, exc: OSError) -> int:
    print(f"tokenrelay: cannot listen on {config.host}:{config.port}: {exc.strerror}", file=sys.stderr)
    return CANNOT_START


async def serve(config: Config, sock: socket.socket | None = None, ready_fd: int | None = None) -> None:
    """Runs one server process until SIGTERM or SIGINT, then drains in-flight requests and exits."""
    if sock is None:
        sock = bind_socket(config.host, config.port, reuse_port=False)
    # (pinned before any thread of the app starts: they inherit the core)
    spinner = busypoll.start() if config.busy_poll else None
    try:
        await _serve(config, sock, ready_fd, spinner)
    finally:
        if spinner is not None:
            spinner.close()


async def _serve(config: Config, sock: socket.socket, ready_fd: int | None, spinner: Spinner | None) -> None:
    host, port = sock.getsockname()[:2]
    config = replace(config, port=port)
    app = build_app(config)
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        handler_cancellation=True,
        shutdown_timeout=config.shutdown_grace_s,
        tcp_keepalive=False,  # (the listening socket has it: see bind_socket)
    )
    await runner.setup()
    loop = asyncio.get_running_loop()
    front: FrontEnd | None = None
    listener: asyncio.Server | None = None
    if server.enabled():
        # The own front end serves the relayed API calls and hands every other connection to aiohttp's server.
        assert runner.server is not None
        routes = app[api.FAST_ROUTES]
        # (`GET /v1/models` too: an application that lists the models first would otherwise leave its connection,
        # and every call it then makes on it, to aiohttp)
        gets = {"/models": admin.models}
        front = app[RELAY].front = FrontEnd(app, runner.server, auth.middleware, routes, config.max_body_bytes, gets)
        front.spinner = spinner
        # (listening again: without `backlog` the queue would shrink to the default of 100)
        listener = await loop.create_server(front, sock=sock, backlog=LISTEN_BACKLOG)
    else:
        if spinner is not None:
            log.warning("busy_poll needs the own front end (TOKENRELAY_FRONT_END=aiohttp): the core is pinned only")
        # (the site listens again: without `backlog` it would shrink the queue to aiohttp's default of 128)
        site = web.SockSite(runner, sock, shutdown_timeout=config.shutdown_grace_s, backlog=LISTEN_BACKLOG)
        await site.start()
    # Everything built so far (modules, config, app) lives as long as the process: out of the GC's sight.
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD_0, *gc.get_threshold()[1:])
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    exporter: workermetrics.Exporter | None = None
    exporting: asyncio.Task[None] | None = None
    where = workermetrics.directory()
    if where is not None:  # one of several workers: /metrics sums them all
        exporter = app[RELAY].exporter = workermetrics.Exporter(where, app[RELAY].prometheus)
        exporter.ui_part = app[ui.UI_HUB].part
        exporting = loop.create_task(exporter.run())
    log.info(
        "tokenrelay listening on http://%s:%d (routes: %s)",
        host,
        port,
        ", ".join(sorted(app[RELAY].config.routes)),
    )
    if ready_fd is not None:
        os.write(ready_fd, f"{port}\n".encode())
    print(f"tokenrelay listening on http://{host}:{port}", flush=True)
    await stop.wait()
    app[RELAY].stopping = True
    log.info(
        "shutting down: finishing %d in-flight requests (grace %.0f s)",
        app[RELAY].in_flight,
        config.shutdown_grace_s,
    )
    if front is not None and listener is not None:
        assert runner.server is not None
        listener.close()  # no new connections; the requests in flight finish within one grace period
        runner.server.pre_shutdown()  # (the connections aiohttp serves: closed once their request is answered)
        await runner.shutdown()  # on_shutdown: ends /ui's event streams (idempotent; cleanup sends it again)
        grace = config.shutdown_grace_s
        await asyncio.gather(front.shutdown(grace), runner.server.shutdown(grace))
    await runner.cleanup()
    if exporting is not None and exporter is not None:
        exporting.cancel()
        exporter.last()  # (after the last request was metered: this worker's final counts stay in the totals)


def raise_fd_limit() -> None:
    """Raises the soft limit of open files to the hard one. Each stream holds two sockets, and idle keep-alive
    connections stay open: the usual soft limit of 1024 would refuse connections (EMFILE) at a few hundred
    streams. (Go's runtime does the same at start-up; nginx has `worker_rlimit_nofile`.)"""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard  # (an unlimited hard limit: the usual nr_open)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # e.g. past the kernel's nr_open: keep what we have
            log.warning("could not raise the open-file limit from %d to %d", soft, target)


def run(config: Config) -> int:
    """Runs the daemon in this process (one worker) or supervises `config.workers` worker processes."""
    problem = auth.startup_problem(config)
    if problem is not None:
        print(f"tokenrelay: {problem}", file=sys.stderr)
        return CANNOT_START
    raise_fd_limit()  # (workers inherit it)
    worker = os.environ.get("TOKENRELAY_WORKER") == "1"
    if config.workers <= 1 or worker:
        try:
            sock = bind_socket(config.host, config.port, reuse_port=worker)
        except OSError as exc:
            return _cannot_listen(config, exc)
        try:
            _run_loop(serve(config, sock))
        except LedgerError as exc:  # (the ledger cannot be opened, or is from a newer tokenrelay)
            print(f"tokenrelay: {exc}", file=sys.stderr)
            return CANNOT_START
        finally:
            sock.close()
        return 0
    return _supervise(config)


def _run_loop(main: asyncio.Future[None] | object) -> None:
    try:
        import uvloop

        uvloop.run(main)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(main)  # type: ignore[arg-type]


def _supervise(config: Config) -> int:
    """Starts N workers that bind the same port with SO_REUSEPORT, restarts any that dies, forwards signals. A
    worker that cannot start (exit code 2: it printed why) or dies as it starts, again and again, stops them all."""
    if config.port == 0:
        print("tokenrelay: --workers > 1 needs a fixed port (not 0)", file=sys.stderr)
        return CANNOT_START
    try:  # (here, once: a port that cannot be had would otherwise make every worker exit, and be restarted)
        probe_port(config.host, config.port)
    except OSError as exc:
        return _cannot_listen(config, exc)
    # What the workers share besides the port and the ledger: their /metrics and /ui parts (`workermetrics`),
    # and the table of client keys' and runs' limit counters (`sharedkeys`).
    try:
        shared_dir = tempfile.mkdtemp(prefix="tokenrelay-workers-")
    except OSError as exc:
        log.warning("no directory for the workers to share (%s): meters and limits are per worker", exc)
        return _supervise_workers(config, None)
    try:
        return _supervise_workers(config, shared_dir)
    finally:
        shutil.rmtree(shared_dir, ignore_errors=True)


def _supervise_workers(config: Config, shared_dir: str | None) -> int:
    env = {**os.environ, "TOKENRELAY_WORKER": "1"}
    if shared_dir is not None:
        env[workermetrics.DIR_ENV] = shared_dir
    args = [sys.executable, "-m", "tokenrelay", *sys.argv[1:]]

    def start(index: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(args, env={**env, busypoll.WORKER_INDEX_ENV: str(index)})

    workers = [start(i) for i in range(config.workers)]
    started = [time.monotonic()] * len(workers)
    quick_exits = [0] * len(workers)  # exits in a row, each within QUICK_EXIT_S of its start
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for w in workers:
            if w.poll() is None:
                w.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while not stopping:
        time.sleep(0.2)
        for i, w in enumerate(workers):
            if not stopping and w.poll() is not None:
                now = time.monotonic()
                quick_exits[i] = quick_exits[i] + 1 if now - started[i] < QUICK_EXIT_S else 0
                if w.returncode == CANNOT_START or quick_exits[i] >= MAX_QUICK_EXITS:
                    # (it said why, or it dies as it starts): restarting it would fail the same way
                    log.error("worker %d exited with %s as it started; stopping the others", w.pid, w.returncode)
                    forward(signal.SIGTERM, None)
                    break
                log.error("worker %d exited with %s; restarting it", w.pid, w.returncode)
                workers[i] = start(i)
                started[i] = now
    codes = [w.wait() for w in workers]
    if any(n >= MAX_QUICK_EXITS for n in quick_exits):
        return 1
    return CANNOT_START if CANNOT_START in codes else max(codes, default=0)
