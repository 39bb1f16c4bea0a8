"""Client keys' limit counters shared by the workers of one daemon (`--workers N`).

Alone, each worker would count a key's budget reservations, tokens and requests per minute by itself, and N
workers would together admit N times a key's tpm or rpm. With several workers, `Admission` keeps each key's
`KeyState` here instead: a slot per key in a file the workers map (`keys.shm`, in the directory the supervisor
made for them), read, decided on and written back under a lock on that slot's bytes (`fcntl.lockf`: the kernel
releases it if a worker dies holding it). The decision itself is the same code as for one worker.

A slot holds the counters and the last minute's traffic as (time, count) pairs, stamped in steps of
`admission.QUANTUM_S` (~120 entries a minute however busy the key: counts exact, an entry ages out up to a step
late, stricter and never laxer), each window a ring in the slot that the policy works on in place (`Ring`).
Should a ring fill up (a clock that jumped), its two oldest entries become one at the later one's time. A key
that finds no free slot (more than `SLOTS` keys with limits and runs with budgets since the daemon started) is
counted by its worker alone, with a warning.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import struct
import zlib
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from tokenrelay.admission import KeyState

from tokenrelay import config
from tokenrelay.budget import Budget, Reservation

T = TypeVar("T")

log = logging.getLogger("tokenrelay")

FILE = "keys.shm"
SLOTS = 8192  # keys with limits and runs with budgets, over the daemon's life (slots are not reused)
SLOT_SIZE = 8 * 1024
PAIRS = 128  # entries of each window: (time f64, count i64)
MAX_WORKERS = config.MAX_WORKERS
# key id, period start, USD spent, window tokens, admitted requests; then for a run's budget (`SharedBudget`): its
# limit, requests refused, requests settled with an unknown cost. (Then what each worker holds, then the windows.)
_KEYHEAD = struct.Struct("<64sddqq")
_RUNTAIL = struct.Struct("<dqq")
_HEAD_SIZE = _KEYHEAD.size + _RUNTAIL.size
# What each worker holds reserved, by its index (`busypoll.WORKER_INDEX_ENV`): USD, tokens, requests in flight. A
# worker that died never settles its requests; the one that takes its index starts by forgetting them.
_HELD = struct.Struct(f"<{MAX_WORKERS}d{MAX_WORKERS}q{MAX_WORKERS}q")
_F64, _I64 = struct.Struct("<d"), struct.Struct("<q")
_WINDOWS = _HEAD_SIZE + _HELD.size
assert _WINDOWS + 2 * (8 + 16 * PAIRS) <= SLOT_SIZE
MAX_KEY_ID = 64
# The file: the index (each slot's key id, so that finding a key or a used slot reads a few pages, not every
# slot's), then the slots.
_SLOTS_AT = SLOTS * MAX_KEY_ID
_SIZE = _SLOTS_AT + SLOTS * SLOT_SIZE
_TABLE_LOCK = _SIZE  # (a byte past the end: claiming a free slot is done under it)


class Ring:
    """A window of (time, count) entries kept in the mapped slot itself, as a ring of PAIRS: the deque operations
    `KeyState` uses, each a few bytes read or written in place. Made by `load` with the slot locked and used only
    until `store` (its head and length are cached meanwhile: no other process may change them)."""

    __slots__ = ("_at", "_head", "_m", "_n")
    _HL = struct.Struct("<II")  # head, length
    _E = struct.Struct("<dq")

    def __init__(self, m: mmap.mmap, at: int) -> None:
        self._m, self._at = m, at
        head, n = self._HL.unpack_from(m, at)
        self._head, self._n = int(head), int(n)

    def _pos(self, i: int) -> int:
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError("window index out of range")
        return self._at + 8 + 16 * ((self._head + i) % PAIRS)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int, /) -> tuple[float, int]:
        t, n = self._E.unpack_from(self._m, self._pos(i))
        return float(t), int(n)

    def __setitem__(self, i: int, entry: tuple[float, int], /) -> None:
        self._E.pack_into(self._m, self._pos(i), *entry)

    def __iter__(self) -> Iterator[tuple[float, int]]:
        for i in range(self._n):
            yield self[i]

    def popleft(self) -> tuple[float, int]:
        entry = self[0]
        self._head, self._n = (self._head + 1) % PAIRS, self._n - 1
        self._HL.pack_into(self._m, self._at, self._head, self._n)
        return entry

    def append(self, entry: tuple[float, int], /) -> None:
        if self._n == PAIRS:  # (only if the clock jumped: the two oldest become one, at the later's time)
            _, n = self.popleft()
            self[0] = (self[0][0], self[0][1] + n)
        self._E.pack_into(self._m, self._at + 8 + 16 * ((self._head + self._n) % PAIRS), *entry)
        self._n += 1
        self._HL.pack_into(self._m, self._at, self._head, self._n)


_RING_SIZE = 8 + 16 * PAIRS


class SharedKeyStates:
    """The slot table of one daemon's workers, mapped into this process."""

    def __init__(self, path: Path, worker: int = 0) -> None:
        self.path = path
        self.worker = worker % MAX_WORKERS
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(self._fd).st_size < _SIZE:
                os.ftruncate(self._fd, _SIZE)  # (sparse: pages are allocated as slots are used)
            self._map = mmap.mmap(self._fd, _SIZE)
        except OSError:
            os.close(self._fd)
            raise
        self._slots: dict[str, int] = {}
        self._full_warned = False
        # slot offset -> what `load` read (this worker's part, and the totals), for `store` to diff against
        self._held: dict[int, tuple[float, int, int]] = {}
        self._totals: dict[int, tuple[float, int, int]] = {}
        self.forget_worker()

    def forget_worker(self) -> None:
        """Drops what this worker's index holds reserved in every slot (an earlier worker of that index died
        with requests in flight: they ended with it)."""
        w = self.worker
        for s in range(SLOTS):
            if not self._map[s * MAX_KEY_ID]:
                continue
            off = _SLOTS_AT + s * SLOT_SIZE
            fcntl.lockf(self._fd, fcntl.LOCK_EX, SLOT_SIZE, off, os.SEEK_SET)
            try:
                held = list(_HELD.unpack_from(self._map, off + _HEAD_SIZE))
                held[w] = 0.0
                held[MAX_WORKERS + w] = held[2 * MAX_WORKERS + w] = 0
                _HELD.pack_into(self._map, off + _HEAD_SIZE, *held)
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, SLOT_SIZE, off, os.SEEK_SET)

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)

    def _slot(self, key_id: str) -> int | None:
        slot = self._slots.get(key_id)
        if slot is not None:
            return slot
        name = key_id.encode()
        if len(name) > MAX_KEY_ID:
            return None
        start = zlib.crc32(name) % SLOTS
        fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, _TABLE_LOCK, os.SEEK_SET)
        try:
            for i in range(SLOTS):
                s = (start + i) % SLOTS
                at = s * MAX_KEY_ID
                held = self._map[at : at + MAX_KEY_ID].rstrip(b"\0")
                if held == name or not held:
                    if not held:
                        self._map[at : at + MAX_KEY_ID] = name.ljust(MAX_KEY_ID, b"\0")
                    self._slots[key_id] = s
                    return s
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, _TABLE_LOCK, os.SEEK_SET)
        if not self._full_warned:
            self._full_warned = True
            log.warning("more than %d client keys and runs with limits: the others are counted per worker", SLOTS)
        return None

    def acquire(self, key_id: str) -> int | None:
        """Locks the key's slot against the other workers and returns its offset (None: no slot for it). Call
        `release(offset)` after."""
        slot = self._slot(key_id)
        if slot is None:
            return None
        off = _SLOTS_AT + slot * SLOT_SIZE
        fcntl.lockf(self._fd, fcntl.LOCK_EX, SLOT_SIZE, off, os.SEEK_SET)
        return off

    def release(self, off: int) -> None:
        self._held.pop(off, None)
        self._totals.pop(off, None)
        fcntl.lockf(self._fd, fcntl.LOCK_UN, SLOT_SIZE, off, os.SEEK_SET)

    def load(self, off: int, st: KeyState) -> None:
        """The slot's counters into `st` (a fresh `KeyState` of the key), reservations summed over the workers.
        Call with the slot locked, and `store` before unlocking."""
        m = self._map
        _, st.period_start, st.spent_usd, st.window_tokens, st.admitted_count = _KEYHEAD.unpack_from(m, off)
        st.reserved_usd, st.reserved_tokens, st.in_flight = self._load_held(off)
        st.window = Ring(m, off + _WINDOWS)
        st.admitted = Ring(m, off + _WINDOWS + _RING_SIZE)

    def store(self, off: int, st: KeyState) -> None:
        """`st`, changed since `load`, back into the slot: what it reserved or released counts as this worker's."""
        m = self._map
        _KEYHEAD.pack_into(
            m, off, st.key.id.encode(), st.period_start, st.spent_usd, st.window_tokens, st.admitted_count
        )
        self._store_held(off, st.reserved_usd, st.reserved_tokens, st.in_flight)

    def _load_held(self, off: int) -> tuple[float, int, int]:
        """The reservations (USD, tokens, requests) of all workers, summed; this worker's part is kept to diff."""
        m = self._map
        at = off + _HEAD_SIZE
        usd, tokens, flights = array("d"), array("q"), array("q")
        for a in (usd, tokens, flights):
            a.frombytes(m[at : at + 8 * MAX_WORKERS])
            at += 8 * MAX_WORKERS
        totals = (max(0.0, sum(usd)), sum(tokens), sum(flights))
        self._held[off] = (usd[self.worker], tokens[self.worker], flights[self.worker])
        self._totals[off] = totals
        return totals

    def _store_held(self, off: int, reserved_usd: float, reserved_tokens: int, in_flight: int) -> None:
        """New totals (from `_load_held`'s): the difference is this worker's."""
        own_usd, own_tokens, own_flights = self._held[off]
        usd, tokens, flights = self._totals[off]
        own_flights += in_flight - flights
        if own_flights <= 0:  # (nothing of this worker's in flight: no float dust left behind)
            own_usd, own_tokens = 0.0, 0
        else:
            own_usd += reserved_usd - usd
            own_tokens += reserved_tokens - tokens
        at = off + _HEAD_SIZE + 8 * self.worker
        _F64.pack_into(self._map, at, own_usd)
        _I64.pack_into(self._map, at + 8 * MAX_WORKERS, own_tokens)
        _I64.pack_into(self._map, at + 16 * MAX_WORKERS, own_flights)

    def budget(self, name: str) -> SharedBudget | None:
        """A run's budget in this table (None: no slot left for it)."""
        return SharedBudget(self, name) if self._slot(name) is not None else None


class SharedBudget:
    """`budget.Budget` for a run of a daemon with several workers: its counters live in a slot of the workers'
    table, and each call runs `Budget`'s own reserve-then-settle on them with the slot locked. A run is known by
    `run:<sha256 of its id>` there."""

    def __init__(self, table: SharedKeyStates, name: str) -> None:
        self.table, self.name = table, name
        self.limit_usd = 0.0

    def _apply(self, change: Callable[[Budget], T]) -> T:
        """`change` on a `Budget` holding the slot's counters (all workers' reservations summed), then the
        counters written back: the difference in reservations counts as this worker's."""
        table, m = self.table, self.table._map
        off = table.acquire(self.name)
        assert off is not None  # (the slot was found when this budget was made)
        try:
            spent = float(_KEYHEAD.unpack_from(m, off)[2])
            limit, rejected, unpriced = _RUNTAIL.unpack_from(m, off + _KEYHEAD.size)
            reserved, tokens, in_flight = table._load_held(off)
            b = Budget(limit, spent)
            b.reserved_usd, b.in_flight, b.rejected, b.unpriced = reserved, in_flight, rejected, unpriced
            result = change(b)
            _KEYHEAD.pack_into(m, off, self.name.encode(), 0.0, b.spent_usd, 0, 0)
            _RUNTAIL.pack_into(m, off + _KEYHEAD.size, b.limit_usd, b.rejected, b.unpriced)
            table._store_held(off, b.reserved_usd, tokens, b.in_flight)
            return result
        finally:
            table.release(off)

    def init(self, limit_usd: float, spent_usd: float) -> SharedBudget:
        """Sets the limit, and the spend so far as the larger of the table's and `spent_usd` (the ledger's)."""
        Budget(limit_usd)  # (the same check of the limit)
        self.limit_usd = float(limit_usd)

        def start(b: Budget) -> None:
            b.limit_usd, b.spent_usd = self.limit_usd, max(b.spent_usd, float(spent_usd))

        self._apply(start)
        return self

    @property
    def spent_usd(self) -> float:
        return float(self.snapshot()["spent_usd"])

    @property
    def exhausted(self) -> bool:
        return self.spent_usd >= self.limit_usd

    def refuse(self) -> None:
        self._apply(Budget.refuse)

    def reserve(self, amount: float) -> Reservation | None:
        return self._apply(lambda b: b.reserve(amount))

    def settle(self, token: Reservation, actual: float | None) -> None:
        if not token.settled:  # (`Budget.settle` marks it settled; a second call must not take the lock)
            self._apply(lambda b: b.settle(token, actual))

    def snapshot(self) -> dict[str, float | int]:
        return self._apply(Budget.snapshot)


def open_shared(directory: Path | None, worker: int) -> SharedKeyStates | None:
    """The workers' table (None for a single worker, or where it cannot be mapped: counted per worker then)."""
    if directory is None:
        return None
    try:
        return SharedKeyStates(directory / FILE, worker)
    except OSError as exc:
        log.warning("client key limits are counted per worker: cannot map %s: %s", directory / FILE, exc)
        return None
