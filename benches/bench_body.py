"""The request body on the way in: what the proxy does to every request body against the baseline of parsing and
re-encoding it with orjson, in the same run.

    python benches/bench_body.py [--repeat 5]

Per body size (a chat request whose messages grow, as an agent's context does): `read_body` (validate, build the
top-level fields), `patch_body` with the spans `read_body` returned (the model name and `stream_options` spliced
in), the same patch without them (a second parse), and `orjson.loads` + `orjson.dumps` of the patched dict.
"""

from __future__ import annotations

import argparse
import timeit

import orjson
from tokenrelay._core import patch_body, read_body

CHANGES = [("model", b'"upstream-model"'), ("stream_options", b'{"include_usage":true}')]


def body_of(messages: int) -> bytes:
    message = {"role": "user", "content": "an agent's context grows with every step of its plan " * 4}
    return orjson.dumps({"model": "route", "stream": True, "messages": [message] * messages, "max_tokens": 512})


def per_call_us(fn: object, repeat: int) -> float:
    number = 200
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6  # type: ignore[arg-type]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    print("| body | read_body | patch_body (spans) | patch_body (parse again) | orjson loads + dumps | ours / orjson |")
    print("|---:|---:|---:|---:|---:|---:|")
    for messages in (1, 16, 256, 2048):
        raw = body_of(messages)
        fields, spans = read_body(raw)
        assert fields["model"] == "route" and patch_body(raw, CHANGES, spans) == patch_body(raw, CHANGES)

        def baseline(raw: bytes = raw) -> bytes:
            body = orjson.loads(raw)
            return orjson.dumps({**body, "model": "upstream-model", "stream_options": {"include_usage": True}})

        read = per_call_us(lambda raw=raw: read_body(raw), args.repeat)
        patched = per_call_us(lambda raw=raw, spans=spans: patch_body(raw, CHANGES, spans), args.repeat)
        again = per_call_us(lambda raw=raw: patch_body(raw, CHANGES), args.repeat)
        base = per_call_us(baseline, args.repeat)
        print(
            f"| {len(raw) / 1024:.1f} KiB | {read:.1f} µs | {patched:.1f} µs | {again:.1f} µs | {base:.1f} µs "
            f"| {(read + patched) / base:.2f}× |"
        )


if __name__ == "__main__":
    main()
