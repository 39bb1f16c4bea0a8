"""Token counts must equal OpenAI's tiktoken exactly; request estimates follow the documented formula."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenrelay import _core
from tests.tokens_corpus import ENCODINGS, corpus, install_tiktoken_vocabularies

tiktoken = pytest.importorskip("tiktoken")

# The SHA-256 tiktoken expects of each published vocabulary file.
TIKTOKEN_SHA256 = {
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
}


@pytest.fixture(scope="module", autouse=True)
def offline_tiktoken(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        cache_dir = tmp_path_factory.mktemp("tiktoken-cache")
        install_tiktoken_vocabularies(cache_dir)
        mp.setenv("TIKTOKEN_CACHE_DIR", str(cache_dir))
        yield


def reference(encoding: str, text: str) -> int:
    return len(tiktoken.get_encoding(encoding).encode_ordinary(text))


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_vocabulary_is_byte_identical_to_openai(encoding: str) -> None:
    data = _core.tiktoken_vocabulary(encoding)
    assert hashlib.sha256(data).hexdigest() == TIKTOKEN_SHA256[encoding]


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("text", corpus(), ids=lambda t: repr(t[:20]))
def test_corpus_matches_tiktoken(encoding: str, text: str) -> None:
    assert _core.count_tokens(text, encoding) == reference(encoding, text)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_whole_corpus_and_every_line(encoding: str) -> None:
    text = "\n".join(corpus())
    assert _core.count_tokens(text, encoding) == reference(encoding, text)
    for line in text.splitlines(keepends=True):
        assert _core.count_tokens(line, encoding) == reference(encoding, line), repr(line)


@pytest.mark.parametrize("encoding", ENCODINGS)
@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=300))
def test_random_unicode_matches_tiktoken(encoding: str, text: str) -> None:
    assert _core.count_tokens(text, encoding) == reference(encoding, text)


@pytest.mark.parametrize("encoding", ENCODINGS)
@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.characters(max_codepoint=127), max_size=200))
def test_random_ascii_matches_tiktoken(encoding: str, text: str) -> None:
    # ASCII takes the hand-written pre-tokenizer's path end to end.
    assert _core.count_tokens(text, encoding) == reference(encoding, text)


# Characters that sit on the pre-tokenizer's class boundaries: letters of each case, marks, digits,
# whitespace kinds, apostrophes and punctuation.
_TRICKY = st.sampled_from(
    [
        *"aZ'sStTdDmMlLvVrReE 0123456789\n\r\t\x0b\x0c.,!?/-_()\"'",
        *["\u00a0", "\u2003", "\u3000", "\u0085", "\u2028", "\u0301", "\u0308"],
        *["ǅ", "ʰ", "中", "é", "١", "½", "🙂"],
    ]
)


@pytest.mark.parametrize("encoding", ENCODINGS)
@settings(max_examples=300, deadline=None)
@given(text=st.lists(_TRICKY, max_size=60).map("".join))
def test_class_boundaries_match_tiktoken(encoding: str, text: str) -> None:
    assert _core.count_tokens(text, encoding) == reference(encoding, text)


def test_lone_surrogates_are_replaced_like_tiktoken() -> None:
    text = "ab\ud800cd\udfff"
    for encoding in ENCODINGS:
        # tiktoken.encode() replaces lone surrogates with U+FFFD before encoding.
        assert _core.count_tokens(text, encoding) == len(tiktoken.get_encoding(encoding).encode(text))


def test_long_text_releases_the_gil_and_still_counts() -> None:
    text = "The quick brown fox. " * 20_000
    assert _core.count_tokens(text) == reference("o200k_base", text)


def test_unknown_encoding_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown encoding"):
        _core.count_tokens("x", "p50k_base")
    with pytest.raises(ValueError, match="unknown encoding"):
        _core.tiktoken_vocabulary("gpt2")
    with pytest.raises(ValueError, match="unknown api"):
        _core.estimate_input_tokens("audio", b"{}")


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o", ("o200k_base", True)),
        ("gpt-4o-mini-2024-07-18", ("o200k_base", True)),
        ("openai/gpt-4.1", ("o200k_base", True)),
        ("gpt-4.5-preview", ("o200k_base", True)),
        ("gpt-5-nano", ("o200k_base", True)),
        ("o1", ("o200k_base", True)),
        ("o3-mini", ("o200k_base", True)),
        ("o4-mini", ("o200k_base", True)),
        ("chatgpt-4o-latest", ("o200k_base", True)),
        ("gpt-oss-20b", ("o200k_base", True)),
        ("gpt-4", ("cl100k_base", True)),
        ("gpt-4-turbo-2024-04-09", ("cl100k_base", True)),
        ("gpt-3.5-turbo", ("cl100k_base", True)),
        ("azure/gpt-35-turbo", ("cl100k_base", True)),
        ("text-embedding-3-large", ("cl100k_base", True)),
        ("text-embedding-ada-002", ("cl100k_base", True)),
        ("claude-sonnet-4-5", ("o200k_base", False)),
        ("anthropic/claude-3-haiku", ("o200k_base", False)),
        ("meta-llama/Llama-3.3-70B-Instruct", ("o200k_base", False)),
        ("", ("o200k_base", False)),
    ],
)
def test_encoding_for_model(model: str, expected: tuple[str, bool]) -> None:
    assert _core.encoding_for_model(model) == expected


@pytest.mark.parametrize(
    "model",
    ["gpt-4o", "gpt-4.1-mini", "gpt-5", "o3", "gpt-4", "gpt-3.5-turbo", "text-embedding-3-small"],
)
def test_known_models_agree_with_tiktoken(model: str) -> None:
    name, known = _core.encoding_for_model(model)
    assert known
    assert tiktoken.encoding_for_model(model).name == name


# --- request estimates ------------------------------------------------------------------------------------


def o200k(text: str) -> int:
    return reference("o200k_base", text)


def body(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, indent=2).encode()


def test_chat_estimate_is_the_cookbook_formula() -> None:
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "name": "example_user", "content": "New synergies will help drive top-line growth."},
        {"role": "assistant", "content": "Things working well together will increase revenue."},
    ]
    # OpenAI cookbook: 3 per message, +1 per name, each value's tokens, +3 priming the reply.
    expected = 3 * 3 + 1 + 3
    expected += sum(o200k(v) for m in messages for v in m.values())
    got = _core.estimate_input_tokens("chat", body({"model": "gpt-4o", "messages": messages}), "gpt-4o")
    assert got == expected


def test_chat_estimate_counts_parts_images_tool_calls_and_tools() -> None:
    params = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    request = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this image, and the weather?"},
                    {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18°C, sunny"},
        ],
        "tools": [
            {
                "type": "function",
                "function": {"name": "get_weather", "description": "Current weather", "parameters": params},
            }
        ],
    }
    expected = 3 + o200k("user") + o200k("What is in this image, and the weather?") + 765
    expected += 3 + o200k("assistant") + o200k("get_weather") + o200k('{"city":"Paris"}')
    expected += 3 + o200k("tool") + o200k("18°C, sunny")
    expected += 3
    compact = json.dumps(params, separators=(",", ":"))
    expected += o200k("get_weather") + o200k("Current weather") + o200k(compact)
    assert _core.estimate_input_tokens("chat", body(request), "gpt-4o") == expected


def test_estimate_uses_the_model_encoding() -> None:
    text = "Counting differs between encodings: 東京 and Москва."
    request = body({"messages": [{"role": "user", "content": text}]})
    cl100k = len(tiktoken.get_encoding("cl100k_base").encode_ordinary(text))
    user = len(tiktoken.get_encoding("cl100k_base").encode_ordinary("user"))
    assert _core.estimate_input_tokens("chat", request, "gpt-4") == 3 + user + cl100k + 3
    assert _core.estimate_input_tokens("chat", request, "gpt-4o") == 3 + o200k("user") + o200k(text) + 3


def test_completions_and_embeddings_estimates() -> None:
    assert _core.estimate_input_tokens("completions", body({"prompt": "Once upon a time"})) == o200k(
        "Once upon a time"
    )
    prompts = ["first prompt", "second, longer prompt"]
    assert _core.estimate_input_tokens("completions", body({"prompt": prompts})) == sum(map(o200k, prompts))
    assert _core.estimate_input_tokens("embeddings", body({"input": [[1, 2, 3], [4, 5]]})) == 5
    assert _core.estimate_input_tokens("embeddings", body({"input": [9, 8, 7, 6]})) == 4
    texts = ["embed me", "and me"]
    model = "text-embedding-3-small"
    cl = [len(tiktoken.get_encoding("cl100k_base").encode_ordinary(t)) for t in texts]
    assert _core.estimate_input_tokens("embeddings", body({"input": texts}), model) == sum(cl)


def test_responses_estimate() -> None:
    request = {
        "instructions": "Answer in French.",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "What's the capital?"}]},
            {"type": "function_call", "call_id": "c", "name": "lookup", "arguments": '{"q":"capital"}'},
            {"type": "function_call_output", "call_id": "c", "output": "Paris"},
        ],
        "tools": [{"type": "function", "name": "lookup", "description": "Search", "parameters": {}}],
    }
    expected = 3 + o200k("Answer in French.")
    expected += 3 + o200k("user") + o200k("What's the capital?")
    expected += 3 + o200k("lookup") + o200k('{"q":"capital"}')
    expected += 3 + o200k("Paris") + 3
    expected += o200k("lookup") + o200k("Search") + o200k("{}")
    assert _core.estimate_input_tokens("responses", body(request), "gpt-5") == expected


def test_anthropic_messages_estimate() -> None:
    request = {
        "model": "claude-sonnet-4-5",
        "system": "Be concise.",
        "messages": [
            {"role": "user", "content": "Add 2 and 3."},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t1", "name": "add", "input": {"a": 2, "b": 3}}],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "5"}],
            },
        ],
        "tools": [{"name": "add", "description": "Adds", "input_schema": {"type": "object"}}],
    }
    expected = 3 + o200k("Be concise.")
    expected += 3 + o200k("user") + o200k("Add 2 and 3.")
    expected += 3 + o200k("assistant") + o200k("add") + o200k('{"a":2,"b":3}')
    expected += 3 + o200k("user") + o200k("5") + 3
    expected += o200k("add") + o200k("Adds") + o200k('{"type":"object"}')
    assert _core.estimate_input_tokens("messages", body(request), "claude-sonnet-4-5") == expected


@pytest.mark.parametrize("api", ["chat", "completions", "responses", "messages", "embeddings"])
def test_malformed_bodies_fall_back_to_raw_text(api: str) -> None:
    raw = b'{"messages": [ truncated'
    assert _core.estimate_input_tokens(api, raw) == o200k(raw.decode())
    for odd in [b"", b"null", b"[]", b'{"messages": 5, "input": {}, "prompt": null}', b"\xff\xfe\x00"]:
        assert _core.estimate_input_tokens(api, odd) >= 0


@settings(max_examples=200, deadline=None)
@given(
    data=st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=20,
    ),
    key=st.sampled_from(["messages", "input", "prompt", "system", "tools", "instructions"]),
    api=st.sampled_from(["chat", "completions", "responses", "messages", "embeddings"]),
)
def test_estimates_never_fail_on_any_json_shape(data: Any, key: str, api: str) -> None:
    assert _core.estimate_input_tokens(api, json.dumps({key: data}).encode()) >= 0


def test_vocabulary_files_are_where_tiktoken_looks() -> None:
    # The fixture's cache works: tiktoken loads without network and agrees on a sample.
    assert tiktoken.get_encoding("o200k_base").encode_ordinary("hello world") == [24912, 2375]
