"""Token counting: tokenrelay's embedded BPE vs OpenAI's tiktoken package, same corpus, same run.

    python benches/bench_tokens.py [--mb 2] [--repeat 5]

Prints throughput (MB/s of UTF-8) per encoding and corpus, the latency of one small count (a 50-token
string) and of a 100 KB count, and checks that every count equals tiktoken's. tiktoken is fed tokenrelay's
own vocabularies offline (its SHA-256 check guards them).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from tokenrelay import _core
from tokens_corpus import ENCODINGS, PROSE, benchmark_text, install_tiktoken_vocabularies


def best_of(repeat: int, fn: Callable[[], int]) -> float:
    """Best wall time of `repeat` calls, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def per_call_us(fn: Callable[[], int], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=2.0, help="corpus size in MB")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    cache = Path(tempfile.mkdtemp(prefix="tiktoken-cache-"))
    install_tiktoken_vocabularies(cache)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    import tiktoken

    target = int(args.mb * 1_000_000)
    other_scripts = "\n".join(v for k, v in PROSE.items() if k != "english")
    corpora = {
        "mixed (code, English, 10 scripts, emoji)": benchmark_text(target),
        "non-Latin prose only": "\n".join([other_scripts] * max(1, target // len(other_scripts.encode()))),
    }
    small = (
        "The relay forwards each chunk as it arrives, splits server-sent events across chunk boundaries, "
        "and counts the tokens of every delta, so an agent fleet's usage is metered exactly even when the "
        "provider reports none. Small counts like this one happen once per streamed delta."
    )

    print(f"tiktoken {tiktoken.__version__}; best of {args.repeat}; MB = 10^6 bytes of UTF-8\n")
    print(f"{'encoding':12} {'corpus':42} {'tokens':>9} {'tokenrelay':>12} {'tiktoken':>10} {'speed-up':>9}")
    for name in ENCODINGS:
        enc = tiktoken.get_encoding(name)
        _core.preload_encoding(name)
        for label, text in corpora.items():
            size = len(text.encode())
            ours = _core.count_tokens(text, name)
            theirs = len(enc.encode_ordinary(text))
            if ours != theirs:
                raise SystemExit(f"MISMATCH {name} {label}: tokenrelay {ours} != tiktoken {theirs}")
            t_ours = best_of(args.repeat, lambda t=text, n=name: _core.count_tokens(t, n))  # type: ignore[misc]
            t_theirs = best_of(args.repeat, lambda t=text, e=enc: len(e.encode_ordinary(t)))  # type: ignore[misc]
            rates = f"{size / t_ours / 1e6:>8.1f} MB/s {size / t_theirs / 1e6:>5.1f} MB/s"
            print(f"{name:12} {label:42} {ours:>9} {rates} {t_theirs / t_ours:>8.1f}x")
        n_small = _core.count_tokens(small, name)
        assert n_small == len(enc.encode_ordinary(small))
        us_ours = per_call_us(lambda s=small, n=name: _core.count_tokens(s, n), 100_000)  # type: ignore[misc]
        us_theirs = per_call_us(lambda s=small, e=enc: len(e.encode_ordinary(s)), 100_000)  # type: ignore[misc]
        label = f"small string ({n_small} tokens), per call"
        print(f"{name:12} {label:42} {'':>9} {us_ours:>8.2f} µs   {us_theirs:>5.2f} µs")
        for kb in (100,):
            mixed = corpora["mixed (code, English, 10 scripts, emoji)"].encode()
            chunk = mixed[: kb * 1000].decode(errors="ignore")
            ms = best_of(args.repeat, lambda c=chunk, n=name: _core.count_tokens(c, n)) * 1e3  # type: ignore[misc]
            print(f"{name:12} {f'{kb} KB of the mixed corpus, one call':42} {'':>9} {ms:>8.2f} ms")
    print()


if __name__ == "__main__":
    main()
