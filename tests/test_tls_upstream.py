"""HTTPS upstreams (every hosted provider): the relay verifies the certificate and streams through TLS.

A local CA (trustme) signs a certificate for 127.0.0.1; the daemon trusts it through SSL_CERT_FILE, as a user
with a private CA would. A second daemon, which does not trust it, must refuse the upstream.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import trustme

from tests.conftest import Daemon, start_daemon
from tests.hostile import HostileUpstream, good_stream
from tests.test_hostile_upstream import KEY, hostile_config, post_stream, record_for

MODES = ("ok", "http10", "gzip", "huge")


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_upstream(ca: trustme.CA) -> Iterator[HostileUpstream]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    server = HostileUpstream(tls=context).start()
    yield server
    server.stop()


def tls_daemon(tmp: Path, upstream: HostileUpstream, env: dict[str, str]) -> Daemon:
    timeouts = "{connect = 3, first_token = 3, idle = 3, total = 20}"
    return start_daemon(tmp, hostile_config(upstream, MODES, timeouts), env={"TEST_UPSTREAM_KEY": KEY, **env})


@pytest.fixture(scope="module")
def relay(ca: trustme.CA, tls_upstream: HostileUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("tls")
    ca_file = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    d = tls_daemon(tmp, tls_upstream, {"SSL_CERT_FILE": str(ca_file)})
    yield d
    d.stop()


async def test_stream_through_tls_is_byte_for_byte(relay: Daemon, tls_upstream: HostileUpstream) -> None:
    assert tls_upstream.url("ok").startswith("https://")
    status, data = await post_stream(relay, "h-ok")
    assert status == 200 and data == good_stream()
    assert record_for(relay, "h-ok")["usage"]["output"] == 3


async def test_large_and_odd_streams_through_tls(relay: Daemon) -> None:
    status, data = await post_stream(relay, "h-huge")
    assert status == 200 and len(data) > 10 * 1024 * 1024 and data.endswith(b"data: [DONE]\n\n")
    for mode in ("http10", "gzip"):
        status, data = await post_stream(relay, f"h-{mode}")
        assert status == 200 and data.endswith(b"data: [DONE]\n\n"), mode


def test_openai_sdk_over_a_tls_upstream(relay: Daemon) -> None:
    client = openai.OpenAI(base_url=relay.base_url, api_key="agent", max_retries=0)
    stream = client.chat.completions.create(model="h-ok", messages=[{"role": "user", "content": "hi"}], stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "tok0 tok1 tok2 "


def test_an_untrusted_certificate_is_refused(
    tls_upstream: HostileUpstream, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tmp = tmp_path_factory.mktemp("tls-untrusted")
    d = tls_daemon(tmp, tls_upstream, {})
    try:
        client = openai.OpenAI(base_url=d.base_url, api_key="agent", max_retries=0)
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model="h-ok", messages=[{"role": "user", "content": "hi"}])
        assert info.value.status_code == 502
        assert "certificate" in str(info.value).lower()
    finally:
        d.stop()
