"""Type stubs for the Rust extension `tokenrelay._core` (one section per module)."""

from typing import Literal, Self, final

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

def estimate_input_tokens(api_name: str, body: bytes, model: str = "") -> int:
    """Estimated input tokens of a request body of `api_name` (count_tokens on a deployment that has none)."""
