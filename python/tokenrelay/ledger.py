"""The durable usage ledger: SQLite in WAL mode, written by one background thread per process.
Meter deltas are UPSERTed (added) per minute bucket, so worker processes can share one file, totals exact."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import operator
import os
import sqlite3
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from tokenrelay._core import METER_ERROR_CLASSES, histogram_merge

log = logging.getLogger("tokenrelay.ledger")

KEY_COLUMNS = ("minute", "route", "deployment", "model", "key_id", "key_name", "run", "tags")
TOKEN_KINDS = ("input", "output", "cached_input", "cache_write", "reasoning")
HIST_COLUMNS = ("ttft_hist", "duration_hist")
# Every additive column of usage_minute: exactly the counters `Meters.drain()` returns.
COUNTER_COLUMNS = (
    "requests",
    "successes",
    *(f"errors_{c}" for c in METER_ERROR_CLASSES),
    *(f"{k}_{s}" for k in TOKEN_KINDS for s in ("reported", "estimated")),
    "cost_usd",
    "cost_unknown_requests",
    "ttft_count",
    "ttft_sum_s",
    "duration_sum_s",
    "gen_output_tokens",
    "gen_time_s",
)
REQUEST_COLUMNS = (
    "ts", "request_id", "route", "deployment", "model", "key_id", "key_name", "run", "tags", "api", "stream",
    "status", "error_class", "error", "input", "output", "cached_input", "cache_write", "reasoning",
    "input_estimated", "output_estimated", "cached_estimated", "cache_write_estimated", "reasoning_estimated",
    "cost_usd", "ttft_s", "duration_s",
)  # fmt: skip

# Applied in order; user_version = number applied. Never edit a released entry: append a new one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE usage_minute (
            minute INTEGER NOT NULL, route TEXT NOT NULL, deployment TEXT NOT NULL, model TEXT NOT NULL,
            key_id TEXT NOT NULL, key_name TEXT NOT NULL, run TEXT NOT NULL, tags TEXT NOT NULL,
            requests INTEGER NOT NULL DEFAULT 0, successes INTEGER NOT NULL DEFAULT 0,
            errors_client_4xx INTEGER NOT NULL DEFAULT 0, errors_upstream_4xx INTEGER NOT NULL DEFAULT 0,
            errors_rate_limited INTEGER NOT NULL DEFAULT 0, errors_upstream_5xx INTEGER NOT NULL DEFAULT 0,
            errors_timeout INTEGER NOT NULL DEFAULT 0, errors_client_disconnect INTEGER NOT NULL DEFAULT 0,
            errors_cancelled_hedge INTEGER NOT NULL DEFAULT 0,
            errors_upstream_error INTEGER NOT NULL DEFAULT 0,
            input_reported INTEGER NOT NULL DEFAULT 0, input_estimated INTEGER NOT NULL DEFAULT 0,
            output_reported INTEGER NOT NULL DEFAULT 0, output_estimated INTEGER NOT NULL DEFAULT 0,
            cached_input_reported INTEGER NOT NULL DEFAULT 0,
            cached_input_estimated INTEGER NOT NULL DEFAULT 0,
            cache_write_reported INTEGER NOT NULL DEFAULT 0, cache_write_estimated INTEGER NOT NULL DEFAULT 0,
            reasoning_reported INTEGER NOT NULL DEFAULT 0, reasoning_estimated INTEGER NOT NULL DEFAULT 0,
            cost_usd REAL NOT NULL DEFAULT 0, cost_unknown_requests INTEGER NOT NULL DEFAULT 0,
            ttft_count INTEGER NOT NULL DEFAULT 0, ttft_sum_s REAL NOT NULL DEFAULT 0,
            ttft_hist TEXT NOT NULL DEFAULT '',
            duration_sum_s REAL NOT NULL DEFAULT 0, duration_hist TEXT NOT NULL DEFAULT '',
            gen_output_tokens INTEGER NOT NULL DEFAULT 0, gen_time_s REAL NOT NULL DEFAULT 0,
            UNIQUE (minute, route, deployment, model, key_id, key_name, run, tags)
        )""",
        "CREATE INDEX usage_minute_run ON usage_minute (run, minute)",
        "CREATE INDEX usage_minute_key ON usage_minute (key_id, minute)",
        """CREATE TABLE requests (
            id INTEGER PRIMARY KEY, ts REAL NOT NULL, request_id TEXT NOT NULL, route TEXT NOT NULL,
            deployment TEXT NOT NULL, model TEXT NOT NULL, key_id TEXT NOT NULL, key_name TEXT NOT NULL,
            run TEXT NOT NULL, tags TEXT NOT NULL, api TEXT NOT NULL, stream INTEGER NOT NULL,
            status INTEGER NOT NULL, error_class TEXT NOT NULL, error TEXT NOT NULL,
            input INTEGER NOT NULL, output INTEGER NOT NULL, cached_input INTEGER NOT NULL,
            cache_write INTEGER NOT NULL, reasoning INTEGER NOT NULL,
            input_estimated INTEGER NOT NULL, output_estimated INTEGER NOT NULL,
            cached_estimated INTEGER NOT NULL, cache_write_estimated INTEGER NOT NULL,
            reasoning_estimated INTEGER NOT NULL,
            cost_usd REAL, ttft_s REAL, duration_s REAL NOT NULL
        )""",
        "CREATE INDEX requests_ts ON requests (ts)",
        "CREATE INDEX requests_run ON requests (run, ts)",
        "CREATE INDEX requests_key ON requests (key_id, ts)",
    ),
    # Client keys (tokenrelay.keys): only a salted SHA-256 of each key is stored; `id` is the key's public
    # prefix, used for lookup. A name is unique among keys that are not revoked.
    (
        """CREATE TABLE client_keys (
            id TEXT PRIMARY KEY, name TEXT NOT NULL, salt TEXT NOT NULL, hash TEXT NOT NULL,
            routes TEXT NOT NULL DEFAULT '', budget_usd REAL, period TEXT, tpm INTEGER, rpm INTEGER,
            expires_at REAL, created_at REAL NOT NULL, revoked_at REAL, updated_at REAL NOT NULL
        )""",
        "CREATE UNIQUE INDEX client_keys_active_name ON client_keys (name) WHERE revoked_at IS NULL",
    ),
    (  # agent runs (`tokenrelay run`): names, budgets, start/end; their usage is in usage_minute.run
        """CREATE TABLE runs (
            id TEXT PRIMARY KEY, name TEXT NOT NULL, budget_usd REAL, route_default TEXT NOT NULL,
            command TEXT NOT NULL, started REAL NOT NULL, ended REAL, exit_code INTEGER
        )""",
        "CREATE INDEX runs_started ON runs (started)",
    ),
    # Requests cut by a shutdown past its grace period (error class "cancelled").
    ("ALTER TABLE usage_minute ADD COLUMN errors_cancelled INTEGER NOT NULL DEFAULT 0",),
)
SCHEMA_VERSION = len(MIGRATIONS)

_UPSERT = (
    f"INSERT INTO usage_minute ({', '.join(KEY_COLUMNS + COUNTER_COLUMNS + HIST_COLUMNS)}) "
    f"VALUES ({', '.join(':' + c for c in KEY_COLUMNS + COUNTER_COLUMNS + HIST_COLUMNS)}) "
    f"ON CONFLICT ({', '.join(KEY_COLUMNS)}) DO UPDATE SET "
    + ", ".join([f"{c} = {c} + excluded.{c}" for c in COUNTER_COLUMNS])
    + ", "
    + ", ".join([f"{c} = hist_merge({c}, excluded.{c})" for c in HIST_COLUMNS])
)
_INSERT_REQUEST = (
    f"INSERT INTO requests ({', '.join(REQUEST_COLUMNS)}) VALUES ({', '.join('?' * len(REQUEST_COLUMNS))})"
)
_ERROR_MESSAGE_MAX = 500


class LedgerError(Exception):
    """The ledger file cannot be used (newer schema, not a ledger, cannot be created)."""


class MetersLike(Protocol):
    def drain(self) -> list[dict[str, object]]: ...
    def restore(self, rows: list[dict[str, object]]) -> None: ...


def default_db_path() -> Path:
    """`$TOKENRELAY_DB`, else `$XDG_DATA_HOME/tokenrelay/usage.db`, else
    `~/.local/share/tokenrelay/usage.db`."""
    if env := os.environ.get("TOKENRELAY_DB"):
        return Path(env).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data).expanduser() / "tokenrelay" / "usage.db"


class _HistSum:
    """SQL aggregate `hist_sum(text)`: the bucket-wise sum of histograms."""

    def __init__(self) -> None:
        self.total = ""

    def step(self, value: str | None) -> None:
        if value:
            self.total = histogram_merge(self.total, value)

    def finalize(self) -> str:
        return self.total


def _register_functions(conn: sqlite3.Connection) -> None:
    conn.create_function("hist_merge", 2, histogram_merge, deterministic=True)
    conn.create_aggregate("hist_sum", 1, _HistSum)  # type: ignore[arg-type]  # typeshed wants int values


def migrate(conn: sqlite3.Connection) -> int:
    """Applies the pending migrations, each in its own write transaction (safe against a concurrent
    process doing the same). Returns the schema version."""
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise LedgerError(f"ledger schema {version} is newer than this tokenrelay ({SCHEMA_VERSION})")
            if version == SCHEMA_VERSION:
                conn.execute("COMMIT")
                return version
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def open_db(path: str | os.PathLike[str], *, busy_timeout_ms: int = 5000) -> sqlite3.Connection:
    """Opens (creating it and its directory if needed) and migrates a ledger for writing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        _register_functions(conn)
        migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def connect_readonly(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """Opens an existing ledger for queries (the CLI reads the file directly)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no ledger at {path}")
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 5000")
    _register_functions(conn)
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version == 0 or version > SCHEMA_VERSION:
        conn.close()
        raise LedgerError(f"{path} is not a tokenrelay ledger this version can read (schema {version})")
    return conn


def _flag(row: Mapping[str, Any], name: str) -> int:
    return 1 if row.get(name) else 0


def _request_params(row: Mapping[str, Any]) -> tuple[object, ...]:
    """One `requests` row from the relay's dict; missing fields get neutral defaults."""

    def text(name: str) -> str:
        value = row.get(name)
        return "" if value is None else str(value)

    def integer(name: str) -> int:
        return int(row.get(name) or 0)

    def real(name: str) -> float | None:
        value = row.get(name)
        return None if value is None else float(value)

    return (
        float(row.get("ts") or time.time()), text("request_id"), text("route"), text("deployment"),
        text("model"), text("key_id"), text("key_name"), text("run"), text("tags"), text("api"),
        _flag(row, "stream"), integer("status"), text("error_class"), text("error")[:_ERROR_MESSAGE_MAX],
        integer("input"), integer("output"), integer("cached_input"), integer("cache_write"),
        integer("reasoning"), _flag(row, "input_estimated"), _flag(row, "output_estimated"),
        _flag(row, "cached_estimated"), _flag(row, "cache_write_estimated"),
        _flag(row, "reasoning_estimated"), real("cost_usd"), real("ttft_s"), real("duration_s") or 0.0,
    )  # fmt: skip


# A `Metering.summary` row as `requests` parameters: its fields already have their column's type (bools are
# stored as 0/1, the error message is cut to 500 characters by Outcome.fail).
_summary_params = operator.itemgetter(*REQUEST_COLUMNS)


class Ledger:
    """Flushes `meters` and the per-request log to SQLite every `interval` seconds from its own thread.

    A failed write (disk full, read-only, locked, file removed) never raises: it is logged once until the
    ledger recovers, meter rows go back into `meters` and request rows stay queued (at most
    `max_pending_requests`, oldest dropped and counted beyond that); the next interval retries, reopening
    (recreating) the file when it was removed or replaced.
    """

    def __init__(
        self,
        meters: MetersLike | None,
        path: str | os.PathLike[str] | None = None,
        *,
        interval: float = 1.0,
        retention_days: float | None = 7.0,
        retention_every_s: float = 600.0,
        max_pending_requests: int = 50_000,
        busy_timeout_ms: int = 5000,
    ) -> None:
        self.path = Path(path) if path is not None else default_db_path()
        self._meters = meters
        self._interval = interval
        self._retention_s = None if retention_days is None else retention_days * 86400.0
        self._retention_every_s = retention_every_s
        self._max_pending = max_pending_requests
        self._busy_timeout_ms = busy_timeout_ms
        self._pending: collections.deque[Mapping[str, Any] | tuple[object, ...]] = collections.deque()
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._requested = 0
        self._done = 0
        self._last_ok = True
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Writer-thread state.
        self._conn: sqlite3.Connection | None = None
        self._ident: tuple[int, int] | None = None
        self._next_retention = 0.0
        self.failing = False
        self.last_error: str | None = None
        self.dropped_requests = 0
        self.flushes = 0

    # -- event-loop side -------------------------------------------------------------------------------
    def log_request(self, row: Mapping[str, Any] | tuple[object, ...]) -> None:
        """Queues one per-request log row (O(1), no I/O). See `REQUEST_COLUMNS` for the fields; a tuple is taken as
        the row's parameters in that order, ready to insert."""
        with self._lock:
            self._pending.append(row)
            if len(self._pending) > self._max_pending:
                self._pending.popleft()
                self._count_dropped(1)

    def log_summary(self, row: Mapping[str, Any]) -> None:
        """`log_request` for a `Metering.summary` row: its parameters are taken at once (one C call), so the writer
        thread has nothing to convert while it holds the GIL."""
        self.log_request(_summary_params(row))

    @property
    def pending_requests(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        """Opens the ledger (raising if it cannot be created at all) and starts the writer thread."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="tokenrelay-ledger", daemon=True)
        self._thread.start()
        # Processes opening a new file at once can find it locked while another migrates it (switching to WAL does
        # not wait on SQLite's busy handler): that is retried for as long as the busy timeout; anything else raises.
        deadline = time.monotonic() + self._busy_timeout_ms / 1000
        while not self.flush():
            error = self.last_error
            transient = error is None or "locked" in error or "busy" in error
            if not transient or time.monotonic() >= deadline:
                self.close()
                raise LedgerError(f"cannot open the ledger at {self.path}: {error}")
            time.sleep(0.01)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wakes the writer and waits for a complete flush cycle; True if it wrote everything."""
        if self._thread is None or not self._thread.is_alive():
            return False
        with self._cond:
            self._requested += 1
            target = self._requested
            self._wake.set()
            if not self._cond.wait_for(lambda: self._done >= target, timeout):
                return False
            return self._last_ok

    async def aflush(self) -> bool:
        return await asyncio.to_thread(self.flush)

    def close(self, timeout: float = 30.0) -> None:
        """Final flush, then stops the writer thread (graceful shutdown)."""
        thread = self._thread
        if thread is None:
            return
        with self._cond:
            self._stopping = True
        self.flush(timeout)
        self._wake.set()
        thread.join(timeout)
        self._thread = None

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    # -- writer thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._wake.wait(self._interval)
            self._wake.clear()
            with self._cond:
                target = self._requested
            try:
                ok = self._flush_once()
            except Exception:  # never let the writer die; _flush_once restores what it took
                log.exception("ledger flush crashed")
                ok = False
            with self._cond:
                self._done = max(self._done, target)
                self._last_ok = ok
                self._cond.notify_all()
                if self._stopping and self._done >= self._requested:
                    break
        self._close_conn()

    def _count_dropped(self, n: int) -> None:
        if self.dropped_requests == 0 or (self.dropped_requests + n) // 10_000 > self.dropped_requests // 10_000:
            log.warning("ledger request log queue full (%d rows): dropping oldest", self._max_pending)
        self.dropped_requests += n

    def _requeue(self, batch: collections.deque[Mapping[str, Any] | tuple[object, ...]]) -> None:
        with self._lock:
            batch.extend(self._pending)
            overflow = len(batch) - self._max_pending
            for _ in range(max(0, overflow)):
                batch.popleft()
            self._pending = batch
        if overflow > 0:
            self._count_dropped(overflow)

    def _close_conn(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None
            self._ident = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None:
            try:
                st = os.stat(self.path)
                ident: tuple[int, int] | None = (st.st_dev, st.st_ino)
            except OSError:
                ident = None
            if ident != self._ident:
                log.warning("ledger %s was removed or replaced; reopening", self.path)
                self._close_conn()
        if self._conn is None:
            self._conn = open_db(self.path, busy_timeout_ms=self._busy_timeout_ms)
            st = os.stat(self.path)
            self._ident = (st.st_dev, st.st_ino)
        return self._conn

    def _flush_once(self) -> bool:
        rows = self._meters.drain() if self._meters is not None else []
        with self._lock:
            taken, self._pending = self._pending, collections.deque()
        batch: collections.deque[Mapping[str, Any] | tuple[object, ...]] = collections.deque()
        params = []
        for row in taken:
            try:
                params.append(row if isinstance(row, tuple) else _request_params(row))
                batch.append(row)
            except (TypeError, ValueError) as exc:
                log.warning("ledger: dropping a malformed request row: %s", exc)
        try:
            conn = self._connection()
            if rows or params:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.executemany(_UPSERT, rows)
                    conn.executemany(_INSERT_REQUEST, params)
                    conn.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back already
                        conn.execute("ROLLBACK")
                    raise
        except Exception as exc:  # sqlite3.Error, OSError, LedgerError: all mean "try again later"
            if self._meters is not None and rows:
                self._meters.restore(rows)
            self._requeue(batch)
            self._close_conn()
            self.last_error = f"{type(exc).__name__}: {exc}"
            if not self.failing:
                log.error("ledger %s: write failed, keeping usage in memory and retrying: %s", self.path, exc)
                self.failing = True
            return False
        self.flushes += 1
        try:  # after the commit: a failure here must not put committed rows back
            self._apply_retention(conn)
        except sqlite3.Error as exc:
            log.warning("ledger %s: retention failed: %s", self.path, exc)
        if self.failing:
            log.warning("ledger %s: writes recovered", self.path)
            self.failing = False
            self.last_error = None
        return True

    def _apply_retention(self, conn: sqlite3.Connection) -> None:
        now = time.monotonic()
        if self._retention_s is None or now < self._next_retention:
            return
        self._next_retention = now + self._retention_every_s
        apply_retention(conn, self._retention_s / 86400.0)


def apply_retention(conn: sqlite3.Connection, retention_days: float, now: float | None = None) -> int:
    """Deletes `requests` rows older than `retention_days`; returns how many."""
    cutoff = (time.time() if now is None else now) - retention_days * 86400.0
    with conn:
        return conn.execute("DELETE FROM requests WHERE ts < ?", (cutoff,)).rowcount
