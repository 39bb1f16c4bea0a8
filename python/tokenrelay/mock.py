"""A mock inference provider that speaks OpenAI's and Anthropic's wire formats, event for event.

It is the daemon's built-in `mock` route (mounted under `/_mock`, so a newcomer can stream tokens with no keys),
the upstream of the test suite and of the benchmarks (`python -m tokenrelay.mock --port P`). Its behaviour is set
per process (command line, or `POST /_control`) and per request (an extra `"mock": {...}` object in the body,
which the relay forwards like any field): answer length, pacing, usage reporting, and injected faults.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import orjson
from aiohttp import web

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "agents",
    "stream",
    "tokens",
    "through",
    "a",
    "relay",
    "that",
    "meters",
    "every",
    "one",
    "of",
    "them",
    "and",
    "balances",
    "load",
    "across",
    "many",
    "deployments",
    "without",
    "dropping",
    "a",
    "byte",
]


@dataclass
class Behaviour:
    """What the mock does; every field can be set per process or per request."""

    tokens: int = 24  # content deltas per answer
    delay_ms: float = 15.0  # pause between deltas
    first_token_ms: float = 0.0  # pause before the first delta (a slow first token)
    words_per_delta: int = 1
    usage: bool = True  # report usage (the stream's usage chunk honours include_usage)
    fail_status: int = 0  # answer with this HTTP status instead
    fail_count: int = -1  # how many requests fail (-1: all, while fail_status is set)
    retry_after: str = ""  # Retry-After header with fail_status
    die_after: int = -1  # drop the connection after this many deltas (-1: never)
    error_after: int = -1  # send an in-stream error event after this many deltas (-1: never)
    slow_tail_every: int = 0  # every Nth request gets slow_tail_ms extra before its first token
    slow_tail_ms: float = 0.0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    chunk_events: int = 1  # events per write (1: one write per event)
    fixed_ids: bool = False  # same ids and timestamps on every answer (byte-for-byte comparisons)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


@dataclass
class Stats:
    requests: int = 0
    streams: int = 0
    completed: int = 0
    disconnected: int = 0
    output_tokens: int = 0  # as reported (or that would have been reported)
    input_tokens: int = 0


class MockProvider:
    """Holds the behaviour and what has been served; builds the aiohttp app."""

    def __init__(self, behaviour: Behaviour | None = None) -> None:
        self.behaviour = behaviour or Behaviour()
        self.stats = Stats()
        self.last_request: dict[str, Any] = {}
        self._ids = itertools.count(1)
        self._failures = 0

    # --- helpers ------------------------------------------------------------------------------------------------

    def _for_request(self, body: dict[str, Any]) -> Behaviour:
        override = body.get("mock")
        if isinstance(override, dict):
            known = {k: v for k, v in override.items() if k in Behaviour.field_names()}
            return replace(self.behaviour, **known)
        return self.behaviour

    def _injected_failure(self, b: Behaviour, api: str) -> web.Response | None:
        if not b.fail_status or (b.fail_count >= 0 and self._failures >= b.fail_count):
            return None
        self._failures += 1
        headers = {"retry-after": b.retry_after} if b.retry_after else None
        if api == "messages":
            kind = "overloaded_error" if b.fail_status == 529 else "api_error"
            payload: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": "mock failure"}}
        else:
            payload = {"error": {"message": "mock failure", "type": "server_error", "param": None, "code": None}}
        return web.Response(
            status=b.fail_status, body=orjson.dumps(payload), headers=headers, content_type="application/json"
        )

    @staticmethod
    def _input_tokens(body: dict[str, Any]) -> int:
        # The mock's own notion of prompt size: words in every string of the request, plus a per-message overhead.
        total = 0
        for key in ("messages", "prompt", "input", "system", "instructions"):
            total += _count_words(body.get(key))
        messages = body.get("messages")
        return total + (3 * len(messages) if isinstance(messages, list) else 0) + 1

    def _id(self, prefix: str, b: Behaviour) -> tuple[str, int]:
        if b.fixed_ids:
            return f"{prefix}0", 1700000000
        return f"{prefix}{next(self._ids)}", int(time.time())

    def _text(self, b: Behaviour) -> list[str]:
        return [
            " ".join(WORDS[(i * b.words_per_delta + j) % len(WORDS)] for j in range(b.words_per_delta))
            + ("" if i == b.tokens - 1 else " ")
            for i in range(b.tokens)
        ]

    async def _record(self, request: web.Request, api: str) -> tuple[dict[str, Any], Behaviour] | web.Response:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return web.json_response({"error": {"message": "bad json", "type": "invalid_request_error"}}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"error": {"message": "expected an object"}}, status=400)
        self.stats.requests += 1
        self.last_request = {"api": api, "headers": {str(k): v for k, v in request.headers.items()}, "body": body, "path": request.path}
        b = self._for_request(body)
        if b.slow_tail_every and self.stats.requests % b.slow_tail_every == 0:
            b = replace(b, first_token_ms=b.first_token_ms + b.slow_tail_ms)
        failure = self._injected_failure(b, api)
        if failure is not None:
            return failure
        return body, b

    async def _stream(
        self,
        request: web.Request,
        head: list[bytes],
        deltas: list[bytes],
        tail: list[bytes],
        b: Behaviour,
        output_tokens: int,
    ) -> web.StreamResponse:
        """Writes the opening events at once, then the deltas at the configured pace, then the closing events."""
        self.stats.streams += 1
        response = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        await response.prepare(request)
        try:
            if head:
                await response.write(b"".join(head))
            if b.first_token_ms:
                await asyncio.sleep(b.first_token_ms / 1000)
            step = max(1, b.chunk_events)
            for i in range(0, len(deltas), step):
                if 0 <= b.die_after <= i:
                    self.stats.disconnected += 1
                    if request.transport is not None:
                        request.transport.abort()
                    return response
                await response.write(b"".join(deltas[i : i + step]))
                if b.delay_ms:
                    await asyncio.sleep(b.delay_ms / 1000)
            if tail:
                await response.write(b"".join(tail))
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.stats.disconnected += 1
            raise
        self.stats.completed += 1
        self.stats.output_tokens += output_tokens
        return response

    # --- OpenAI -------------------------------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        got = await self._record(request, "chat")
        if isinstance(got, web.Response):
            return got
        body, b = got
        model = str(body.get("model", "mock"))
        rid, created = self._id("chatcmpl-mock", b)
        prompt_tokens = self._input_tokens(body)
        self.stats.input_tokens += prompt_tokens
        pieces = self._text(b)
        completion = len(pieces) * b.words_per_delta + b.reasoning_tokens
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": b.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": b.reasoning_tokens, "audio_tokens": 0},
        }
        if not body.get("stream"):
            self.stats.completed += 1
            self.stats.output_tokens += completion
            message = {"role": "assistant", "content": "".join(pieces), "refusal": None}
            answer: dict[str, Any] = {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
                "system_fingerprint": "fp_mock",
            }
            if b.usage:
                answer["usage"] = usage
            return web.Response(body=orjson.dumps(answer), content_type="application/json")
        include_usage = b.usage and bool((body.get("stream_options") or {}).get("include_usage"))
        base = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_mock",
        }

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            data: dict[str, Any] = {
                **base,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }
            if include_usage:
                data["usage"] = None
            return b"data: " + orjson.dumps(data) + b"\n\n"

        deltas = []
        tail = []
        for i, piece in enumerate(pieces):
            if i == b.error_after:
                err = {"error": {"message": "mock in-stream error", "type": "server_error", "code": None}}
                deltas.append(b"data: " + orjson.dumps(err) + b"\n\n")
                break
            deltas.append(chunk({"content": piece}))
        else:
            tail.append(chunk({}, "stop"))
            if include_usage:
                tail.append(b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
        tail.append(b"data: [DONE]\n\n")
        head = [chunk({"role": "assistant", "content": "", "refusal": None})]
        return await self._stream(request, head, deltas, tail, b, completion)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        got = await self._record(request, "completions")
        if isinstance(got, web.Response):
            return got
        body, b = got
        model = str(body.get("model", "mock"))
        rid, created = self._id("cmpl-mock", b)
        prompt_tokens = self._input_tokens(body)
        self.stats.input_tokens += prompt_tokens
        pieces = self._text(b)
        completion = len(pieces) * b.words_per_delta
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }
        base = {"id": rid, "object": "text_completion", "created": created, "model": model}
        if not body.get("stream"):
            self.stats.completed += 1
            self.stats.output_tokens += completion
            answer: dict[str, Any] = {
                **base,
                "choices": [{"text": "".join(pieces), "index": 0, "logprobs": None, "finish_reason": "stop"}],
            }
            if b.usage:
                answer["usage"] = usage
            return web.Response(body=orjson.dumps(answer), content_type="application/json")
        include_usage = b.usage and bool((body.get("stream_options") or {}).get("include_usage"))
        deltas = []
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            data: dict[str, Any] = {
                **base,
                "choices": [{"text": piece, "index": 0, "logprobs": None, "finish_reason": "stop" if last else None}],
            }
            if include_usage:
                data["usage"] = None
            deltas.append(b"data: " + orjson.dumps(data) + b"\n\n")
        tail = []
        if include_usage:
            tail.append(b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
        tail.append(b"data: [DONE]\n\n")
        return await self._stream(request, [], deltas, tail, b, completion)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        got = await self._record(request, "responses")
        if isinstance(got, web.Response):
            return got
        body, b = got
        model = str(body.get("model", "mock"))
        rid, created = self._id("resp_mock", b)
        item_id = rid.replace("resp_", "msg_")
        input_tokens = self._input_tokens(body)
        self.stats.input_tokens += input_tokens
        pieces = self._text(b)
        output_tokens = len(pieces) * b.words_per_delta + b.reasoning_tokens
        text = "".join(pieces)
        usage = {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": b.cached_tokens},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": b.reasoning_tokens},
            "total_tokens": input_tokens + output_tokens,
        }
        part = {"type": "output_text", "text": text, "annotations": []}
        item = {
            "id": item_id,
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [part],
        }

        def response_obj(status: str, output: list[Any], with_usage: bool) -> dict[str, Any]:
            return {
                "id": rid,
                "object": "response",
                "created_at": created,
                "status": status,
                "model": model,
                "output": output,
                "parallel_tool_calls": True,
                "tool_choice": "auto",
                "tools": [],
                "temperature": 1.0,
                "top_p": 1.0,
                "text": {"format": {"type": "text"}},
                "truncation": "disabled",
                "instructions": body.get("instructions"),
                "metadata": {},
                "error": None,
                "incomplete_details": None,
                "usage": usage if with_usage and b.usage else None,
            }

        if not body.get("stream"):
            self.stats.completed += 1
            self.stats.output_tokens += output_tokens
            return web.Response(
                body=orjson.dumps(response_obj("completed", [item], True)), content_type="application/json"
            )
        seq = itertools.count()

        def event(kind: str, data: dict[str, Any]) -> bytes:
            payload = orjson.dumps({"type": kind, "sequence_number": next(seq), **data})
            return b"event: " + kind.encode() + b"\ndata: " + payload + b"\n\n"

        empty_item = {**item, "status": "in_progress", "content": []}
        head = [
            event("response.created", {"response": response_obj("in_progress", [], False)}),
            event("response.in_progress", {"response": response_obj("in_progress", [], False)}),
            event("response.output_item.added", {"output_index": 0, "item": empty_item}),
            event(
                "response.content_part.added",
                {
                    "item_id": item_id,
                    "output_index": 0,
                    "content_index": 0,
                    "part": {"type": "output_text", "text": "", "annotations": []},
                },
            ),
        ]
        deltas = [
            event(
                "response.output_text.delta",
                {"item_id": item_id, "output_index": 0, "content_index": 0, "delta": piece, "logprobs": []},
            )
            for piece in pieces
        ]
        tail = [
            event(
                "response.output_text.done",
                {"item_id": item_id, "output_index": 0, "content_index": 0, "text": text, "logprobs": []},
            ),
            event(
                "response.content_part.done",
                {"item_id": item_id, "output_index": 0, "content_index": 0, "part": part},
            ),
            event("response.output_item.done", {"output_index": 0, "item": item}),
            event("response.completed", {"response": response_obj("completed", [item], True)}),
        ]
        return await self._stream(request, head, deltas, tail, b, output_tokens)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        got = await self._record(request, "embeddings")
        if isinstance(got, web.Response):
            return got
        body, _ = got
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else [inputs]
        tokens = self._input_tokens(body)
        self.stats.input_tokens += tokens
        self.stats.completed += 1
        data = [
            {"object": "embedding", "index": i, "embedding": [0.1 * ((i + j) % 7) for j in range(8)]}
            for i in range(len(items))
        ]
        answer = {
            "object": "list",
            "data": data,
            "model": body.get("model"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": "mock-gpt", "object": "model", "created": 0, "owned_by": "tokenrelay-mock"}],
            }
        )

    # --- Anthropic ----------------------------------------------------------------------------------------------

    async def messages(self, request: web.Request) -> web.StreamResponse:
        got = await self._record(request, "messages")
        if isinstance(got, web.Response):
            return got
        body, b = got
        model = str(body.get("model", "mock"))
        mid, _ = self._id("msg_mock", b)
        input_tokens = self._input_tokens(body)
        self.stats.input_tokens += input_tokens
        pieces = self._text(b)
        output_tokens = len(pieces) * b.words_per_delta
        usage = {
            "input_tokens": input_tokens - b.cached_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": b.cached_tokens,
            "output_tokens": output_tokens,
        }
        if not body.get("stream"):
            self.stats.completed += 1
            self.stats.output_tokens += output_tokens
            answer = {
                "id": mid,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": "".join(pieces)}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": usage,
            }
            return web.Response(body=orjson.dumps(answer), content_type="application/json")

        def event(kind: str, data: dict[str, Any]) -> bytes:
            return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **data}) + b"\n\n"

        start = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {**usage, "output_tokens": 1},
        }
        head = [
            event("message_start", {"message": start}),
            event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
            event("ping", {}),
        ]
        deltas = []
        for i, piece in enumerate(pieces):
            if i == b.error_after:
                deltas.append(event("error", {"error": {"type": "overloaded_error", "message": "Overloaded"}}))
                break
            deltas.append(event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": piece}}))
        tail = (
            []
            if b.error_after >= 0
            else [
                event("content_block_stop", {"index": 0}),
                event(
                    "message_delta",
                    {
                        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                        "usage": {"output_tokens": output_tokens},
                    },
                ),
                event("message_stop", {}),
            ]
        )
        return await self._stream(request, head, deltas, tail, b, output_tokens)

    async def count_tokens(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        return web.json_response({"input_tokens": self._input_tokens(body)})

    # --- control ------------------------------------------------------------------------------------------------

    async def control(self, request: web.Request) -> web.Response:
        """POST a partial Behaviour to change it (and reset the failure counter); GET reads it."""
        if request.method == "POST":
            changes = orjson.loads(await request.read())
            unknown = set(changes) - Behaviour.field_names() - {"reset_stats"}
            if unknown:
                return web.json_response({"error": f"unknown: {sorted(unknown)}"}, status=400)
            if changes.pop("reset_stats", False):
                self.stats = Stats()
            self.behaviour = replace(self.behaviour, **changes)
            self._failures = 0
        return web.json_response(asdict(self.behaviour))

    async def stats_handler(self, request: web.Request) -> web.Response:
        return web.Response(
            body=orjson.dumps({**asdict(self.stats), "last_request": self.last_request}),
            content_type="application/json",
        )

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        for prefix in ("/openai/v1", "/v1"):
            app.router.add_post(f"{prefix}/chat/completions", self.chat)
            app.router.add_post(f"{prefix}/completions", self.completions)
            app.router.add_post(f"{prefix}/responses", self.responses)
            app.router.add_post(f"{prefix}/embeddings", self.embeddings)
            app.router.add_get(f"{prefix}/models", self.models)
        for prefix in ("/anthropic/v1", "/v1"):
            app.router.add_post(f"{prefix}/messages", self.messages)
            app.router.add_post(f"{prefix}/messages/count_tokens", self.count_tokens)
        app.router.add_route("*", "/_control", self.control)
        app.router.add_get("/_stats", self.stats_handler)
        return app


def _count_words(value: object) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_count_words(v) for v in value)
    if isinstance(value, dict):
        return sum(_count_words(v) for k, v in value.items() if k in ("content", "text", "input", "output"))
    return 0


def main(argv: list[str] | None = None) -> None:
    """Runs the mock provider as its own process (tests and benchmarks)."""
    parser = argparse.ArgumentParser(prog="python -m tokenrelay.mock", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    for f in fields(Behaviour):
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=type(f.default) if f.type != "bool" else lambda s: s.lower() in ("1", "true", "yes"),
            default=f.default,
        )
    args = parser.parse_args(argv)
    behaviour = Behaviour(**{f.name: getattr(args, f.name) for f in fields(Behaviour)})
    provider = MockProvider(behaviour)

    async def serve() -> None:
        runner = web.AppRunner(provider.app(), access_log=None, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port, backlog=4096)
        await site.start()
        port = runner.addresses[0][1]
        print(f"mock listening on http://{args.host}:{port}", flush=True)
        await asyncio.Event().wait()

    try:
        import uvloop

        uvloop.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
