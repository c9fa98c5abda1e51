"""What operators rely on: the drain on SIGTERM, health and readiness, the
metrics' values, JSON logs and ``--workers``. Each is checked through the
server's own surface (HTTP, websockets, signals to real processes)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from herald_presence.protocol import tokens
from herald_presence.protocol.client.agent import AgentClient
from herald_presence.protocol.client.base import Disconnected
from herald_presence.protocol.client.visitor import VisitorClient
from herald_presence.protocol.errors import CloseCode, RequestFailed
from herald_presence.server.process.drain import drain
from herald_presence.server.web.keys import HUB

from .conftest import Start
from .harness import SECRET, HeraldServer, changed, sample, scrape
from .processes import HERALD, STOP_TIMEOUT, HeraldProcess, free_port, get_json, start_server
from .redis_server import RedisServer

# --- metrics ------------------------------------------------------------------


async def test_metrics_count_connections_messages_errors_and_deliveries(start_herald: Start) -> None:
    herald = await start_herald()
    before = await scrape(herald.base_url)
    visitor = await herald.visitor("m1")
    agent = await herald.agent("metrics-agent")
    await agent.subscribe(["m1"])
    assert await agent.show_terms("m1") == 1
    with pytest.raises(RequestFailed):
        await agent.show_terms("nobody-here")
    async with herald.raw_visitor("raw-metrics") as raw:
        await raw.send_bytes(b"\xc1 not msgpack")
        await raw.receive_bytes(timeout=5)
        during = await scrape(herald.base_url)

    def delta(name: str, **labels: str) -> float:
        return sample(during, name, **labels) - sample(before, name, **labels)

    assert delta("herald_connections", role="visitor") == 2  # the SDK visitor and the raw one
    assert delta("herald_connections", role="agent") == 1
    assert delta("herald_connections_opened_total", role="visitor") == 2
    assert delta("herald_messages_received_total", role="agent", type="subscribe") == 1
    assert delta("herald_messages_received_total", role="agent", type="signal") == 2
    assert delta("herald_messages_sent_total", role="visitor", type="welcome") == 2
    assert delta("herald_messages_sent_total", role="visitor", type="signal") == 1
    assert delta("herald_messages_sent_total", role="agent", type="snapshot") == 1
    assert delta("herald_errors_total", code="visitor_offline") == 1
    assert delta("herald_errors_total", code="bad_frame") == 1
    assert delta("herald_signal_delivery_seconds_count", outcome="delivered") == 1
    assert delta("herald_signal_delivery_seconds_count", outcome="error") == 1
    assert sample(during, "herald_backend_up") == 1
    assert sample(during, "herald_draining") == 0
    assert sample(during, "process_resident_memory_bytes") > 10 * 2**20

    await visitor.close()
    await agent.close()
    for _ in range(100):  # the handlers finish just after the clients see the close
        after = await scrape(herald.base_url)
        if sample(after, "herald_connections", role="visitor") == sample(before, "herald_connections", role="visitor"):
            break
        await asyncio.sleep(0.02)
    assert sample(after, "herald_connections", role="agent") == sample(before, "herald_connections", role="agent")


async def test_held_signals_are_a_gauge_and_their_outcomes_are_counted(start_herald: Start) -> None:
    herald = await start_herald(grace_period=5, signal_hold=1.5)
    before = await scrape(herald.base_url)
    agent = await herald.agent("holder")
    for outcome in ("delivered", "expired"):
        visitor = await herald.visitor(f"away-{outcome}")
        await visitor.close()  # away: its grace period runs, so signals to it are held
        sent = asyncio.create_task(agent.show_terms(f"away-{outcome}"))
        for _ in range(100):
            held = sample(await scrape(herald.base_url), "herald_held_signals")
            if held == sample(before, "herald_held_signals") + 1:
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the held signal never showed in herald_held_signals")
        if outcome == "delivered":
            await herald.visitor(f"away-{outcome}")
            assert await sent == 1
        else:
            with pytest.raises(RequestFailed) as expired:
                await sent
            assert expired.value.code == "signal_expired"
    after = await scrape(herald.base_url)
    assert sample(after, "herald_held_signals") == sample(before, "herald_held_signals")
    for outcome in ("delivered", "expired"):
        counted = sample(after, "herald_held_signals_resolved_total", outcome=outcome)
        assert counted == sample(before, "herald_held_signals_resolved_total", outcome=outcome) + 1


# --- drain ----------------------------------------------------------------------


async def test_a_draining_instance_is_not_ready_and_refuses_new_clients(herald: HeraldServer) -> None:
    herald.app[HUB].draining = True  # what SIGTERM does first, before the listener closes
    async with aiohttp.ClientSession() as session:
        async with session.get(herald.base_url + "/readyz") as response:
            assert response.status == 503
            assert (await response.json())["draining"] is True
        async with session.get(herald.base_url + "/healthz") as response:
            assert response.status == 200  # alive: draining is not a reason to be restarted
        async with session.get(herald.base_url + "/v1/visitor") as response:
            assert response.status == 503
            assert response.headers["Retry-After"] == "1"
            assert (await response.json())["error"]["code"] == "draining"
    assert sample(await scrape(herald.base_url), "herald_draining") == 1


async def test_drain_moves_every_client_at_spread_out_moments_and_answers_requests_first(
    start_herald: Start,
) -> None:
    herald = await start_herald(drain_spread=0.6, drain_timeout=6, grace_period=5, signal_hold=1.0)
    visitors = [await herald.visitor(f"d{i}", reconnect=False) for i in range(20)]
    agent = await herald.agent("drained-agent", reconnect=False)
    away = await herald.visitor("away", reconnect=False)
    await away.close()  # a signal to it is held for signal_hold: a request in hand when the drain starts
    held = asyncio.create_task(agent.show_terms("away"))
    await asyncio.sleep(0.1)

    started = time.monotonic()
    draining = asyncio.create_task(drain(herald.app, [herald.site]))
    await asyncio.sleep(0.05)
    with pytest.raises(OSError):  # the listener is closed: a load balancer tries another instance
        await asyncio.open_connection("127.0.0.1", herald.port)
    gone = await asyncio.gather(*(v.wait_for(Disconnected, timeout=5) for v in visitors))
    closed_at = [time.monotonic() - started for _ in gone]
    took = await asyncio.wait_for(draining, 10)

    assert {event.code for event in gone} == {CloseCode.RECONNECT}
    # The request in hand was answered before the agent was asked to move.
    with pytest.raises(RequestFailed) as answer:
        await held
    assert answer.value.code == "signal_expired"
    agent_gone = await agent.wait_for(Disconnected, timeout=5)
    assert agent_gone.code == CloseCode.RECONNECT
    assert took < 6, f"the drain took {took:.2f}s, over drain_timeout"
    assert max(closed_at) <= 6
    assert not herald.app[HUB].visitors


async def test_drain_closes_stragglers_at_the_deadline(start_herald: Start) -> None:
    """A request that is never answered in time does not hold the process."""
    herald = await start_herald(drain_spread=0.1, drain_timeout=3, grace_period=10, signal_hold=30)
    agent = await herald.agent("patient", reconnect=False)
    away = await herald.visitor("long-away", reconnect=False)
    await away.close()
    held = asyncio.create_task(agent.show_terms("long-away"))
    await asyncio.sleep(0.1)
    took = await asyncio.wait_for(drain(herald.app, [herald.site]), 10)
    assert 0.4 < took < 3, f"the drain took {took:.2f}s with drain_timeout 3"
    await herald.runner.cleanup()  # what the process does next: what is left closes now
    with pytest.raises(RequestFailed):
        await asyncio.wait_for(held, 5)


# --- processes: JSON logs and workers --------------------------------------------


def test_json_logs_name_the_connection(tmp_path: Path) -> None:
    server = start_server(
        tmp_path, str(HERALD), "serve", "--group", f"acme={SECRET}", "--log-format", "json", "--log-level", "DEBUG"
    )
    try:
        welcome = asyncio.run(_connect_once(server.base_url))
    finally:
        server.stop()
    lines = [line for line in server.stderr_path.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert {"time", "level", "logger", "message"} <= set(records[0])
    assert all(record.get("instance") for record in records if record["logger"].startswith("herald_presence.server"))
    mine = [record["message"] for record in records if record.get("connection") == welcome]
    assert "visitor acme/logged connected" in mine, f"no log line names connection {welcome}:\n" + "\n".join(lines)
    access = [record for record in records if "http" in record]
    assert any(record["http"]["path"] == "/v1/visitor" for record in access)


async def _connect_once(base_url: str) -> str:
    visitor = VisitorClient(base_url, "acme", "logged", tokens.visitor_token(SECRET, "acme", "logged"))
    try:
        await visitor.connect()
        assert visitor.welcome is not None
        return visitor.welcome.connection
    finally:
        await visitor.close()


async def test_workers_share_the_port_as_instances_of_one_cluster(tmp_path: Path, redis_server: RedisServer) -> None:
    process = _two_workers(tmp_path, redis_server, drain_timeout=5)
    base = process.base_url
    clients: list[VisitorClient | AgentClient] = []
    try:
        instances = await asyncio.to_thread(_instances_answering, base, 2)
        assert len(instances) == 2, f"one port, {len(instances)} instances answered:\n{process.output()}"
        agent = AgentClient(base, "acme", "watcher", tokens.agent_key(SECRET, "acme", "watcher"))
        clients.append(agent)
        await agent.connect()
        await agent.subscribe_group()
        # 16 visitors land on the agent's worker alone with odds of 1 in 65536: the
        # agent sees visitors of the other worker, over Redis.
        for i in range(16):
            visitor = VisitorClient(base, "acme", f"w{i}", tokens.visitor_token(SECRET, "acme", f"w{i}"))
            clients.append(visitor)
            await visitor.connect()
        for i in range(16):
            await agent.wait_for(changed("online", f"w{i}"), timeout=10)
        started = time.monotonic()
        process.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.proc.wait, 5 + STOP_TIMEOUT)
        took = time.monotonic() - started
    finally:
        for client in clients:
            await client.close()
        process.kill()
    assert code == 0, process.output()
    assert took < 5 + 1, f"{took:.1f}s from SIGTERM to exit with drain_timeout 5"


def _two_workers(tmp_path: Path, redis: RedisServer, drain_timeout: int) -> HeraldProcess:
    """``herald serve --workers 2`` on a free port, not yet ready (the caller waits for both)."""
    port = free_port()
    argv = [
        str(HERALD), "serve", "--port", str(port), "--group", f"acme={SECRET}", "--workers", "2",
        "--redis-url", redis.url, "--redis-prefix", f"w{port}", "--drain-spread", str(drain_timeout / 10),
        "--drain-timeout", str(drain_timeout),
    ]  # fmt: skip
    return HeraldProcess(argv, port, tmp_path)


def _instances_answering(base: str, want: int) -> set[str]:
    """Instance IDs behind one port: fresh connections land on different workers."""
    seen: set[str] = set()
    deadline = time.monotonic() + 20
    while len(seen) < want and time.monotonic() < deadline:
        try:
            seen.add(get_json(base + "/readyz")["instance"])
        except OSError:
            time.sleep(0.05)
    return seen


def test_a_worker_that_dies_is_started_again(tmp_path: Path, redis_server: RedisServer) -> None:
    process = _two_workers(tmp_path, redis_server, drain_timeout=3)
    try:
        assert len(_instances_answering(process.base_url, 2)) == 2, process.output()
        workers = _children(process.proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[0], signal.SIGKILL)  # as the OOM killer would
        deadline = time.monotonic() + 15
        while len(replaced := _children(process.proc.pid)) < 2 or workers[0] in replaced:
            assert time.monotonic() < deadline, f"no worker replaced {workers[0]}:\n{process.output()}"
            time.sleep(0.1)
        assert process.proc.poll() is None, "the supervisor must outlive its worker"
        assert len(_instances_answering(process.base_url, 2)) == 2, "the new worker answers on the port"
        process.proc.send_signal(signal.SIGTERM)
        assert process.proc.wait(3 + STOP_TIMEOUT) == 0, process.output()
    finally:
        process.kill()


def _children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (Linux /proc)."""
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return [int(child) for child in children.read().split()]
