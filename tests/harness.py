"""A real Herald on a real port, and SDK clients wired to it.

Tests talk to the server only through sockets: the SDK, or raw aiohttp
websockets when a test needs to send bytes no SDK would.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Iterable
from typing import Any

import aiohttp

from herald_presence.protocol import codec, tokens
from herald_presence.protocol.client.agent import AgentClient
from herald_presence.protocol.client.base import Disconnected
from herald_presence.protocol.client.visitor import VisitorClient
from herald_presence.protocol.errors import CloseCode
from herald_presence.protocol.messages import Hello, Message
from herald_presence.server.backends.base import Backend
from herald_presence.server.config import Settings, load
from herald_presence.server.process.app import make_app
from herald_presence.server.web.keys import HUB
from herald_presence.server.web.listener import HeraldRunner, HeraldSite

SECRET = "test-secret-acme-0123456789"
OTHER_SECRET = "test-secret-other-0123456789"

# Short timings so that grace periods, holds and keepalives fit in a test.
TEST_SETTINGS = {
    "grace_period": "0.4",
    "signal_hold": "1.0",
    "keepalive": "5",
    "handshake_timeout": "2",
    "delivery_timeout": "2",
    # Tests open many connections from one address and send bursts; each
    # limit is tested on its own with its real (or a small) value.
    "connections_per_address": "100000",
    "max_connections_per_address": "100000",
    "message_rate": "100000",
    "message_burst": "100000",
    "message_bytes_rate": "100000000",
    "message_bytes_burst": "100000000",
    "visitor_signal_rate": "100000",
    "visitor_signal_burst": "100000",
    "failed_credentials_per_address": "100000",
    # In-process servers share their event loop with the tests' clients, so
    # the loop's lag on a busy CI machine is not the server's overload: no
    # shedding here; tests/test_overload.py sets overload_lag itself.
    "overload_lag": "0",
}


def settings(*, consumer_codes: Iterable[str] = (), **overrides: Any) -> Settings:
    """The test groups ``acme`` and ``other`` and the test timings, with
    overrides; ``consumer_codes`` names the groups that opt into short codes
    from consumer pages (a TOML-only group key, off by default)."""
    flags = {**TEST_SETTINGS, "groups": f"acme={SECRET},other={OTHER_SECRET}", **overrides}
    loaded = load(env={}, flags={k: str(v) for k, v in flags.items()})
    for group in consumer_codes:
        loaded.groups[group].allow_consumer_codes = True
    return loaded


class HeraldServer:
    """One server instance; ``stop()`` closes it like a clean shutdown."""

    def __init__(self, settings: Settings, backend: Backend | None = None) -> None:
        self.settings = settings
        self.app = make_app(settings, backend)
        self.runner = HeraldRunner(self.app, settings, shutdown_timeout=2)
        self.port = 0
        self.clients: list[VisitorClient | AgentClient] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> HeraldServer:
        await self.runner.setup()
        self.site = HeraldSite(self.runner, "127.0.0.1", self.port)  # what the process listens with
        await self.site.start()
        self.port = self.site.port
        return self

    async def stop(self) -> None:
        for client in self.clients:
            with contextlib.suppress(Exception):
                await client.close()
        await self.runner.cleanup()

    def secret(self, group: str) -> str:
        return self.settings.groups[group].secrets[0]

    async def visitor(self, visitor: str, group: str = "acme", connect: bool = True, **options: Any) -> VisitorClient:
        token = options.pop("token", None) or tokens.visitor_token(self.secret(group), group, visitor)
        client = VisitorClient(self.base_url, group, visitor, token, **options)
        self.clients.append(client)
        if connect:
            await client.connect()
        return client

    async def agent(self, agent: str, group: str = "acme", connect: bool = True, **options: Any) -> AgentClient:
        key = options.pop("key", None) or tokens.agent_key(self.secret(group), group, agent)
        client = AgentClient(self.base_url, group, agent, key, **options)
        self.clients.append(client)
        if connect:
            await client.connect()
        return client

    @contextlib.asynccontextmanager
    async def raw_visitor(self, visitor: str = "raw", group: str = "acme", hello: bool = True) -> Any:
        """A bare websocket for sending bytes the SDK never would."""
        async with aiohttp.ClientSession() as session, session.ws_connect(self.base_url + "/v1/visitor") as ws:
            if hello:
                token = tokens.visitor_token(self.secret(group), group, visitor)
                await ws.send_bytes(codec.encode(Hello(versions=[1], group=group, visitor=visitor, token=token)))
                welcome = codec.decode(await ws.receive_bytes(timeout=5))
                assert welcome.TYPE == "welcome", welcome
            yield ws


@contextlib.asynccontextmanager
async def away(
    herald: HeraldServer, visitor: VisitorClient, back_to: HeraldServer | None = None
) -> AsyncIterator[None]:
    """The visitor's connections on ``herald`` are dropped (close 4002, as a
    drain does) and its SDK cannot get back until the block ends: meanwhile
    its address leads to a port that refuses connections. Then it reconnects
    on its own, to ``herald`` or (as a load balancer would send it) to ``back_to``."""
    home = (back_to or herald).base_url
    with socket.socket() as nowhere:
        nowhere.bind(("127.0.0.1", 0))  # bound, never listening: every connection to it is refused
        visitor.base_url = f"http://127.0.0.1:{nowhere.getsockname()[1]}"
        for conn in herald.app[HUB].visitors.all():
            if conn.subject == visitor.visitor:
                conn.leave(CloseCode.RECONNECT, "the test took it away")
        await visitor.wait_for(Disconnected)
        try:
            yield
        finally:
            visitor.base_url = home


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(base_url: str) -> Samples:
    """Every sample at ``/metrics``, keyed by name and labels, parsed the way Prometheus does."""
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as session, session.get(base_url + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 for a labelled child never touched (it is not exported yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


async def receive(ws: aiohttp.ClientWebSocketResponse, seconds: float = 5) -> Message:
    return codec.decode(await ws.receive_bytes(timeout=seconds))


def changed(change: str, visitor: str | None = None) -> Any:
    """Matcher for ``wait_for``: a presence change of one kind (and visitor)."""
    from herald_presence.protocol.messages import PresenceChanged

    def match(event: Any) -> bool:
        return (
            isinstance(event, PresenceChanged)
            and event.change == change
            and (visitor is None or event.state["visitor"] == visitor)
        )

    return match


def signal(event_name: str) -> Any:
    """Matcher for ``wait_for``: a relayed signal with this event name."""
    from herald_presence.protocol.messages import Signal

    return lambda event: isinstance(event, Signal) and event.event == event_name


async def drain(client: VisitorClient | AgentClient, seconds: float) -> list[Any]:
    """Every event the client gets during ``seconds``."""
    import asyncio

    events: list[Any] = []
    deadline = asyncio.get_running_loop().time() + seconds
    while (left := deadline - asyncio.get_running_loop().time()) > 0:
        try:
            events.append(await client.next_event(timeout=left))
        except TimeoutError:
            break
    return events
