"""Errors in each API's own shape: OpenAI's `{"error": {...}}` and Anthropic's `{"type": "error", ...}`."""

from __future__ import annotations

import orjson
from aiohttp import web

# HTTP status -> (OpenAI error type, Anthropic error type)
_TYPES: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("authentication_error", "authentication_error"),
    403: ("permission_error", "permission_error"),
    404: ("not_found_error", "not_found_error"),
    408: ("timeout_error", "timeout_error"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_error"),
    500: ("server_error", "api_error"),
    502: ("upstream_error", "api_error"),
    503: ("service_unavailable", "overloaded_error"),
    504: ("timeout_error", "timeout_error"),
}


def error_type(status: int, api: str) -> str:
    """The error `type` a client of `api` expects for an HTTP status."""
    openai_type, anthropic_type = _TYPES.get(
        status, ("server_error" if status >= 500 else "invalid_request_error",) * 2
    )
    return anthropic_type if api == "messages" else openai_type


def error_body(status: int, message: str, api: str, code: str | None = None, param: str | None = None) -> bytes:
    """A JSON error body in the shape the client's SDK parses."""
    kind = error_type(status, api)
    if api == "messages":
        return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})


def api_of_path(path: str) -> str:
    """The API whose error shape a request path gets: Anthropic's for `/messages`, OpenAI's for the rest."""
    return "messages" if path.endswith(("/messages", "/messages/count_tokens")) else "chat"


def error_response(
    status: int,
    message: str,
    api: str = "chat",
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An error response in the API's own shape."""
    return web.Response(
        status=status,
        body=error_body(status, message, api, code, param),
        content_type="application/json",
        headers=headers,
    )


def error_event(message: str, api: str, kind: str = "upstream_error", code: str | None = None) -> bytes:
    """An SSE event that ends a stream with an error, in the API's streaming format."""
    if api == "messages":
        payload = orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})
        return b"event: error\ndata: " + payload + b"\n\n"
    if api == "responses":
        payload = orjson.dumps({"type": "error", "code": code or kind, "message": message, "param": None})
        return b"event: error\ndata: " + payload + b"\n\n"
    payload = orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})
    return b"data: " + payload + b"\n\n"
