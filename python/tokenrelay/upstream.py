"""Talking to upstreams: one shared HTTP client, and the request each provider kind expects."""

from __future__ import annotations

import socket
from collections.abc import Mapping

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from tokenrelay import __version__
from tokenrelay.config import Deployment

USER_AGENT = f"tokenrelay/{__version__}"

# Client headers a provider needs to see (feature flags, idempotency); everything else stays with the proxy.
FORWARDED_CLIENT_HEADERS = ("anthropic-beta", "openai-beta", "idempotency-key", "x-stainless-helper-method")

# Headers never copied from an upstream response to the client: hop-by-hop ones (RFC 9110 §7.6.1), framing the
# proxy redoes itself, and the body's encoding (the client session has already decoded it).
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "content-encoding",
        "date",
        "server",
        "set-cookie",
        "alt-svc",
    }
)


def make_session() -> aiohttp.ClientSession:
    """The one client session every upstream request goes through.

    No connection cap (aiohttp's default of 100 would queue agent streams), no total timeout (long generations
    are normal; the relay enforces per-phase timeouts itself), keep-alive connections reused per host, and
    TCP_NODELAY so small SSE writes are not held back.
    """
    connector = aiohttp.TCPConnector(
        limit=0,
        limit_per_host=0,
        ttl_dns_cache=300,
        keepalive_timeout=60,
        enable_cleanup_closed=False,
        socket_factory=_nodelay_socket,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, sock_read=None),
        auto_decompress=True,
        skip_auto_headers=("User-Agent",),
        json_serialize=None,  # type: ignore[arg-type]
    )


def _nodelay_socket(addr_info: tuple[int, int, int, str, tuple[object, ...]]) -> socket.socket:
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=type_, proto=proto)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def upstream_url(deployment: Deployment, path: str) -> str:
    """The upstream URL for an API path like `/chat/completions`: always the configured base URL plus a fixed path,
    so nothing in a request can change where tokenrelay connects."""
    return deployment.base_url + path


def upstream_headers(deployment: Deployment, client: Mapping[str, str], stream: bool) -> dict[str, str]:
    """Request headers for the upstream: the deployment's credentials, never the client's."""
    headers = {
        "content-type": "application/json",
        "accept": "text/event-stream" if stream else "application/json",
        "user-agent": USER_AGENT,
    }
    if deployment.kind == "anthropic":
        headers["anthropic-version"] = client.get("anthropic-version") or deployment.anthropic_version
        if deployment.api_key:
            headers["x-api-key"] = deployment.api_key
    elif deployment.api_key:
        headers["authorization"] = f"Bearer {deployment.api_key}"
    for name in FORWARDED_CLIENT_HEADERS:
        value = client.get(name)
        if value is not None:
            headers[name] = value
    headers.update(deployment.headers)
    return headers


REDACTED = "[redacted]"


def redact(data: bytes, deployment: Deployment) -> bytes:
    """An upstream's error body with the deployment's key removed (some providers echo the credentials they
    were sent), before it reaches a client, an error message or a log line."""
    key = deployment.api_key
    if not key or key.encode() not in data:
        return data
    return data.replace(key.encode(), REDACTED.encode())


def redact_text(text: str, deployment: Deployment) -> str:
    """As `redact`, for a message already decoded."""
    key = deployment.api_key
    return text.replace(key, REDACTED) if key and key in text else text


def response_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The upstream response's headers a client may see."""
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        if name.lower() not in _HOP_BY_HOP:
            out.add(name, value)
    return out
