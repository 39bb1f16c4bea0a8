"""The command line as a person uses it: check a config, ask the version, start and stop the daemon."""

from __future__ import annotations

import importlib.metadata
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from tokenrelay import __version__
from tokenrelay.app import bind_socket

from tests.conftest import free_port

GOOD = """
listen = "127.0.0.1:4999"

[routes.fast-llama]
strategy = "round_robin"
[[routes.fast-llama.deployments]]
kind = "openai"
base_url = "https://api.groq.com/openai/v1"
model = "llama-3.3-70b-versatile"
api_key_env = "GROQ_API_KEY"
weight = 1
"""

BAD = """
listen = "nowhere"
colour = "blue"

[routes.fast-llama]
strategy = "fastest-ever"
[[routes.fast-llama.deployments]]
kind = "grpc"
base_url = "ftp://example"
model = "m"
api_key_env = "NOT_SET_ANYWHERE_KEY"
weight = "heavy"
wieght = 2
"""


def tokenrelay(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "tokenrelay", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def test_version() -> None:
    result = tokenrelay("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"tokenrelay {__version__}"
    assert __version__ == importlib.metadata.version("tokenrelay")  # (the core's, and what pip says is installed)


def test_check_accepts_a_good_config(tmp_path: Path) -> None:
    path = tmp_path / "good.toml"
    path.write_text(GOOD)
    result = tokenrelay("check", str(path), env={"GROQ_API_KEY": "gsk-test"})
    assert result.returncode == 0, result.stderr
    assert "1 routes, 1 deployments" in result.stdout


def test_check_names_every_error_with_its_key_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BAD)
    result = tokenrelay("check", str(path))
    assert result.returncode == 1
    err = result.stderr
    for expected in (
        "listen: expected HOST:PORT",
        "colour: unknown key",
        "routes.fast-llama.strategy: must be one of",
        "routes.fast-llama.deployments[0].kind: must be one of openai, anthropic",
        "routes.fast-llama.deployments[0].base_url: must be an http:// or https:// URL",
        "routes.fast-llama.deployments[0].api_key_env: environment variable NOT_SET_ANYWHERE_KEY is not set",
        "routes.fast-llama.deployments[0].weight: expected an integer, got str 'heavy'",
        "routes.fast-llama.deployments[0].wieght: unknown key (did you mean 'weight'?)",
    ):
        assert expected in err, f"missing {expected!r} in:\n{err}"


def test_check_reports_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[routes\n")
    assert "invalid TOML" in tokenrelay("check", str(path)).stderr
    missing = tokenrelay("check", str(tmp_path / "nope.toml"))
    assert missing.returncode == 1 and "no such file" in missing.stderr


def test_reading_commands_do_not_load_the_server() -> None:
    # `tokenrelay usage` and its kin are run by hand and by scripts, often: aiohttp (~0.3 s to import here, most of
    # such a command's start-up) is the daemon's, not theirs.
    code = "import sys, tokenrelay.cli, tokenrelay.usage_cli; print(sorted(m for m in sys.modules if 'aiohttp' in m))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_serve_refuses_a_bad_config_before_binding(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(textwrap.dedent(BAD))
    result = tokenrelay("serve", "--config", str(path))
    assert result.returncode == 1
    assert "listening" not in result.stdout
    assert "error(s)" in result.stderr


def test_serve_refuses_more_workers_than_the_shared_state_has_rows_for(tmp_path: Path) -> None:
    for args in (["--workers", "33"], ["--workers", "0"]):
        result = tokenrelay("serve", "--listen", f"127.0.0.1:{free_port()}", "--db", str(tmp_path / "u.db"), *args)
        assert result.returncode == 1, result.stderr
        assert "--workers: must be between 1 and 32" in result.stderr and "listening" not in result.stdout
    path = tmp_path / "many.toml"
    path.write_text("workers = 40\n")
    result = tokenrelay("serve", "--config", str(path))
    assert result.returncode == 1 and "workers: must be between 1 and 32" in result.stderr


def test_serve_on_a_port_in_use_says_so_and_exits(tmp_path: Path) -> None:
    # Something else listens on the port; then the workers of another daemon (SO_REUSEPORT, as tokenrelay's bind),
    # which a second `--workers` daemon must not join. One worker or several: a one-line reason, exit code 2, at
    # once (no traceback, no supervisor restarting workers that cannot bind).
    for reuse_port in (False, True):
        holder = socket.socket()
        if reuse_port:
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with holder:
            for workers in ("1", "2"):
                result = tokenrelay(
                    "serve", "--listen", f"127.0.0.1:{port}", "--workers", workers, "--db", str(tmp_path / "u.db")
                )
                assert result.returncode == 2, (reuse_port, workers, result.stderr)
                assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
                assert "Traceback" not in result.stderr and "listening" not in result.stdout


def test_serve_with_a_ledger_it_cannot_open_says_so_and_exits(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for workers in ("1", "2"):
        port = free_port()
        result = tokenrelay(
            "serve", "--listen", f"127.0.0.1:{port}", "--workers", workers, "--db", str(blocker / "usage.db")
        )
        assert result.returncode == 2, (workers, result.stderr)
        assert f"tokenrelay: cannot open the ledger at {blocker / 'usage.db'}" in result.stderr
        assert "Traceback" not in result.stderr and "restarting" not in result.stderr


def test_workers_that_die_as_they_start_are_not_restarted_forever(tmp_path: Path) -> None:
    # Each worker dies at once (an event loop that cannot be imported: only workers run one); the supervisor gives
    # up after a few quick exits in a row instead of restarting them every 0.2 s.
    (tmp_path / "uvloop.py").write_text("raise RuntimeError('broken event loop')\n")
    result = tokenrelay(
        "serve",
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--workers",
        "2",
        "--db",
        str(tmp_path / "u.db"),
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode == 1, result.stderr
    assert "broken event loop" in result.stderr and "as it started; stopping the others" in result.stderr
    assert result.stderr.count("restarting it") <= 2 * 2  # (two workers, two restarts each at most)


def test_accepted_connections_have_keepalive_from_the_listening_socket() -> None:
    # The daemon sets SO_KEEPALIVE once on its listener instead of on each connection (aiohttp's
    # tcp_keepalive is off): a client that vanishes without a FIN must still be found out by the kernel.
    listener = bind_socket("127.0.0.1", 0, reuse_port=False)
    listener.setblocking(True)
    with listener, socket.create_connection(listener.getsockname()[:2]):
        accepted, _ = listener.accept()
        with accepted:
            assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
