"""Type stubs for the Rust extension `tokenrelay._core` (one section per module)."""

import os
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Literal, Self, final

__all__: list[str]

__version__: str

# --- stream ---

_Source = Literal["reported", "estimated"]

@final
class Usage:
    """Normalised usage of one request (frozen).

    `input` is ALL input tokens processed, cache reads and writes included (OpenAI `prompt_tokens` semantics;
    Anthropic `input_tokens + cache_read_input_tokens + cache_creation_input_tokens`); `cached_input` the part
    read from cache; `cache_write` the part written to cache; `output` all output tokens, reasoning included;
    `reasoning` the reasoning part of `output`. Each has a source: "reported" by the provider or "estimated"
    locally. A detail missing from a reported usage is 0 with its parent's source (reasoning is estimated
    from streamed reasoning text instead, when there was some).
    """

    @property
    def input(self) -> int: ...
    @property
    def output(self) -> int: ...
    @property
    def cached_input(self) -> int: ...
    @property
    def cache_write(self) -> int: ...
    @property
    def reasoning(self) -> int: ...
    @property
    def input_source(self) -> _Source: ...
    @property
    def output_source(self) -> _Source: ...
    @property
    def cached_input_source(self) -> _Source: ...
    @property
    def cache_write_source(self) -> _Source: ...
    @property
    def reasoning_source(self) -> _Source: ...
    def to_dict(self) -> dict[str, int | str]:
        """All ten fields."""

PUMP_END: int
PUMP_MALFORMED: int
PUMP_CLIENT_GONE: int
PUMP_PAUSED: int

@final
class Pump:
    """The relay of a stream's upstream reads to the client, as the upstream transport's protocol: each read is
    metered (`meter.feed_wire`) and written to the client (`write`) in Rust, with no Python frame per read.

    Per read: `response.last_read = time()`; then `on_event(kind, arg)` when the body ends (PUMP_END, arg:
    `wire_excess`), the framing is malformed (PUMP_MALFORMED, arg: the message), `write` raised RuntimeError or
    OSError (PUMP_CLIENT_GONE, arg: the exception) or `buffered()` went past `high` (PUMP_PAUSED, once until
    `resume()`). After the first three, reads go to `protocol`, as do `eof_received`, `connection_lost`,
    `pause_writing` and `resume_writing` all along.
    """

    def __new__(
        cls,
        meter: StreamMeter,
        response: object,
        time: Callable[[], float],
        write: Callable[[bytes], object],
        buffered: Callable[[], int],
        high: int,
        protocol: object,
        on_event: Callable[[int, Any], object],
    ) -> Self: ...
    def data_received(self, data: bytes) -> None: ...
    def resume(self) -> None: ...
    def eof_received(self) -> bool | None: ...
    def connection_lost(self, exc: BaseException | None) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...

RELAY_END: int
RELAY_MALFORMED: int
RELAY_CLIENT_GONE: int
RELAY_BROKEN: int

@final
class Plane:
    """The worker's data plane thread: relays committed streams from an upstream socket to a client socket,
    metering each read, without the event loop or the GIL."""

    def __new__(cls) -> Self: ...
    def fileno(self) -> int: ...
    def relay(self, meter: StreamMeter, upstream_fd: int, client_fd: int, high: int) -> Relay:
        """Duplicates both descriptors; the caller must not read the upstream or write the client until the
        relay's kind comes from `completed()`."""
    def completed(self) -> list[tuple[int, int, Any, bytes]]:
        """(id, kind, arg, rest) of each relay finished since the last call (never a cancelled one): RELAY_END
        (arg: the connection is reusable), RELAY_MALFORMED / RELAY_CLIENT_GONE / RELAY_BROKEN (arg: the message);
        `rest`: bytes not yet written to the client (the caller's to write, in order)."""
    def close(self) -> None: ...

@final
class Spinner:
    """An idle-priority (SCHED_IDLE) thread that keeps its core awake while `enter()` calls outnumber `leave()`
    calls and for `linger_s` after the last `leave()`; pinned to `cpu` if given. OSError if it cannot be made so."""

    def __new__(cls, cpu: int | None = None, linger_s: float = 0.0) -> Self: ...
    def enter(self) -> None: ...
    def leave(self) -> None: ...
    @property
    def clients(self) -> int: ...
    @property
    def cpu_seconds(self) -> float: ...
    def close(self) -> None: ...

@final
class Relay:
    @property
    def id(self) -> int: ...
    @property
    def last_read(self) -> float:
        """When the last upstream read arrived, in `time.monotonic()` seconds."""
    @property
    def buffered(self) -> int:
        """Bytes read from the upstream that the client has not taken yet."""
    def cancel(self) -> bytes:
        """Once this returns nothing more is metered or written to the client, and the relay is not reported by
        `completed()`; returns the bytes it had metered and not written (the caller's to write first)."""

@final
class StreamMeter:
    """Meters one streamed response: SSE split, usage/delta extraction. Feed every raw upstream read in order.

    `api`: "chat" | "completions" | "responses" | "messages" (ValueError otherwise). `model` picks the
    encoding for estimates (empty: the model the stream names). `strip_usage` (chat/completions only, ignored
    otherwise): remove usage-only chunks (`choices == []` with `usage`), for clients that did not ask for
    `stream_options.include_usage` when the proxy injected it.
    """

    def __new__(cls, api: str, model: str = "", strip_usage: bool = False, translate_to: str | None = None) -> Self:
        """`translate_to`: the client's API ("chat" | "messages") when it differs from the upstream's `api`:
        every event is rewritten into the client's format (feed() then always returns bytes; usage is still
        decoded from the upstream's events; a chat client gets the usage chunk unless `strip_usage`).
        ValueError when no translation exists between the two."""
    def feed(self, chunk: bytes) -> bytes | None:
        """Parse one raw read (holds the GIL; short).

        None: forward `chunk` unchanged (the fast path, no copy). Otherwise forward the returned bytes
        instead (possibly b""). With strip_usage only whole events are forwarded and an incomplete tail is
        held back until completed (at most one event's size limit, 16 MiB); without it, always None.
        """
    def flush(self) -> bytes:
        """End of stream: the held-back bytes to forward (b"" normally). Meters an unterminated last event."""
    def frame(self, framing: str, length: int = 0) -> None:
        """From now on feed_wire() takes the upstream's wire bytes, delimited by `framing` ("chunked", "length"
        with `length`, "close"); ValueError for another name."""
    def feed_wire(self, data: bytes) -> bytes | None:
        """One upstream read with its body framing. None: write `data` to the client as it is (whole chunks
        from boundary to boundary when `client_chunked`, else an unframed payload; unedited); otherwise the
        bytes to write instead, framed for the client. ValueError on malformed framing."""
    def wire_close(self) -> None:
        """The upstream connection closed: completes a body read to the close; ValueError if incomplete."""
    client_chunked: bool
    @property
    def wire_done(self) -> bool:
        """The upstream body was read to its end."""
    @property
    def wire_excess(self) -> bool:
        """Bytes came after the body's end (the connection cannot be reused)."""
    def work_bytes(self, request_len: int) -> int:
        """Bytes finish() would tokenize given a request body of `request_len` bytes (0: all was reported)."""
    def finish(self, request_body: bytes | None = None) -> Usage:
        """Usage of the whole request, estimating what the provider did not report (GIL released).

        Call flush() first when strip_usage is on; input is estimated from `request_body` when not reported.
        """
    @property
    def api(self) -> str: ...
    @property
    def content_started(self) -> bool:
        """The first output token (text, tool call, refusal or reasoning) was seen."""
    @property
    def events(self) -> int:
        """SSE events dispatched so far."""
    @property
    def malformed(self) -> int:
        """Events that could not be decoded (bad JSON, unknown event type, over the size limit)."""
    @property
    def oversized(self) -> int:
        """Events discarded for exceeding the 16 MiB size limit (also counted in `malformed`)."""
    @property
    def done(self) -> bool:
        """`[DONE]`, `message_stop` or `response.completed|incomplete|failed` was seen."""
    @property
    def finish_reason(self) -> str | None:
        """finish_reason (chat/completions), stop_reason (messages) or response status (responses)."""
    @property
    def error(self) -> dict[str, str] | None:
        """{"type": ..., "message": ...} of the first in-stream error event."""
    @property
    def estimate_bytes(self) -> int:
        """Bytes of text finish() would tokenize (0 if all usage was reported); if large, use a thread."""
    @property
    def first_token_ns(self) -> int | None:
        """time.monotonic_ns() when the read that carried the first content token was fed."""

def decode_body(api: str, body: bytes, model: str = "", request_body: bytes | None = None) -> Usage:
    """Usage of a non-streaming JSON body; `api` also accepts "embeddings". Bad JSON: all estimated."""

# --- tokens ---
def count_tokens(text: str, encoding: str = "o200k_base") -> int:
    """Tokens in `text`, exactly as tiktoken's encode_ordinary counts them (special tokens are plain text).

    Releases the GIL for texts above 4 KiB. Raises ValueError for an encoding other than
    "o200k_base" / "cl100k_base".
    """

def encoding_for_model(model: str) -> tuple[str, bool]:
    """(encoding name, known): known is False when the model's tokenizer is not public (a guess)."""

def estimate_input_tokens(api: str, body: bytes, model: str = "") -> int:
    """Estimated input tokens of a request body; api is "chat", "completions", "responses", "messages" or
    "embeddings" (ValueError otherwise). Never fails on a malformed body. Releases the GIL."""

def preload_encoding(encoding: str = "o200k_base") -> None:
    """Load an encoding now (about 50 ms, once per process) instead of on the first count."""

def tiktoken_vocabulary(encoding: str) -> bytes:
    """The vocabulary in tiktoken's .tiktoken file format (byte-identical to OpenAI's published file)."""

# --- balance ---
_Outcome = Literal["success", "failure", "rate_limited", "cancelled", "client_gone"]

@final
class Pool:
    """A route's deployments and their balancing state. Frozen and thread-safe.

    Per request attempt: `idx = pool.pick(tried)`; if `idx >= 0` a slot is reserved, then
    `pool.first_token(idx, ttft_s)` when the first token arrives and exactly one
    `pool.release(idx, outcome, ...)` (in a `finally`). If `idx` is `Pool.BUSY`, every eligible deployment
    is at a limit (queue and retry); if `Pool.UNAVAILABLE`, none may be used. `pool.retry_after(tried)` then
    says how long to wait (None: nothing comes back on its own).

    With `shared=PATH` the state lives in that file, shared with every pool built on it with the same
    deployments and settings (the daemon's other workers), as worker `worker`: limits, breaker, cooldowns and
    averages are then the daemon's, and `snapshot()` reports this worker's own requests (in flight, counted).
    What an earlier pool of the same worker index held there is dropped. Another configuration's file raises
    ValueError.
    """

    BUSY: ClassVar[int]  # -1
    UNAVAILABLE: ClassVar[int]  # -2
    MAX_WORKERS: ClassVar[int]  # 32: rows a shared pool keeps, by worker index
    def __new__(
        cls,
        deployments: list[dict[str, object]],
        strategy: str = "p2c",
        *,
        breaker_failures: int = 3,
        breaker_error_rate: float = 0.5,
        breaker_window_s: float = 30.0,
        breaker_min_requests: int = 10,
        cooldown_s: float = 10.0,
        max_cooldown_s: float = 120.0,
        shared: str | os.PathLike[str] | None = None,
        worker: int = 0,
    ) -> Self: ...
    @property
    def strategy(self) -> str: ...
    @property
    def shared(self) -> bool: ...
    def set_waiting(self, waiting: bool) -> None:
        """Tells the other workers whether this one has requests queued for room on this pool."""
    def others_waiting(self) -> int:
        """The other workers with requests queued for room, as a bit set by worker index (0 unless shared)."""
    def pick(self, exclude: Iterable[int] | None = None) -> int: ...
    def retry_after(self, exclude: Iterable[int] | None = None) -> float | None: ...
    def first_token(self, idx: int, ttft_s: float) -> None: ...
    def release(
        self,
        idx: int,
        outcome: _Outcome,
        output_tokens: int = 0,
        total_tokens: int = 0,
        duration_s: float = 0.0,
    ) -> None: ...
    def cooldown(self, idx: int, seconds: float) -> None: ...
    def set_health(self, idx: int, up: bool) -> None: ...
    def snapshot(self) -> list[dict[str, object]]:
        """Per deployment, in index order: name, state ("healthy" | "cooling_down" | "open" | "half_open" |
        "down"), until_s (seconds until pickable again), outstanding, ewma_ttft_s, ewma_tokens_per_s (None
        until sampled), error_rate (failures + 429s in the breaker window), requests, failures, rate_limited,
        rpm_used, tpm_used (last 60 s), and the configured weight, tier, max_concurrent, rpm, tpm."""
    def __len__(self) -> int: ...

# --- end balance ---
# --- meter ---

@final
class TokenRate:
    """Tokens per second over the last `window_s` seconds, spreading each request's tokens over the time it took:
    input tokens at its start, output tokens evenly from its first token to its end. Adding is O(1) whatever the
    request's length (a difference array); reading the series is O(window)."""

    def __init__(self, window_s: int = 600) -> None: ...
    @property
    def n(self) -> int: ...
    def add(self, side: int, tokens: float, start: float, end: float, now: float) -> None:
        """Adds `tokens` on `side` (0 in, 1 out) spread evenly over [start, end] (Unix seconds)."""
    def add_request(
        self, input: float, output: float, start: float, first_token: float | None, end: float, now: float
    ) -> None:
        """One finished request: input tokens at `start`, output from `first_token` (None: `start`) to `end`."""
    def series(self, seconds: int, now: float) -> tuple[list[float], list[float]]:
        """Tokens in and out for each of the last `seconds` whole seconds before `now`, oldest first."""

@final
class Meters:
    """In-memory usage meters: `record()` per finished request, `drain()` deltas for the ledger."""

    def __init__(self) -> None: ...
    def record(
        self,
        *,
        ts: float,
        route: str,
        deployment: str,
        model: str,
        key_id: str,
        key_name: str,
        run: str,
        tags: str,
        status: int,
        error_class: str,
        input: int,
        output: int,
        cached_input: int,
        cache_write: int,
        reasoning: int,
        input_estimated: bool,
        output_estimated: bool,
        cached_estimated: bool,
        cache_write_estimated: bool,
        reasoning_estimated: bool,
        cost_usd: float | None,
        ttft_s: float | None,
        duration_s: float,
        stream: bool,
        api: str,
    ) -> None: ...
    def drain(self) -> list[dict[str, object]]: ...
    def restore(self, rows: list[dict[str, object]]) -> None: ...
    def pending_buckets(self) -> int: ...
    def prometheus(self) -> str: ...
    def totals(self) -> dict[str, object]: ...

def histogram_quantiles(buckets: str, qs: list[float]) -> list[float | None]: ...
def histogram_merge(a: str | None, b: str | None, /) -> str: ...

HISTOGRAM_BOUNDS: tuple[float, ...]
METER_ERROR_CLASSES: tuple[str, ...]

# --- translate ---

DEFAULT_MAX_TOKENS: int
"""`max_tokens` sent to an Anthropic deployment when a chat completions request gives none."""

class TranslationError(ValueError):
    """A request that cannot be translated; `param` names the offending parameter (a path like
    `messages[2].content[0].type`), or is None when the whole request is at fault."""

    param: str | None

def translate_request(client: str, kind: str, body: bytes, model: str, drop_unsupported: bool = False) -> bytes:
    """The request body of the `client` API ("chat" | "messages") for a deployment of `kind` ("openai" |
    "anthropic") of the other format, with `model` as its model. Raises TranslationError naming a parameter
    with no equivalent (unless `drop_unsupported`), or when no translation exists. GIL released."""

def translate_response(upstream: str, client: str, body: bytes) -> bytes:
    """A complete JSON response body of the `upstream` API in the `client` API's format (usage and stop reason
    mapped). Unchanged when the two are the same; TranslationError when it is not JSON. GIL released."""

def translate_error(upstream: str, client: str, status: int, body: bytes) -> bytes:
    """An upstream error body (HTTP `status`) in the error shape of the `client` API ("chat" and the other
    OpenAI APIs, or "messages"). A body that is not JSON becomes the message."""

# --- HTTP/1.1 framing (rust/src/h1.rs) ---

def parse_response_head(
    buf: bytes, head_request: bool = False
) -> tuple[int, str, int, list[tuple[str, str]], int, str, int, bool] | None: ...
def parse_request_head(
    buf: bytes | bytearray | memoryview,
) -> tuple[str, str, int, list[tuple[str, str]], int, int | None, bool, bool] | None:
    """`(method, target, minor_version, headers, head_len, content_length, unusual, keep_alive)`, or None while
    incomplete; `unusual`: a Transfer-Encoding, Expect or Upgrade field. ValueError when not a valid head."""

class BodyDecoder:
    def __init__(self, framing: str, length: int = 0) -> None: ...
    def decode(self, data: bytes) -> bytes: ...
    def close(self) -> None: ...
    @property
    def done(self) -> bool: ...
    @property
    def excess(self) -> bool: ...

# --- the request body (rust/src/body.rs) ---

@final
class BodySpans:
    """Where a body's top-level members lie (from `read_body`): `patch_body` of the same bytes parses nothing."""

def read_body(raw: bytes) -> tuple[dict[str, Any], BodySpans]:
    """The top-level fields of a request body the proxy reads: every value but arrays and values over 4 KiB
    (messages, tools, inputs stay in the bytes), and where every member lies. The whole body is validated (GIL
    released when long); ValueError with a message for the client when it is not a JSON object."""

def patch_body(raw: bytes, fields: list[tuple[str, bytes]], spans: BodySpans | None = None) -> bytes:
    """`raw` with these top-level members set to these raw JSON values (replaced where present, every
    occurrence; added at the end otherwise); every other byte as sent. `spans`: `read_body(raw)`'s, so `raw`
    is not parsed again. ValueError if not a JSON object, or if `spans` are of another body."""
