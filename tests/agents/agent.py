"""An agent-like script: the official `openai` and `anthropic` SDKs, sync and async, streaming and not, configured
only by the standard environment variables (OPENAI_BASE_URL, ANTHROPIC_BASE_URL, the API keys, and the model in
OPENAI_MODEL / ANTHROPIC_MODEL). It prints one JSON line per call with what the SDK saw, then a final line.

    python tests/agents/agent.py [--rounds N] [--exit-code C] [--sleep S] [--concurrency K]

Exits 4 when tokenrelay refuses a request over the run's budget (after printing why), else --exit-code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import anthropic
import openai

MESSAGES = [{"role": "user", "content": "Tell me about foxes and dogs."}]


def report(kind: str, output_tokens: int, input_tokens: int) -> None:
    print(json.dumps({"call": kind, "output_tokens": output_tokens, "input_tokens": input_tokens}), flush=True)


def openai_sync(model: str) -> None:
    client = openai.OpenAI()
    answer = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=64)  # type: ignore[arg-type]
    assert answer.usage is not None
    report("openai.sync", answer.usage.completion_tokens, answer.usage.prompt_tokens)
    stream = client.chat.completions.create(
        model=model,
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=64,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
    assert usage is not None
    report("openai.sync.stream", usage.completion_tokens, usage.prompt_tokens)


async def openai_async(model: str) -> None:
    client = openai.AsyncOpenAI()
    # No include_usage: the SDK sees no usage, the relay still meters it (it asks upstream and hides the chunk).
    stream = await client.chat.completions.create(
        model=model,
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=64,
        stream=True,
    )
    text = ""
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    report("openai.async.stream", -1, -1)


def anthropic_sync(model: str) -> None:
    client = anthropic.Anthropic()
    message = client.messages.create(model=model, max_tokens=64, messages=MESSAGES)  # type: ignore[arg-type]
    report("anthropic.sync", message.usage.output_tokens, message.usage.input_tokens)


async def anthropic_async(model: str) -> None:
    client = anthropic.AsyncAnthropic()
    async with client.messages.stream(model=model, max_tokens=64, messages=MESSAGES) as stream:  # type: ignore[arg-type]
        async for _ in stream.text_stream:
            pass
        final = await stream.get_final_message()
    report("anthropic.async.stream", final.usage.output_tokens, final.usage.input_tokens)


async def one_round(oa: str, an: str, concurrency: int) -> None:
    await asyncio.to_thread(openai_sync, oa)
    await asyncio.to_thread(anthropic_sync, an)
    await asyncio.gather(*(openai_async(oa) for _ in range(concurrency)), anthropic_async(an))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--exit-code", type=int, default=0)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()
    oa = os.environ.get("OPENAI_MODEL", "mock")
    an = os.environ.get("ANTHROPIC_MODEL", "mock-anthropic")
    try:
        for _ in range(args.rounds):
            asyncio.run(one_round(oa, an, args.concurrency))
    except (openai.RateLimitError, anthropic.RateLimitError) as exc:
        print(f"agent: stopped: {exc}", file=sys.stderr, flush=True)
        return 4
    if args.sleep:
        print("sleeping", flush=True)
        time.sleep(args.sleep)
    print(json.dumps({"done": True}), flush=True)
    return args.exit_code


if __name__ == "__main__":
    sys.exit(main())
