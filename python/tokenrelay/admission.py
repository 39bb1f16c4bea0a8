"""Admission control for client keys: USD budgets per period, tokens and requests per minute.

A request reserves its worst case (estimated input tokens + its output cap, priced at the dearest deployment
that may serve it) before it is sent; the reservation is replaced by the real usage when it ends. Admission
and settlement are synchronous (no await between the check and the reservation), so concurrent requests on
one event loop can never together pass a limit that each alone would respect.
"""

from __future__ import annotations

import collections
import datetime as dt
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from tokenrelay.keys import ClientKey, period_end, period_start
from tokenrelay.sharedkeys import SharedKeyStates

T = TypeVar("T")
WINDOW_S = 60.0
QUANTUM_S = 0.5  # the time step of the windows kept in a shared table (`KeyState.quantum`)
# Float sums of per-request costs drift by ~1e-17; a budget must admit a request that lands exactly on it.
_EPS = 1e-9


@dataclass
class Denial:
    """Why a request is not admitted: an HTTP status (403 or 429), a message naming the limit, a retry hint."""

    status: int
    message: str
    code: str
    retry_after_s: float | None = None

    def headers(self) -> dict[str, str] | None:
        if self.retry_after_s is None:
            return None
        return {"retry-after": str(max(1, math.ceil(self.retry_after_s)))}


@dataclass
class Reservation:
    """What one admitted request holds until it settles."""

    state: KeyState
    usd: float
    tokens: int
    period_start: float
    settled: bool = False


class Window(Protocol):
    """The last minute's (time, count) entries, oldest first: a deque, or a ring in a shared slot."""

    def __len__(self) -> int: ...
    def __getitem__(self, i: int, /) -> tuple[float, int]: ...
    def __setitem__(self, i: int, entry: tuple[float, int], /) -> None: ...
    def __iter__(self) -> Iterator[tuple[float, int]]: ...
    def popleft(self) -> tuple[float, int]: ...
    def append(self, entry: tuple[float, int], /) -> None: ...


@dataclass
class KeyState:
    """One key's counters in this process: spend this period, reservations, the last minute's traffic."""

    key: ClientKey
    period_start: float = 0.0
    spent_usd: float = 0.0
    reserved_usd: float = 0.0
    reserved_tokens: int = 0
    in_flight: int = 0
    window: Window = field(default_factory=lambda: collections.deque[tuple[float, int]]())  # (time, tokens)
    window_tokens: int = 0
    admitted: Window = field(default_factory=lambda: collections.deque[tuple[float, int]]())  # (time, requests)
    admitted_count: int = 0
    # With a shared table (several workers): entries are stamped with the end of their `quantum`-long step and
    # merged into the previous entry of the same step, so a busy key's minute stays ~60/quantum entries (counts
    # exact; an entry ages out up to a quantum late: stricter, never laxer). 0: exact times (one worker).
    quantum: float = 0.0

    def note(self, window: Window, now: float, n: int) -> None:
        """Adds `n` (requests or tokens) at `now` to one of the windows."""
        q = self.quantum
        if q:
            now = math.ceil(now / q) * q
            if window and window[-1][0] == now:
                window[-1] = (now, window[-1][1] + n)
                return
        window.append((now, n))

    def roll(self, now: float) -> None:
        """Starts a new budget period when one began, and forgets traffic older than the window."""
        if self.key.period is not None:
            start = period_start(self.key.period, now)
            if start != self.period_start:
                self.period_start = start
                self.spent_usd = 0.0
        cutoff = now - WINDOW_S
        while self.window and self.window[0][0] <= cutoff:
            self.window_tokens -= self.window.popleft()[1]
        while self.admitted and self.admitted[0][0] <= cutoff:
            self.admitted_count -= self.admitted.popleft()[1]


class Admission:
    """Per-key limit state: this process's, or with `shared` (several workers) the daemon's, kept in
    `sharedkeys` and decided on under its lock by the same code."""

    def __init__(self, shared: SharedKeyStates | None = None) -> None:
        self.shared = shared
        self.states: dict[str, KeyState] = {}
        # key id -> (period start, USD spent since) as last read from the ledger (all workers' flushed spend).
        self.ledger_spent: dict[str, tuple[float, float]] = {}

    def state(self, key: ClientKey, now: float) -> KeyState:
        st = self.states.get(key.id)
        if st is None or st.key != key:
            st = KeyState(key) if st is None else _rekeyed(st, key)
            self.states[key.id] = st
            st.roll(now)
            self._apply_ledger(st)
        st.roll(now)
        return st

    def _apply_ledger(self, st: KeyState) -> None:
        seen = self.ledger_spent.get(st.key.id)
        if seen is not None and seen[0] == st.period_start:
            st.spent_usd = max(st.spent_usd, seen[1])

    def sync_spent(self, spent: dict[str, tuple[float, float]]) -> None:
        """Takes the ledger's view of each key's spend: other workers' requests count once flushed (with a
        shared table, the spend before this daemon started; it is applied as each key is next read)."""
        self.ledger_spent.update(spent)
        for st in self.states.values():
            self._apply_ledger(st)

    def _decided(self, key: ClientKey, now: float, decide: Callable[[KeyState], T]) -> T:
        """`decide` on the key's state: this process's, or the shared slot's, read and written back under its
        lock (a key that finds no slot is counted here)."""
        shared = self.shared
        off = None if shared is None else shared.acquire(key.id)
        if off is None:
            return decide(self.state(key, now))
        assert shared is not None
        try:
            st = KeyState(key, quantum=QUANTUM_S)
            shared.load(off, st)
            try:
                st.roll(now)
                self._apply_ledger(st)
                return decide(st)
            finally:  # (the windows are changed in place: the counters must follow them whatever happened)
                shared.store(off, st)
        finally:
            shared.release(off)

    def admit(self, key: ClientKey, usd: float, tokens: int, now: float | None = None) -> Reservation | Denial:
        """Reserves `usd` and `tokens` for one request of `key`, or says which limit refuses it."""
        at = time.time() if now is None else now
        if self.shared is None:
            return self._admit(self.state(key, at), key, usd, tokens, at)
        return self._decided(key, at, lambda st: self._admit(st, key, usd, tokens, at))

    def _admit(self, st: KeyState, key: ClientKey, usd: float, tokens: int, now: float) -> Reservation | Denial:
        if key.rpm is not None and st.admitted_count >= key.rpm:
            wait = st.admitted[0][0] + WINDOW_S - now
            return Denial(
                429,
                f"client key {key.name!r} reached its limit of {key.rpm} requests per minute (rpm)",
                "rpm_limit",
                wait,
            )
        if key.tpm is not None:
            if tokens > key.tpm:
                return Denial(
                    403,
                    f"this request may use up to {tokens} tokens (input + max output), more than client key "
                    f"{key.name!r}'s limit of {key.tpm} tokens per minute (tpm); lower max_tokens",
                    "tpm_limit",
                )
            used = st.window_tokens + st.reserved_tokens
            if used + tokens > key.tpm:
                return Denial(
                    429,
                    f"client key {key.name!r} would exceed its limit of {key.tpm} tokens per minute (tpm): "
                    f"{st.window_tokens} used in the last minute, {st.reserved_tokens} reserved by requests in "
                    f"flight, this one may use up to {tokens}",
                    "tpm_limit",
                    self._tpm_wait(st, key.tpm - tokens, now),
                )
        if key.budget_usd is not None:
            budget, period = key.budget_usd, key.period or "month"
            resets = dt.datetime.fromtimestamp(period_end(period, st.period_start), dt.UTC)
            if st.spent_usd >= budget - _EPS and (budget > 0 or usd > 0):
                return Denial(
                    403,
                    f"client key {key.name!r} has exhausted its budget of ${budget:.4g} per {period} "
                    f"(${st.spent_usd:.4f} spent); it resets at {resets:%Y-%m-%d %H:%M} UTC",
                    "budget_exhausted",
                )
            if st.spent_usd + usd > budget + _EPS:
                return Denial(
                    403,
                    f"this request may cost up to ${usd:.4g}, more than the ${budget - st.spent_usd:.4g} left of "
                    f"client key {key.name!r}'s budget of ${budget:.4g} per {period}; lower max_tokens",
                    "budget_exceeded",
                )
            if st.spent_usd + st.reserved_usd + usd > budget + _EPS:
                return Denial(
                    429,
                    f"client key {key.name!r}'s budget of ${budget:.4g} per {period} is reserved by requests "
                    f"in flight (${st.spent_usd:.4f} spent, ${st.reserved_usd:.4f} reserved, this one may cost "
                    f"up to ${usd:.4g}); retry when they finish",
                    "budget_reserved",
                    1.0,
                )
        st.reserved_usd += usd
        st.reserved_tokens += tokens
        st.in_flight += 1
        if key.rpm is not None:  # the windows are kept only for the limits a key has: memory ~ its rate
            if st.quantum:
                st.note(st.admitted, now, 1)
            else:
                st.admitted.append((now, 1))
            st.admitted_count += 1
        return Reservation(st, usd, tokens, st.period_start)

    @staticmethod
    def _tpm_wait(st: KeyState, allowed: int, now: float) -> float:
        """Seconds until enough of the last minute's tokens age out for `allowed` to be reached."""
        excess = st.window_tokens + st.reserved_tokens - allowed
        for ts, n in st.window:
            excess -= n
            if excess <= 0:
                return max(0.0, ts + WINDOW_S - now)
        return 1.0  # held by requests in flight: they settle soon

    def settle(self, reservation: Reservation, usd: float, tokens: int, now: float | None = None) -> None:
        """Replaces a reservation by what the request really cost (exactly once)."""
        if reservation.settled:
            return
        reservation.settled = True
        at = time.time() if now is None else now
        if self.shared is None:
            self._settle(reservation.state, reservation, usd, tokens, at)
            return
        self._decided(reservation.state.key, at, lambda st: self._settle(st, reservation, usd, tokens, at))

    @staticmethod
    def _settle(st: KeyState, reservation: Reservation, usd: float, tokens: int, now: float) -> None:
        st.in_flight -= 1
        st.reserved_tokens -= reservation.tokens
        st.reserved_usd = max(0.0, st.reserved_usd - reservation.usd) if st.in_flight else 0.0
        st.roll(now)
        if reservation.period_start == st.period_start:
            st.spent_usd += usd
        if tokens > 0 and st.key.tpm is not None:
            if st.quantum:
                st.note(st.window, now, tokens)
            else:
                st.window.append((now, tokens))
            st.window_tokens += tokens


def _rekeyed(old: KeyState, key: ClientKey) -> KeyState:
    """The same counters under a key whose limits changed (its record was reloaded)."""
    old.key = key
    return old
