"""Agent runs as a user drives them: `tokenrelay run -- <agent>` against a real daemon and mock upstreams, the
summary it prints, budgets, exit codes and signals, `tokenrelay env`, `tokenrelay runs` and `tokenrelay usage`."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import Daemon, MockUpstream, free_port, http_json

AGENT = str(Path(__file__).parent / "agents" / "agent.py")
PRICE_IN, PRICE_OUT = 1000.0, 2000.0  # USD per 1M tokens: large, so a few requests spend a visible budget


def priced_config(m: MockUpstream, extra_routes: str = "") -> str:
    return textwrap.dedent(f"""
        [routes.oa]
        [[routes.oa.deployments]]
        name = "oa-1"
        kind = "openai"
        base_url = "{m.openai_base}"
        model = "upstream-model"
        api_key_env = "TEST_UPSTREAM_KEY"
        price = {{input = {PRICE_IN}, output = {PRICE_OUT}}}

        [routes.an]
        [[routes.an.deployments]]
        name = "an-1"
        kind = "anthropic"
        base_url = "{m.url}/v1"
        model = "claude-upstream"
        api_key_env = "TEST_UPSTREAM_KEY"
        price = {{input = {PRICE_IN}, output = {PRICE_OUT}}}
        """) + textwrap.dedent(extra_routes)


AGENT_ENV = {"OPENAI_MODEL": "oa", "ANTHROPIC_MODEL": "an"}


def tokenrelay(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenrelay", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def assert_no_errors(totals: dict[str, Any]) -> None:
    """No request failed (a stream the SDK hangs up on right after `[DONE]` is a delivered one)."""
    assert totals["errors"] == 0, totals["errors_by_class"]


def summary_of(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The `--json` summary: the last line `tokenrelay run` wrote to stderr."""
    last = result.stderr.strip().splitlines()[-1]
    summary: dict[str, Any] = json.loads(last)
    return summary


@pytest.fixture
def upstream(mock_factory: Callable[..., MockUpstream]) -> MockUpstream:
    return mock_factory(delay_ms=1.0)


@pytest.fixture
def priced(upstream: MockUpstream, daemon_factory: Callable[..., Daemon]) -> Daemon:
    return daemon_factory(priced_config(upstream))


def test_run_summary_equals_what_the_upstream_served(priced: Daemon, upstream: MockUpstream) -> None:
    result = tokenrelay("run", "--url", priced.url, "--name", "agent", "--json", "--", sys.executable, AGENT,
                        "--rounds", "2", env=AGENT_ENV)  # fmt: skip
    assert result.returncode == 0, result.stderr
    # The command's stdout is its own: its JSON lines, no summary mixed in.
    calls = [json.loads(line) for line in result.stdout.splitlines()]
    assert calls[-1] == {"done": True} and len(calls) == 11
    summary = summary_of(result)
    served = upstream.stats()
    totals = summary["usage"]["totals"]
    assert summary["run"]["id"].startswith("agent-") and summary["run"]["exit_code"] == 0
    assert totals["requests"] == served["requests"] == 10
    assert_no_errors(totals)
    assert totals["tokens"]["output"] == {"reported": served["output_tokens"], "estimated": 0, "total": 240}
    assert totals["tokens"]["input"]["total"] == served["input_tokens"]
    assert totals["tokens"]["input"]["estimated"] == 0
    # What the SDKs were told matches too (where the SDK got usage).
    sdk_output = sum(c["output_tokens"] for c in calls[:-1] if c["output_tokens"] >= 0)
    assert sdk_output == 24 * sum(1 for c in calls[:-1] if c["output_tokens"] >= 0)
    expected_cost = (served["input_tokens"] * PRICE_IN + served["output_tokens"] * PRICE_OUT) / 1e6
    assert totals["cost_usd"] == pytest.approx(expected_cost)
    by_route = {(r["route"], r["deployment"]): r["requests"] for r in summary["usage"]["rows"]}
    assert by_route == {("oa", "oa-1"): 6, ("an", "an-1"): 4}
    assert totals["ttft_s"]["count"] == 10 and totals["ttft_s"]["sum"] > 0
    assert summary["run"]["wall_s"] > 0


def test_human_summary_goes_to_stderr(priced: Daemon) -> None:
    result = tokenrelay("run", "--url", priced.url, "--", sys.executable, AGENT, env=AGENT_ENV)
    assert result.returncode == 0
    assert "tokenrelay run" not in result.stdout
    text = result.stderr
    assert "requests   5, errors " in text
    assert "output     120" in text
    assert "waiting" in text and "on first tokens" in text
    header = next(line for line in text.splitlines() if line.startswith("route"))
    assert header.split() == ["route", "deployment", "requests", "errors", "input", "output", "cost", "ttft",
                              "p50", "tok/s"]  # fmt: skip


def test_exit_code_passes_through(priced: Daemon) -> None:
    result = tokenrelay("run", "--url", priced.url, "--", sys.executable, AGENT, "--exit-code", "3", env=AGENT_ENV)
    assert result.returncode == 3
    assert "exit 3" in result.stderr


def test_command_killed_by_a_signal(priced: Daemon) -> None:
    result = tokenrelay("run", "--url", priced.url, "--", "sh", "-c", "kill -9 $$")
    assert result.returncode == -signal.SIGKILL
    assert "killed by SIGKILL" in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_are_forwarded_to_the_command(priced: Daemon, sig: signal.Signals) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenrelay", "run", "--url", priced.url, "--", sys.executable, AGENT, "--sleep", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **AGENT_ENV},
        # As from a terminal: a suite started in the background by a shell (`cmd &`) inherits SIGINT ignored, and
        # so would the agent, which would then sleep through the forwarded SIGINT.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == "sleeping":
            break
    started = time.monotonic()
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=30)
    assert time.monotonic() - started < 20
    assert proc.returncode == -sig  # the child died of it; so does `tokenrelay run`, after the summary
    assert f"killed by {sig.name}" in stderr
    assert "requests   5" in stderr


def test_budget_stops_the_run(priced: Daemon, upstream: MockUpstream) -> None:
    budget = 0.30
    result = tokenrelay("run", "--url", priced.url, "--budget-usd", str(budget), "--json", "--",
                        sys.executable, AGENT, "--rounds", "5", env=AGENT_ENV)  # fmt: skip
    # The agent sees a 429 with tokenrelay's explanation (the SDK did not retry it) and gives up.
    assert result.returncode == 4, result.stderr
    assert "agent: stopped" in result.stderr and "within its budget" in result.stderr
    summary = summary_of(result)
    totals, state = summary["usage"]["totals"], summary["run"]["budget"]
    served = upstream.stats()
    assert 0 < served["requests"] < 25
    assert totals["requests"] == served["requests"] + state["rejected"]  # refused requests never left the relay
    refused = totals["errors_by_class"]["rate_limited"]  # a run-budget refusal is a 429 from the proxy
    assert totals["errors"] == refused
    # Refused (the last round's concurrent calls: 1 or 2 of them), and not retried by the SDKs.
    assert 1 <= refused == state["rejected"] <= 2
    assert totals["cost_usd"] <= budget
    assert state["spent_usd"] == pytest.approx(totals["cost_usd"])
    assert state["reserved_usd"] == 0 and state["in_flight"] == 0


async def test_concurrent_requests_cannot_overshoot_a_budget(priced: Daemon, upstream: MockUpstream) -> None:
    budget = 0.5
    http_json("POST", f"{priced.url}/runs", {"id": "burst-1", "budget_usd": budget})
    client = openai.AsyncOpenAI(base_url=f"{priced.url}/run/burst-1/v1", api_key="k", max_retries=0)

    async def drain() -> bool:
        try:
            stream = await client.chat.completions.create(
                model="oa", messages=[{"role": "user", "content": "hello there"}], max_tokens=64, stream=True
            )
            async for _ in stream:
                pass
            return True
        except openai.RateLimitError as exc:
            assert "budget" in str(exc)
            return False

    admitted = await asyncio.gather(*(drain() for _ in range(30)))
    run = http_json("GET", f"{priced.url}/runs/burst-1")
    cost = run["usage"]["totals"]["cost_usd"]
    assert 0 < sum(admitted) < 30
    assert cost <= budget
    assert run["run"]["budget"]["spent_usd"] == pytest.approx(cost)
    assert upstream.stats()["requests"] == sum(admitted)


def test_concurrent_runs_stay_separate(priced: Daemon, upstream: MockUpstream) -> None:
    def start(rounds: int) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tokenrelay",
                "run",
                "--url",
                priced.url,
                "--json",
                "--",
                sys.executable,
                AGENT,
                "--rounds",
                str(rounds),
                "--concurrency",
                "3",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **AGENT_ENV},
        )

    a, b = start(1), start(2)
    results = []
    for proc in (a, b):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(summary_of(subprocess.CompletedProcess([], 0, out, err)))
    assert results[0]["run"]["id"] != results[1]["run"]["id"]
    assert [r["usage"]["totals"]["requests"] for r in results] == [7, 14]
    assert sum(r["usage"]["totals"]["tokens"]["output"]["total"] for r in results) == upstream.stats()["output_tokens"]
    listed = tokenrelay("runs", "--db", str(priced.db_path), "--json")
    runs = {r["id"]: r for r in json.loads(listed.stdout)["runs"]}
    for r in results:
        assert runs[r["run"]["id"]]["usage"]["requests"] == r["usage"]["totals"]["requests"]
        assert runs[r["run"]["id"]]["exit_code"] == 0


def test_no_daemon_says_how_to_start_one(tmp_path: Path) -> None:
    result = tokenrelay("run", "--url", f"http://127.0.0.1:{free_port()}", "--", "true")
    assert result.returncode == 125
    assert "tokenrelay serve" in result.stderr and "--ephemeral" in result.stderr


def test_ephemeral_daemon_for_one_command(tmp_path: Path) -> None:
    db = tmp_path / "private.db"
    env = {
        "TOKENRELAY_URL": f"http://127.0.0.1:{free_port()}",
        "OPENAI_MODEL": "mock",
        "ANTHROPIC_MODEL": "mock-anthropic",
    }
    result = tokenrelay("run", "--ephemeral", "--db", str(db), "--json", "--", sys.executable, AGENT, env=env)
    assert result.returncode == 0, result.stderr
    summary = summary_of(result)
    assert summary["usage"]["totals"]["requests"] == 5
    assert summary["usage"]["totals"]["tokens"]["output"]["total"] == 120
    # The private daemon is gone, and what it metered is in its ledger.
    leftovers = [p for p in Path("/proc").glob("[0-9]*") if str(db) in _cmdline(p)]
    assert leftovers == []
    runs = json.loads(tokenrelay("runs", "--db", str(db), "--json").stdout)["runs"]
    assert [r["id"] for r in runs] == [summary["run"]["id"]]


def _cmdline(p: Path) -> str:
    try:
        return (p / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_route_default_is_exported(priced: Daemon) -> None:
    script = (
        "import os; print(os.environ['OPENAI_MODEL'], os.environ['TOKENRELAY_ROUTE'], os.environ['TOKENRELAY_RUN'])"
    )
    result = tokenrelay("run", "--url", priced.url, "--route-default", "oa", "--name", "x", "--", sys.executable,
                        "-c", script)  # fmt: skip
    assert result.returncode == 0
    model, route, run = result.stdout.split()
    assert (model, route) == ("oa", "oa") and run.startswith("x-")


def test_env_points_the_sdks_at_the_daemon(priced: Daemon) -> None:
    result = tokenrelay("env", "--url", priced.url, "--run", "job-7", "--key", "sk client")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert f"export OPENAI_BASE_URL={priced.url}/run/job-7/v1" in lines
    assert f"export ANTHROPIC_BASE_URL={priced.url}/run/job-7" in lines
    assert "export OPENAI_API_KEY='sk client'" in lines
    # eval it in a shell and let the stock SDKs do a call: it is metered under the run.
    script = f'eval "$({sys.executable} -m tokenrelay env --url {priced.url} --run job-7)" && ' \
             f"OPENAI_MODEL=oa ANTHROPIC_MODEL=an {sys.executable} {AGENT}"  # fmt: skip
    assert subprocess.run(["bash", "-c", script], capture_output=True, timeout=60).returncode == 0
    usage = priced.get("/usage?run=job-7")
    assert usage["totals"]["requests"] == 5
    plain = tokenrelay("env", env={"TOKENRELAY_URL": "http://127.0.0.1:9"}).stdout
    assert "export OPENAI_BASE_URL=http://127.0.0.1:9/v1" in plain.splitlines()
    assert "export ANTHROPIC_BASE_URL=http://127.0.0.1:9" in plain.splitlines()


def test_usage_table_as_a_person_reads_it(
    mock_factory: Callable[..., MockUpstream], daemon_factory: Callable[..., Daemon]
) -> None:
    m = mock_factory(delay_ms=1.0)
    quiet = mock_factory(delay_ms=1.0, usage="false")  # reports no usage: tokens are estimated locally
    extra = f"""
        [routes.est]
        [[routes.est.deployments]]
        name = "est-1"
        kind = "openai"
        base_url = "{quiet.openai_base}"
        model = "some-unpriced-model"
        api_key_env = "TEST_UPSTREAM_KEY"
        """
    d = daemon_factory(priced_config(m, extra))
    assert tokenrelay("run", "--url", d.url, "--", sys.executable, AGENT, env=AGENT_ENV).returncode == 0
    client = openai.OpenAI(base_url=d.base_url, api_key="k", max_retries=0)
    client.chat.completions.create(model="est", messages=[{"role": "user", "content": "hi"}])
    d.stop()  # the CLI reads the ledger file: no daemon needed

    result = tokenrelay("usage", "--db", str(d.db_path), "--by", "route")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header_at = next(i for i, line in enumerate(lines) if line.startswith("route"))
    header = lines[header_at].split()
    assert header[:8] == ["route", "requests", "errors", "input", "output", "cached", "reasoning", "cost"]
    rows = {
        line.split()[0]: line.split()
        for line in lines[header_at + 2 :]
        if line and line[0] not in "─~—" and not line.startswith("errors:")
    }
    assert rows["oa"][1] == "3" and rows["an"][1] == "2" and rows["est"][1] == "1"
    assert rows["oa"][4] == "72"  # output tokens, 3 x 24
    assert rows["est"][3].startswith("~") and rows["est"][4].startswith("~")  # estimated locally
    assert rows["est"][7] == "—"  # unknown price is not $0
    assert rows["oa"][7].startswith("$")
    assert rows["total"][1] == "6"
    # Columns line up: every row is as wide as the header's column positions say.
    assert "~ includes tokens counted locally" in result.stdout
    assert "\x1b[" not in result.stdout  # no colour when not a terminal

    as_json = json.loads(tokenrelay("usage", "--db", str(d.db_path), "--by", "route", "--json").stdout)
    assert as_json["totals"]["requests"] == 6
    assert {r["route"]: r["requests"] for r in as_json["rows"]} == {"oa": 3, "an": 2, "est": 1}
    as_csv = list(
        csv.DictReader(io.StringIO(tokenrelay("usage", "--db", str(d.db_path), "--by", "route", "--csv").stdout))
    )
    assert {r["route"]: int(r["requests"]) for r in as_csv} == {"oa": 3, "an": 2, "est": 1}
    log = tokenrelay("usage", "--db", str(d.db_path), "--requests", "--limit", "3").stdout.splitlines()
    assert log[0].split()[:3] == ["time", "route", "deployment"] and len(log) == 2 + 3
    run_id = json.loads(tokenrelay("runs", "--db", str(d.db_path), "--json").stdout)["runs"][0]["id"]
    one = tokenrelay("usage", "--db", str(d.db_path), "--run", run_id).stdout
    assert (
        f"run {run_id}" in one
        and "oa-1" in one
        and "an-1" in one
        and not any(line.startswith("est ") for line in one.splitlines())
    )
    listed = tokenrelay("runs", "--db", str(d.db_path)).stdout.splitlines()
    assert listed[0].split()[:3] == ["run", "name", "started"] and listed[2].split()[0] == run_id


def test_usage_without_a_ledger_says_where_it_looked(tmp_path: Path) -> None:
    result = tokenrelay("usage", "--db", str(tmp_path / "nope.db"))
    assert result.returncode == 1
    assert "no ledger at" in result.stderr and "tokenrelay serve" in result.stderr
