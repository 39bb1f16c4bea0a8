"""Fixtures that start real processes on loopback: mock upstreams and the tokenrelay daemon itself."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# Hypothesis profiles: "fast" by default, "slow" for long local runs (HYPOTHESIS_PROFILE=slow).
try:
    from hypothesis import HealthCheck, settings

    settings.register_profile("fast", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("slow", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))
except ImportError:  # pragma: no cover
    pass

FIXTURES = Path(__file__).parent / "fixtures"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_line(proc: subprocess.Popen[str], marker: str, timeout: float = 30.0) -> str:
    """Reads the process's stdout until a line containing `marker` (its 'listening on' line)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                raise RuntimeError(f"process exited with {proc.returncode} before printing {marker!r}")
            continue
        if marker in line:
            return line.strip()
    raise TimeoutError(f"no {marker!r} line within {timeout} s")


def http_json(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url, data=data, method=method, headers={"content-type": "application/json", **(headers or {})}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


@dataclass
class MockUpstream:
    """A mock provider process (tokenrelay.mock)."""

    proc: subprocess.Popen[str]
    url: str  # http://127.0.0.1:PORT

    @property
    def openai_base(self) -> str:
        return f"{self.url}/v1"

    def control(self, **changes: Any) -> dict[str, Any]:
        result: dict[str, Any] = http_json("POST", f"{self.url}/_control", changes)
        return result

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = http_json("GET", f"{self.url}/_stats")
        return result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_mock(port: int = 0, **behaviour: Any) -> MockUpstream:
    args = [sys.executable, "-m", "tokenrelay.mock", "--port", str(port)]
    for key, value in behaviour.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = _wait_line(proc, "mock listening on")
    return MockUpstream(proc, line.rsplit(" ", 1)[-1])


@pytest.fixture
def mock_factory() -> Iterator[Callable[..., MockUpstream]]:
    started: list[MockUpstream] = []

    def make(**behaviour: Any) -> MockUpstream:
        m = start_mock(**behaviour)
        started.append(m)
        return m

    yield make
    for m in started:
        m.stop()


@pytest.fixture
def mock_upstream(mock_factory: Callable[..., MockUpstream]) -> MockUpstream:
    """One mock provider with fast pacing (tests do not need a realistic pace)."""
    return mock_factory(delay_ms=1.0)


@dataclass
class Daemon:
    """A running `tokenrelay serve` process."""

    proc: subprocess.Popen[str]
    url: str
    log_path: Path
    db_path: Path
    config_path: Path | None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def log_records(self, logger: str = "tokenrelay.requests") -> list[dict[str, Any]]:
        """The structured request log lines written so far."""
        out = []
        for line in self.log_path.read_text().splitlines():
            marker = f" {logger} "
            if marker in line:
                out.append(json.loads(line.split(marker, 1)[1]))
        return out

    def wait_records(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            records = self.log_records()
            if len(records) >= count or time.monotonic() > deadline:
                return records
            time.sleep(0.05)

    def get(self, path: str, headers: dict[str, str] | None = None) -> Any:
        return http_json("GET", f"{self.url}{path}", headers=headers)

    def metric(self, name: str) -> float:
        """One unlabelled sample of `/metrics`."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(f"{name} "):
                    return float(line.split()[1])
        raise AssertionError(f"no {name} in /metrics")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_daemon(
    tmp_path: Path,
    config: str | None = None,
    args: list[str] | None = None,
    env: dict[str, str] | None = None,
    listen: str = "127.0.0.1:0",
    name: str = "daemon",
    preexec: Callable[[], None] | None = None,
) -> Daemon:
    config_path = None
    cmd = [sys.executable, "-m", "tokenrelay", "serve", "--listen", listen]
    if config is not None:
        config_path = tmp_path / f"{name}.toml"
        config_path.write_text(textwrap.dedent(config))
        cmd += ["--config", str(config_path)]
    db_path = tmp_path / f"{name}.db"
    cmd += ["--db", str(db_path), *(args or [])]
    log_path = tmp_path / f"{name}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=log_file, text=True, env=full_env, preexec_fn=preexec
        )
    try:
        line = _wait_line(proc, "tokenrelay listening on")
    except Exception:
        proc.kill()
        raise RuntimeError(f"daemon did not start:\n{log_path.read_text()}") from None
    return Daemon(proc, line.rsplit(" ", 1)[-1], log_path, db_path, config_path)


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def make(config: str | None = None, **kwargs: Any) -> Daemon:
        d = start_daemon(tmp_path, config, name=f"daemon{len(started)}", **kwargs)
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop()


def route_config(name: str, *upstreams: MockUpstream, extra: str = "", deployment_extra: str = "") -> str:
    """A config with one route over the given mock upstreams."""
    out = f"[routes.{name}]\n{extra}\n"
    for i, m in enumerate(upstreams):
        out += textwrap.dedent(f"""
            [[routes.{name}.deployments]]
            name = "d{i}"
            kind = "openai"
            base_url = "{m.openai_base}"
            model = "upstream-model"
            api_key_env = "TEST_UPSTREAM_KEY"
            {deployment_extra}
            """)
    return out


@pytest.fixture(autouse=True)
def _upstream_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "sk-upstream-secret-123")
