"""Per-request cost of client-key auth and admission: `python benches/bench_keys.py`."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from tokenrelay import keys
from tokenrelay.admission import Admission, Reservation
from tokenrelay.auth import Gate
from tokenrelay.metering import Metering
from tokenrelay.sharedkeys import SharedKeyStates


def per_call_us(fn: object, n: int = 200_000) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()  # type: ignore[operator]
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "usage.db"
        secret, record = keys.create_key(db, "bench", budget_usd=1e9, period="day", tpm=10**12, rpm=10**9)
        gate = Gate(db, None, Metering(), {})
        gate.keys = {record.id: record}
        admission = Admission()

        shared = Admission(SharedKeyStates(Path(tmp) / "keys.shm"))  # (what each of `--workers N` uses)

        def admit_settle(admission: Admission) -> None:
            r = admission.admit(record, 0.001, 100)
            assert isinstance(r, Reservation)
            admission.settle(r, 0.001, 100)

        print(f"authenticate (valid key):     {per_call_us(lambda: gate.authenticate(secret)):.2f} us")
        print(f"authenticate (invalid key):   {per_call_us(lambda: gate.authenticate('sk-nope')):.2f} us")
        one = per_call_us(lambda: admit_settle(admission), 50_000)
        print(f"admit + settle (all limits):  {one:.2f} us")
        many = per_call_us(lambda: admit_settle(shared), 50_000)
        print(f"  the same, shared table:     {many:.2f} us ({many / one:.1f}x; with --workers N)")
        print(f"keys_stamp (reload check):    {per_call_us(lambda: keys.keys_stamp(db), 2_000):.1f} us")


if __name__ == "__main__":
    main()
