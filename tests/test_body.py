"""The request body, read once in Rust: read_body (the top-level fields the proxy reads) and patch_body (the
upstream's model name and stream_options spliced into the client's bytes)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenrelay._core import patch_body, read_body

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip
bodies = st.dictionaries(st.text(min_size=1, max_size=10), values, max_size=8)


def expected_fields(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if not isinstance(v, list) and len(orjson.dumps(v)) <= 4096}


@SETTINGS
@given(body=bodies, indent=st.booleans())
def test_read_body_is_the_top_level_fields(body: dict[str, Any], indent: bool) -> None:
    raw = orjson.dumps(body, option=orjson.OPT_INDENT_2 if indent else 0)
    assert read_body(raw)[0] == expected_fields(body)


@SETTINGS
@given(body=bodies, model=st.text(max_size=30), options=st.dictionaries(st.text(max_size=5), scalars, max_size=3))
def test_patch_body_equals_the_body_with_those_fields_set(
    body: dict[str, Any], model: str, options: dict[str, Any]
) -> None:
    raw = orjson.dumps(body)
    changes = [("model", orjson.dumps(model)), ("stream_options", orjson.dumps(options))]
    out = patch_body(raw, changes)
    assert orjson.loads(out) == {**body, "model": model, "stream_options": options}
    assert patch_body(raw, changes, read_body(raw)[1]) == out  # with the spans read_body found: the same bytes


def test_long_values_stay_in_the_bytes() -> None:
    messages = [{"role": "user", "content": "x" * 10_000}]
    raw = orjson.dumps({"model": "m", "messages": messages, "metadata": {"k": "v" * 5000}, "max_tokens": 7})
    fields, spans = read_body(raw)
    assert fields == {"model": "m", "max_tokens": 7}
    out = patch_body(raw, [("model", b'"upstream"')], spans)
    assert out == raw.replace(b'"model":"m"', b'"model":"upstream"')  # every other byte as sent


def test_errors_have_the_clients_message() -> None:
    with pytest.raises(ValueError, match="not valid JSON"):
        read_body(b'{"model": "m",')
    with pytest.raises(ValueError, match="not valid JSON"):
        read_body(b"")
    with pytest.raises(ValueError, match="must be a JSON object"):
        read_body(b'["model"]')
    with pytest.raises(ValueError, match="must be a JSON object"):
        patch_body(b"42", [("model", b'"m"')])
    with pytest.raises(ValueError, match="another body"):
        patch_body(b'{"model": "mm"}', [("model", b'"m"')], read_body(b'{"model": "m"}')[1])


def test_duplicate_keys_last_wins_and_all_are_patched() -> None:
    raw = b'{"model": "a", "model": "b"}'
    fields, spans = read_body(raw)
    assert fields == orjson.loads(raw) == {"model": "b"}
    assert patch_body(raw, [("model", b'"c"')], spans) == b'{"model": "c", "model": "c"}'
    assert orjson.loads(patch_body(raw, [("model", b'"c"')])) == {"model": "c"}
