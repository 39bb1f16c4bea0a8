"""Client keys: creating, listing and revoking them in the ledger database, and checking a presented key.

A key looks like `tr-<id>-<secret>`: `id` (12 hex digits) is public and used for lookup; the whole key is
stored only as SHA-256(salt + key) with a per-key random salt. Keys carry 256 random bits, so a fast hash is
safe: a slow KDF (bcrypt, scrypt) protects low-entropy passwords from guessing, and there is nothing to guess.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import math
import re
import secrets
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenrelay.ledger import connect_readonly, default_db_path, open_db
from tokenrelay.ledger_query import parse_time

KEY_PREFIX = "tr-"
ID_HEX = 12
PERIODS = ("day", "month")
_KEY_SHAPE = re.compile(r"^tr-([0-9a-f]{12})-([A-Za-z0-9_-]{20,})$")
_NAME_SHAPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:/-]{0,63}$")
_COLUMNS = "id, name, salt, hash, routes, budget_usd, period, tpm, rpm, expires_at, created_at, revoked_at, updated_at"


class KeyProblem(ValueError):
    """A key operation that cannot be done (bad argument, unknown or duplicate name); the message says why."""


@dataclass(frozen=True)
class ClientKey:
    """One stored client key (never the key itself)."""

    id: str
    name: str
    salt: str
    hash: str
    routes: tuple[str, ...] = ()
    budget_usd: float | None = None
    period: str | None = None
    tpm: int | None = None
    rpm: int | None = None
    expires_at: float | None = None
    created_at: float = 0.0
    revoked_at: float | None = None
    updated_at: float = 0.0

    @property
    def key_id(self) -> str:
        """The metering identity of requests made with this key (the `key_id` in the ledger and /usage)."""
        return self.id

    def status(self, now: float | None = None) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and (time.time() if now is None else now) >= self.expires_at:
            return "expired"
        return "active"

    def matches(self, key: str) -> bool:
        """True when `key` is this key (constant-time comparison of the salted hashes)."""
        return hmac.compare_digest(_digest(self.salt, key), self.hash)

    def public(self) -> dict[str, Any]:
        """What may be shown: everything but the salt and the hash."""
        return {
            "id": self.id,
            "name": self.name,
            "routes": list(self.routes),
            "budget_usd": self.budget_usd,
            "period": self.period,
            "tpm": self.tpm,
            "rpm": self.rpm,
            "expires_at": self.expires_at,
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
            "status": self.status(),
        }


def _digest(salt: str, key: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + key.encode()).hexdigest()


def key_id_of(key: str) -> str | None:
    """The public id inside a presented key, or None if it does not have the shape of a tokenrelay key."""
    m = _KEY_SHAPE.match(key)
    return m.group(1) if m else None


def parse_expires(text: str, now: float | None = None) -> float:
    """Unix time from `30d`, `12h`, `2w` (from now), `2026-12-31` (local midnight starting that day), an ISO
    datetime (local time unless it has an offset) or a Unix timestamp."""
    try:
        return parse_time(text, now, ago=False)
    except ValueError:
        raise KeyProblem(f"cannot read --expires {text!r}: use 30d, 12h, 2w, 2026-12-31 or an ISO datetime") from None


def period_start(period: str, now: float | None = None) -> float:
    """Start of the budget period containing `now`: UTC midnight (day) or the 1st of the month, 00:00 UTC."""
    when = dt.datetime.fromtimestamp(time.time() if now is None else now, dt.UTC)
    start = when.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "month":
        start = start.replace(day=1)
    return start.timestamp()


def period_end(period: str, start: float) -> float:
    """The start of the period after the one beginning at `start`."""
    when = dt.datetime.fromtimestamp(start, dt.UTC)
    if period == "day":
        return (when + dt.timedelta(days=1)).timestamp()
    year, month = (when.year + 1, 1) if when.month == 12 else (when.year, when.month + 1)
    return when.replace(year=year, month=month).timestamp()


def _row_to_key(row: Sequence[Any]) -> ClientKey:
    (id_, name, salt, hash_, routes, budget, period, tpm, rpm, expires, created, revoked, updated) = row
    return ClientKey(
        id=id_,
        name=name,
        salt=salt,
        hash=hash_,
        routes=tuple(r for r in routes.split(",") if r),
        budget_usd=budget,
        period=period,
        tpm=tpm,
        rpm=rpm,
        expires_at=expires,
        created_at=created,
        revoked_at=revoked,
        updated_at=updated,
    )


def _db(path: str | Path | None) -> Path:
    return Path(path) if path else default_db_path()


def create_key(
    db: str | Path | None,
    name: str,
    *,
    routes: Sequence[str] = (),
    budget_usd: float | None = None,
    period: str | None = None,
    tpm: int | None = None,
    rpm: int | None = None,
    expires_at: float | None = None,
    now: float | None = None,
) -> tuple[str, ClientKey]:
    """Creates a key; returns (the key itself — shown once, never stored —, its record)."""
    now = time.time() if now is None else now
    problems = _validate(name, routes, budget_usd, period, tpm, rpm, expires_at, now)
    if problems:
        raise KeyProblem("; ".join(problems))
    if budget_usd is not None and period is None:
        period = "month"
    conn = open_db(_db(db))
    try:
        for _ in range(5):  # a 48-bit id collision is practically impossible, but cheap to rule out
            id_ = secrets.token_hex(ID_HEX // 2)
            key = f"{KEY_PREFIX}{id_}-{secrets.token_urlsafe(32)}"
            salt = secrets.token_hex(16)
            record = ClientKey(
                id_,
                name,
                salt,
                _digest(salt, key),
                tuple(routes),
                budget_usd,
                period if budget_usd is not None else None,
                tpm,
                rpm,
                expires_at,
                now,
                None,
                now,
            )
            try:
                conn.execute(
                    f"INSERT INTO client_keys ({_COLUMNS}) VALUES ({', '.join('?' * 13)})",
                    (
                        record.id,
                        record.name,
                        record.salt,
                        record.hash,
                        ",".join(record.routes),
                        record.budget_usd,
                        record.period,
                        record.tpm,
                        record.rpm,
                        record.expires_at,
                        record.created_at,
                        None,
                        record.updated_at,
                    ),
                )
            except sqlite3.IntegrityError as exc:
                if "client_keys.name" in str(exc) or "client_keys_active_name" in str(exc):
                    raise KeyProblem(f"a key named {name!r} already exists (revoke it first)") from None
                continue
            return key, record
        raise KeyProblem("could not allocate a key id")  # pragma: no cover
    finally:
        conn.close()


def _validate(
    name: str,
    routes: Sequence[str],
    budget_usd: float | None,
    period: str | None,
    tpm: int | None,
    rpm: int | None,
    expires_at: float | None,
    now: float,
) -> list[str]:
    problems = []
    if not _NAME_SHAPE.match(name):
        problems.append(f"--name {name!r}: use 1-64 letters, digits and . _ @ : / - (starting with a letter or digit)")
    if any(not r or "," in r for r in routes):
        problems.append("--routes: a comma-separated list of route names")
    if budget_usd is not None and not (math.isfinite(budget_usd) and budget_usd >= 0):
        problems.append("--budget-usd must be a number >= 0")
    if period is not None and period not in PERIODS:
        problems.append(f"--period must be one of {', '.join(PERIODS)}")
    if period is not None and budget_usd is None:
        problems.append("--period needs --budget-usd")
    for flag, value in (("--tpm", tpm), ("--rpm", rpm)):
        if value is not None and value <= 0:
            problems.append(f"{flag} must be greater than 0")
    if expires_at is not None and expires_at <= now:
        problems.append("--expires is in the past")
    return problems


def load_keys(db: str | Path | None) -> list[ClientKey]:
    """Every key in the database, revoked ones included, oldest first; [] when there is no database yet."""
    path = _db(db)
    if not path.exists():
        return []
    conn = connect_readonly(path)
    try:
        return _select(conn)
    except sqlite3.OperationalError as exc:  # a ledger from before client keys (schema 1): no keys
        if "no such table" in str(exc):
            return []
        raise
    finally:
        conn.close()


def _select(conn: sqlite3.Connection) -> list[ClientKey]:
    rows = conn.execute(f"SELECT {_COLUMNS} FROM client_keys ORDER BY created_at, id").fetchall()
    return [_row_to_key(r) for r in rows]


def keys_stamp(db: str | Path | None) -> tuple[int, float]:
    """(number of keys, latest change): changes whenever a key is created or revoked."""
    path = _db(db)
    if not path.exists():
        return (0, 0.0)
    try:
        conn = connect_readonly(path)
    except Exception:
        return (0, 0.0)
    try:
        count, latest = conn.execute("SELECT count(*), max(updated_at) FROM client_keys").fetchone()
        return (int(count), float(latest or 0.0))
    except sqlite3.OperationalError:
        return (0, 0.0)
    finally:
        conn.close()


def find_key(keys: Sequence[ClientKey], name_or_id: str) -> ClientKey:
    """The active key with that name, else the key with that id; KeyProblem when none."""
    by_name = [k for k in keys if k.name == name_or_id and k.revoked_at is None]
    if by_name:
        return by_name[0]
    by_id = [k for k in keys if k.id == name_or_id]
    if by_id:
        return by_id[0]
    raise KeyProblem(f"no active key named {name_or_id!r} and no key with that id")


def revoke_key(db: str | Path | None, name_or_id: str, now: float | None = None) -> ClientKey:
    """Revokes a key by name or id; returns its updated record. Revoking twice is an error."""
    now = time.time() if now is None else now
    conn = open_db(_db(db))
    try:
        record = find_key(_select(conn), name_or_id)
        if record.revoked_at is not None:
            raise KeyProblem(f"key {record.name!r} ({record.id}) was already revoked")
        conn.execute("UPDATE client_keys SET revoked_at = ?, updated_at = ? WHERE id = ?", (now, now, record.id))
        return _row_to_key(conn.execute(f"SELECT {_COLUMNS} FROM client_keys WHERE id = ?", (record.id,)).fetchone())
    finally:
        conn.close()


def spent_usd(db: str | Path | None, key_ids: Mapping[str, float]) -> dict[str, float]:
    """USD spent per key id since its period start (`key_ids`: id -> start), from the flushed ledger."""
    path = _db(db)
    out = dict.fromkeys(key_ids, 0.0)
    if not key_ids or not path.exists():
        return out
    conn = connect_readonly(path)
    try:
        for key, since in key_ids.items():
            row = conn.execute(
                "SELECT SUM(cost_usd) FROM usage_minute WHERE key_id = ? AND minute >= ?", (key, since)
            ).fetchone()
            out[key] = float(row[0] or 0.0)
    finally:
        conn.close()
    return out


# --- `tokenrelay keys ...`: what the user reads ------------------------------------------------------------------


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def _limits(key: ClientKey) -> dict[str, str]:
    return {
        "routes": ",".join(key.routes) or "all",
        "budget": "-" if key.budget_usd is None else f"${key.budget_usd:g}/{key.period}",
        "tpm": "-" if key.tpm is None else str(key.tpm),
        "rpm": "-" if key.rpm is None else str(key.rpm),
        "expires": _when(key.expires_at),
    }


def cli_create(db: str | None, name: str, routes: str | None, budget_usd: float | None, period: str | None,
               tpm: int | None, rpm: int | None, expires: str | None, as_json: bool) -> int:  # fmt: skip
    """`tokenrelay keys create`: prints the key once, then what it may do."""
    import json
    import sys

    try:
        key, record = create_key(
            db,
            name,
            routes=[r.strip() for r in (routes or "").split(",") if r.strip()],
            budget_usd=budget_usd,
            period=period,
            tpm=tpm,
            rpm=rpm,
            expires_at=parse_expires(expires) if expires else None,
        )
    except KeyProblem as exc:
        print(f"tokenrelay keys create: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps({"key": key, **record.public()}))
        return 0
    limits = _limits(record)
    print(f"Created client key {name!r} (id {record.id}) in {_db(db)}:\n\n    {key}\n")
    print("Copy it now: tokenrelay stores only a salted hash and cannot show it again.")
    print(f"Routes: {limits['routes']}  budget: {limits['budget']}  tpm: {limits['tpm']}  rpm: {limits['rpm']}"
          f"  expires: {limits['expires']}")  # fmt: skip
    print("Agents send it as their API key (OpenAI SDK `api_key`, Anthropic SDK `api_key`).")
    return 0


def cli_list(db: str | None, as_json: bool) -> int:
    """`tokenrelay keys list`: a table (or JSON) of every key with its limits and this period's spend."""
    import json

    records = load_keys(db)
    now = time.time()
    starts = {k.id: period_start(k.period or "month", now) for k in records if k.budget_usd is not None}
    spent = spent_usd(db, starts)
    if as_json:
        print(json.dumps([{**k.public(), "spent_usd": spent.get(k.id)} for k in records]))
        return 0
    if not records:
        print(f"No client keys in {_db(db)}. Create one with: tokenrelay keys create --name NAME")
        return 0
    header = ("ID", "NAME", "ROUTES", "BUDGET", "SPENT", "TPM", "RPM", "EXPIRES", "CREATED", "STATUS")
    rows = []
    for k in records:
        limits = _limits(k)
        rows.append((k.id, k.name, limits["routes"], limits["budget"],
                     f"${spent[k.id]:.4f}" if k.id in spent else "-", limits["tpm"], limits["rpm"],
                     limits["expires"], _when(k.created_at), k.status(now)))  # fmt: skip
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cli_revoke(db: str | None, name_or_id: str) -> int:
    """`tokenrelay keys revoke NAME|ID`: a running daemon refuses the key within about a second."""
    import sys

    try:
        record = revoke_key(db, name_or_id)
    except KeyProblem as exc:
        print(f"tokenrelay keys revoke: {exc}", file=sys.stderr)
        return 1
    print(f"Revoked client key {record.name!r} (id {record.id}); a running tokenrelay refuses it within 1 s.")
    return 0
