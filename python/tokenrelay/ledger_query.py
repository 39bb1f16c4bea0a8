"""Reads the ledger for `GET /usage` and `tokenrelay usage`: grouped totals with latency quantiles, the recent
request log, and the `--since` time syntax. Works on a live ledger (WAL readers never block the writer)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
import os
import re
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from tokenrelay._core import METER_ERROR_CLASSES, histogram_merge, histogram_quantiles
from tokenrelay.ledger import COUNTER_COLUMNS, HIST_COLUMNS, TOKEN_KINDS, connect_readonly

# group_by name -> (SQL expressions, output names)
GROUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "route": (("route",), ("route",)),
    "deployment": (("deployment",), ("deployment",)),
    "model": (("model",), ("model",)),
    "key": (("key_id", "key_name"), ("key_id", "key_name")),
    "run": (("run",), ("run",)),
    "tag": (("tags",), ("tag",)),
    "minute": (("minute",), ("minute",)),
    "hour": (("(minute / 3600) * 3600",), ("hour",)),
    "day": (("(minute / 86400) * 86400",), ("day",)),
}
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


def parse_since(text: str, now: float | None = None) -> float:
    """Unix time from `30m`, `1h`, `7d`, `2w` (ago), `2026-11-01` (local midnight), an ISO datetime
    (local time unless it has an offset) or a Unix timestamp."""
    return parse_time(text, now, ago=True)


def parse_time(text: str, now: float | None = None, *, ago: bool) -> float:
    """A time as people write it: a duration (`30m`, `1h`, `7d`, `2w`) counted back from now (`ago`) or ahead,
    a date (local midnight starting it), an ISO datetime (local time unless it has an offset) or a Unix time."""
    now = time.time() if now is None else now
    if m := _RELATIVE.match(text):
        return now + (-1 if ago else 1) * float(m.group(1)) * _UNITS[m.group(2)]
    stripped = text.strip()
    try:
        return float(stripped)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(stripped.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"cannot read time {text!r}: use 30m, 1h, 7d, 2026-11-01 or an ISO datetime") from None
    return when.timestamp()


def _split_tags(tags: str) -> list[str]:
    return [t.strip() for t in tags.split(",") if t.strip()] or [""]


def _merge_raw(into: dict[str, Any], row: dict[str, Any]) -> None:
    for c in COUNTER_COLUMNS:
        into[c] = (into[c] or 0) + (row[c] or 0)
    for c in HIST_COLUMNS:
        into[c] = histogram_merge(into[c], row[c])


def _quantiles(hist: str | None, qs: list[float]) -> dict[str, float | None]:
    values = histogram_quantiles(hist or "", qs)
    return {f"p{round(q * 100)}": v for q, v in zip(qs, values, strict=True)}


def _finish(raw: dict[str, Any]) -> dict[str, Any]:
    """The public shape of one aggregate (from summed raw columns)."""
    requests = int(raw["requests"] or 0)
    unknown = int(raw["cost_unknown_requests"] or 0)
    ttft_count = int(raw["ttft_count"] or 0)
    gen_time = float(raw["gen_time_s"] or 0.0)
    errors = {c: int(raw[f"errors_{c}"] or 0) for c in METER_ERROR_CLASSES}
    tokens = {}
    for kind in TOKEN_KINDS:
        reported, estimated = int(raw[f"{kind}_reported"] or 0), int(raw[f"{kind}_estimated"] or 0)
        tokens[kind] = {"reported": reported, "estimated": estimated, "total": reported + estimated}
    return {
        "requests": requests,
        "successes": int(raw["successes"] or 0),
        "errors": sum(errors.values()),
        "errors_by_class": errors,
        "tokens": tokens,
        # Unknown prices are null, not zero: a total is only a number if some request had a known price.
        "cost_usd": None if requests > 0 and unknown >= requests else float(raw["cost_usd"] or 0.0),
        "cost_unknown_requests": unknown,
        "ttft_s": {
            **_quantiles(raw["ttft_hist"], [0.5, 0.9, 0.99]),
            "mean": float(raw["ttft_sum_s"]) / ttft_count if ttft_count else None,
            "sum": float(raw["ttft_sum_s"] or 0.0),  # time spent waiting on first tokens
            "count": ttft_count,
        },
        "duration_s": {
            **_quantiles(raw["duration_hist"], [0.5, 0.9, 0.99]),
            "mean": float(raw["duration_sum_s"]) / requests if requests else None,
            "sum": float(raw["duration_sum_s"] or 0.0),
        },
        "output_tokens_per_s": int(raw["gen_output_tokens"] or 0) / gen_time if gen_time > 0 else None,
    }


def _sort_key(value: object) -> tuple[int, float, str]:
    if isinstance(value, int | float):
        return (0, float(value), "")
    return (1, math.inf, str(value))


def query_usage(
    db: sqlite3.Connection | str | os.PathLike[str],
    since: float | None = None,
    until: float | None = None,
    group_by: Sequence[str] = (),
    run: str | None = None,
    key_id: str | None = None,
    route: str | None = None,
) -> dict[str, Any]:
    """Totals and grouped rows over minute buckets overlapping [since, until). `group_by` among route,
    deployment, model, key, run, tag (a bucket with tags "a,b" counts under both), minute, hour, day (UTC).
    `run`, `key_id` and `route` restrict the rows to one run, client key or route."""
    unknown = [g for g in group_by if g not in GROUPS]
    if unknown:
        raise ValueError(f"cannot group by {unknown}; choose among {sorted(GROUPS)}")
    conn = db if isinstance(db, sqlite3.Connection) else connect_readonly(db)
    try:
        where: list[str] = []
        args: list[float | str] = []
        for column, value in (("run", run), ("key_id", key_id), ("route", route)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if since is not None:
            where.append("minute >= ?")
            args.append(math.floor(since / 60.0) * 60.0)
        if until is not None:
            where.append("minute < ?")
            args.append(until)
        exprs = [e for g in group_by for e in GROUPS[g][0]]
        names = [n for g in group_by for n in GROUPS[g][1]]
        sums = [f"SUM({c}) AS {c}" for c in COUNTER_COLUMNS] + [f"hist_sum({c}) AS {c}" for c in HIST_COLUMNS]
        select = [f"{e} AS g{i}" for i, e in enumerate(exprs)] + sums
        sql = f"SELECT {', '.join(select)} FROM usage_minute"
        if where:
            sql += " WHERE " + " AND ".join(where)
        if exprs:
            sql += " GROUP BY " + ", ".join(f"g{i}" for i in range(len(exprs)))
        cursor = conn.execute(sql, args)
        columns = [d[0] for d in cursor.description]
        raw_rows = [dict(zip(columns, r, strict=True)) for r in cursor.fetchall()]
    finally:
        if conn is not db:
            conn.close()

    groups: dict[tuple[object, ...], dict[str, Any]] = {}
    totals_raw: dict[str, Any] = {c: 0 for c in COUNTER_COLUMNS} | {c: "" for c in HIST_COLUMNS}
    for raw in raw_rows:
        if not exprs:
            totals_raw = raw
            break
        key_values = [raw[f"g{i}"] for i in range(len(exprs))]
        _merge_raw(totals_raw, raw)
        tag_slot = names.index("tag") if "tag" in names else None
        variants = [key_values]
        if tag_slot is not None:
            variants = [
                [*key_values[:tag_slot], t, *key_values[tag_slot + 1 :]] for t in _split_tags(raw["g" + str(tag_slot)])
            ]
        for values in variants:
            key = tuple(values)
            if key in groups:
                _merge_raw(groups[key], raw)
            else:
                groups[key] = dict(raw)
    rows = [
        dict(zip(names, key, strict=True)) | _finish(raw)
        for key, raw in sorted(groups.items(), key=lambda kv: [_sort_key(v) for v in kv[0]])
    ]
    return {
        "since": since,
        "until": until,
        "group_by": list(group_by),
        "filters": {k: v for k, v in (("run", run), ("key_id", key_id), ("route", route)) if v is not None},
        "totals": _finish(totals_raw),
        "rows": rows,
    }


def recent_requests(
    db: sqlite3.Connection | str | os.PathLike[str],
    limit: int = 50,
    run: str | None = None,
    key_id: str | None = None,
) -> list[dict[str, Any]]:
    """The newest per-request log rows, newest first, optionally for one run or client key."""
    conn = db if isinstance(db, sqlite3.Connection) else connect_readonly(db)
    try:
        where, args = [], []
        if run is not None:
            where.append("run = ?")
            args.append(run)
        if key_id is not None:
            where.append("key_id = ?")
            args.append(key_id)
        sql = "SELECT * FROM requests" + (" WHERE " + " AND ".join(where) if where else "")
        cursor = conn.execute(sql + " ORDER BY ts DESC, id DESC LIMIT ?", [*args, int(limit)])
        columns = [d[0] for d in cursor.description]
        return [dict(zip(columns, r, strict=True)) for r in cursor.fetchall()]
    finally:
        if conn is not db:
            conn.close()


def _flatten(row: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}_"))
        elif isinstance(value, list):
            out[name] = ";".join(str(v) for v in value)
        else:
            out[name] = value
    return out


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV: nested fields as `outer_inner` columns, lists joined by `;` (`/usage?format=csv` and
    `tokenrelay usage --csv`; here, not in the server's module, so that the command does not import aiohttp)."""
    flat = [_flatten(r) for r in rows]
    columns: list[str] = []
    for row in flat:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(flat)
    return buffer.getvalue()
