"""Side-by-side benchmarks: tokenrelay against no proxy, nginx and LiteLLM, in one run on one machine.

    python benches/run.py [--quick] [--scenarios paced,unpaced,idle,nonstream,anthropic,capacity]
                          [--targets direct,tokenrelay-w1,tokenrelay-w2,tokenrelay-w1-busy,nginx-w1,nginx-w2,
                                     litellm] (also tokenrelay-w2-busy)
                          [--rounds N] [--mock fast|aiohttp] [--rig rust|python] [--no-readme]

Every process is separate: the mock upstream (`fastmock`, or `tokenrelay.mock` with `--mock aiohttp`), the load
generator (`loadgen`, one process per measurement) and the proxy under test. The rig (mock and load generator) is
the compiled one in `benches/rig/` (built by this script with cargo) or, with `--rig python` or when cargo is
missing or the build fails, `fastmock.py` and `loadgen.py`: the same programs in Python, at about twice the CPU.
Mock and load generator are pinned to core 0, the proxy to core 1 (`taskset`); two-worker proxies get both cores,
so they share core 0 with the rig. Each round starts every target in turn (rotating the order), warms it up, runs
every scenario, stops it; the figures are medians over the rounds. Raw JSON goes to `benches/out/<stamp>/`, the
tables into `benches/README.md` between the results markers, the chart to `benches/results.png`. See
benches/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LITELLM_VERSION = "1.77.7"  # newest release whose `[proxy]` extra installs from PyPI here (1.110 needs litellm-proxy)
LITELLM_VENV = HERE / ".litellm-venv"
RIG_DIR = HERE / "rig"  # the compiled rig: its own crate, not a member of the root workspace
CORE_RIG = "0"
CORE_PROXY = "1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
OPENAI_BODY = {
    "model": "bench",
    "stream": True,
    "stream_options": {"include_usage": True},
    "messages": [{"role": "user", "content": "say something"}],
}
ANTHROPIC_BODY = {
    "model": "bench-anthropic",
    "stream": True,
    "max_tokens": 256,
    "messages": [{"role": "user", "content": "say something"}],
}
ALL_TARGETS = [
    "direct",
    "tokenrelay-w1",
    "tokenrelay-w2",
    "tokenrelay-w1-busy",  # (tokenrelay-w2-busy: by --targets; pinned to the rig's core it only loses, see README)
    "nginx-w1",
    "nginx-w2",
    "litellm",
]
ALL_SCENARIOS = ["nonstream", "paced", "anthropic", "unpaced", "idle", "capacity"]


def ms(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def taskset(cores: str) -> list[str]:
    return ["taskset", "-c", cores] if shutil.which("taskset") and (os.cpu_count() or 1) >= 2 else []


def http(method: str, url: str, body: dict[str, Any] | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    data = orjson.dumps(body) if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float, ok: Callable[[int], bool]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        try:
            status, _ = http("GET", url, timeout=2)
            if ok(status):
                return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"not ready after {timeout:.0f} s")


# --- /proc ---------------------------------------------------------------------------------------------------------


def tree_pids(roots: list[int]) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            children.setdefault(int(stat[stat.rfind(b")") + 2 :].split()[1]), []).append(int(entry))
    out: list[int] = []
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.append(pid)
            todo.extend(children.get(pid, []))
    return out


def cpu_seconds(roots: list[int]) -> float:
    """utime+stime of every live process in the trees (children's own counters, not just reaped ones)."""
    total = 0
    for pid in tree_pids(roots):
        try:
            fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return total / CLK_TCK


def rss_kb(roots: list[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for pid in tree_pids(roots):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out[pid] = int(line.split()[1])
        except OSError:
            continue
    return out


def build_rig() -> tuple[Path | None, str]:
    """Builds the compiled rig (`benches/rig`, release); its binaries' directory, or None and why not."""
    cargo = shutil.which("cargo") or str(Path.home() / ".cargo" / "bin" / "cargo")
    if not Path(cargo).exists():
        return None, "cargo not found"
    target = RIG_DIR / "target"
    cmd = [cargo, "build", "--release", "--quiet", "--manifest-path", str(RIG_DIR / "Cargo.toml")]
    try:
        r = subprocess.run([*cmd, "--target-dir", str(target)], capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"cargo build failed: {exc}"
    if r.returncode != 0:
        return None, f"cargo build failed ({r.returncode}): {r.stderr.strip()[-600:]}"
    bin_dir = target / "release"
    missing = [b for b in ("fastmock", "loadgen") if not (bin_dir / b).exists()]
    return (None, f"cargo build left no {', '.join(missing)}") if missing else (bin_dir, "")


# --- processes -----------------------------------------------------------------------------------------------------


class Proc:
    """A child process in its own process group, stopped by SIGTERM then SIGKILL of that group."""

    def __init__(self, cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self.log_file = open(log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, stdout=self.log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=log_path.parent
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers of the group (workers)
        self.log_file.close()

    def tail(self, n: int = 1500) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-n:]
        return ""


def wait_line(path: Path, needle: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in path.read_text(errors="replace").splitlines():
            if needle in line:
                return line
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"no {needle!r} after {timeout:.0f} s")


@dataclass
class Running:
    port: int
    roots: list[int]  # the proxy's processes (empty for direct)
    headers: list[str] = field(default_factory=list)
    stop: Callable[[], None] = lambda: None


@dataclass
class Target:
    name: str
    cores: str
    start: Callable[[Path, int], Running]
    skipped: str = ""


def start_direct(work: Path, mock_port: int) -> Running:
    return Running(mock_port, [])


def tokenrelay_starter(
    workers: int, python: str = sys.executable, name: str = "", extra: tuple[str, ...] = ()
) -> Callable[[Path, int], Running]:
    """`python`: the interpreter whose tokenrelay runs (another build, for a before/after in one run); `extra`:
    more `serve` arguments (`--busy-poll`)."""
    name = name or f"tokenrelay-w{workers}"

    def start(work: Path, mock_port: int) -> Running:
        port = free_port()
        cfg = work / f"{name}.toml"
        cfg.write_text(
            f"""# generated by benches/run.py: one route per API, each to the mock
log_level = "warning"   # no per-request log lines in the measured path
[routes.bench]
[[routes.bench.deployments]]
kind = "openai"
base_url = "http://127.0.0.1:{mock_port}/v1"
model = "mock-gpt"
[routes.bench-anthropic]
[[routes.bench-anthropic.deployments]]
kind = "anthropic"
base_url = "http://127.0.0.1:{mock_port}/v1"
model = "mock-claude"
"""
        )
        cmd = [
            *taskset(CORE_PROXY if workers == 1 else f"{CORE_RIG},{CORE_PROXY}"),
            python,
            "-m",
            "tokenrelay",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--config",
            str(cfg),
            "--workers",
            str(workers),
            "--log-level",
            "warning",
            "--db",
            str(work / f"{name}.db"),
            *extra,
        ]
        p = Proc(cmd, work / f"{name}.log", env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            wait_line(p.log_path, "tokenrelay listening on", p.proc, 30)
            # with N workers, wait until each has printed its line
            deadline = time.monotonic() + 30
            while p.log_path.read_text().count("tokenrelay listening on") < workers and time.monotonic() < deadline:
                time.sleep(0.1)
        except RuntimeError as exc:
            p.stop()
            raise RuntimeError(f"{exc}: {p.tail()}") from None
        return Running(port, [p.pid], stop=p.stop)

    return start


def nginx_starter(workers: int) -> Callable[[Path, int], Running]:
    def start(work: Path, mock_port: int) -> Running:
        port = free_port()
        d = work / f"nginx-w{workers}"
        (d / "tmp").mkdir(parents=True, exist_ok=True)
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf = d / "nginx.conf"
        conf.write_text(
            f"""# generated by benches/run.py
{user}worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    upstream mock {{ server 127.0.0.1:{mock_port}; keepalive 1024; keepalive_requests 1000000; }}
    server {{
        listen 127.0.0.1:{port} reuseport backlog=8192;
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""
        )
        cores = CORE_PROXY if workers == 1 else f"{CORE_RIG},{CORE_PROXY}"
        cmd = [*taskset(cores), "nginx", "-p", str(d), "-e", str(d / "error.log"), "-c", str(conf), "-g", "daemon off;"]
        p = Proc(cmd, d / "stdout.log")
        try:
            wait_http(f"http://127.0.0.1:{port}/_control", p.proc, 15, lambda s: s == 200)
        except RuntimeError as exc:
            p.stop()
            raise RuntimeError(f"{exc}: {p.tail()} {(d / 'error.log').read_text(errors='replace')[-800:]}") from None
        return Running(port, [p.pid], stop=p.stop)

    return start


def litellm_bin() -> Path:
    """LiteLLM's proxy in its own venv, created on first use."""
    exe = LITELLM_VENV / "bin" / "litellm"
    marker = LITELLM_VENV / f".installed-{LITELLM_VERSION}"
    if exe.exists() and marker.exists():
        return exe
    log(f"installing litellm[proxy]=={LITELLM_VERSION} into {LITELLM_VENV} (first use; takes a few minutes)")
    if not (LITELLM_VENV / "bin" / "python").exists():
        subprocess.run(["python3", "-m", "venv", str(LITELLM_VENV)], check=True)
    pip = [str(LITELLM_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    r = subprocess.run([*pip, f"litellm[proxy]=={LITELLM_VERSION}"], capture_output=True, text=True, timeout=900)
    if r.returncode != 0 or not exe.exists():
        raise RuntimeError(f"pip install litellm[proxy]=={LITELLM_VERSION} failed: {r.stderr[-600:]}")
    marker.touch()
    return exe


def start_litellm(work: Path, mock_port: int) -> Running:
    exe = litellm_bin()
    port = free_port()
    cfg = work / "litellm.yaml"
    cfg.write_text(
        f"""# generated by benches/run.py
model_list:
  - model_name: bench
    litellm_params:
      model: openai/mock-gpt
      api_base: http://127.0.0.1:{mock_port}/v1
      api_key: sk-mock
  - model_name: bench-anthropic
    litellm_params:
      model: anthropic/mock-claude
      api_base: http://127.0.0.1:{mock_port}
      api_key: sk-mock
litellm_settings:
  telemetry: false
  set_verbose: false
  drop_params: true
general_settings:
  master_key: sk-bench-master
  disable_spend_logs: true
  disable_error_logs: true
"""
    )
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "OPENAI_", "ANTHROPIC_", "LITELLM_"))
    }
    env.update(
        LITELLM_LOG="ERROR",
        LITELLM_TELEMETRY="False",
        LITELLM_LOCAL_MODEL_COST_MAP="True",  # no fetch of the price list from the internet
        DISABLE_ADMIN_UI="True",
        NO_DOCS="True",
        PYTHONUNBUFFERED="1",
    )
    cmd = [
        *taskset(CORE_PROXY),
        str(exe),
        "--config",
        str(cfg),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    p = Proc(cmd, work / "litellm.log", env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/health/liveliness", p.proc, 120, lambda s: s == 200)
    except RuntimeError as exc:
        p.stop()
        raise RuntimeError(f"{exc}: {p.tail(800)}") from None
    return Running(port, [p.pid], headers=["Authorization: Bearer sk-bench-master"], stop=p.stop)


TARGETS: dict[str, Target] = {
    "direct": Target("direct", CORE_RIG, start_direct),
    "tokenrelay-w1": Target("tokenrelay-w1", CORE_PROXY, tokenrelay_starter(1)),
    "tokenrelay-w2": Target("tokenrelay-w2", f"{CORE_RIG},{CORE_PROXY}", tokenrelay_starter(2)),
    # (busy polling: each worker pinned to one of the target's cores, kept awake while clients are connected)
    "tokenrelay-w1-busy": Target(
        "tokenrelay-w1-busy", CORE_PROXY, tokenrelay_starter(1, name="tokenrelay-w1-busy", extra=("--busy-poll",))
    ),
    "tokenrelay-w2-busy": Target(
        "tokenrelay-w2-busy",
        f"{CORE_RIG},{CORE_PROXY}",
        tokenrelay_starter(2, name="tokenrelay-w2-busy", extra=("--busy-poll",)),
    ),
    "nginx-w1": Target("nginx-w1", CORE_PROXY, nginx_starter(1)),
    "nginx-w2": Target("nginx-w2", f"{CORE_RIG},{CORE_PROXY}", nginx_starter(2)),
    "litellm": Target("litellm", CORE_PROXY, start_litellm),
}


def preflight(names: list[str]) -> None:
    """Marks targets that cannot run here as skipped, with the reason (the others still run)."""
    for name in names:
        t = TARGETS[name]
        if name.startswith("nginx") and not shutil.which("nginx"):
            t.skipped = "nginx not installed (apt-get install -y nginx-light)"
        if name.startswith("tokenrelay"):
            r = subprocess.run(
                [sys.executable, "-c", "import tokenrelay.app, tokenrelay._core"], capture_output=True, text=True
            )
            if r.returncode != 0:
                t.skipped = "tokenrelay does not import: " + (r.stderr.strip().splitlines() or ["?"])[-1][:200]
        if name == "litellm":
            try:
                litellm_bin()
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                t.skipped = f"LiteLLM could not be installed: {exc}"[:300]


# --- measurements --------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    paced_levels: list[int]
    unpaced_streams: int
    unpaced_tokens: int
    idle_streams: int
    idle_hold_s: float
    nonstream_conns: int
    nonstream_s: float
    anthropic_streams: int
    capacity_levels: list[int]
    rounds: int


FULL = Plan([64, 256, 1024], 32, 2000, 3000, 8.0, 32, 3.0, 256, [512, 768, 1024, 1536, 2048, 3072, 4096], 3)
QUICK = Plan([64, 256], 16, 1000, 1000, 6.0, 32, 2.0, 256, [512, 1024, 2048], 1)


class Bench:
    def __init__(self, work: Path, out: Path, mock_port: int, mock_control: str, loadgen: list[str]) -> None:
        self.work = work
        self.out = out
        self.mock_port = mock_port
        self.mock_control = mock_control
        self.loadgen_cmd = loadgen  # the load generator's command (the compiled one or loadgen.py)
        self.records: list[dict[str, Any]] = []

    def mock(self, **behaviour: Any) -> None:
        status, body = http("POST", self.mock_control, behaviour)
        if status != 200:
            raise RuntimeError(f"mock control failed: {status} {body[:200]!r}")

    def settle(self, timeout_s: float = 30.0) -> None:
        """Waits until the mock holds no stream open upstream, so that a target which was just stopped (LiteLLM
        leaves streams the load generator cut) does not keep core 0 busy under the next one's measurements."""
        deadline = time.monotonic() + timeout_s
        started, first = time.monotonic(), None
        while True:
            status, body = http("GET", self.mock_control)
            open_streams = orjson.loads(body).get("open_streams", 0) if status == 200 else 0
            first = open_streams if first is None else first
            if not open_streams or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if first:
            waited = time.monotonic() - started
            log(f"  settle: {first} streams were still open upstream; {open_streams} after {waited:.1f} s")

    def loadgen(
        self, run: Running, tag: str, *, path: str, body: dict[str, Any], extra: list[str], timeout_s: float
    ) -> dict[str, Any]:
        out = self.out / f"{tag}.json"
        cmd = [
            *taskset(CORE_RIG),
            *self.loadgen_cmd,
            "--port",
            str(run.port),
            "--path",
            path,
            "--body",
            orjson.dumps(body).decode(),
            "--timeout-s",
            str(timeout_s),
            "--out",
            str(out),
            *extra,
        ]
        for h in run.headers:
            cmd += ["--header", h]
        cpu0 = cpu_seconds(run.roots) if run.roots else 0.0
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s + 60)
        cpu1 = cpu_seconds(run.roots) if run.roots else 0.0
        if r.returncode != 0 or not out.exists():
            raise RuntimeError(f"loadgen failed ({r.returncode}): {r.stderr[-800:]}")
        res: dict[str, Any] = orjson.loads(out.read_bytes())
        res["proxy_cpu_s"] = cpu1 - cpu0 if run.roots else None
        res["proxy_cpu_per_1m_events"] = (cpu1 - cpu0) / res["events"] * 1e6 if run.roots and res["events"] else None
        out.write_bytes(orjson.dumps(res, option=orjson.OPT_INDENT_2))
        return res

    def record(self, target: str, scenario: str, level: int, rnd: int, res: dict[str, Any]) -> None:
        self.records.append({"target": target, "scenario": scenario, "level": level, "round": rnd, **res})

    # each scenario: configure the mock, run the load generator, keep the summary
    def paced(
        self, t: str, run: Running, rnd: int, level: int, path: str = "", scenario: str = "paced", requests: int = 2
    ) -> dict[str, Any]:
        anthropic = scenario == "anthropic"
        path = path or ("/v1/messages" if anthropic else "/v1/chat/completions")
        body = ANTHROPIC_BODY if anthropic else OPENAI_BODY
        self.steady(run, level, path, body)
        self.mock(tokens=64, delay_ms=20.0, first_token_ms=0.0)
        res = self.loadgen(
            run,
            f"{scenario}-{level}-{t}-r{rnd}",
            path=path,
            body=body,
            extra=[
                # Starts spread over one stream's life (~1.3 s) and `requests` answers per connection: the
                # arrival rate of a steady load of `level` concurrent streams, not a single burst.
                "--mode",
                "stream",
                "--streams",
                str(level),
                "--ramp-ms",
                "1300",
                "--pace-ms",
                "20",
                "--requests",
                str(requests),
                "--cut-s",
                str(1.3 * (requests + 1) + 15),
            ],
            timeout_s=30 + level / 100,
        )
        self.record(t, scenario, level, rnd, res)
        return res

    def steady(self, run: Running, level: int, path: str, body: dict[str, Any]) -> None:
        """Brings the target to the state a steady load of `level` concurrent streams keeps it in (unmeasured):
        `level` short streams at once, so a proxy holds as many upstream connections as that load needs, as a
        long-running proxy does. Without it a level's first answers also paid for opening the proxy's upstream
        connections, and the mock for accepting them while it streamed (the direct run pays neither)."""
        self.mock(tokens=2, delay_ms=0.0, first_token_ms=1500.0)  # (held long enough that all `level` overlap)
        self.unmeasured(run, f"steady-{level}", path, body, level, 1)

    def unmeasured(self, run: Running, tag: str, path: str, body: dict[str, Any], streams: int, requests: int) -> None:
        """A load whose figures are not kept (warm-ups); a failure here shows in the measurement after it."""
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.loadgen(
                run,
                f"{tag}-{run.port}",
                path=path,
                body=body,
                extra=["--mode", "stream", "--streams", str(streams), "--requests", str(requests)],
                timeout_s=30 + streams / 100,
            )

    def unpaced(self, t: str, run: Running, rnd: int, plan: Plan) -> None:
        self.mock(tokens=plan.unpaced_tokens, delay_ms=0.0, first_token_ms=0.0)
        res = self.loadgen(
            run,
            f"unpaced-{plan.unpaced_streams}-{t}-r{rnd}",
            path="/v1/chat/completions",
            body=OPENAI_BODY,
            extra=["--mode", "stream", "--streams", str(plan.unpaced_streams), "--cut-s", "10"],
            timeout_s=60,
        )
        self.record(t, "unpaced", plan.unpaced_streams, rnd, res)

    def nonstream(self, t: str, run: Running, rnd: int, plan: Plan) -> None:
        self.mock(tokens=16, delay_ms=0.0, first_token_ms=0.0)
        res = self.loadgen(
            run,
            f"nonstream-{plan.nonstream_conns}-{t}-r{rnd}",
            path="/v1/chat/completions",
            body={**OPENAI_BODY, "stream": False, "stream_options": None},
            extra=["--mode", "json", "--streams", str(plan.nonstream_conns), "--duration-s", str(plan.nonstream_s)],
            timeout_s=plan.nonstream_s + 30,
        )
        self.record(t, "nonstream", plan.nonstream_conns, rnd, res)

    def idle(self, t: str, run: Running, rnd: int, plan: Plan) -> None:
        hold = plan.idle_hold_s
        ramp = 2.0
        self.mock(tokens=2, delay_ms=0.0, first_token_ms=hold * 1000)
        before = rss_kb(run.roots) if run.roots else {}
        res = self.loadgen(
            run,
            f"idle-{plan.idle_streams}-{t}-r{rnd}",
            path="/v1/chat/completions",
            body=OPENAI_BODY,
            extra=[
                "--mode",
                "idle",
                "--streams",
                str(plan.idle_streams),
                "--ramp-ms",
                str(ramp * 1000),
                "--cut-s",
                str(hold + 10),
                "--sample-pids",
                *[str(p) for p in run.roots],
                "--sample-after-s",
                str(min(hold - ramp - 1, 3.0)),
                "--sample-url",
                self.mock_control,
            ]
            if run.roots
            else [
                "--mode",
                "idle",
                "--streams",
                str(plan.idle_streams),
                "--ramp-ms",
                str(ramp * 1000),
                "--cut-s",
                str(hold + 10),
            ],
            timeout_s=hold + 40,
        )
        res["rss_before_kb"] = sum(before.values())
        if run.roots and res["samples"]:
            during = sum(res["samples"][-1]["rss_kb"].values())
            res["rss_during_kb"] = during
            upstream = res["samples"][-1].get("upstream", {}).get("open_streams")
            res["upstream_open"] = upstream
            # per stream actually relayed (held open upstream); the aiohttp mock does not count them
            opened = upstream if isinstance(upstream, int) and upstream > 0 else plan.idle_streams
            # A proxy that held fewer than half of the streams open has no per-stream figure (its errors tell):
            # (during - before) / a few streams is its own noise, e.g. negative where it freed memory meanwhile.
            held = opened >= plan.idle_streams / 2
            res["rss_per_stream_kb"] = (during - res["rss_before_kb"]) / opened if held else None
        self.record(t, "idle", plan.idle_streams, rnd, res)

    def capacity(self, t: str, run: Running, plan: Plan, deadline: float) -> None:
        """The largest paced level with no error and no chunk more than 100 ms behind its pace (stops at a miss)."""
        best = 0
        for level in plan.capacity_levels:
            if time.monotonic() > deadline:
                break
            res = self.paced(t, run, 0, level, scenario="capacity", requests=3)
            ok = res["errors"] == 0 and res["cut"] == 0 and res["late_streams"] == 0 and res["late_first"] == 0
            log(
                f"  capacity {t} {level}: {'ok' if ok else 'MISSED'} (late {res['late_streams']}, "
                f"late first {res['late_first']}, errors {res['errors']}, cut {res['cut']}, "
                f"gap max {ms(res['gap_ms']['max'])} ms)"
            )
            if not ok:
                break
            best = level
        self.records.append(
            {
                "target": t,
                "scenario": "capacity-max",
                "level": best,
                "round": 0,
                "tried_up_to": plan.capacity_levels[-1],
                "first_level": plan.capacity_levels[0],
            }
        )


def warmup(bench: Bench, run: Running) -> None:
    bench.mock(tokens=8, delay_ms=2.0, first_token_ms=0.0)
    for body, path in ((OPENAI_BODY, "/v1/chat/completions"), (ANTHROPIC_BODY, "/v1/messages")):
        bench.unmeasured(run, "warmup", path, body, 64, 2)


# --- report --------------------------------------------------------------------------------------------------------


def med(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None and x == x]
    return statistics.median(v) if v else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one round, fewer levels (~4 minutes without LiteLLM)")
    p.add_argument("--scenarios", default=",".join(ALL_SCENARIOS))
    p.add_argument("--targets", default=",".join(ALL_TARGETS))
    p.add_argument("--rounds", type=int, default=0)
    p.add_argument("--mock", choices=("fast", "aiohttp"), default="fast")
    p.add_argument(
        "--rig",
        choices=("rust", "python"),
        default="rust",
        help="mock + load generator: compiled (benches/rig, built with cargo; Python if that fails) or the .py ones",
    )
    p.add_argument("--no-readme", action="store_true", help="don't rewrite benches/README.md and results.png")
    p.add_argument(
        "--baseline",
        metavar="PYTHON",
        help="also measure `baseline-w1`: the tokenrelay installed for this interpreter (e.g. an earlier commit "
        "in its own venv), for a before/after in the same run",
    )
    args = p.parse_args(argv)
    if args.baseline:
        TARGETS["baseline-w1"] = Target("baseline-w1", CORE_PROXY, tokenrelay_starter(1, args.baseline, "baseline-w1"))
        if "baseline-w1" not in args.targets.split(","):
            args.targets += ",baseline-w1"
    plan = QUICK if args.quick else FULL
    if args.rounds:
        plan.rounds = args.rounds
    scenarios = [s for s in args.scenarios.split(",") if s]
    names = [t for t in args.targets.split(",") if t]
    for n in names:
        if n not in TARGETS:
            p.error(f"unknown target {n!r} (known: {', '.join(TARGETS)})")
    for s in scenarios:
        if s not in ALL_SCENARIOS:
            p.error(f"unknown scenario {s!r} (known: {', '.join(ALL_SCENARIOS)})")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    need = max(plan.idle_streams, *plan.capacity_levels) * 2 + 512
    if hard < need:
        log(f"warning: open-file limit {hard} < {need}: the largest levels may fail on file descriptors")

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = HERE / "out" / stamp
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tokenrelay-bench-"))
    started = time.monotonic()
    preflight(names)
    for n in names:
        if TARGETS[n].skipped:
            log(f"skipping {n}: {TARGETS[n].skipped}")
    active = [n for n in names if not TARGETS[n].skipped]

    rig, rig_note = args.rig, ""
    bin_dir: Path | None = None
    if rig == "rust":
        bin_dir, rig_note = build_rig()
        if bin_dir is None:
            rig = "python"
            log(f"the compiled rig is not available ({rig_note}): using the Python rig (fastmock.py, loadgen.py)")
    if bin_dir is not None:
        loadgen_cmd, fastmock_cmd = [str(bin_dir / "loadgen")], [str(bin_dir / "fastmock")]
    else:
        loadgen_cmd = [sys.executable, str(HERE / "loadgen.py")]
        fastmock_cmd = [sys.executable, str(HERE / "fastmock.py")]
    mock_port = free_port()
    if args.mock == "fast":
        mock_cmd = [*fastmock_cmd, "--port", str(mock_port)]
    else:
        mock_cmd = [sys.executable, "-m", "tokenrelay.mock", "--port", str(mock_port), "--usage", "true"]
    mock_name = "tokenrelay.mock" if args.mock == "aiohttp" else Path(fastmock_cmd[-1]).name
    log(f"rig: {rig} (mock {mock_name}, load generator {Path(loadgen_cmd[-1]).name})")
    # How steady the cores are, before anything runs: the context a p99 is read in (see benches/noise.py).
    import noise  # benches/noise.py

    machine_noise = noise.measure(3.0 if args.quick else 5.0, list(range(min(os.cpu_count() or 1, 2))))
    log(f"machine noise: {noise.describe(machine_noise)}")
    mock = Proc([*taskset(CORE_RIG), *mock_cmd], work / "mock.log")
    bench = Bench(work, out, mock_port, f"http://127.0.0.1:{mock_port}/_control", loadgen_cmd)
    baseline: dict[str, list[dict[int, int]]] = {}
    failures: dict[str, str] = {}
    try:
        wait_line(mock.log_path, "mock listening on", mock.proc, 20)
        stream_scenarios = [s for s in scenarios if s != "capacity"]
        for rnd in range(plan.rounds if stream_scenarios else 0):
            order = active[rnd % len(active) :] + active[: rnd % len(active)]
            order = ["direct", *[t for t in order if t != "direct"]] if "direct" in order else order
            for t in order:
                if t in failures:
                    continue
                log(f"round {rnd + 1}/{plan.rounds}: {t}")
                try:
                    run = TARGETS[t].start(work, mock_port)
                except (RuntimeError, OSError) as exc:
                    failures[t] = f"did not start: {exc}"[:400]
                    log(f"  {t} {failures[t]}")
                    continue
                try:
                    warmup(bench, run)
                    if run.roots:
                        baseline.setdefault(t, []).append(rss_kb(run.roots))
                    for s in stream_scenarios:
                        try:
                            if s == "paced":
                                for level in plan.paced_levels:
                                    r = bench.paced(t, run, rnd, level)
                                    log(
                                        f"  paced {level}: ttft p50 {ms(r['ttft_ms']['p50'])} ms p99 "
                                        f"{ms(r['ttft_ms']['p99'])} ms gap p99 {ms(r['gap_ms']['p99'])} ms "
                                        f"errors {r['errors']} cut {r['cut']}"
                                    )
                            elif s == "anthropic":
                                bench.paced(t, run, rnd, plan.anthropic_streams, scenario="anthropic")
                            elif s == "unpaced":
                                bench.unpaced(t, run, rnd, plan)
                                r = bench.records[-1]
                                log(f"  unpaced: {r['events_per_s']:.0f} events/s errors {r['errors']}")
                            elif s == "nonstream":
                                bench.nonstream(t, run, rnd, plan)
                                r = bench.records[-1]
                                log(f"  nonstream: {r['requests_per_s']:.0f} req/s errors {r['errors']}")
                            elif s == "idle":
                                bench.idle(t, run, rnd, plan)
                                r = bench.records[-1]
                                log(f"  idle: {ms(r.get('rss_per_stream_kb'))} KB/stream errors {r['errors']}")
                        except Exception as exc:  # one broken measurement must not lose the run
                            log(f"  {s} failed: {exc!r}")
                            bench.records.append({"target": t, "scenario": s, "round": rnd, "failed": str(exc)[:400]})
                finally:
                    run.stop()
                    bench.settle()
        if "capacity" in scenarios:
            budget = 120 if args.quick else 240
            per_target = budget / max(1, len(active))
            for t in active:
                if t in failures:
                    continue
                log(f"capacity search: {t}")
                try:
                    run = TARGETS[t].start(work, mock_port)
                except (RuntimeError, OSError) as exc:
                    failures[t] = f"did not start: {exc}"[:400]
                    continue
                try:
                    warmup(bench, run)
                    bench.capacity(t, run, plan, time.monotonic() + per_target)
                except Exception as exc:
                    log(f"  capacity failed: {exc!r}")
                finally:
                    run.stop()
                    bench.settle()
    finally:
        mock.stop()
    elapsed = time.monotonic() - started
    meta = {
        "command": "python benches/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "noise": machine_noise,
        "elapsed_s": elapsed,
        "plan": vars(plan),
        "mock": args.mock,
        "rig": rig,  # the load generator's (and with `--mock fast` the mock's) implementation actually used
        "rig_requested": args.rig,
        "rig_note": rig_note,  # why the compiled rig was not used, if it was not
        "skipped": {n: TARGETS[n].skipped for n in names if TARGETS[n].skipped} | failures,
        "baseline_rss_kb": baseline,
        "litellm_version": LITELLM_VERSION,
        "nginx_version": nginx_version(),
    }
    (out / "results.json").write_bytes(
        orjson.dumps({"meta": meta, "records": bench.records}, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)
    )
    import report  # benches/report.py

    md = report.markdown(meta, bench.records, names)
    (out / "results.md").write_text(md)
    print(md)
    if not args.no_readme:
        report.update_readme(HERE / "README.md", md)
        report.chart(bench.records, names, HERE / "results.png")
    log(f"done in {elapsed / 60:.1f} min; raw results in {out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def machine() -> str:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    py = platform.python_version()
    return f"{platform.system()} {platform.release()}, {os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, Python {py}"


def nginx_version() -> str:
    with contextlib.suppress(OSError):
        r = subprocess.run(["nginx", "-v"], capture_output=True, text=True)
        return r.stderr.strip().split("/")[-1]
    return ""


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
