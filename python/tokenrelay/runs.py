"""Agent runs in the daemon: the registry (`POST /runs`), kept in memory and in the ledger's `runs` table, and
the run budget: a request of a run with a budget reserves its worst-case cost before it is sent
(`admit`) and settles its actual cost when it ends (`settle`), so concurrent requests cannot overshoot."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from tokenrelay import ledger_query
from tokenrelay._core import estimate_input_tokens
from tokenrelay.budget import Budget, Reservation, max_output_tokens, worst_case_cost
from tokenrelay.config import Config, Route
from tokenrelay.ledger import connect_readonly, open_db
from tokenrelay.metering import Metering, Outcome
from tokenrelay.sharedkeys import SharedBudget, SharedKeyStates

log = logging.getLogger("tokenrelay.runs")

RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# The output a request may produce when it does not say (no max_tokens): its worst case for a budget.
# Local token counts (o200k) can be below a provider's own tokenizer (Claude's counts more): reserve a margin.
INPUT_MARGIN = 1.25
MAX_RUNS_IN_MEMORY = 10_000
ABSENT_FOR_S = 1.0  # with several workers: how long an id found nowhere is not looked up again
_BUDGET_KEY = "run_budget"  # Outcome.extra key holding (budget, reservation) until the request settles


@dataclass
class Run:
    """One agent run as registered by `tokenrelay run` (or any client of `POST /runs`)."""

    id: str
    name: str = ""
    budget_usd: float | None = None
    route_default: str = ""
    command: str = ""
    started: float = field(default_factory=time.time)
    ended: float | None = None
    exit_code: int | None = None
    budget: Budget | SharedBudget | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "budget_usd": self.budget_usd,
            "route_default": self.route_default,
            "command": self.command,
            "started": self.started,
            "ended": self.ended,
            "exit_code": self.exit_code,
            "budget": self.budget.snapshot() if self.budget is not None else None,
        }


def _row_to_run(row: sqlite3.Row | tuple[Any, ...]) -> Run:
    rid, name, budget, route_default, command, started, ended, exit_code = row
    return Run(rid, name, budget, route_default, command, started, ended, exit_code)


_COLUMNS = "id, name, budget_usd, route_default, command, started, ended, exit_code"


def load_runs(db: str | Path, since: float | None = None, limit: int = 1000) -> list[Run]:
    """Runs from the ledger's `runs` table, newest first ([] for a ledger that predates the table)."""
    conn = connect_readonly(db)
    try:
        sql = f"SELECT {_COLUMNS} FROM runs"
        args: list[float | int] = []
        if since is not None:
            sql += " WHERE started >= ?"
            args.append(since)
        rows = conn.execute(sql + " ORDER BY started DESC LIMIT ?", [*args, limit]).fetchall()
    except sqlite3.OperationalError:  # no runs table (an older ledger)
        return []
    finally:
        conn.close()
    return [_row_to_run(r) for r in rows]


def _store(db: Path, run: Run) -> None:
    conn = open_db(db)
    try:
        with conn:
            conn.execute(
                f"INSERT INTO runs ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                "ended = excluded.ended, exit_code = excluded.exit_code",
                (
                    run.id,
                    run.name,
                    run.budget_usd,
                    run.route_default,
                    run.command,
                    run.started,
                    run.ended,
                    run.exit_code,
                ),
            )
    finally:
        conn.close()


class RunRegistry:
    """The runs this daemon knows, by id; budgets live here. Writes to the ledger happen in a thread.

    With several workers (`shared`: their table, `sharedkeys`), a run registered through one worker is found by
    the others in the ledger's `runs` table the first time they see its id (`lookup`), and its budget is one set
    of counters in the table for all of them (`SharedBudget`)."""

    def __init__(self, db: Path, shared: SharedKeyStates | None = None) -> None:
        self.db = db
        self.shared = shared
        self.runs: dict[str, Run] = {}
        self._absent: dict[str, float] = {}  # run id -> until when it is known not to be registered (monotonic)

    def get(self, run_id: str) -> Run | None:
        return self.runs.get(run_id)

    def _budget(self, run_id: str, limit_usd: float, spent_usd: float) -> Budget | SharedBudget:
        if self.shared is not None:
            shared = self.shared.budget("run:" + hashlib.sha256(run_id.encode()).hexdigest()[:40])
            if shared is not None:
                return shared.init(limit_usd, spent_usd)
        return Budget(limit_usd, spent_usd)

    async def lookup(self, run_id: str) -> Run | None:
        """`get`, and with several workers the ledger for a run another worker registered (read in a thread; an
        id found in neither is not looked for again for ABSENT_FOR_S)."""
        run = self.runs.get(run_id)
        if run is not None or self.shared is None:
            return run
        now = time.monotonic()
        if self._absent.get(run_id, 0.0) > now:
            return None
        found = await asyncio.to_thread(self._load_one, run_id)
        if found is None:
            if len(self._absent) > MAX_RUNS_IN_MEMORY:
                self._absent.clear()
            self._absent[run_id] = now + ABSENT_FOR_S
            return None
        return self.runs.setdefault(run_id, found)

    def _load_row(self, run_id: str) -> Run | None:
        if not self.db.exists():
            return None
        conn = connect_readonly(self.db)
        try:
            row = conn.execute(f"SELECT {_COLUMNS} FROM runs WHERE id = ?", (run_id,)).fetchone()
        except sqlite3.OperationalError:
            return None
        finally:
            conn.close()
        return None if row is None else _row_to_run(row)

    def _load_one(self, run_id: str) -> Run | None:
        """The run from the ledger (in a thread), its budget attached."""
        run = self._load_row(run_id)
        if run is None:
            return None
        if run.budget_usd is not None:
            spent = ledger_query.query_usage(self.db, run=run.id)["totals"]["cost_usd"] or 0.0
            run.budget = self._budget(run.id, run.budget_usd, spent)
        return run

    def refresh(self, run: Run) -> None:
        """Its end as the ledger has it (in a thread): with several workers, another may have ended it."""
        stored = self._load_row(run.id)
        if stored is not None and stored.ended is not None:
            run.ended, run.exit_code = stored.ended, stored.exit_code

    async def create(self, run: Run) -> None:
        if run.budget_usd is not None:
            run.budget = self._budget(run.id, run.budget_usd, 0.0)
        self._absent.pop(run.id, None)
        self.runs[run.id] = run
        if len(self.runs) > MAX_RUNS_IN_MEMORY:  # forget the oldest ended runs (they stay in the ledger)
            ended = sorted((r for r in self.runs.values() if r.ended is not None), key=lambda r: r.started)
            for old in ended[: len(self.runs) - MAX_RUNS_IN_MEMORY]:
                del self.runs[old.id]
        await asyncio.to_thread(_store, self.db, run)

    async def end(self, run: Run, exit_code: int | None) -> None:
        run.ended = time.time()
        run.exit_code = exit_code
        await asyncio.to_thread(_store, self.db, run)

    def restore(self) -> None:
        """At startup (in a thread): reloads unfinished runs with a budget, their spend taken from the ledger, so
        a daemon restart does not reset a run's budget."""
        if not self.db.exists():
            return
        for run in load_runs(self.db, since=time.time() - 7 * 86400):
            if run.ended is not None or run.budget_usd is None or run.id in self.runs:
                continue
            spent = ledger_query.query_usage(self.db, run=run.id)["totals"]["cost_usd"] or 0.0
            run.budget = self._budget(run.id, run.budget_usd, spent)
            self.runs[run.id] = run


RUNS: web.AppKey[RunRegistry] = web.AppKey("runs", RunRegistry)


async def admit(
    app: web.Application, config: Config, outcome: Outcome, route: Route, api: str, body: dict[str, Any], raw: bytes
) -> str | None:
    """Reserves the request's worst case against its run's budget. Returns why it is refused, or None."""
    registry = app.get(RUNS)
    if registry is None or not outcome.run:
        return None
    run = registry.get(outcome.run)
    if run is None and registry.shared is not None:  # (registered through another worker?)
        run = await registry.lookup(outcome.run)
    if run is None or run.budget is None:
        return None
    budget = run.budget
    if budget.exhausted:  # no need to count tokens to refuse
        budget.refuse()
        return _refusal(run, budget, None)
    counted = await asyncio.to_thread(estimate_input_tokens, api, raw, outcome.requested_model)
    worst, _ = worst_case_cost(  # an unknown price counts 0: the run is still stopped by what is known
        config.routes, route, outcome.requested_model, round(counted * INPUT_MARGIN), max_output_tokens(api, body)
    )
    token = budget.reserve(worst)
    if token is None:
        return _refusal(run, budget, worst)
    outcome.extra[_BUDGET_KEY] = (budget, token)
    return None


def _refusal(run: Run, budget: Budget | SharedBudget, worst: float | None) -> str:
    s = budget.snapshot()
    if worst is None:
        return (
            f"run {run.id!r} has spent its budget (${s['spent_usd']:.4f} of ${s['limit_usd']:.4f}). "
            "Start a new run or raise --budget-usd."
        )
    return (
        f"run {run.id!r} cannot afford this request within its budget: it could cost up to ${worst:.4f} "
        f"(input estimate + max_tokens) and ${s['remaining_usd']:.4f} of ${s['limit_usd']:.4f} remains "
        f"(${s['spent_usd']:.4f} spent, ${s['reserved_usd']:.4f} reserved by requests in flight). "
        "Start a new run or raise --budget-usd."
    )


def settle(meter: Metering, outcome: Outcome) -> None:
    """Settles the request's budget reservation, if it made one. Never raises."""
    held: tuple[Budget | SharedBudget, Reservation] | None = outcome.extra.pop(_BUDGET_KEY, None)
    if held is None:
        return
    budget, token = held
    try:
        budget.settle(token, meter.cost(outcome))
    except Exception:  # pragma: no cover - a bug here must not fail a served request
        log.exception("could not settle the run budget of request %s", outcome.request_id)
        budget.settle(token, token.amount)
