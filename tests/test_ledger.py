"""The SQLite ledger on a real file: migrations, concurrent writers, failures and recovery, queries."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from tokenrelay._core import Meters
from tokenrelay.ledger import (
    SCHEMA_VERSION,
    Ledger,
    LedgerError,
    apply_retention,
    connect_readonly,
    default_db_path,
    open_db,
)
from tokenrelay.ledger_query import parse_since, query_usage, recent_requests

T0 = 1_800_000_000.0


def record(m: Meters, **overrides: Any) -> None:
    kw: dict[str, Any] = dict(
        ts=T0 + 1, route="chat", deployment="openai-1", model="gpt-4o", key_id="k1", key_name="team-a",
        run="run-1", tags="", status=200, error_class="", input=1000, output=200, cached_input=0,
        cache_write=0, reasoning=0, input_estimated=False, output_estimated=False, cached_estimated=False,
        cache_write_estimated=False, reasoning_estimated=False, cost_usd=0.01, ttft_s=0.3, duration_s=2.3,
        stream=True, api="chat",
    )  # fmt: skip
    kw.update(overrides)
    m.record(**kw)


def request_row(i: int, **overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = dict(
        ts=T0 + i, request_id=f"req-{i}", route="chat", deployment="openai-1", model="gpt-4o", key_id="k1",
        key_name="team-a", run="run-1", tags="", api="chat", stream=True, status=200, error_class="",
        error="", input=10, output=5, cost_usd=None, ttft_s=0.1, duration_s=1.0,
    )  # fmt: skip
    row.update(overrides)
    return row


def total_requests(path: Path) -> int:
    return int(query_usage(path)["totals"]["requests"])


def test_migrations_from_empty_and_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "usage.db"
    conn = open_db(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"usage_minute", "requests"} <= tables
    conn.close()
    open_db(path).close()  # reopening does not re-run migrations
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(LedgerError, match="newer"):
        open_db(path)


def test_default_db_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TOKENRELAY_DB", str(tmp_path / "x.db"))
    assert default_db_path() == tmp_path / "x.db"
    monkeypatch.delenv("TOKENRELAY_DB")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_db_path() == tmp_path / "tokenrelay" / "usage.db"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_db_path() == Path.home() / ".local" / "share" / "tokenrelay" / "usage.db"


def test_flush_writes_meters_and_request_log(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    m = Meters()
    ledger = Ledger(m, path, interval=60)
    ledger.start()
    try:
        for i in range(5):
            record(m, run="run-1" if i < 3 else "run-2")
            ledger.log_request(request_row(i, run="run-1" if i < 3 else "run-2"))
        assert ledger.flush()
        assert ledger.pending_requests == 0 and m.pending_buckets() == 0
        for _ in range(2):
            record(m)
        assert ledger.flush()
    finally:
        ledger.close()
    usage = query_usage(path, group_by=["run"])
    assert usage["totals"]["requests"] == 7
    assert [(r["run"], r["requests"]) for r in usage["rows"]] == [("run-1", 5), ("run-2", 2)]
    assert usage["totals"]["cost_usd"] == pytest.approx(0.07)
    recent = recent_requests(path, limit=2)
    assert [r["request_id"] for r in recent] == ["req-4", "req-3"]
    assert [r["request_id"] for r in recent_requests(path, run="run-1")] == ["req-2", "req-1", "req-0"]
    assert recent[0]["cost_usd"] is None and recent[0]["stream"] == 1


def test_close_does_a_final_flush(tmp_path: Path) -> None:
    m = Meters()
    ledger = Ledger(m, tmp_path / "u.db", interval=3600)
    ledger.start()
    record(m)
    ledger.log_request(request_row(1))
    ledger.close()
    assert total_requests(tmp_path / "u.db") == 1
    assert len(recent_requests(tmp_path / "u.db")) == 1


WRITER = textwrap.dedent(
    """
    import sys
    from tokenrelay._core import Meters
    from tokenrelay.ledger import Ledger
    path, n, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    m = Meters()
    ledger = Ledger(m, path, interval=0.005)
    ledger.start()
    for i in range(n):
        m.record(ts=1800000001.0 + (i % 3) * 60, route="chat", deployment="d", model="m", key_id="k",
                 key_name="n", run="shared", tags="", status=200, error_class="", input=3, output=2,
                 cached_input=0, cache_write=0, reasoning=0, input_estimated=False, output_estimated=False,
                 cached_estimated=False, cache_write_estimated=False, reasoning_estimated=False,
                 cost_usd=0.5, ttft_s=0.1, duration_s=1.0, stream=True, api="chat")
        ledger.log_request({"ts": 1800000001.0 + i, "request_id": f"{name}-{i}"})
    ledger.close()
    assert not ledger.failing, ledger.last_error
    """
)


def test_two_processes_share_one_ledger_with_exact_totals(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    n = 3000
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(n), name], stderr=subprocess.PIPE)
        for name in ("a", "b")
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    usage = query_usage(path, group_by=["minute"])
    t = usage["totals"]
    assert t["requests"] == 2 * n
    assert t["tokens"]["input"]["reported"] == 3 * 2 * n
    assert t["cost_usd"] == pytest.approx(0.5 * 2 * n)
    assert [r["requests"] for r in usage["rows"]] == [2000, 2000, 2000]
    # The histograms merged across processes too.
    assert t["duration_s"]["p50"] is not None and 0.8 < t["duration_s"]["p50"] <= 1.0
    conn = connect_readonly(path)
    assert conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 2 * n
    assert conn.execute("SELECT COUNT(*) FROM usage_minute").fetchone()[0] == 3
    conn.close()


def test_locked_database_fails_quietly_then_recovers_without_double_counting(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "usage.db"
    m = Meters()
    ledger = Ledger(m, path, interval=3600, busy_timeout_ms=50)
    ledger.start()
    try:
        record(m)
        assert ledger.flush()
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        with caplog.at_level(logging.ERROR, logger="tokenrelay.ledger"):
            for i in range(3):
                record(m)
                ledger.log_request(request_row(i))
                assert not ledger.flush()
        assert ledger.failing and "locked" in (ledger.last_error or "")
        assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1  # logged once
        assert m.pending_buckets() == 1 and ledger.pending_requests == 3
        blocker.execute("ROLLBACK")
        blocker.close()
        assert ledger.flush()
        assert not ledger.failing
    finally:
        ledger.close()
    assert total_requests(path) == 4
    assert len(recent_requests(path)) == 3


def test_file_deleted_mid_run_is_recreated(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    m = Meters()
    ledger = Ledger(m, path, interval=3600)
    ledger.start()
    try:
        record(m)
        assert ledger.flush()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        record(m)
        record(m)
        assert ledger.flush()
    finally:
        ledger.close()
    # The deleted file took its one request with it; the two recorded after went to the new file.
    assert total_requests(path) == 2


def test_unwritable_path_keeps_rows_until_it_is_fixed(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    m = Meters()
    ledger = Ledger(m, path, interval=3600, max_pending_requests=2)
    ledger.start()
    try:
        record(m)
        assert ledger.flush()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        path.mkdir()  # a directory where the file was: every open and write fails, even as root
        for i in range(3):
            record(m)
            ledger.log_request(request_row(i))
        assert not ledger.flush()
        assert not ledger.flush()
        assert ledger.failing
        assert ledger.pending_requests == 2 and ledger.dropped_requests == 1
        shutil.rmtree(path)
        assert ledger.flush()
    finally:
        ledger.close()
    assert total_requests(path) == 3
    assert [r["request_id"] for r in recent_requests(path)] == ["req-2", "req-1"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_file_fails_then_recovers(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    m = Meters()
    ledger = Ledger(m, path, interval=3600)
    ledger.start()
    try:
        record(m)
        assert ledger.flush()
        tmp_path.chmod(0o555)
        path.chmod(0o444)
        record(m)
        ledger.flush()  # may fail or not (the open connection can still write): never raises
        path.chmod(0o644)
        tmp_path.chmod(0o755)
        assert ledger.flush()
    finally:
        ledger.close()
    assert total_requests(path) == 2


def test_start_raises_when_the_ledger_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    ledger = Ledger(Meters(), tmp_path / "file" / "usage.db")
    with pytest.raises(LedgerError):
        ledger.start()


def test_query_grouping_quantiles_and_tags(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    m = Meters()
    for _ in range(90):
        record(m, duration_s=0.2, ttft_s=0.05, tags="eval,batch")
    for _ in range(10):
        record(m, duration_s=20.0, ttft_s=2.0, route="code", key_id="k2", key_name="team-b", cost_usd=None)
    record(m, ts=T0 + 3600, error_class="timeout", status=504, output=0, ttft_s=None, duration_s=30.0)
    record(m, ts=T0 + 3600, output=50, output_estimated=True, tags="eval")
    ledger = Ledger(m, path, interval=3600)
    ledger.start()
    ledger.close()

    usage = query_usage(path, group_by=["route"])
    by_route = {r["route"]: r for r in usage["rows"]}
    assert by_route["chat"]["requests"] == 92 and by_route["code"]["requests"] == 10
    assert by_route["code"]["cost_usd"] is None  # every price unknown
    assert by_route["chat"]["errors_by_class"]["timeout"] == 1 and by_route["chat"]["errors"] == 1
    assert by_route["chat"]["tokens"]["output"] == {"reported": 90 * 200, "estimated": 50, "total": 18050}
    assert usage["totals"]["requests"] == 102
    assert usage["totals"]["cost_unknown_requests"] == 10
    d = usage["totals"]["duration_s"]
    assert 0.16 < d["p50"] <= 0.2 and 16.0 < d["p99"] <= 31.5
    assert 1.6 < by_route["code"]["ttft_s"]["p90"] <= 2.0
    # tokens/s: successes only; 200 tokens over (0.2 - 0.05) s.
    code_tps = by_route["code"]["output_tokens_per_s"]
    assert code_tps == pytest.approx(200 / 18.0)

    by_key = query_usage(path, group_by=["key"])["rows"]
    assert [(r["key_id"], r["key_name"], r["requests"]) for r in by_key] == [
        ("k1", "team-a", 92),
        ("k2", "team-b", 10),
    ]
    by_tag = {r["tag"]: r["requests"] for r in query_usage(path, group_by=["tag"])["rows"]}
    assert by_tag == {"": 11, "batch": 90, "eval": 91}
    by_hour = query_usage(path, group_by=["hour", "route"])["rows"]
    assert [(r["hour"], r["route"], r["requests"]) for r in by_hour] == [
        (T0 // 3600 * 3600, "chat", 90),
        (T0 // 3600 * 3600, "code", 10),
        ((T0 + 3600) // 3600 * 3600, "chat", 2),
    ]
    # Time window: only the later hour.
    late = query_usage(path, since=T0 + 1800, until=T0 + 7200)
    assert late["totals"]["requests"] == 2
    assert query_usage(path, since=T0 + 99999)["totals"]["requests"] == 0
    assert query_usage(path, since=T0 + 99999)["totals"]["cost_usd"] == 0.0
    with pytest.raises(ValueError, match="group by"):
        query_usage(path, group_by=["planet"])


def test_queries_reject_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        query_usage(tmp_path / "nope.db")
    sqlite3.connect(tmp_path / "empty.db").close()
    with pytest.raises(LedgerError):
        query_usage(tmp_path / "empty.db")


def test_retention_drops_old_request_rows(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    now = time.time()
    ledger = Ledger(None, path, interval=3600, retention_days=7)
    ledger.log_request(request_row(0, ts=now - 8 * 86400, request_id="old"))
    ledger.log_request(request_row(1, ts=now - 6 * 86400, request_id="recent"))
    ledger.start()  # the first flush writes both, then applies retention
    ledger.close()
    assert [r["request_id"] for r in recent_requests(path)] == ["recent"]
    conn = open_db(path)
    assert apply_retention(conn, 6.5, now=now) == 0
    assert apply_retention(conn, 5.0, now=now) == 1
    assert conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 0
    conn.close()


def test_malformed_request_rows_are_dropped_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    ledger = Ledger(None, path, interval=3600)
    ledger.start()
    ledger.log_request(request_row(0, input="many"))
    ledger.log_request(request_row(1))
    assert ledger.flush()
    ledger.close()
    assert [r["request_id"] for r in recent_requests(path)] == ["req-1"]


def test_parse_since() -> None:
    now = 1_000_000.0
    assert parse_since("30m", now) == now - 1800
    assert parse_since("1h", now) == now - 3600
    assert parse_since("7d", now) == now - 7 * 86400
    assert parse_since("2026-11-01T00:00:00+00:00") == 1793491200.0
    assert parse_since("2026-11-01T00:00:00Z") == 1793491200.0
    assert parse_since("1793491200") == 1793491200.0
    local = parse_since("2026-11-01")
    assert abs(local - 1793491200.0) <= 14 * 3600
    with pytest.raises(ValueError):
        parse_since("yesterday-ish")
