"""`/metrics` for a daemon of several workers (`--workers N`): one exposition for the whole daemon.

Each worker counts what it serves (its Rust meters, its front end, its data plane), and a scrape reaches one
worker (they share the port with SO_REUSEPORT). Alone, a worker's counters would be a fraction of the daemon's,
and consecutive scrapes landing on different workers would read to Prometheus as counter resets. So each worker
writes its exposition to the directory the supervisor made for them (`TOKENRELAY_WORKERS_DIR`, which also holds
the table of `sharedkeys`) once a second and when it stops; a scrape writes the serving worker's file afresh and
sums all the files:
- counters and histograms of every worker this daemon has run: a worker that died and was restarted keeps its
  last counts in the sum, so totals do not go back;
- gauges of the workers alive now (summed; `tokenrelay_upstream_up`, 0 or 1, takes the largest).

What the other workers served shows up within EXPORT_EVERY_S. A single-worker daemon has no such directory and
serves its own text as it is.

The live page (`/ui`) is shared the same way: each worker also writes its part of the page's snapshot
(`<pid>.ui.json`, `handlers.ui.Hub.part`) once a second, and the worker a watcher reaches merges the parts of the
workers alive now (`read_ui_parts`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("tokenrelay")

DIR_ENV = "TOKENRELAY_WORKERS_DIR"  # (the directory the supervisor made for its workers)
EXPORT_EVERY_S = 1.0
SUFFIX = ".prom"
UI_SUFFIX = ".ui.json"
UI_FRESH_S = 5.0  # an older part (a worker that is stuck or stopping) is left out of the page
# Gauges whose values are not amounts: across workers, the largest one (a deployment up in any worker is up).
_MAX_GAUGES = frozenset({"tokenrelay_upstream_up"})
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
WORKERS_GAUGE = (
    "# HELP tokenrelay_workers Worker processes alive now whose meters this exposition sums.\n"
    "# TYPE tokenrelay_workers gauge\n"
)

Number = int | float


class Exposition:
    """A Prometheus text exposition read into families (in order), their HELP and TYPE, and their samples."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.help: dict[str, str] = {}
        self.kind: dict[str, str] = {}
        self.samples: dict[str, dict[str, Number]] = {}

    def _family(self, name: str) -> str:
        if name not in self.samples:
            self.order.append(name)
            self.samples[name] = {}
        return name

    def family_of(self, sample: str) -> str:
        for suffix in _HISTOGRAM_SUFFIXES:
            if sample.endswith(suffix):
                base = sample[: -len(suffix)]
                if self.kind.get(base) == "histogram":
                    return base
        return sample

    @classmethod
    def parse(cls, text: str) -> Exposition:
        """The text tokenrelay writes (HELP and TYPE before each family's samples, one sample per line)."""
        e = cls()
        for line in text.splitlines():
            if not line:
                continue
            if line.startswith("# HELP "):
                name, _, help_text = line[7:].partition(" ")
                e.help[e._family(name)] = help_text
            elif line.startswith("# TYPE "):
                name, _, kind = line[7:].partition(" ")
                e.kind[e._family(name)] = kind
            elif not line.startswith("#"):
                series, _, value = line.rpartition(" ")
                if not series:
                    continue
                family = e._family(e.family_of(series.partition("{")[0]))
                e.samples[family][series] = _number(value)
        return e

    def add(self, other: Exposition, gauges: bool) -> None:
        """Adds `other`'s samples (its gauges too if `gauges`): counters and histograms sum, gauges as above."""
        for name in other.order:
            kind = other.kind.get(name, "untyped")
            if kind == "gauge" and not gauges:
                continue
            if name not in self.samples:
                self._family(name)
                self.help.setdefault(name, other.help.get(name, ""))
                self.kind.setdefault(name, kind)
            mine = self.samples[name]
            largest = name in _MAX_GAUGES
            for series, value in other.samples[name].items():
                if series not in mine:
                    mine[series] = value
                elif largest:
                    mine[series] = max(mine[series], value)
                else:
                    mine[series] += value

    def render(self) -> str:
        out: list[str] = []
        for name in self.order:
            if name in self.help:
                out.append(f"# HELP {name} {self.help[name]}")
            if name in self.kind:
                out.append(f"# TYPE {name} {self.kind[name]}")
            out.extend(f"{series} {_format(value)}" for series, value in self.samples[name].items())
        return "\n".join(out) + "\n"


def _number(text: str) -> Number:
    try:
        return int(text)
    except ValueError:
        return float(text)


def _format(value: Number) -> str:
    if isinstance(value, int):
        return str(value)
    if value != value:  # NaN
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # (someone else's process took the number: not our worker)
        return False
    return True


def merge(directory: Path) -> str:
    """The workers' latest files as one exposition (counters of every worker that ran, gauges of live ones)."""
    total = Exposition()
    alive = 0
    try:
        files = sorted(directory.glob(f"*{SUFFIX}"))
    except OSError:
        files = []
    for path in files:
        try:
            pid = int(path.name[: -len(SUFFIX)])
            text = path.read_text()
        except (ValueError, OSError):  # (not ours; or replaced or removed between the listing and the read)
            continue
        live = _alive(pid)
        alive += live
        total.add(Exposition.parse(text), gauges=live)
    return total.render() + WORKERS_GAUGE + f"tokenrelay_workers {alive}\n"


def _write_file(data: bytes, directory: Path, name: str, pid: int) -> None:
    tmp = directory / f".{name}.{pid}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, directory / name)  # (atomic: a reader never sees half a file)


def _write(text: str, directory: Path, pid: int) -> None:
    _write_file(text.encode(), directory, f"{pid}{SUFFIX}", pid)


class Exporter:
    """This worker's side: writes its exposition to `directory` once a second, at each scrape it serves, and when
    it stops. Each file only moves forward (a text taken earlier is never written over a later one), so totals
    summed from the files never go back from one scrape to the next, whichever worker serves it."""

    def __init__(self, directory: Path, exposition: Callable[[], str]) -> None:
        self.directory = directory
        self.pid = os.getpid()
        self._exposition = exposition
        self._lock = threading.Lock()  # (the loop's scrape and the periodic export write from executor threads)
        self._taken = 0
        self._written = 0
        self.ui_part: Callable[[float], dict[str, Any]] | None = None  # (the live page's part: `Hub.part`)

    def _take(self) -> tuple[int, str]:
        self._taken += 1
        return self._taken, self._exposition()

    def _write(self, seq: int, text: str) -> None:
        with self._lock:
            if seq > self._written:
                _write(text, self.directory, self.pid)
                self._written = seq

    def _scrape(self, seq: int, text: str) -> str:
        try:
            self._write(seq, text)
        except OSError as exc:  # (the supervisor's directory went away: this worker's own counts only)
            log.warning("could not export this worker's metrics to %s: %s", self.directory, exc)
            return text
        return merge(self.directory)

    async def scrape(self) -> str:
        """What `/metrics` serves: this worker's live exposition written first, then every worker's file summed
        (this worker's live counts plus the others' files would not be monotonic: the next scrape, served by
        another worker, would read this worker's older file)."""
        seq, text = self._take()
        return await asyncio.get_running_loop().run_in_executor(None, self._scrape, seq, text)

    def _write_ui(self, part: bytes) -> None:
        _write_file(part, self.directory, f"{self.pid}{UI_SUFFIX}", self.pid)

    async def run(self) -> None:
        """Exports every EXPORT_EVERY_S until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                await loop.run_in_executor(None, self._write, *self._take())
                if self.ui_part is not None:
                    await loop.run_in_executor(None, self._write_ui, orjson.dumps(self.ui_part(time.time())))
            except OSError as exc:
                log.warning("could not export this worker's metrics to %s: %s", self.directory, exc)
            await asyncio.sleep(EXPORT_EVERY_S)

    def read_ui_parts(self) -> list[dict[str, Any]]:
        """The other live workers' recent parts of the live page (blocking: run it off the loop)."""
        parts = []
        oldest = time.time() - UI_FRESH_S
        try:
            files = sorted(self.directory.glob(f"*{UI_SUFFIX}"))
        except OSError:
            return []
        for path in files:
            try:
                pid = int(path.name[: -len(UI_SUFFIX)])
                if pid == self.pid or not _alive(pid):
                    continue
                part = orjson.loads(path.read_bytes())
            except (ValueError, OSError):  # (not ours; replaced or removed meanwhile)
                continue
            if isinstance(part, dict) and float(part.get("now", 0.0)) >= oldest:
                parts.append(part)
        return parts

    def last(self) -> None:
        """The final counts of a worker that stops, kept in the daemon's totals."""
        with contextlib.suppress(OSError):
            self._write(*self._take())


def directory() -> Path | None:
    """The directory of this daemon's workers' expositions, if this process is one of several workers."""
    value = os.environ.get(DIR_ENV)
    return Path(value) if value else None
