"""Client keys as a user meets them: the `tokenrelay keys` CLI, and each auth rule of a running daemon, through
the official openai and anthropic SDKs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from tokenrelay import keys

from tests.conftest import Daemon, MockUpstream, route_config

ADMIN = "admin-secret-0123456789abcdef"
MESSAGES: Any = [{"role": "user", "content": "Say something about foxes."}]


def keys_cli(db: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "tokenrelay", "keys", *args, "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def create(db: Path, name: str, *args: str) -> str:
    """Creates a key with the CLI and returns the key itself."""
    return str(json.loads(keys_cli(db, "create", "--name", name, "--json", *args).stdout)["key"])


def http(method: str, url: str, key: str | None = None, body: Any = None) -> tuple[int, Any, dict[str, str]]:
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw, status, hdrs = resp.read(), resp.status, {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as err:
        raw, status, hdrs = err.read(), err.code, {k.lower(): v for k, v in err.headers.items()}
    try:
        return status, json.loads(raw), hdrs
    except ValueError:
        return status, raw.decode(), hdrs


def oai(d: Daemon, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=d.base_url, api_key=key, max_retries=0)


def claude(d: Daemon, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=d.url, api_key=key, max_retries=0)


def chat(d: Daemon, key: str, model: str = "fast") -> str:
    answer = oai(d, key).chat.completions.create(model=model, messages=MESSAGES)
    return answer.choices[0].message.content or ""


def message(d: Daemon, key: str, model: str = "mock-anthropic") -> str:
    answer = claude(d, key).messages.create(model=model, max_tokens=64, messages=MESSAGES)
    return "".join(getattr(block, "text", "") for block in answer.content)


def wait_until(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


# --- the CLI -----------------------------------------------------------------------------------------------------


def test_keys_cli_create_list_revoke(tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    out = keys_cli(
        db, "create", "--name", "ci-bot", "--routes", "fast,mock", "--budget-usd", "5", "--period", "day",
        "--tpm", "20000", "--rpm", "60", "--expires", "30d",
    ).stdout  # fmt: skip
    key = next(line.strip() for line in out.splitlines() if line.strip().startswith("tr-"))
    assert out.count(key) == 1
    assert "Created client key 'ci-bot'" in out and "cannot show it again" in out
    assert "Routes: fast,mock  budget: $5/day  tpm: 20000  rpm: 60" in out
    assert len(key) > 50 and keys.key_id_of(key) is not None

    second = create(db, "laptop")
    table = keys_cli(db, "list").stdout.splitlines()
    assert table[0].split() == ["ID", "NAME", "ROUTES", "BUDGET", "SPENT", "TPM", "RPM", "EXPIRES", "CREATED", "STATUS"]
    assert len(table) == 3
    ci_row, laptop_row = table[1].split(), table[2].split()
    assert ci_row[:7] == [keys.key_id_of(key), "ci-bot", "fast,mock", "$5/day", "$0.0000", "20000", "60"]
    assert ci_row[-1] == "active"
    assert laptop_row[1:3] == ["laptop", "all"] and laptop_row[-1] == "active"

    # A duplicate active name is refused; revoking by name, then by id (already revoked) says so.
    dup = keys_cli(db, "create", "--name", "ci-bot", check=False)
    assert dup.returncode == 1 and "already exists" in dup.stderr
    assert "Revoked client key 'ci-bot'" in keys_cli(db, "revoke", "ci-bot").stdout
    again = keys_cli(db, "revoke", str(keys.key_id_of(key)), check=False)
    assert again.returncode == 1 and "already revoked" in again.stderr
    listed = json.loads(keys_cli(db, "list", "--json").stdout)
    assert {k["name"]: k["status"] for k in listed} == {"ci-bot": "revoked", "laptop": "active"}
    assert all("hash" not in k and "salt" not in k for k in listed)
    # The name is free again once revoked.
    create(db, "ci-bot")

    # Never stored in plaintext: neither key nor its secret part is anywhere in the database files.
    for path in tmp_path.glob("usage.db*"):
        data = path.read_bytes()
        for k in (key, second):
            assert k.encode() not in data and k[16:].encode() not in data  # tr-<12-hex id>-<secret>


def test_keys_cli_rejects_bad_arguments(tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    for args, message in (
        (["--name", "x", "--period", "day"], "--period needs --budget-usd"),
        (["--name", "x", "--tpm", "0"], "--tpm must be greater than 0"),
        (["--name", "has space"], "--name"),
        (["--name", "x", "--expires", "2001-01-01"], "in the past"),
        (["--name", "x", "--expires", "someday"], "cannot read --expires"),
    ):
        proc = keys_cli(db, "create", *args, check=False)
        assert proc.returncode == 1 and message in proc.stderr, (args, proc.stderr)
    assert "No client keys" in keys_cli(db, "list").stdout


# --- the daemon ----------------------------------------------------------------------------------------------------


@pytest.fixture
def keyed(tmp_path: Path, mock_upstream: MockUpstream, daemon_factory: Callable[..., Daemon]) -> dict[str, Any]:
    """A daemon with keys: alice (route fast only), bob (all routes), carol (revoked), dave (expired)."""
    db = tmp_path / "keys.db"
    alice = create(db, "alice", "--routes", "fast")
    bob = create(db, "bob")
    carol = create(db, "carol")
    keys_cli(db, "revoke", "carol")
    dave, _ = keys.create_key(db, "dave", expires_at=time.time() - 1, now=time.time() - 10)
    d = daemon_factory(route_config("fast", mock_upstream), args=["--db", str(db)], env={"TOKENRELAY_ADMIN_KEY": ADMIN})
    return {"daemon": d, "db": db, "alice": alice, "bob": bob, "carol": carol, "dave": dave}


def test_relay_needs_a_valid_key_in_each_api_shape(keyed: dict[str, Any]) -> None:
    d: Daemon = keyed["daemon"]
    assert chat(d, keyed["alice"]) and message(d, keyed["bob"])
    cases = [
        ("sk-not-a-tokenrelay-key", "invalid client key"),
        (keyed["alice"][:-4] + "AAAA", "invalid client key"),  # right id, wrong secret
        (keyed["carol"], "'carol' was revoked"),
        (keyed["dave"], "'dave' expired at"),
    ]
    for key, text in cases:
        with pytest.raises(openai.AuthenticationError) as oerr:
            chat(d, key)
        assert oerr.value.status_code == 401 and text in oerr.value.message
        assert oerr.value.body["type"] == "authentication_error"  # type: ignore[index]
        with pytest.raises(anthropic.AuthenticationError) as aerr:
            message(d, key)
        assert aerr.value.status_code == 401
        assert aerr.value.body == {"type": "error", "error": {"type": "authentication_error", "message": ANY(text)}}
    # The raw shape with no credentials at all.
    status, body, headers = http("POST", f"{d.base_url}/chat/completions", None, {"model": "fast"})
    assert status == 401 and body["error"]["code"] == "invalid_api_key" and headers["www-authenticate"] == "Bearer"
    assert "needs a client key" in body["error"]["message"]
    status, body, _ = http("POST", f"{d.base_url}/messages", None, {"model": "mock-anthropic"})
    assert status == 401 and body["type"] == "error" and body["error"]["type"] == "authentication_error"


class ANY:
    """Equal to any string containing `part`."""

    def __init__(self, part: str) -> None:
        self.part = part

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and self.part in other

    def __repr__(self) -> str:
        return f"ANY({self.part!r})"


def test_route_restriction_is_403_and_requests_carry_the_key_name(keyed: dict[str, Any]) -> None:
    d: Daemon = keyed["daemon"]
    with pytest.raises(openai.PermissionDeniedError) as oerr:
        chat(d, keyed["alice"], model="mock")
    assert "may not use route 'mock' (allowed: fast)" in oerr.value.message
    with pytest.raises(anthropic.PermissionDeniedError) as aerr:
        message(d, keyed["alice"])
    assert aerr.value.body["error"]["type"] == "permission_error"  # type: ignore[index]
    chat(d, keyed["alice"])
    chat(d, ADMIN, model="mock")  # the admin key relays too, unrestricted
    records = d.wait_records(4)
    by_name = {(r["key_name"], r["route"], r["status"]) for r in records}
    alice_id = keys.key_id_of(keyed["alice"])
    assert ("alice", "mock", 403) in by_name and ("alice", "mock-anthropic", 403) in by_name
    assert ("alice", "fast", 200) in by_name and ("admin", "mock", 200) in by_name
    assert {r["key_id"] for r in records if r["key_name"] == "alice"} == {alice_id}
    assert all(keyed["alice"] not in json.dumps(r) for r in records)


def test_admin_api_and_usage_scopes(keyed: dict[str, Any]) -> None:
    d: Daemon = keyed["daemon"]
    chat(d, keyed["alice"])
    chat(d, keyed["bob"])
    chat(d, keyed["bob"])
    for path in ("/admin/keys", "/admin/routes", "/metrics"):
        assert http("GET", d.url + path)[0] == 401
        assert http("GET", d.url + path, keyed["bob"])[0] == 403
        assert http("GET", d.url + path, ADMIN)[0] == 200
    assert http("GET", d.url + "/usage")[0] == 401
    assert http("GET", d.url + "/healthz")[0] == 200
    # The model list (served by the own front end) is a client call: it needs a client key, like the calls.
    status, body, _ = http("GET", d.url + "/v1/models")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert http("GET", d.url + "/v1/models", keyed["bob"])[0] == 200

    # A client key reads its own usage only, whatever key_id it asks for; the admin reads all of it.
    alice_id, bob_id = keys.key_id_of(keyed["alice"]), keys.key_id_of(keyed["bob"])
    for key, query, expected in (
        (keyed["alice"], "", {alice_id: 1}),
        (keyed["alice"], f"&key_id={bob_id}", {alice_id: 1}),
        (keyed["bob"], "", {bob_id: 2}),
        (ADMIN, "", {alice_id: 1, bob_id: 2}),
    ):
        status, body, _ = http("GET", f"{d.url}/usage?group_by=key{query}", key)
        assert status == 200
        assert {r["key_id"]: r["requests"] for r in body["rows"]} == expected
    status, body, _ = http("GET", f"{d.url}/usage/requests", keyed["alice"])
    assert status == 200 and {r["key_name"] for r in body["requests"]} == {"alice"}

    # Create, use and revoke a key over HTTP.
    status, created, _ = http("POST", f"{d.url}/admin/keys", ADMIN, {"name": "eve", "routes": ["fast"], "rpm": 5})
    assert status == 201 and created["key"].startswith("tr-") and created["rpm"] == 5
    assert chat(d, created["key"])
    status, listed, _ = http("GET", f"{d.url}/admin/keys", ADMIN)
    assert {k["name"]: k["status"] for k in listed["keys"]} == {
        "alice": "active", "bob": "active", "carol": "revoked", "dave": "expired", "eve": "active",
    }  # fmt: skip
    assert all("hash" not in k and "key" not in k for k in listed["keys"])
    assert http("POST", f"{d.url}/admin/keys", ADMIN, {"name": "eve"})[0] == 400
    assert http("DELETE", f"{d.url}/admin/keys/eve", ADMIN)[0] == 200
    assert http("DELETE", f"{d.url}/admin/keys/nobody", ADMIN)[0] == 404
    with pytest.raises(openai.AuthenticationError, match="revoked"):
        chat(d, created["key"])


def test_daemon_sees_keys_created_and_revoked_after_it_started(
    tmp_path: Path, mock_upstream: MockUpstream, daemon_factory: Callable[..., Daemon]
) -> None:
    db = tmp_path / "keys.db"
    d = daemon_factory(route_config("fast", mock_upstream), args=["--db", str(db)])
    assert chat(d, "any-identity")  # loopback, no keys: any key is only a metering identity
    assert http("GET", d.url + "/usage")[0] == 200
    # The admin API is off without TOKENRELAY_ADMIN_KEY.
    status, body, _ = http("GET", d.url + "/admin/keys")
    assert status == 403 and "TOKENRELAY_ADMIN_KEY" in body["error"]["message"]

    key = create(db, "late")
    assert wait_until(lambda: _status(lambda: chat(d, "any-identity")) == 401)
    assert chat(d, key)
    keys_cli(db, "revoke", "late")
    assert wait_until(lambda: _status(lambda: chat(d, key)) == 401)
    # Revoking the last key does not open the proxy again.
    assert _status(lambda: chat(d, "any-identity")) == 401


def _status(call: Callable[[], object]) -> int:
    try:
        call()
    except openai.APIStatusError as exc:
        return exc.status_code
    return 200


def test_non_loopback_without_keys_refuses_to_start(tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    cmd = [sys.executable, "-m", "tokenrelay", "serve", "--listen", "0.0.0.0:0", "--db", str(db)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "refusing to listen on 0.0.0.0:0 without client keys" in proc.stderr
    assert f"tokenrelay keys create --name my-agent --db {db}" in proc.stderr
    # With a key it starts (no traffic is sent to the non-loopback address).
    create(db, "agent")
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as server:
        assert server.stdout is not None
        line = server.stdout.readline()
        server.terminate()
        server.wait(10)
    assert line.startswith("tokenrelay listening on http://0.0.0.0:")


def test_short_admin_key_refuses_to_start(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "tokenrelay", "serve", "--listen", "127.0.0.1:0", "--db", str(tmp_path / "u.db")]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=30, env={**_env(), "TOKENRELAY_ADMIN_KEY": "short"}
    )
    assert proc.returncode == 2 and "shorter than 16 characters" in proc.stderr


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)
