"""``herald serve`` and ``herald token`` as an operator runs them: real
processes on free loopback ports, bounded waits, each server stopped by its
own PID."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from herald_presence import server
from herald_presence.protocol.client.agent import AgentClient
from herald_presence.protocol.client.base import Disconnected, Refused
from herald_presence.protocol.client.visitor import VisitorClient
from herald_presence.protocol.errors import CloseCode, ErrorCode

from .processes import (
    CLI_TIMEOUT,
    HERALD,
    REPO,
    STOP_TIMEOUT,
    HeraldProcess,
    StartServer,
    clean_env,
    free_port,
    get_json,
    start_server,
)


def run_cli(*args: str, timeout: float = CLI_TIMEOUT, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run ``herald ARGS`` with ``stdin`` to completion (killed after ``timeout``) and capture its output."""
    return subprocess.run(
        [str(HERALD), *args],
        cwd=REPO,
        env=clean_env(),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def mint(role: str, group: str, subject: str, secret: str, *options: str) -> str:
    """A token made the way the README says: ``herald token <role> --group --id``, the
    secret on standard input (never on the command line, where ``ps`` shows it)."""
    result = run_cli("token", role, "--group", group, "--id", subject, *options, stdin=secret + "\n")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def jwt_parts(token: str) -> tuple[dict[str, object], dict[str, object]]:
    """A JWT's header and claims, as JSON (unverified)."""
    header, claims, _signature = token.split(".")
    return tuple(json.loads(base64.urlsafe_b64decode(part + "==")) for part in (header, claims))  # type: ignore[return-value]


def test_token_without_a_secret_on_stdin_is_one_clear_error() -> None:
    result = run_cli("token", "visitor", "--group", "acme", "--id", "v1")
    assert result.returncode == 1 and result.stderr.startswith("herald: no secret on standard input"), result.stderr


@pytest.fixture
def run_herald(tmp_path: Path) -> Iterator[StartServer]:
    """``run_herald(*argv)`` starts a ready server; every one is stopped afterwards."""
    started: list[HeraldProcess] = []

    def start(*argv: str) -> HeraldProcess:
        process = start_server(tmp_path, *argv)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HeraldProcess]:
    """``herald serve`` with nothing configured at all."""
    process = start_server(tmp_path_factory.mktemp("demo"), str(HERALD), "serve", "--grace-period", "0.5")
    try:
        yield process
    finally:
        process.stop()


def demo_banner(stdout: str) -> tuple[str, str]:
    """The (group, secret) a zero-config server printed."""
    assert "DEMO MODE" in stdout, stdout
    group = re.search(r"^\s*group: (\S+)\s*$", stdout, re.MULTILINE)
    secret = re.search(r"^\s*secret: (\S+)", stdout, re.MULTILINE)
    assert group and secret, f"no group/secret in the demo banner:\n{stdout}"
    return group[1], secret[1]


async def test_zero_config_server_prints_a_demo_secret_that_works(demo_server: HeraldProcess) -> None:
    group, secret = demo_banner(demo_server.stdout())
    assert group == "demo"
    assert len(secret) >= 16

    token = await asyncio.to_thread(mint, "visitor", group, "v1", secret)
    visitor = VisitorClient(demo_server.base_url, group, "v1", token, reconnect=False)
    try:
        async with asyncio.timeout(10):
            welcome = await visitor.connect()
    finally:
        await visitor.close()
    assert (welcome.role, welcome.group, welcome.visitor) == ("visitor", "demo", "v1")


async def test_zero_config_server_gives_its_demo_pages_credentials_that_work(demo_server: HeraldProcess) -> None:
    """The console and demo pages of a zero-config server work with nothing typed in."""
    assert "/console" in demo_server.stdout()
    async with aiohttp.ClientSession() as http:
        async with http.get(demo_server.base_url + "/demo/credentials") as response:
            assert await response.json() == {"group": "demo"}
        async with http.post(demo_server.base_url + "/demo/credentials", json={"role": "visitor", "id": "v2"}) as r:
            token = (await r.json())["token"]
    visitor = VisitorClient(demo_server.base_url, "demo", "v2", token, reconnect=False)
    try:
        async with asyncio.timeout(10):
            assert (await visitor.connect()).visitor == "v2"
    finally:
        await visitor.close()


async def test_demo_server_refuses_a_token_signed_with_another_secret(demo_server: HeraldProcess) -> None:
    group, _ = demo_banner(demo_server.stdout())
    forged = await asyncio.to_thread(mint, "visitor", group, "v1", "not-the-demo-secret-0123456789")
    visitor = VisitorClient(demo_server.base_url, group, "v1", forged)  # reconnecting, as an app would
    try:
        async with asyncio.timeout(10):  # a refusal is final, not retried forever
            with pytest.raises(Refused) as refused:
                await visitor.connect()
    finally:
        await visitor.close()
    assert refused.value.code == ErrorCode.UNAUTHORIZED


async def test_herald_token_jwt_mints_credentials_a_live_server_takes(demo_server: HeraldProcess) -> None:
    """``--jwt``: an HS256 JWT with exactly the server's claims; a visitor connects with it, an
    agent logs in and connects with it, a back end reads the audit trail with it."""
    group, secret = demo_banner(demo_server.stdout())
    visitor_jwt = await asyncio.to_thread(mint, "visitor", group, "v-jwt", secret, "--jwt", "--ttl", "600")
    agent_jwt = await asyncio.to_thread(mint, "agent", group, "alice", secret, "--jwt")
    api = await asyncio.to_thread(run_cli, "token", "api", "--group", group, "--jwt", stdin=secret + "\n")
    assert api.returncode == 0, api.stderr
    api_jwt = api.stdout.strip()

    header, claims = jwt_parts(visitor_jwt)
    assert header == {"alg": "HS256", "typ": "JWT"}
    assert set(claims) == {"sub", "group", "role", "aud", "iat", "exp"}
    assert (claims["sub"], claims["group"], claims["role"], claims["aud"]) == ("v-jwt", group, "visitor", "herald")
    assert claims["exp"] == claims["iat"] + 600 and abs(claims["iat"] - time.time()) < 30  # type: ignore[operator]
    assert jwt_parts(api_jwt)[1]["sub"] == group and jwt_parts(api_jwt)[1]["role"] == "api"

    visitor = VisitorClient(demo_server.base_url, group, "v-jwt", visitor_jwt, reconnect=False)
    agent = AgentClient(demo_server.base_url, group, "alice", agent_jwt, reconnect=False)
    try:
        async with asyncio.timeout(10):
            assert (await visitor.connect()).visitor == "v-jwt"
            welcome = await agent.connect()  # logs in with the key (POST /v1/agent/login), then connects
    finally:
        await visitor.close()
        await agent.close()
    assert (welcome.role, welcome.agent) == ("agent", "alice")
    headers = {"Authorization": f"Bearer {api_jwt}"}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{demo_server.base_url}/v1/groups/{group}/events", headers=headers) as response:
            assert response.status == 200, await response.text()
        forged = await asyncio.to_thread(mint, "visitor", group, "v-jwt", "not-the-demo-secret-0123456789", "--jwt")
        refused = VisitorClient(demo_server.base_url, group, "v-jwt", forged, reconnect=False)
        try:
            async with asyncio.timeout(10):
                with pytest.raises(Refused) as refusal:
                    await refused.connect()
        finally:
            await refused.close()
    assert refusal.value.code == ErrorCode.UNAUTHORIZED


def test_herald_token_jwt_takes_the_groups_audience_and_refuses_what_it_cannot_sign(tmp_path: Path) -> None:
    config = tmp_path / "herald.toml"
    config.write_text('[groups.acme]\nsecrets = ["cli-secret-0123456789"]\njwt_audience = "acme-crm"\n')
    made = run_cli("token", "visitor", "--group", "acme", "--id", "v1", "--jwt", "--config", str(config))
    assert made.returncode == 0, made.stderr
    assert jwt_parts(made.stdout.strip())[1]["aud"] == "acme-crm"
    chosen = run_cli("token", "agent", "--group", "acme", "--id", "a", "--jwt", "--audience", "other", "--config",
                     str(config))  # fmt: skip
    assert jwt_parts(chosen.stdout.strip())[1]["aud"] == "other"
    v1 = run_cli("token", "visitor", "--group", "acme", "--id", "v1", "--audience", "x", stdin="cli-secret-0123456789")
    assert v1.returncode == 1 and "--audience is for JWTs" in v1.stderr, v1.stderr
    short = run_cli("token", "visitor", "--group", "acme", "--id", "v1", "--jwt", stdin="short\n")
    assert short.returncode == 1 and short.stdout == "", short.stderr  # the same checks as for v1 tokens


def test_demo_secrets_differ_between_starts(demo_server: HeraldProcess, run_herald: StartServer) -> None:
    _, first = demo_banner(demo_server.stdout())
    _, second = demo_banner(run_herald(str(HERALD), "serve").stdout())
    assert first != second


def test_python_dash_m_server_serves_too(run_herald: StartServer) -> None:
    process = run_herald(
        sys.executable, "-m", "herald_presence.server", "serve", "--group", "acme=cli-secret-0123456789"
    )
    health = get_json(process.base_url + "/healthz")
    assert health == {"status": "ok", "version": server.__version__}
    assert "DEMO MODE" not in process.stdout()  # a configured group means no demo group


def test_a_malformed_setting_stops_the_server_with_a_clear_message() -> None:
    result = run_cli("serve", "--port", str(free_port()), "--grace-period", "nope")
    assert result.returncode != 0
    assert "grace_period" in result.stderr and "'nope'" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_an_unknown_key_in_the_toml_file_stops_the_server(tmp_path: Path) -> None:
    config = tmp_path / "herald.toml"
    config.write_text('grace_peroid = 1.0\n\n[groups.acme]\nsecrets = ["cli-secret-0123456789"]\n')
    result = run_cli("serve", "--port", str(free_port()), "--config", str(config))
    assert result.returncode != 0
    assert "grace_peroid" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


async def test_sigterm_tells_clients_to_reconnect_and_exits_within_seconds(run_herald: StartServer) -> None:
    secret = "cli-secret-0123456789"
    argv = [str(HERALD), "serve", "--group", f"acme={secret}", "--drain-spread", "1", "--drain-timeout", "4"]
    process = await asyncio.to_thread(run_herald, *argv)
    token = await asyncio.to_thread(mint, "visitor", "acme", "v1", secret)
    visitor = VisitorClient(process.base_url, "acme", "v1", token, reconnect=False)
    try:
        async with asyncio.timeout(10):
            await visitor.connect()
        process.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        async with asyncio.timeout(STOP_TIMEOUT):
            gone = await visitor.wait_for(Disconnected, timeout=None)
        try:
            code = await asyncio.to_thread(process.proc.wait, STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"herald still running {STOP_TIMEOUT}s after SIGTERM\n{process.output()}")
        took = time.monotonic() - started
    finally:
        await visitor.close()
    assert gone.code == CloseCode.RECONNECT  # drained: "reconnect", which the SDK does
    assert code == 0, f"exit code {code} after {took:.1f}s\n{process.output()}"
