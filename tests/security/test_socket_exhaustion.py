"""Sockets that hold a file descriptor and never finish a request: sockets that
send nothing, requests whose headers or body trickle in, floods of either from
one address. Each accepted socket is counted before a byte is read (at most
``max_connections_per_address`` open at once from one address, and
``max_connections`` in all), a request must arrive within ``request_timeout``,
and refusals are counted in ``/metrics`` and logged once, not per socket
(``server/web/listener.py``).

All of it happens at accept, below the backend, so these run on the memory
backend only. Clients at another address bind 127.0.0.2, which Linux's
loopback answers like 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from herald_presence.server.web import listener

from ..harness import SECRET, HeraldServer, settings
from ..processes import HERALD, HeraldProcess, start_server
from .helpers import assert_bystanders_served, show_terms_round_trip

CAP = 50  # max_connections_per_address in these tests
TIMEOUT = 2.0  # request_timeout in these tests: seconds
OTHER = "127.0.0.2"  # another client address on the loopback
HALF_SENT = b"GET /healthz HTTP/1.1\r\nHost: herald\r\nX-Slow: "

Start = Callable[..., Awaitable[HeraldServer]]
Socket = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    started: list[HeraldServer] = []

    async def start(**overrides: Any) -> HeraldServer:
        server = await HeraldServer(settings(**overrides)).start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


async def connect(herald: HeraldServer | HeraldProcess, source: str = "127.0.0.1", send: bytes = b"") -> Socket:
    reader, writer = await asyncio.open_connection("127.0.0.1", herald.port, local_addr=(source, 0))
    if send:
        writer.write(send)
        await writer.drain()
    return reader, writer


async def closed_after(sock: Socket, limit: float) -> float | None:
    """Seconds until the server closed (or reset) this socket, whatever it sent
    before; None if it is still open after ``limit`` seconds."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        async with asyncio.timeout(limit):
            while await sock[0].read(4096):
                pass
    except TimeoutError:
        return None
    except ConnectionError:
        pass
    return loop.time() - started


def close_all(socks: list[Socket]) -> None:
    for _, writer in socks:
        writer.close()


async def limit_hits(herald: HeraldServer | HeraldProcess, limit: str, source: str = OTHER) -> float:
    """``herald_limit_hits_total{limit}``, scraped from ``source``."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=connector) as http, http.get(herald.base_url + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "herald_limit_hits_total" and sample.labels == {"limit": limit}:
                return sample.value
    return 0.0


async def test_idle_sockets_from_one_address_are_capped_and_timed_out(start: Start) -> None:
    herald = await start(max_connections_per_address=CAP, request_timeout=TIMEOUT)
    hits = await limit_hits(herald, "max_connections_per_address")
    socks = [await connect(herald) for _ in range(CAP + 20)]  # none of them sends a byte
    fates = [asyncio.create_task(closed_after(sock, TIMEOUT + 3)) for sock in socks]
    try:
        await asyncio.sleep(0.5)
        refused = [fate for fate in fates if fate.done()]
        assert len(refused) == 20, f"{len(socks) - len(refused)} idle sockets held open from one address, not {CAP}"
        # While the address holds its cap, its next socket is closed at once too...
        extra = await connect(herald)
        assert await closed_after(extra, 1.0) is not None
        close_all([extra])
        # ...every refusal is counted, and a client at another address is served.
        assert await limit_hits(herald, "max_connections_per_address") - hits == 21
        await assert_bystanders_served(herald.base_url, source=OTHER)
        # The held sockets are closed once request_timeout has passed without a request.
        lasted = [await fate for fate in fates if fate not in refused]
        assert all(seconds is not None and TIMEOUT * 0.8 <= seconds <= TIMEOUT + 1.5 for seconds in lasted), (
            f"idle sockets lasted {sorted(lasted, key=lambda s: s or 1e9)[::10]}s with request_timeout {TIMEOUT}s"
        )
    finally:
        close_all(socks)
        await asyncio.gather(*fates)
    # An idle keep-alive connection, after a request, is closed after request_timeout too.
    keep_alive = await connect(herald, send=b"GET /healthz HTTP/1.1\r\nHost: herald\r\n\r\n")
    assert (await keep_alive[0].readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
    idle = await closed_after(keep_alive, TIMEOUT + 3)
    close_all([keep_alive])
    assert idle is not None and TIMEOUT * 0.8 <= idle <= TIMEOUT + 1.5, idle
    # The address is free again: its own clients are served.
    await assert_bystanders_served(herald.base_url)


async def test_half_sent_http_requests_are_timed_out(start: Start) -> None:
    herald = await start(max_connections_per_address=CAP, request_timeout=TIMEOUT)
    hits = await limit_hits(herald, "request_timeout")
    stop = asyncio.Event()

    async def trickle(sock: Socket) -> None:
        """A header byte every 0.2 s, slowloris-style: progress, never an end."""
        while not stop.is_set():
            try:
                sock[1].write(b"a")
                await sock[1].drain()
            except ConnectionError:
                return
            await asyncio.sleep(0.2)

    idle_half = [await connect(herald, send=HALF_SENT) for _ in range(20)]
    trickled = [await connect(herald, send=HALF_SENT) for _ in range(20)]
    trickling = [asyncio.create_task(trickle(sock)) for sock in trickled]
    # Headers complete, a body that never comes: answered 408 within request_timeout of the headers.
    slow_body = await connect(
        herald,
        send=b"POST /v1/agent/login HTTP/1.1\r\nHost: herald\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"group": ',
    )
    socks = [*idle_half, *trickled]
    try:
        closed = await asyncio.gather(*(closed_after(sock, TIMEOUT + 3) for sock in socks))
        assert all(seconds is not None and seconds <= TIMEOUT + 2.5 for seconds in closed), closed
        status = await asyncio.wait_for(slow_body[0].readuntil(b"\r\n"), TIMEOUT + 3)
        assert status.startswith(b"HTTP/1.1 408"), status
    finally:
        stop.set()
        await asyncio.gather(*trickling)
        close_all([*socks, slow_body])
    assert await limit_hits(herald, "request_timeout") - hits == 1
    await assert_bystanders_served(herald.base_url)


async def test_established_websockets_are_not_timed_out(start: Start) -> None:
    herald = await start(request_timeout=0.5)
    visitor, agent = await herald.visitor("v-long"), await herald.agent("alice")
    await agent.subscribe(["v-long"])
    ids = visitor.connection_id, agent.connection_id
    await asyncio.sleep(2.0)  # four request timeouts, with nothing sent either way
    await show_terms_round_trip(agent, visitor)
    assert (visitor.connection_id, agent.connection_id) == ids, "a websocket was closed and reconnected"
    await assert_bystanders_served(herald.base_url)


async def test_refused_connections_are_counted_and_logged_without_flooding_the_log(
    start: Start, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(listener, "LOG_EVERY", 0.5)
    herald = await start(max_connections_per_address=5, request_timeout=30)
    hits = await limit_hits(herald, "max_connections_per_address")
    caplog.set_level(logging.INFO, logger=listener.__name__)
    held = [await connect(herald) for _ in range(5)]
    refused = [await connect(herald) for _ in range(40)]
    try:
        assert all(await asyncio.gather(*(closed_after(sock, 1.0) for sock in refused)))
        assert await limit_hits(herald, "max_connections_per_address") - hits == 40
        await asyncio.sleep(1.2)  # a summary period and some
        lines = [r.getMessage() for r in caplog.records if r.name == listener.__name__ and "refus" in r.getMessage()]
        assert len(lines) == 2, lines
        assert "from 127.0.0.1" in lines[0] and "max_connections_per_address" in lines[0]
        assert "refused 39 more connections" in lines[1] and "127.0.0.1 (39)" in lines[1]
    finally:
        close_all([*held, *refused])
    await assert_bystanders_served(herald.base_url, source=OTHER)


async def test_a_trusted_proxy_is_not_capped_per_address(start: Start) -> None:
    """Behind a load balancer the TCP peer is the balancer: its connections are
    not counted per address (its clients are, at the upgrade) and keep a long
    keep-alive; an untrusted address is still capped."""
    herald = await start(max_connections_per_address=5, request_timeout=1.0, trusted_proxies="127.0.0.1")
    from_proxy = [await connect(herald) for _ in range(20)]
    from_client = [await connect(herald, source=OTHER) for _ in range(6)]
    try:
        clients = await asyncio.gather(*(closed_after(sock, 0.5) for sock in from_client))
        assert clients[:5] == [None] * 5 and clients[5] is not None, clients
        proxied = await asyncio.gather(*(closed_after(sock, 1.5) for sock in from_proxy))  # 2 s in all
        assert proxied == [None] * 20, "a trusted proxy's connections were refused or timed out"
    finally:
        close_all([*from_proxy, *from_client])
    await assert_bystanders_served(herald.base_url)


async def test_connections_over_the_instance_cap_are_refused_with_a_clear_log_line(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    herald = await start(max_connections=30, request_timeout=30)
    hits = await limit_hits(herald, "max_connections")  # its connection closes with the session
    caplog.set_level(logging.WARNING, logger=listener.__name__)
    await asyncio.sleep(0.3)  # the server sees the scrape's connection close
    held = [await connect(herald) for _ in range(30)]
    try:
        assert await asyncio.gather(*(closed_after(sock, 0.3) for sock in held)) == [None] * 30
        late = await connect(herald, source=OTHER)
        assert await closed_after(late, 1.0) is not None
        close_all([late])
        [line] = [r.getMessage() for r in caplog.records if r.name == listener.__name__]
        assert "max_connections" in line and "open-file limit" in line, line
    finally:
        close_all(held)
    await asyncio.sleep(0.3)  # the server sees them close
    assert await limit_hits(herald, "max_connections") - hits == 1
    await assert_bystanders_served(herald.base_url, source=OTHER)


async def test_herald_serve_listens_through_the_same_budget(tmp_path: Path) -> None:
    """The process (its runner, uvloop) caps, times out, counts and logs like the tests' servers."""
    server = start_server(
        tmp_path, str(HERALD), "serve", "--group", f"acme={SECRET}",
        "--max-connections-per-address", "10", "--request-timeout", "1",
    )  # fmt: skip
    try:
        socks = [await connect(server) for _ in range(15)]
        fates = [asyncio.create_task(closed_after(sock, 4)) for sock in socks]
        await asyncio.sleep(0.5)
        assert sum(fate.done() for fate in fates) == 5
        await assert_bystanders_served(server.base_url, source=OTHER)
        lasted = await asyncio.gather(*fates)
        close_all(socks)
        assert all(seconds is not None and seconds <= 2.5 for seconds in lasted), lasted
        assert await limit_hits(server, "max_connections_per_address") == 5
        await assert_bystanders_served(server.base_url)
    finally:
        server.stop()
    assert "refusing new connections from 127.0.0.1" in server.output()


def test_addresses_are_counted_per_client_and_ipv6_per_64() -> None:
    trusted = (ipaddress.ip_network("10.0.0.0/8"),)
    assert listener.counted_address(("203.0.113.5", 4000), ()) == "203.0.113.5"
    assert listener.counted_address(("10.1.2.3", 4000), trusted) is None  # the load balancer
    assert listener.counted_address(("::ffff:10.1.2.3", 4000, 0, 0), trusted) is None
    assert listener.counted_address(("::ffff:203.0.113.5", 4000, 0, 0), trusted) == "203.0.113.5"
    first = listener.counted_address(("2001:db8:1:2::1", 4000, 0, 0), ())
    assert first == listener.counted_address(("2001:db8:1:2:ffff::9", 4000, 0, 0), ()) == "2001:db8:1:2::/64"
    assert listener.counted_address(None, ()) == "unknown"


def test_the_instance_cap_stays_below_the_open_file_limit() -> None:
    assert listener.connection_budget(settings(), file_limit=1024) == 1024 - listener.RESERVED_FDS
    assert listener.connection_budget(settings(max_connections=500), file_limit=1024) == 500
    assert listener.connection_budget(settings(max_connections=5000), file_limit=1024) == 1024 - listener.RESERVED_FDS
