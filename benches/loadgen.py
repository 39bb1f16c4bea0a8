"""The benchmarks' load generator: a raw asyncio (uvloop) HTTP/1.1 client, run as its own process.

It opens N keep-alive connections to one address, sends the same POST on each (staggered over a ramp), and parses
the answers itself: the status line and headers, chunked or Content-Length framing, and server-sent events found
by their blank-line boundaries. No HTTP library sits in the measured path, so the client costs a few microseconds
per read and is not what limits the run (`run.py` checks that with the `direct` target).

Per stream it records the time to the first content event (an event whose `content` or `text` field is a
non-empty string), every gap between events after it, the number of events and any error. It writes one JSON
summary (percentiles, totals, optional RSS samples of other processes) to `--out` or stdout.

Modes: `stream` (one or more SSE answers per connection), `json` (back-to-back small requests per connection
for `--duration-s`), `idle` (N streams held open; samples the RSS of `--sample-pids` while they are all open).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import socket
import sys
import time
import urllib.request
from typing import Any

import orjson

CONTENT_RE = re.compile(rb'"(?:content|text)": ?"[^"]')
now = time.perf_counter


class Result:
    __slots__ = ("error", "events", "gaps", "latency", "sent", "status", "ttft")

    def __init__(self) -> None:
        self.status = 0
        self.sent = -1.0  # when the request went out (for --trace)
        self.ttft = -1.0
        self.latency = -1.0
        self.events = 0
        self.gaps: list[float] = []
        self.error = ""


class Conn(asyncio.Protocol):
    """One keep-alive connection; `request()` sends the prepared request and resolves when the answer ends."""

    def __init__(self, request: bytes, sse: bool) -> None:
        self.request_bytes = request
        self.sse = sse
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.events_buf = bytearray()
        self.waiter: asyncio.Future[Result] | None = None
        self.result = Result()
        self.in_head = True
        self.chunked = False
        self.remaining = -1
        self.t_start = 0.0
        self.t_last = 0.0
        self.got_content = False
        self.closed = False
        self.server_closes = False

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # --- asyncio.Protocol ----------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            if not self.in_head and not self.chunked and self.remaining < 0:
                self._finish(now())  # close-delimited body
            else:
                self._fail(f"connection lost: {exc or 'closed by peer'}")

    def data_received(self, data: bytes) -> None:
        t = now()
        buf = self.buf
        buf += data
        if self.in_head:
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                return
            head = bytes(buf[:i]).lower()
            del buf[: i + 4]
            self.in_head = False
            try:
                self.result.status = int(head[9:12])
            except ValueError:
                self._fail("bad status line")
                return
            self.chunked = b"transfer-encoding: chunked" in head
            self.server_closes = b"connection: close" in head
            self.remaining = -1
            j = head.find(b"content-length:")
            if j >= 0:
                end = head.find(b"\r\n", j)
                self.remaining = int(head[j + 15 : end if end >= 0 else None])
        if self.chunked:
            while True:
                j = buf.find(b"\r\n")
                if j < 0:
                    return
                size = int(bytes(buf[:j]).split(b";", 1)[0], 16)
                if len(buf) < j + 4 + size:
                    return
                payload = bytes(buf[j + 2 : j + 2 + size])
                del buf[: j + 4 + size]
                if size == 0:
                    self._finish(t)
                    return
                self._payload(payload, t)
        elif self.remaining >= 0:
            take = min(len(buf), self.remaining)
            self._payload(bytes(buf[:take]), t)
            del buf[:take]
            self.remaining -= take
            if self.remaining == 0:
                self._finish(t)
        else:
            self._payload(bytes(buf), t)
            buf.clear()

    # --- parsing -------------------------------------------------------------------------------------------------

    def _payload(self, payload: bytes, t: float) -> None:
        if not self.sse:
            return
        eb = self.events_buf
        eb += payload
        start = 0
        r = self.result
        while True:
            k = eb.find(b"\n\n", start)
            if k < 0:
                break
            r.events += 1
            if self.got_content:
                r.gaps.append(t - self.t_last)
                self.t_last = t
            elif CONTENT_RE.search(eb, start, k):
                self.got_content = True
                r.ttft = t - self.t_start
                self.t_last = t
            start = k + 2
        if start:
            del eb[:start]

    def _finish(self, t: float) -> None:
        r = self.result
        r.latency = t - self.t_start
        if r.status != 200:
            r.error = f"status {r.status}"
        elif self.sse and not self.got_content:
            r.error = "no content event"
        self._resolve()

    def _fail(self, message: str) -> None:
        self.result.error = message
        self._resolve()

    def _resolve(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(self.result)

    # --- driving -------------------------------------------------------------------------------------------------

    def request(self) -> asyncio.Future[Result]:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Result] = loop.create_future()
        self.waiter = waiter
        self.result = Result()
        self.buf.clear()
        self.events_buf.clear()
        self.in_head = True
        self.chunked = False
        self.remaining = -1
        self.got_content = False
        if self.closed or self.transport is None:
            self._fail("connection closed")
            return waiter
        self.t_start = self.result.sent = now()
        self.transport.write(self.request_bytes)
        return waiter


def write_trace(path: str, t0: float, results: list[Result]) -> None:
    """`--trace`: the answers in the order they were sent, one line each, for a timeline of a run."""
    lines = ["sent_s ttft_ms max_gap_ms error"]
    for r in sorted(results, key=lambda r: r.sent):
        sent = r.sent - t0 if r.sent >= 0 else float("nan")
        lines.append(f"{sent:.4f} {r.ttft * 1e3:.3f} {max(r.gaps, default=0.0) * 1e3:.3f} {r.error or '-'}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def build_request(host: str, port: int, path: str, body: bytes, headers: list[str]) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: keep-alive",
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def ms_stats(values: list[float]) -> dict[str, float]:
    v = sorted(x * 1000 for x in values)
    return {
        "n": len(v),
        "p50": pct(v, 50),
        "p90": pct(v, 90),
        "p99": pct(v, 99),
        "p999": pct(v, 99.9),
        "max": v[-1] if v else float("nan"),
        "mean": sum(v) / len(v) if v else float("nan"),
    }


def tree_pids(roots: list[int]) -> list[int]:
    """The given processes and all their descendants (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def rss_kb(roots: list[int]) -> dict[str, int]:
    """VmRSS in KiB of each process in the trees under `roots`."""
    out: dict[str, int] = {}
    for pid in tree_pids(roots):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        out[str(pid)] = int(line.split()[1])
                        break
        except OSError:
            continue
    return out


async def open_conns(
    host: str, port: int, n: int, request: bytes, sse: bool, errors: list[str], batch: int = 200
) -> list[Conn | None]:
    loop = asyncio.get_running_loop()
    conns: list[Conn | None] = []

    async def one() -> Conn | None:
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(lambda: Conn(request, sse), host, port), timeout=10
            )
            return proto
        except (OSError, TimeoutError) as exc:
            errors.append(f"connect: {exc!r}")
            return None

    for i in range(0, n, batch):
        conns.extend(await asyncio.gather(*(one() for _ in range(min(batch, n - i)))))
    return conns


async def run(args: argparse.Namespace) -> dict[str, Any]:
    body = args.body.encode() if args.body else open(args.body_file, "rb").read()  # noqa: SIM115, ASYNC230
    request = build_request(args.host, args.port, args.path, body, args.header or [])
    sse = args.mode != "json"
    connect_errors: list[str] = []
    t_connect = now()
    conns = await open_conns(args.host, args.port, args.streams, request, sse, connect_errors)
    connect_s = now() - t_connect
    results: list[Result] = []
    loop = asyncio.get_running_loop()
    t0 = now()
    deadline = t0 + (min(args.cut_s, args.timeout_s) if args.cut_s else args.timeout_s)
    n = len(conns)
    all_sent = asyncio.Event()
    sent = 0
    reconnects = 0
    samples: list[dict[str, Any]] = []

    async def drive(i: int, conn: Conn | None) -> None:
        nonlocal sent, reconnects
        if args.ramp_ms and n > 1:
            await asyncio.sleep(args.ramp_ms / 1000 * i / n)
        if conn is None:
            sent += 1
            if sent == n:
                all_sent.set()
            return
        count = 0
        while True:
            fut = conn.request()
            if count == 0:
                sent += 1
                if sent == n:
                    all_sent.set()
            try:
                res = await asyncio.wait_for(fut, timeout=max(0.01, deadline - now()))
            except TimeoutError:
                res = conn.result
                res.error = res.error or ("cut" if args.cut_s else "timeout")
                results.append(res)
                if conn.transport is not None:
                    conn.transport.abort()
                return
            results.append(res)
            count += 1
            if res.error:
                return
            if conn.closed or conn.server_closes:
                # the server ends keep-alive (e.g. after N requests): reconnect, as a client pool would
                conn.close()
                fresh = await open_conns(args.host, args.port, 1, request, sse, connect_errors)
                if fresh[0] is None:
                    return
                conn = fresh[0]
                conns[i] = conn
                reconnects += 1
            if args.mode == "json":
                if now() - t0 >= args.duration_s:
                    return
            elif count >= args.requests:
                return

    async def sampler() -> None:
        await all_sent.wait()
        t_sent = now()
        for delay in args.sample_after_s:
            await asyncio.sleep(max(0.0, t_sent + delay - now()))
            open_heads = sum(1 for c in conns if c is not None and not c.in_head)
            sample: dict[str, Any] = {
                "after_s": delay,
                "rss_kb": rss_kb(args.sample_pids),
                "answers_started": open_heads,
            }
            if args.sample_url:
                try:
                    with urllib.request.urlopen(args.sample_url, timeout=2) as r:  # noqa: ASYNC210
                        sample["upstream"] = orjson.loads(r.read())
                except OSError as exc:
                    sample["upstream"] = {"error": str(exc)}
            samples.append(sample)

    tasks = [loop.create_task(drive(i, c)) for i, c in enumerate(conns)]
    sample_task = loop.create_task(sampler()) if args.sample_pids else None
    await asyncio.gather(*tasks)
    t_end = now()
    if sample_task is not None:
        if not sample_task.done():
            sample_task.cancel()
        await asyncio.gather(sample_task, return_exceptions=True)
    for c in conns:
        if c is not None and c.transport is not None:
            c.transport.close()
    wall = t_end - t0
    if args.trace:
        write_trace(args.trace, t0, results)
    ok = [r for r in results if not r.error]
    cut = [r for r in results if r.error == "cut"]
    errors = [r.error for r in results if r.error and r.error != "cut"] + connect_errors
    gaps: list[float] = []
    for r in ok:
        gaps.extend(r.gaps)
    events = sum(r.events for r in results)  # cut answers' events count too: they were received
    late_limit = (args.pace_ms + args.late_ms) / 1000 if args.pace_ms else None
    late_streams = sum(1 for r in ok if late_limit is not None and r.gaps and max(r.gaps) > late_limit)
    late_first = sum(
        1 for r in ok if late_limit is not None and r.ttft > (args.first_token_ms + args.late_ms) / 1000 + 0.0
    )
    return {
        "mode": args.mode,
        "streams": args.streams,
        "requests_per_conn": args.requests,
        "connected": sum(1 for c in conns if c is not None),
        "connect_s": connect_s,
        "wall_s": wall,
        "answers": len(results),
        "ok": len(ok),
        "errors": len(errors),
        "cut": len(cut),
        "error_samples": sorted(set(errors))[:5],
        "events": events,
        "events_per_s": events / wall if wall > 0 else 0.0,
        "requests_per_s": len(ok) / wall if wall > 0 else 0.0,
        "ttft_ms": ms_stats([r.ttft for r in ok if r.ttft >= 0]),
        "gap_ms": ms_stats(gaps),
        "latency_ms": ms_stats([r.latency for r in ok]),
        "reconnects": reconnects,
        "late_streams": late_streams,
        "late_first": late_first,
        "samples": samples,
        "client_cpu_s": sum(os.times()[:2]),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/v1/chat/completions")
    p.add_argument("--body", default="")
    p.add_argument("--body-file", default="")
    p.add_argument("--header", action="append", help="an extra request header line, e.g. 'Authorization: Bearer x'")
    p.add_argument("--mode", choices=("stream", "json", "idle"), default="stream")
    p.add_argument("--streams", type=int, default=64, help="concurrent connections")
    p.add_argument("--requests", type=int, default=1, help="answers per connection (stream and idle modes)")
    p.add_argument("--duration-s", type=float, default=5.0, help="json mode: how long each connection loops")
    p.add_argument("--ramp-ms", type=float, default=0.0, help="spread the first requests over this long")
    p.add_argument("--timeout-s", type=float, default=60.0, help="hard limit for the whole run")
    p.add_argument("--pace-ms", type=float, default=0.0, help="the upstream's pace, to count late chunks")
    p.add_argument("--first-token-ms", type=float, default=0.0)
    p.add_argument("--late-ms", type=float, default=100.0, help="a chunk is late this long beyond its pace")
    p.add_argument("--sample-pids", type=int, nargs="*", default=[])
    p.add_argument("--sample-after-s", type=float, nargs="*", default=[2.0])
    p.add_argument("--sample-url", default="", help="GET this (JSON) with each sample, e.g. the mock's /_control")
    p.add_argument("--cut-s", type=float, default=0.0, help="stop after this long; unfinished answers count as cut")
    p.add_argument("--out", default="")
    p.add_argument(
        "--trace",
        default="",
        help="write one line per answer here: sent at (s from the start), TTFT and longest gap (ms), error",
    )
    args = p.parse_args(argv)
    if not args.body and not args.body_file:
        p.error("--body or --body-file is needed")
    gc.disable()  # the run allocates little that cycles; a collection mid-run would show up as a late chunk
    try:
        import uvloop

        summary = uvloop.run(run(args))
    except ImportError:
        summary = asyncio.run(run(args))
    data = orjson.dumps(summary, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    if args.out:
        with open(args.out, "wb") as f:
            f.write(data)
    else:
        sys.stdout.buffer.write(data + b"\n")


if __name__ == "__main__":
    main()
