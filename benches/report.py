"""Turns run.py's records into the markdown tables of benches/README.md and the chart benches/results.png."""

from __future__ import annotations

import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

START = "<!-- results:start -->"
END = "<!-- results:end -->"
Rec = dict[str, Any]


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and x == x else None


def _values(
    records: list[Rec], target: str, scenario: str, level: int | None, get: Callable[[Rec], Any]
) -> list[float]:
    """One value per measurement of a target's scenario at a level (every level when None), failures left out."""
    vals = (
        _num(get(r))
        for r in records
        if r["target"] == target
        and r["scenario"] == scenario
        and (level is None or r.get("level") == level)
        and "failed" not in r
    )
    return [x for x in vals if x is not None]


def median_of(
    records: list[Rec], target: str, scenario: str, level: int | None, get: Callable[[Rec], Any]
) -> float | None:
    v = _values(records, target, scenario, level, get)
    return statistics.median(v) if v else None


def best_of(
    records: list[Rec], target: str, scenario: str, level: int | None, get: Callable[[Rec], Any]
) -> float | None:
    """The largest value over rounds (None where no round measured it)."""
    v = _values(records, target, scenario, level, get)
    return max(v) if v else None


def total_errors(records: list[Rec], target: str, scenario: str, level: int | None = None) -> int | None:
    rs = [
        r
        for r in records
        if r["target"] == target and r["scenario"] == scenario and (level is None or r.get("level") == level)
    ]
    if not rs:
        return None
    cut = 0 if scenario == "unpaced" else sum(int(r.get("cut", 0)) for r in rs)  # unfinished when the run was cut
    return sum(int(r.get("errors", 0)) for r in rs) + cut + sum(1 for r in rs if "failed" in r)


def f(x: float | None, digits: int = 2, sign: bool = False) -> str:
    if x is None:
        return "–"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a is not None and b else "–"


def levels(records: list[Rec], scenario: str) -> list[int]:
    return sorted({int(r["level"]) for r in records if r["scenario"] == scenario and "level" in r})


def markdown(meta: dict[str, Any], records: list[Rec], names: list[str]) -> str:
    targets = [n for n in names if any(r["target"] == n for r in records)]
    proxies = [t for t in targets if t != "direct"]
    out: list[str] = []
    w = out.append
    w(f"Run: `{meta['command']}` — {meta['date']}, {meta['elapsed_s'] / 60:.1f} min.  ")
    w(f"Machine: {meta['machine']}.  ")
    if meta.get("noise"):
        import noise  # benches/noise.py

        w(f"Machine noise (`benches/noise.py`): {noise.describe(meta['noise'])}.  ")
    w(
        f"nginx {meta.get('nginx_version') or '?'}, LiteLLM {meta['litellm_version']}, mock: `{meta['mock']}`, rig: "
        f"`{meta.get('rig', 'python')}`; "
        f"medians over {meta['plan']['rounds']} round(s). Proxies with one worker pinned to core 1, rig (mock + "
        "load generator) to core 0; two-worker proxies on both cores. tokenrelay at log level warning."
    )
    for name, why in meta.get("skipped", {}).items():
        w(f"\n**{name} skipped:** {why}")
    w("")

    def ttft(t: str, sc: str, lv: int, q: str) -> float | None:
        return median_of(records, t, sc, lv, lambda r: r["ttft_ms"][q])

    def gap(t: str, sc: str, lv: int) -> float | None:
        return median_of(records, t, sc, lv, lambda r: r["gap_ms"]["p99"])

    for sc, title in (
        ("paced", "Paced streams (64 deltas, one per 20 ms)"),
        ("anthropic", "Anthropic `/v1/messages`, paced"),
    ):
        if not levels(records, sc):
            continue
        w(f"### {title}\n")
        w(
            "Each connection streams 2 answers back to back, first requests spread over 1.3 s (one answer's life). "
            "Added over direct (same run): TTFT p50 / p99 and inter-chunk gap p99, in ms; in brackets the same "
            "over nginx-w1. Errors summed over rounds.\n"
        )
        w(
            "| streams | target | TTFT p50 | TTFT p99 | added TTFT p50 | added TTFT p99 | added gap p99 | "
            "proxy CPU s / 1M events | errors |"
        )
        w("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
        for lv in levels(records, sc):
            d50, d99, dg = ttft("direct", sc, lv, "p50"), ttft("direct", sc, lv, "p99"), gap("direct", sc, lv)
            n50, n99, ng = ttft("nginx-w1", sc, lv, "p50"), ttft("nginx-w1", sc, lv, "p99"), gap("nginx-w1", sc, lv)
            for t in targets:
                p50, p99, g = ttft(t, sc, lv, "p50"), ttft(t, sc, lv, "p99"), gap(t, sc, lv)
                if p50 is None and total_errors(records, t, sc, lv) is None:
                    continue

                def add(a: float | None, base: float | None, nb: float | None, t: str = t) -> str:
                    if t == "direct" or a is None or base is None:
                        return "–"
                    s = f(a - base, 2, True)
                    return s + (f" ({f(a - nb, 2, True)})" if nb is not None and not t.startswith("nginx-w1") else "")

                cpu = median_of(records, t, sc, lv, lambda r: r.get("proxy_cpu_per_1m_events"))
                w(
                    f"| {lv} | {t} | {f(p50)} | {f(p99)} | {add(p50, d50, n50)} | {add(p99, d99, n99)} | "
                    f"{add(g, dg, ng)} | {f(cpu, 1)} | {total_errors(records, t, sc, lv)} |"
                )
        w("")

    if levels(records, "unpaced"):
        lv = levels(records, "unpaced")[0]
        tokens = meta["plan"]["unpaced_tokens"]
        w(f"### Unpaced ({lv} concurrent streams × {tokens} deltas, upstream as fast as it can)\n")
        w("| target | events/s | × nginx-w1 | × nginx-w2 | proxy CPU s / 1M events | × nginx-w1 | errors |")
        w("|---|---:|---:|---:|---:|---:|---:|")
        ev_n1 = median_of(records, "nginx-w1", "unpaced", lv, lambda r: r["events_per_s"])
        ev_n2 = median_of(records, "nginx-w2", "unpaced", lv, lambda r: r["events_per_s"])
        cpu_n1 = median_of(records, "nginx-w1", "unpaced", lv, lambda r: r.get("proxy_cpu_per_1m_events"))
        for t in targets:
            ev = median_of(records, t, "unpaced", lv, lambda r: r["events_per_s"])
            cpu = median_of(records, t, "unpaced", lv, lambda r: r.get("proxy_cpu_per_1m_events"))
            w(
                f"| {t} | {f(ev, 0)} | {ratio(ev, ev_n1)} | {ratio(ev, ev_n2)} | {f(cpu, 1)} | {ratio(cpu, cpu_n1)} | "
                f"{total_errors(records, t, 'unpaced', lv)} |"
            )
        w("")

    if levels(records, "nonstream"):
        lv = levels(records, "nonstream")[0]
        w(f"### Non-streaming (small JSON answers, {lv} connections back to back)\n")
        w("| target | requests/s | latency p50 ms | latency p99 ms | added p50 | added p99 | errors |")
        w("|---|---:|---:|---:|---:|---:|---:|")
        d50 = median_of(records, "direct", "nonstream", lv, lambda r: r["latency_ms"]["p50"])
        d99 = median_of(records, "direct", "nonstream", lv, lambda r: r["latency_ms"]["p99"])
        for t in targets:
            rps = median_of(records, t, "nonstream", lv, lambda r: r["requests_per_s"])
            l50 = median_of(records, t, "nonstream", lv, lambda r: r["latency_ms"]["p50"])
            l99 = median_of(records, t, "nonstream", lv, lambda r: r["latency_ms"]["p99"])
            a50 = None if t == "direct" or l50 is None or d50 is None else l50 - d50
            a99 = None if t == "direct" or l99 is None or d99 is None else l99 - d99
            w(
                f"| {t} | {f(rps, 0)} | {f(l50)} | {f(l99)} | {f(a50, 2, True)} | {f(a99, 2, True)} | "
                f"{total_errors(records, t, 'nonstream', lv)} |"
            )
        w("")

    if levels(records, "idle"):
        lv = levels(records, "idle")[0]
        w(f"### Many idle streams ({lv} open streams waiting for their first token)\n")
        w(
            "RSS of the proxy's processes (VmRSS, all processes of the target): per open stream = (during − before) "
            "/ streams (– where fewer than half of them were held open upstream); baseline = after start-up and "
            "warm-up, per process.\n"
        )
        w(
            "| target | RSS per open stream KB | streams open upstream | RSS before MB | RSS during MB | "
            "baseline MB per process | errors |"
        )
        w("|---|---:|---:|---:|---:|---|---:|")
        for t in proxies:
            per = median_of(records, t, "idle", lv, lambda r: r.get("rss_per_stream_kb"))
            before = median_of(records, t, "idle", lv, lambda r: r.get("rss_before_kb"))
            during = median_of(records, t, "idle", lv, lambda r: r.get("rss_during_kb"))
            base = meta.get("baseline_rss_kb", {}).get(t, [])
            base_s = "–"
            if base:
                procs = sorted(base[0].values(), reverse=True)
                base_s = ", ".join(f"{kb / 1024:.0f}" for kb in procs)
            up = median_of(records, t, "idle", lv, lambda r: r.get("upstream_open"))
            w(
                f"| {t} | {f(per, 1)} | {f(up, 0)} | {f(before / 1024 if before else None, 0)} | "
                f"{f(during / 1024 if during else None, 0)} | {base_s} | {total_errors(records, t, 'idle', lv)} |"
            )
        w("")

    caps = {r["target"]: r for r in records if r["scenario"] == "capacity-max"}
    if caps:
        w("### Largest paced load sustained\n")
        w(
            "Paced streams (64 deltas at 20 ms, 3 answers per connection, starts spread over 1.3 s) with no error, "
            "no chunk more than 100 ms beyond its pace and no first token later than 100 ms; levels tried in order, "
            "stopping at the first miss. `direct` is the rig's own ceiling: a proxy cannot be shown above it.\n"
        )
        w("| target | sustained streams | levels tried up to |")
        w("|---|---:|---:|")
        for t in targets:
            if t in caps:
                got = caps[t]["level"] or f"< {caps[t].get('first_level', '?')}"
                w(f"| {t} | {got} | {caps[t]['tried_up_to']} |")
        w("")

    w(
        "Errors include answers still unfinished when a run was cut (paced: ramp + 15 s; idle: hold + 10 s); unpaced "
        "runs are cut at 10 s and their events/s counts what arrived by then.\n"
    )
    w("### Targets (issue #7): where they stand\n")
    w("| target | where it stands |")
    w("|---|---|")
    for goal, stand in goals(meta, records):
        w(f"| {goal} | {stand} |")
    w("")
    return "\n".join(out)


def goals(meta: dict[str, Any], records: list[Rec]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []

    def mark(ok: bool | None) -> str:
        return "—" if ok is None else ("✅" if ok else "❌")

    t = "tokenrelay-w1"
    d50 = median_of(records, "direct", "paced", 256, lambda r: r["ttft_ms"]["p50"])
    d99 = median_of(records, "direct", "paced", 256, lambda r: r["ttft_ms"]["p99"])
    stands = []
    for target, label in ((t, "workers 1"), ("tokenrelay-w1-busy", "workers 1 with --busy-poll")):
        p50 = median_of(records, target, "paced", 256, lambda r: r["ttft_ms"]["p50"])
        p99 = median_of(records, target, "paced", 256, lambda r: r["ttft_ms"]["p99"])
        if None not in (d50, d99, p50, p99):
            a50, a99 = p50 - d50, p99 - d99  # type: ignore[operator]
            stands.append(f"{mark(a50 <= 0.5 and a99 <= 2)} {label}: p50 {a50:+.2f} ms, p99 {a99:+.2f} ms")
    out.append(("paced 256: added TTFT p50 ≤ 0.5 ms, p99 ≤ 2 ms", "; ".join(stands) or "not measured in this run"))
    caps = {r["target"]: r["level"] for r in records if r["scenario"] == "capacity-max"}
    rig = caps.get("direct")
    stands = [
        f"{mark(caps[target] >= 1024)} {label}: {caps[target] or '< 512'}"
        for target, label in (("tokenrelay-w2", "workers 2"), ("tokenrelay-w2-busy", "workers 2 with --busy-poll"))
        if target in caps
    ]
    note = f" (rig ceiling: direct {rig})" if stands and rig is not None else ""
    out.append(
        ("≥ 1024 sustained paced streams with --workers 2", "; ".join(stands) + note or "not measured in this run")
    )
    lvs = levels(records, "unpaced")
    if lvs:
        lv = lvs[0]
        ev = median_of(records, t, "unpaced", lv, lambda r: r["events_per_s"])
        evn = median_of(records, "nginx-w1", "unpaced", lv, lambda r: r["events_per_s"])
        cpu = median_of(records, t, "unpaced", lv, lambda r: r.get("proxy_cpu_per_1m_events"))
        cpun = median_of(records, "nginx-w1", "unpaced", lv, lambda r: r.get("proxy_cpu_per_1m_events"))
        if ev and evn and cpu and cpun:
            out.append(
                (
                    "unpaced events/s ≥ 0.8× nginx, CPU/event ≤ 2× nginx",
                    f"{mark(ev >= 0.8 * evn and cpu <= 2 * cpun)} workers 1 vs nginx 1 worker: "
                    f"{ev / evn:.2f}× events/s, {cpu / cpun:.2f}× CPU/event",
                )
            )
        else:
            out.append(("unpaced events/s ≥ 0.8× nginx, CPU/event ≤ 2× nginx", "not measured in this run"))
        # LiteLLM's best round, not its median: a round in which it delivered a handful of events before the cut
        # would make the median ratio a meaningless 10^5-10^6x, and the best round is the comparison most in its favour.
        evl = best_of(records, "litellm", "unpaced", lv, lambda r: r["events_per_s"])
        errs = total_errors(records, t, "unpaced") or 0
        errs += sum(total_errors(records, t, sc) or 0 for sc in ("paced", "anthropic", "nonstream", "idle"))
        if ev and evl == 0:
            out.append(
                (
                    "≥ 20× LiteLLM events/s with zero errors",
                    f"{mark(errs == 0)} LiteLLM delivered no event before the 10 s cut (tokenrelay {ev:.0f}/s); "
                    f"tokenrelay errors {errs}",
                )
            )
        elif ev and evl:
            out.append(
                (
                    "≥ 20× LiteLLM events/s with zero errors",
                    f"{mark(ev >= 20 * evl and errs == 0)} {ev / evl:.1f}× LiteLLM's best round "
                    f"({evl:.0f} events/s); tokenrelay errors {errs}",
                )
            )
        else:
            why = meta.get("skipped", {}).get("litellm", "LiteLLM not measured")
            out.append(("≥ 20× LiteLLM events/s with zero errors", f"— {why}"[:200]))
    lvi = levels(records, "idle")
    base = meta.get("baseline_rss_kb", {}).get(t, [])
    if lvi:
        per = median_of(records, t, "idle", lvi[0], lambda r: r.get("rss_per_stream_kb"))
        worst = max(max(b.values()) for b in base) / 1024 if base else None
        held = median_of(records, t, "idle", lvi[0], lambda r: r.get("upstream_open"))
        if per is not None and worst is not None:
            out.append(
                (
                    "≤ 16 KB RSS per idle stream, baseline ≤ 60 MB/worker",
                    f"{mark(per <= 16 and worst <= 60)} {per:.1f} KB/stream, baseline {worst:.0f} MB",
                )
            )
        elif per is None and held is not None:  # (run.py gives no per-stream figure past half the streams lost)
            out.append(
                (
                    "≤ 16 KB RSS per idle stream, baseline ≤ 60 MB/worker",
                    f"{mark(False)} only {held:.0f} of {lvi[0]} streams held open",
                )
            )
    if len(out) < 5:
        out.append(("≤ 16 KB RSS per idle stream, baseline ≤ 60 MB/worker", "not measured in this run"))
    return out


def update_readme(path: Path, md: str) -> None:
    text = path.read_text() if path.exists() else f"{START}\n{END}\n"
    if START not in text or END not in text:
        text += f"\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{START}\n{md}\n{END}{tail}")


def chart(records: list[Rec], names: list[str], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("installing matplotlib for the chart (into this interpreter's environment)", flush=True)
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], capture_output=True)
        if r.returncode != 0:
            print("matplotlib could not be installed; no chart", flush=True)
            return
        import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lvs = sorted(set(levels(records, "paced")) | set(levels(records, "capacity")))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=80)
    for i, t in enumerate(names):
        color = f"C{i}"  # the same colour for a target in both panels
        xs, ys, es = [], [], []
        for lv in lvs:
            sc = "paced" if lv in levels(records, "paced") else "capacity"
            d = median_of(records, "direct", sc, lv, lambda r: r["ttft_ms"]["p50"])
            v = median_of(records, t, sc, lv, lambda r: r["ttft_ms"]["p50"])
            ev = median_of(records, t, sc, lv, lambda r: r["events_per_s"])
            if v is not None and d is not None:
                xs.append(lv)
                ys.append(v - d)
                es.append(float("nan") if ev is None else ev)
        if xs:
            if t != "direct":
                ax1.plot(xs, ys, marker="o", label=t, color=color)
            ax2.plot(xs, es, marker="o", label=t, color=color)
    ax1.set(
        xscale="log",
        yscale="symlog",
        xlabel="concurrent paced streams",
        ylabel="added TTFT p50 over direct (ms)",
        title="Added time to first token",
    )
    ax2.set(xscale="log", xlabel="concurrent paced streams", ylabel="events/s received", title="Events/s")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str]) -> int:
    """`python benches/report.py benches/out/<run>/results.json`: the tables and chart of an earlier run, written
    again into benches/README.md and results.png (after a change to this file, without measuring again)."""
    if len(argv) != 1:
        print("usage: python benches/report.py RESULTS_JSON", file=sys.stderr)
        return 2
    import orjson

    data = orjson.loads(Path(argv[0]).read_bytes())
    meta, records = data["meta"], data["records"]
    names = list(dict.fromkeys(r["target"] for r in records))
    md = markdown(meta, records, names)
    here = Path(__file__).resolve().parent
    update_readme(here / "README.md", md)
    chart(records, names, here / "results.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
