"""Talking to upstreams: the request head each provider kind expects, and the response headers a client sees."""

from __future__ import annotations

from collections.abc import Mapping

from multidict import CIMultiDict, CIMultiDictProxy

from tokenrelay import __version__
from tokenrelay.config import Deployment
from tokenrelay.h1client import Origin, header_lines, origin_of, request_head

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


def _deployment_headers(deployment: Deployment, stream: bool, anthropic_version: str | None) -> dict[str, str]:
    """The request headers that depend on the deployment alone: its credentials, never the client's."""
    headers = {
        "content-type": "application/json",
        "accept": "text/event-stream" if stream else "application/json",
        # A compressed stream would be buffered by the provider's compressor: events as they are made.
        "accept-encoding": "identity" if stream else "gzip, deflate",
        "user-agent": USER_AGENT,
    }
    if deployment.kind == "anthropic":
        headers["anthropic-version"] = anthropic_version or deployment.anthropic_version
        if deployment.api_key:
            headers["x-api-key"] = deployment.api_key
    elif deployment.api_key:
        headers["authorization"] = f"Bearer {deployment.api_key}"
    headers.update(deployment.headers)
    return headers


# (deployment, path, stream, anthropic-version) -> the deployment, its request head, and the client headers it
# forwards (those it does not set itself): built once, not per request.
_HEADS: dict[tuple[int, str, bool, str | None], tuple[Deployment, Origin, bytes, tuple[str, ...]]] = {}


def upstream_request(
    deployment: Deployment, path: str, client: Mapping[str, str], stream: bool
) -> tuple[Origin, bytes]:
    """Where a request goes and its head (`h1client.request_head`): always the configured base URL plus a fixed
    API path, so nothing in a request can change where tokenrelay connects. The part that depends on the
    deployment alone is built once and cached; the client headers a provider needs to see (unless the deployment
    sets them itself) are added to it."""
    version = client.get("anthropic-version") if deployment.kind == "anthropic" else None
    key = (id(deployment), path, stream, version)
    cached = _HEADS.get(key)
    if cached is None or cached[0] is not deployment:
        if len(_HEADS) > 4096:  # versions come from clients: keep the cache bounded
            _HEADS.clear()
        static = _deployment_headers(deployment, stream, version)
        origin = origin_of(deployment.base_url)
        own = {k.lower() for k in deployment.headers}
        forwarded = tuple(name for name in FORWARDED_CLIENT_HEADERS if name not in own)
        cached = _HEADS[key] = (deployment, origin, request_head("POST", origin, path, static), forwarded)
    _, origin, head, forwarded = cached
    extra = {}
    for name in forwarded:
        value = client.get(name)
        if value is not None:
            extra[name] = value
    if extra:
        head += header_lines(extra)
    return origin, head


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
