# Hand-written stubs for tokenrelay._core. Each helper owns one section, delimited by `# --- <module> ---`.

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
