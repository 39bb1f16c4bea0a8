"""`tokenrelay usage` and `tokenrelay runs`: the ledger as tables a person reads (or JSON/CSV for scripts).

Reads the SQLite ledger directly (read-only), so it works while the daemon is down. Numbers are shortened for
people (1.2k tokens, $0.043, 85 ms); `~` marks token counts that include local estimates; `—` is unknown.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from tokenrelay import ledger_query
from tokenrelay.ledger import LedgerError, default_db_path

UNKNOWN = "—"
TOKEN_COLUMNS = (("input", "input"), ("output", "output"), ("cached", "cached_input"), ("reasoning", "reasoning"))


# --- numbers for people -----------------------------------------------------------------------------------------


def human_count(n: float) -> str:
    """123, 1.2k, 34k, 1.2M, 3.4B."""
    n = float(n)
    for limit, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= limit:
            value = n / limit
            return f"{value:.1f}{suffix}" if value < 100 else f"{value:.0f}{suffix}"
    return f"{n:.0f}"


def human_cost(usd: float | None) -> str:
    """$0, $0.0043, $0.043, $1.23, $1,234; `—` when the price is unknown."""
    if usd is None:
        return UNKNOWN
    if usd == 0:
        return "$0"
    if usd < 0.01:
        return f"${usd:.4f}"
    if usd < 1:
        return f"${usd:.3f}"
    if usd < 1000:
        return f"${usd:.2f}"
    return f"${usd:,.0f}"


def human_seconds(s: float | None) -> str:
    """0.4 ms, 85 ms, 1.2 s, 12 s, 3m05s, 1h02m."""
    if s is None:
        return UNKNOWN
    if s < 0.001:
        return f"{s * 1000:.1f} ms"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 10:
        return f"{s:.1f} s"
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def human_rate(per_s: float | None) -> str:
    return UNKNOWN if per_s is None else f"{human_count(per_s)}/s"


def human_time(ts: float | None) -> str:
    """Local time: `14:05:09` today, else `2026-11-01 14:05`."""
    if ts is None:
        return UNKNOWN
    when = dt.datetime.fromtimestamp(ts)
    if when.date() == dt.date.today():
        return when.strftime("%H:%M:%S")
    return when.strftime("%Y-%m-%d %H:%M")


def tokens_cell(tokens: dict[str, int]) -> str:
    """A token total, `~`-prefixed when any part of it was estimated locally."""
    text = human_count(tokens["total"])
    return f"~{text}" if tokens["estimated"] else text


# --- tables -------------------------------------------------------------------------------------------------------


def _use_colour(out: TextIO) -> bool:
    return out.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def render_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], left: int, out: TextIO, total: Sequence[str] | None = None
) -> None:
    """Aligned columns: the first `left` columns left-aligned (names), the rest right-aligned (numbers)."""
    all_rows = [list(header), *map(list, rows)] + ([list(total)] if total is not None else [])
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        parts = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(parts).rstrip()

    bold, dim, reset = ("\x1b[1m", "\x1b[2m", "\x1b[0m") if _use_colour(out) else ("", "", "")
    rule = dim + "  ".join("─" * w for w in widths) + reset
    out.write(bold + line(header) + reset + "\n")
    out.write(rule + "\n")
    for row in rows:
        out.write(line(row) + "\n")
    if total is not None:
        if rows:
            out.write(rule + "\n")
        out.write(bold + line(total) + reset + "\n")


def _group_cell(name: str, row: dict[str, Any]) -> str:
    if name == "key":
        key_id, key_name = row.get("key_id") or "", row.get("key_name") or ""
        if not key_id:
            return "(no key)"
        return f"{key_name} ({key_id})" if key_name else key_id
    column = {"tag": "tag"}.get(name, name)
    value = row.get(column)
    if name in ("minute", "hour", "day") and isinstance(value, int | float):
        fmt = {"minute": "%Y-%m-%d %H:%M", "hour": "%Y-%m-%d %H:00", "day": "%Y-%m-%d"}[name]
        return dt.datetime.fromtimestamp(value, dt.UTC).strftime(fmt) + " UTC"
    return str(value) if value not in (None, "") else "(none)"


def usage_cells(agg: dict[str, Any]) -> list[str]:
    """The number columns of one aggregate (row or totals) of `query_usage`."""
    ttft = agg["ttft_s"]
    return [
        human_count(agg["requests"]),
        human_count(agg["errors"]),
        *(tokens_cell(agg["tokens"][kind]) for _, kind in TOKEN_COLUMNS),
        human_cost(agg["cost_usd"]),
        human_seconds(ttft["p50"]),
        human_seconds(ttft["p99"]),
        human_rate(agg["output_tokens_per_s"]),
    ]


USAGE_HEADER = ["requests", "errors", *(name for name, _ in TOKEN_COLUMNS), "cost", "ttft p50", "ttft p99", "tok/s"]


def print_usage_table(result: dict[str, Any], group_by: Sequence[str], out: TextIO) -> None:
    """The `query_usage` result as a table with a totals row, and a legend for the markers that appear."""
    totals = result["totals"]
    if totals["requests"] == 0:
        out.write("no requests recorded in this period\n")
        return
    header = [*(g for g in group_by), *USAGE_HEADER] if group_by else ["", *USAGE_HEADER]
    rows = [[*(_group_cell(g, r) for g in group_by), *usage_cells(r)] for r in result["rows"]] if group_by else []
    total = [("total" if i == 0 else "") for i in range(max(1, len(group_by)))] + usage_cells(totals)
    render_table(header, rows, max(1, len(group_by)), out, total)
    notes = []
    if any(totals["tokens"][k]["estimated"] for _, k in TOKEN_COLUMNS):
        notes.append("~ includes tokens counted locally (the provider reported no usage)")
    if totals["cost_unknown_requests"]:
        n = totals["cost_unknown_requests"]
        notes.append(f"{UNKNOWN} cost unknown: {n} request(s) on models without a price (set `price` in the config)")
    if totals["errors"]:
        by_class = ", ".join(f"{k} {v}" for k, v in totals["errors_by_class"].items() if v)
        notes.append(f"errors: {by_class}")
    for note in notes:
        out.write(note + "\n")


def print_requests_table(rows: list[dict[str, Any]], out: TextIO) -> None:
    if not rows:
        out.write("no requests in the request log\n")
        return
    header = ["time", "route", "deployment", "run", "status", "input", "output", "cost", "ttft", "duration"]
    table = []
    for r in reversed(rows):  # oldest first, like a log
        status = str(r["status"]) + (f" {r['error_class']}" if r["error_class"] else "")
        table.append(
            [
                human_time(r["ts"]),
                r["route"] or "(none)",
                r["deployment"] or UNKNOWN,
                r["run"] or "",
                status,
                ("~" if r["input_estimated"] else "") + human_count(r["input"]),
                ("~" if r["output_estimated"] else "") + human_count(r["output"]),
                human_cost(r["cost_usd"]),
                human_seconds(r["ttft_s"]),
                human_seconds(r["duration_s"]),
            ]
        )
    render_table(header, table, 5, out)


# --- commands -------------------------------------------------------------------------------------------------


def _db(path: str | None) -> Path:
    return Path(path).expanduser() if path else default_db_path()


def _open_error(db: Path, exc: Exception) -> int:
    if isinstance(exc, FileNotFoundError):
        print(
            f"tokenrelay: no ledger at {db}. The daemon creates it when it starts (`tokenrelay serve`); "
            "or pass --db PATH.",
            file=sys.stderr,
        )
    else:
        print(f"tokenrelay: cannot read the ledger {db}: {exc}", file=sys.stderr)
    return 1


def _parse_times(since: str | None, until: str | None) -> tuple[float | None, float | None]:
    return (
        ledger_query.parse_since(since) if since else None,
        ledger_query.parse_since(until) if until else None,
    )


def _emit(data: Any, fmt: str, out: TextIO, human: Callable[[], None], csv_rows: list[dict[str, Any]]) -> None:
    if fmt == "json":
        out.write(json.dumps(data, indent=2) + "\n")
    elif fmt == "csv":
        out.write(ledger_query.rows_to_csv(csv_rows))
    else:
        human()


def usage_command(
    db: str | None,
    since: str | None,
    until: str | None,
    by: str | None,
    run: str | None,
    route: str | None,
    fmt: str,
    requests: bool,
    limit: int,
    out: TextIO = sys.stdout,
) -> int:
    """`tokenrelay usage`: grouped totals (or, with `requests`, the last requests) from the ledger file."""
    path = _db(db)
    group_by = [g.strip() for g in (by or "").split(",") if g.strip()]
    if run and not by:
        group_by = ["route", "deployment"]
    unknown = [g for g in group_by if g not in ledger_query.GROUPS]
    if unknown:
        print(
            f"tokenrelay: cannot group by {', '.join(unknown)}; choose from {', '.join(ledger_query.GROUPS)}",
            file=sys.stderr,
        )
        return 2
    try:
        t0, t1 = _parse_times(since, until)
    except ValueError as exc:
        print(f"tokenrelay: {exc}", file=sys.stderr)
        return 2
    try:
        if requests:
            rows = ledger_query.recent_requests(path, limit, run)
            _emit({"requests": rows}, fmt, out, lambda: print_requests_table(rows, out), rows)
            return 0
        result = ledger_query.query_usage(path, t0, t1, group_by, run, None, route)
    except (FileNotFoundError, LedgerError, OSError) as exc:
        return _open_error(path, exc)
    except Exception as exc:  # sqlite3.Error: locked or corrupt
        return _open_error(path, exc)

    def human() -> None:
        scope = [f"ledger {path}"]
        if run:
            scope.append(f"run {run}")
        if route:
            scope.append(f"route {route}")
        scope.append(f"since {human_time(t0)}" if t0 is not None else "all time")
        if t1 is not None:
            scope.append(f"until {human_time(t1)}")
        out.write(f"usage — {', '.join(scope)}\n\n")
        print_usage_table(result, group_by, out)

    csv_rows = result["rows"] if group_by else [result["totals"]]
    _emit(result, fmt, out, human, csv_rows)
    return 0


def print_runs_table(runs: list[dict[str, Any]], out: TextIO) -> None:
    if not runs:
        out.write("no runs recorded yet (start one with `tokenrelay run -- CMD`)\n")
        return
    header = ["run", "name", "started", "wall", "exit", "requests", "errors", "input", "output", "cost", "budget"]
    rows = []
    for r in runs:
        u = r.get("usage")
        started, ended = r.get("started"), r.get("ended")
        wall = human_seconds(ended - started) if started and ended else ("running" if started else UNKNOWN)
        budget = r.get("budget_usd")
        rows.append(
            [
                r["id"],
                r.get("name") or "",
                human_time(started),
                wall,
                UNKNOWN if r.get("exit_code") is None else str(r["exit_code"]),
                human_count(u["requests"]) if u else "0",
                human_count(u["errors"]) if u else "0",
                tokens_cell(u["tokens"]["input"]) if u else "0",
                tokens_cell(u["tokens"]["output"]) if u else "0",
                human_cost(u["cost_usd"]) if u else "$0",
                human_cost(budget) if budget is not None else "",
            ]
        )
    render_table(header, rows, 3, out)


def runs_command(db: str | None, since: str | None, fmt: str, limit: int, out: TextIO = sys.stdout) -> int:
    """`tokenrelay runs`: recent runs, newest first, with their totals, from the ledger file."""
    from tokenrelay.handlers.runs import runs_with_totals

    path = _db(db)
    try:
        t0, _ = _parse_times(since, None)
    except ValueError as exc:
        print(f"tokenrelay: {exc}", file=sys.stderr)
        return 2
    try:
        runs = runs_with_totals(path, t0)[:limit]
    except Exception as exc:  # missing file, not a ledger, sqlite3.Error
        return _open_error(path, exc)
    flat = [{k: v for k, v in r.items() if k not in ("usage", "budget")} | _flat_usage(r.get("usage")) for r in runs]
    _emit({"runs": runs}, fmt, out, lambda: print_runs_table(runs, out), flat)
    return 0


def _flat_usage(u: dict[str, Any] | None) -> dict[str, Any]:
    if u is None:
        return {"requests": 0, "errors": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0}
    return {
        "requests": u["requests"],
        "errors": u["errors"],
        "input_tokens": u["tokens"]["input"]["total"],
        "output_tokens": u["tokens"]["output"]["total"],
        "cost_usd": u["cost_usd"],
    }
