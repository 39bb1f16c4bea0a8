"""`tokenrelay env` and `tokenrelay run`: point an unmodified agent at the daemon, metered as one run.

`run` registers a fresh run with the daemon (`POST /runs`), starts the command with the stock SDKs' variables
set to the run-scoped URLs (`/run/<id>/v1`), forwards signals to it, and when it ends prints the run's summary
to stderr (stdout stays the command's own) and exits as the command did.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tokenrelay.usage_cli import (
    TOKEN_COLUMNS,
    UNKNOWN,
    human_cost,
    human_count,
    human_rate,
    human_seconds,
    render_table,
)

DEFAULT_URL = "http://127.0.0.1:4141"
# A stand-in client key: the SDKs refuse to start without one, and the daemon ignores it unless keys are set.
PLACEHOLDER_KEY = "tokenrelay"
# Exit codes of `run` itself, as env(1) and docker use them: the command's own code otherwise.
EXIT_TOOL_FAILED = 125
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127


class DaemonError(Exception):
    """The daemon could not be reached or refused a request."""


def daemon_url(url: str | None) -> str:
    return (url or os.environ.get("TOKENRELAY_URL") or DEFAULT_URL).rstrip("/")


def client_key(key: str | None) -> str:
    return key or os.environ.get("TOKENRELAY_KEY") or PLACEHOLDER_KEY


def sdk_environment(url: str, run: str | None, key: str, route_default: str | None = None) -> dict[str, str]:
    """The variables that point the stock `openai` and `anthropic` SDKs (and most agents) at the daemon.

    The anthropic SDK appends `/v1/messages` to its base URL; the openai SDK appends `/chat/completions`."""
    root = f"{url}/run/{run}" if run else url
    env = {
        "OPENAI_BASE_URL": f"{root}/v1",
        "OPENAI_API_BASE": f"{root}/v1",  # older openai SDKs and LangChain
        "ANTHROPIC_BASE_URL": root,
        "OPENAI_API_KEY": key,
        "ANTHROPIC_API_KEY": key,
        "TOKENRELAY_URL": url,
    }
    if run:
        env["TOKENRELAY_RUN"] = run
    if route_default:
        # For agents that read a model from the environment: the route they should ask for.
        env["TOKENRELAY_ROUTE"] = route_default
        env["OPENAI_MODEL"] = route_default
        env["ANTHROPIC_MODEL"] = route_default
    return env


def env_command(url: str | None, run: str | None, key: str | None, route: str | None, out: TextIO) -> int:
    """`tokenrelay env`: shell exports, for `eval "$(tokenrelay env)"`."""
    if run is not None and not _valid_run_id(run):
        print("tokenrelay: --run must be letters, digits, '.', '_' or '-' (at most 128)", file=sys.stderr)
        return 2
    for name, value in sdk_environment(daemon_url(url), run, client_key(key), route).items():
        out.write(f"export {name}={shlex.quote(value)}\n")
    return 0


# --- talking to the daemon ----------------------------------------------------------------------------------------


def _request(method: str, url: str, body: Any = None, timeout: float = 30.0) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:500].decode("utf-8", "replace")
        with contextlib.suppress(ValueError, KeyError, TypeError):
            detail = json.loads(detail)["error"]["message"]
        raise DaemonError(f"{method} {url}: {exc.code} {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise DaemonError(f"cannot reach the tokenrelay daemon at {url}: {getattr(exc, 'reason', exc)}") from None


def daemon_up(url: str) -> bool:
    try:
        return bool(_request("GET", f"{url}/healthz", timeout=2.0).get("status") == "ok")
    except DaemonError:
        return False


@dataclass
class Ephemeral:
    """A private daemon started for one command."""

    proc: subprocess.Popen[str]
    url: str

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: drains, flushes the ledger, exits 0
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_ephemeral(db: str | None, config: str | None, timeout: float = 60.0) -> Ephemeral:
    """Starts `tokenrelay serve --listen 127.0.0.1:0` and waits for its 'listening on' line. It writes to the
    usual ledger unless `db` is given, so `tokenrelay runs` shows the run afterwards."""
    cmd = [sys.executable, "-m", "tokenrelay", "serve", "--listen", "127.0.0.1:0", "--log-level", "warning"]
    if db:
        cmd += ["--db", db]
    if config:
        cmd += ["--config", config]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "listening on" in line:
            proc.stdout.close()  # it prints nothing else to stdout
            return Ephemeral(proc, line.rsplit(" ", 1)[-1].strip())
        if not line and proc.poll() is not None:
            break
    proc.kill()
    proc.wait()
    raise DaemonError(f"the private daemon did not start (exit {proc.returncode}); run `tokenrelay serve` to see why")


# --- the run ------------------------------------------------------------------------------------------------------

_SLUG = re.compile(r"[^A-Za-z0-9._-]+")


def _valid_run_id(run: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", run))


def new_run_id(name: str) -> str:
    """`<name>-<6 hex>`: readable in tables, unique enough for a person's runs."""
    slug = _SLUG.sub("-", name).strip("-._")[:48] or "run"
    return f"{slug}-{secrets.token_hex(3)}"


@contextlib.contextmanager
def _forward_signals(child: subprocess.Popen[bytes]) -> Iterator[None]:
    """SIGTERM and SIGHUP go to the child. SIGINT too, unless we share a terminal's foreground process group with
    it: then the terminal already sent Ctrl-C to the child, and a second one would make it stop less gracefully."""
    terminal_ctrl_c = False
    with contextlib.suppress(OSError):
        terminal_ctrl_c = sys.stdin.isatty() and os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()

    def forward(signum: int, _frame: object) -> None:
        if signum == signal.SIGINT and terminal_ctrl_c:
            return
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass
class RunOptions:
    command: Sequence[str]
    name: str | None = None
    budget_usd: float | None = None
    route_default: str | None = None
    ephemeral: bool = False
    json: bool = False
    url: str | None = None
    key: str | None = None
    db: str | None = None
    config: str | None = None
    summary_file: str | None = None


def run_command(opts: RunOptions, err: TextIO = sys.stderr) -> int:
    """`tokenrelay run -- CMD`: the command's exit code (or its signal, re-raised), 125 if the run could not
    start, 126/127 if the command is not executable / not found."""
    if not opts.command:
        print("tokenrelay: nothing to run: tokenrelay run [OPTIONS] -- COMMAND [ARGS...]", file=err)
        return 2
    url = daemon_url(opts.url)
    private: Ephemeral | None = None
    if opts.ephemeral:
        try:
            private = start_ephemeral(opts.db, opts.config)
        except DaemonError as exc:
            print(f"tokenrelay: {exc}", file=err)
            return EXIT_TOOL_FAILED
        url = private.url
    elif not daemon_up(url):
        print(
            f"tokenrelay: no daemon at {url}. Start one with `tokenrelay serve` (or `make run`) in another "
            "terminal, set TOKENRELAY_URL to where it listens, or use `tokenrelay run --ephemeral` for a "
            "private daemon that lives as long as the command.",
            file=err,
        )
        return EXIT_TOOL_FAILED
    try:
        return _run(opts, url, err)
    finally:
        if private is not None:
            private.stop()


def _run(opts: RunOptions, url: str, err: TextIO) -> int:
    name = opts.name or Path(opts.command[0]).name
    run_id = new_run_id(name)
    try:
        _request(
            "POST",
            f"{url}/runs",
            {
                "id": run_id,
                "name": name,
                "budget_usd": opts.budget_usd,
                "route_default": opts.route_default or "",
                "command": shlex.join(opts.command),
            },
        )
    except DaemonError as exc:
        print(f"tokenrelay: could not register the run: {exc}", file=err)
        return EXIT_TOOL_FAILED
    env = {**os.environ, **sdk_environment(url, run_id, client_key(opts.key), opts.route_default)}
    started = time.monotonic()
    try:
        child = subprocess.Popen(list(opts.command), env=env)
    except FileNotFoundError:
        print(f"tokenrelay: {opts.command[0]}: command not found", file=err)
        _end(url, run_id, EXIT_NOT_FOUND)
        return EXIT_NOT_FOUND
    except PermissionError:
        print(f"tokenrelay: {opts.command[0]}: permission denied", file=err)
        _end(url, run_id, EXIT_NOT_EXECUTABLE)
        return EXIT_NOT_EXECUTABLE
    with _forward_signals(child):
        while True:
            try:
                code = child.wait()
                break
            except KeyboardInterrupt:  # pragma: no cover - our handler replaces the default one
                continue
    wall = time.monotonic() - started
    _end(url, run_id, code)
    try:
        summary = _request("GET", f"{url}/runs/{run_id}")
    except DaemonError as exc:
        print(f"tokenrelay: run {run_id} ended, but its summary could not be read: {exc}", file=err)
        summary = None
    if summary is not None:
        summary["run"]["wall_s"] = wall
        summary["run"]["exit_code"] = code
        if opts.summary_file:
            Path(opts.summary_file).write_text(json.dumps(summary, indent=2) + "\n")
        if opts.json:
            err.write(json.dumps(summary) + "\n")
        else:
            print_summary(summary, err)
    err.flush()
    if code < 0:  # killed by a signal: die the same way, so our parent sees what happened
        _die_by_signal(-code)
    return code


def _end(url: str, run_id: str, code: int) -> None:
    with contextlib.suppress(DaemonError):
        _request("POST", f"{url}/runs/{run_id}/end", {"exit_code": code})


def _die_by_signal(signum: int) -> None:
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a re-raised SIGSEGV/SIGABRT must not dump our core
    with contextlib.suppress(OSError, ValueError):  # SIGKILL/SIGSTOP have no handler to reset
        signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    time.sleep(1)  # pragma: no cover - the signal ends us


def print_summary(summary: dict[str, Any], out: TextIO) -> None:
    """The run summary a person reads when the command ends."""
    run, usage = summary["run"], summary["usage"]
    t = usage["totals"]
    code = run.get("exit_code")
    status = f"exit {code}" if code is None or code >= 0 else f"killed by {_signal_name(-code)}"
    out.write(f"\n── tokenrelay run {run['id']} ({status}, {human_seconds(run.get('wall_s'))} wall) ──\n")
    errors = ""
    if t["errors"]:
        errors = " (" + ", ".join(f"{k} {v}" for k, v in t["errors_by_class"].items() if v) + ")"
    out.write(f"requests   {t['requests']}, errors {t['errors']}{errors}\n")
    for label, kind in TOKEN_COLUMNS:
        tok = t["tokens"][kind]
        detail = ""
        if tok["estimated"]:
            detail = f"  ({human_count(tok['reported'])} reported, {human_count(tok['estimated'])} estimated)"
        out.write(f"{label:<10} {human_count(tok['total'])}{detail}\n")
    cost = human_cost(t["cost_usd"])
    if t["cost_unknown_requests"]:
        cost += f"  ({t['cost_unknown_requests']} request(s) at an unknown price not included)"
    budget = run.get("budget")
    if budget:
        cost += f"  of a ${budget['limit_usd']:g} budget"
        if budget["rejected"]:
            cost += f"; {budget['rejected']} request(s) refused over budget"
    out.write(f"cost       {cost}\n")
    ttft = t["ttft_s"]
    out.write(
        f"waiting    {human_seconds(ttft.get('sum'))} on first tokens (p50 {human_seconds(ttft['p50'])}, "
        f"p99 {human_seconds(ttft['p99'])}); output {human_rate(t['output_tokens_per_s'])}\n"
    )
    if len(usage["rows"]) > 0:
        out.write("\n")
        header = ["route", "deployment", "requests", "errors", "input", "output", "cost", "ttft p50", "tok/s"]
        rows = [
            [
                r["route"] or "(none)",
                r["deployment"] or UNKNOWN,
                human_count(r["requests"]),
                human_count(r["errors"]),
                ("~" if r["tokens"]["input"]["estimated"] else "") + human_count(r["tokens"]["input"]["total"]),
                ("~" if r["tokens"]["output"]["estimated"] else "") + human_count(r["tokens"]["output"]["total"]),
                human_cost(r["cost_usd"]),
                human_seconds(r["ttft_s"]["p50"]),
                human_rate(r["output_tokens_per_s"]),
            ]
            for r in usage["rows"]
        ]
        render_table(header, rows, 2, out)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
