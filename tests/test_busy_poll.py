"""Busy polling (`busy_poll = true` / `--busy-poll`): each worker pinned to one core, with an idle-priority thread
there that spins while a client connection is open, and sleeps once none is."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
from tokenrelay import busypoll

from tests.conftest import Daemon, MockUpstream, free_port, route_config

SCHED_IDLE = 5
CHAT = [{"role": "user", "content": "hello there"}]


def _threads(pid: int) -> dict[int, str]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):  # (a thread that just ended)
            out[int(tid)] = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    return out


def _spinner(pid: int) -> int:
    return next(tid for tid, name in _threads(pid).items() if name == "tokenrelay-spin")


def _stat(pid: int, tid: int) -> list[str]:
    text = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()  # (fields from 3 on: the name may hold spaces)


def _cpu_s(pid: int, tid: int) -> float:
    fields = _stat(pid, tid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _cpu_over(pid: int, tid: int, seconds: float) -> float:
    before = _cpu_s(pid, tid)
    time.sleep(seconds)
    return _cpu_s(pid, tid) - before


def _workers(supervisor: int) -> list[int]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        kids = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
        pids = [int(k) for k in kids]
        if len(pids) == 2 and all(any(n == "tokenrelay-spin" for n in _threads(p).values()) for p in pids):
            return pids
        time.sleep(0.1)
    raise AssertionError("the two workers did not start their spinners")


def test_the_worker_is_pinned_and_spins_only_while_a_client_is_connected(
    daemon_factory: Callable[..., Daemon], mock_upstream: MockUpstream
) -> None:
    d = daemon_factory("busy_poll = true\n" + route_config("r", mock_upstream))
    pid = d.proc.pid
    spin = _spinner(pid)
    assert int(_stat(pid, spin)[38]) == SCHED_IDLE  # (field 41: the scheduling policy)
    cores = {frozenset(os.sched_getaffinity(tid)) for tid in _threads(pid)}
    assert len(cores) == 1 and len(next(iter(cores))) == 1  # every thread on the same one core
    assert _cpu_over(pid, spin, 0.5) < 0.1  # no client: asleep

    # The SDK's pool keeps its connection open after a call, until the client is closed. (After a stream it may
    # not: the SDK stops reading at `[DONE]` and its HTTP client drops a response it has not read to the end.)
    with openai.OpenAI(base_url=d.base_url, api_key="k", max_retries=0) as client:
        chunks = list(client.chat.completions.create(model="r", messages=CHAT, stream=True))  # type: ignore[arg-type]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reply = client.chat.completions.create(model="r", messages=CHAT)  # type: ignore[arg-type]
        assert reply.choices[0].message.content
        assert d.metric("tokenrelay_busy_poll_clients") == 1
        spun = _cpu_over(pid, spin, 1.0)
        # It spins whenever its core has nothing else to run: a share of the second, however busy the machine.
        assert spun > 0.2, f"spun {spun:.2f} s of 1 s with a client connected"
    deadline = time.monotonic() + 5
    while d.metric("tokenrelay_busy_poll_clients") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert d.metric("tokenrelay_busy_poll_clients") == 0
    time.sleep(busypoll.LINGER_S + 0.3)  # (it spins on for LINGER_S after the last client left)
    assert _cpu_over(pid, spin, 0.5) < 0.1  # the client is gone: asleep again
    assert d.metric("tokenrelay_busy_poll_cpu_seconds_total") >= spun
    assert d.stop() == 0


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_two_workers_are_pinned_to_two_cores(
    daemon_factory: Callable[..., Daemon], mock_upstream: MockUpstream
) -> None:
    port = free_port()
    d = daemon_factory(
        route_config("r", mock_upstream), args=["--workers", "2", "--busy-poll"], listen=f"127.0.0.1:{port}"
    )
    cores = [os.sched_getaffinity(w) for w in _workers(d.proc.pid)]
    assert all(len(c) == 1 for c in cores) and cores[0] != cores[1]
    client = openai.OpenAI(base_url=d.base_url, api_key="k", max_retries=0)
    reply = client.chat.completions.create(model="r", messages=CHAT)  # type: ignore[arg-type]
    assert reply.choices[0].message.content
    assert d.stop() == 0


def test_without_busy_poll_there_is_no_spinner_and_no_pinning(
    daemon_factory: Callable[..., Daemon], mock_upstream: MockUpstream
) -> None:
    d = daemon_factory(route_config("r", mock_upstream))
    assert "tokenrelay-spin" not in _threads(d.proc.pid).values()
    assert os.sched_getaffinity(d.proc.pid) == os.sched_getaffinity(0)
    with pytest.raises(AssertionError, match="no tokenrelay_busy_poll_clients"):
        d.metric("tokenrelay_busy_poll_clients")
