"""Signals are accounted for: every agent signal ends in a delivered count or
a clear error, held signals reach a visitor that comes back, visitor signals
reach exactly the agents they should."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import signal as os_signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from herald_presence import protocol
from herald_presence.protocol import ProtocolError, RequestFailed, codec
from herald_presence.protocol.client.agent import SIGNAL_RETRIES, AgentClient
from herald_presence.protocol.client.base import Backoff
from herald_presence.protocol.messages import Ack, Error, Signal, Welcome

from .conftest import Start
from .harness import SECRET, HeraldServer, changed, drain, receive, signal
from .processes import HERALD, start_server
from .redis_server import RedisServer
from .topologies import backend_name  # noqa: F401  (memory, redis and a Redis Cluster)

IDENTIFIER = re.compile(r"[A-Za-z0-9._:@+\-]{1,128}")
JS_DIR = Path(protocol.__file__).resolve().parent / "client" / "js"


async def test_signal_to_an_offline_visitor_is_refused_at_once(herald: HeraldServer) -> None:
    agent = await herald.agent("alice")
    started = time.monotonic()
    with pytest.raises(RequestFailed) as refused:
        await agent.show_terms("nobody")
    assert refused.value.code == "visitor_offline"
    assert time.monotonic() - started < 1


async def test_signal_sent_while_the_visitor_reconnects_is_delivered_when_it_is_back(herald: HeraldServer) -> None:
    agent = await herald.agent("alice")
    await agent.subscribe(["v1"])
    first = await herald.visitor("v1")
    await agent.wait_for(changed("online", "v1"))
    await first.close()
    await asyncio.sleep(0.05)  # the server has seen the close: the visitor is away

    pending = asyncio.create_task(agent.show_terms("v1"))
    await asyncio.sleep(0.2)
    assert not pending.done(), "held, not answered, while the visitor is away"
    second = await herald.visitor("v1")
    showterms = await second.wait_for(signal("showterms"))
    assert showterms.agent == "alice"
    assert await pending == 1


async def test_held_signal_expires_when_the_visitor_does_not_come_back(start_herald) -> None:  # type: ignore[no-untyped-def]
    herald = await start_herald(grace_period=5, signal_hold=0.5)
    agent = await herald.agent("alice")
    visitor = await herald.visitor("v1")
    await visitor.close()
    await asyncio.sleep(0.05)
    started = time.monotonic()
    with pytest.raises(RequestFailed) as expired:
        await agent.show_terms("v1")
    assert expired.value.code == "signal_expired"
    assert 0.4 < time.monotonic() - started < 3
    # Coming back later does not deliver the expired signal.
    again = await herald.visitor("v1")
    assert not [e for e in await drain(again, 0.3) if isinstance(e, Signal)]


async def test_signal_with_to_all_reaches_every_tab(herald: HeraldServer) -> None:
    agent = await herald.agent("alice")
    tabs = [await herald.visitor("v1") for _ in range(3)]
    assert await agent.signal("v1", "highlight", {"selector": "#pay"}, to="all") == 3
    for tab in tabs:
        got = await tab.wait_for(signal("highlight"))
        assert got.data == {"selector": "#pay"}


async def test_a_signal_to_all_held_for_a_reconnecting_visitor_reaches_every_tab_that_comes_back(
    herald: HeraldServer,
) -> None:
    agent = await herald.agent("alice")
    await agent.subscribe(["v1"])
    tabs = [await herald.visitor("v1") for _ in range(2)]
    for tab in tabs:
        await tab.close()
    await asyncio.sleep(0.05)  # the server has seen both closes: the visitor is away

    pending = asyncio.create_task(agent.signal("v1", "highlight", {"selector": "#pay"}, to="all"))
    await asyncio.sleep(0.1)
    assert not pending.done(), "held, not answered, while the visitor is away"
    first = await herald.visitor("v1")
    assert (await first.wait_for(signal("highlight"))).data == {"selector": "#pay"}
    assert await pending == 1, "answered once, by the first tab back"
    second = await herald.visitor("v1")  # within signal_hold: it gets the signal too
    assert (await second.wait_for(signal("highlight"))).data == {"selector": "#pay"}
    for tab in (first, second):
        assert not [e for e in await drain(tab, 0.2) if isinstance(e, Signal)], "each tab gets it once"


async def test_a_held_signal_to_the_focused_tab_reaches_only_the_first_tab_back(herald: HeraldServer) -> None:
    agent = await herald.agent("alice")
    tabs = [await herald.visitor("v1") for _ in range(2)]
    for tab in tabs:
        await tab.close()
    await asyncio.sleep(0.05)

    pending = asyncio.create_task(agent.show_terms("v1"))
    await asyncio.sleep(0.1)
    first = await herald.visitor("v1")
    await first.wait_for(signal("showterms"))
    assert await pending == 1
    second = await herald.visitor("v1")
    assert not [e for e in await drain(second, 0.3) if isinstance(e, Signal)]


async def test_visitor_signal_reaches_every_watching_agent(herald: HeraldServer) -> None:
    by_id = await herald.agent("by-id")
    await by_id.subscribe(["v1"])
    by_group = await herald.agent("by-group")
    await by_group.subscribe_group()
    bystander = await herald.agent("bystander")
    await bystander.subscribe(["v2"])
    visitor = await herald.visitor("v1")
    await visitor.signal_agent("cobrowse", {"step": "ready"})
    for agent in (by_id, by_group):
        got = await agent.wait_for(signal("cobrowse"))
        assert (got.visitor, got.data, got.connection) == ("v1", {"step": "ready"}, visitor.connection_id)
    assert not [e for e in await drain(bystander, 0.3) if isinstance(e, Signal)]


async def test_visitor_can_address_one_agent(herald: HeraldServer) -> None:
    alice = await herald.agent("alice")
    bob = await herald.agent("bob")
    await bob.subscribe(["v1"])
    visitor = await herald.visitor("v1")
    await alice.show_terms("v1")  # alice asked: v1 may answer her by name, though she does not watch it
    await visitor.wait_for(signal("showterms"))
    await visitor.signal_agent("terms", {"status": "declined"}, agent="alice")
    got = await alice.wait_for(signal("terms"))
    assert got.data == {"status": "declined"} and got.visitor == "v1"
    assert not [e for e in await drain(bob, 0.3) if isinstance(e, Signal)]

    with pytest.raises(RequestFailed) as refused:
        await visitor.signal_agent("terms", {"status": "declined"}, agent="nobody")
    assert refused.value.code == "agent_offline"


async def test_many_signals_are_all_answered(herald: HeraldServer) -> None:
    agent = await herald.agent("alice")
    visitor = await herald.visitor("v1")
    answers = await asyncio.gather(*(agent.signal("v1", "ping", {"n": n}) for n in range(200)))
    assert answers == [1] * 200
    received = [e for e in await drain(visitor, 0.5) if isinstance(e, Signal)]
    assert sorted(e.data["n"] for e in received) == list(range(200))


# --- signal IDs: a signal sent again is acted on once -------------------------


def signals(events: list[object]) -> list[Signal]:
    return [e for e in events if isinstance(e, Signal)]


async def test_a_signal_sent_twice_with_one_sid_is_shown_once(herald: HeraldServer) -> None:
    agent = await herald.agent("alice")
    visitor = await herald.visitor("v1")
    async with herald.raw_visitor("raw") as raw:
        # The server relays both sends, sid and all: the dedupe is the receiver's.
        assert await agent.signal("raw", "showterms", sid="terms-1") == 1
        assert await agent.signal("raw", "showterms", sid="terms-1") == 1
        relayed = [await receive(raw), await receive(raw)]
        assert [(f.TYPE, f.sid, f.agent) for f in relayed] == [("signal", "terms-1", "alice")] * 2  # type: ignore[attr-defined]

    assert await agent.signal("v1", "showterms", sid="terms-1") == 1
    assert await agent.show_terms("v1", sid="terms-1") == 1  # the same signal, sent again
    assert [e.sid for e in signals(await drain(visitor, 0.3))] == ["terms-1"]
    assert visitor.duplicate_signals == 1

    assert await agent.show_terms("v1", sid="terms-2") == 1  # another signal: shown again
    assert [e.sid for e in signals(await drain(visitor, 0.3))] == ["terms-2"]
    # A signal without a sid (a client that predates it) is never dropped.
    for _ in range(2):
        assert (await agent.request(Signal(event="showterms", visitor="v1"), Ack)).delivered == 1
    assert [e.sid for e in signals(await drain(visitor, 0.3))] == [None, None]
    assert visitor.duplicate_signals == 1


async def test_the_agent_sdk_sends_a_fresh_sid_per_signal(herald: HeraldServer) -> None:
    agent = await herald.agent("alice")
    async with herald.raw_visitor("raw") as raw:
        await agent.signal("raw", "highlight", {"selector": "#pay"})
        await agent.signal("raw", "highlight", {"selector": "#pay"})
        await agent.show_terms("raw")
        sids = [(await receive(raw)).sid for _ in range(3)]  # type: ignore[attr-defined]
    assert all(isinstance(sid, str) and IDENTIFIER.fullmatch(sid) for sid in sids), sids
    assert len(set(sids)) == 3
    with pytest.raises(ProtocolError) as refused:
        await agent.signal("raw", "highlight", sid="not an identifier")
    assert refused.value.code == "invalid"


async def test_the_visitor_sdk_sends_a_fresh_sid_and_the_agent_sdk_drops_a_repeat(herald: HeraldServer) -> None:
    agent = await herald.agent("alice")
    await agent.subscribe(["v1"])
    visitor = await herald.visitor("v1")
    await visitor.signal_agent("cobrowse")
    await visitor.terms("displayed")
    fresh = [await agent.wait_for(signal("cobrowse")), await agent.wait_for(signal("terms"))]
    assert all(IDENTIFIER.fullmatch(e.sid or "") for e in fresh) and fresh[0].sid != fresh[1].sid

    await visitor.terms("accepted", sid="answer-1")
    await visitor.terms("accepted", sid="answer-1")  # sent again, say after a lost ack
    await visitor.signal_agent("terms", {"status": "accepted"})  # no sid given: a fresh one
    got = signals(await drain(agent, 0.4))
    assert [(e.sid == "answer-1", e.data) for e in got] == [
        (True, {"status": "accepted"}),
        (False, {"status": "accepted"}),
    ]
    assert agent.duplicate_signals == 1


async def test_a_held_signal_keeps_its_sid(herald: HeraldServer) -> None:
    agent = await herald.agent("alice")
    first = await herald.visitor("v1")
    await first.close()
    await asyncio.sleep(0.05)  # the server has seen the close: the visitor is away
    pending = asyncio.create_task(agent.show_terms("v1", sid="held-1"))
    await asyncio.sleep(0.1)
    back = await herald.visitor("v1")
    assert (await back.wait_for(signal("showterms"))).sid == "held-1"
    assert await pending == 1


async def test_the_sid_memory_is_bounded(herald: HeraldServer) -> None:
    agent = await herald.agent("alice")
    visitor = await herald.visitor("v1", signal_memory=4)
    for n in range(6):  # "s0" and "s1" are forgotten: sending them again shows them again
        await agent.signal("v1", "ping", sid=f"s{n}")
    for n in (5, 2, 1, 0):
        await agent.signal("v1", "ping", sid=f"s{n}")
    assert [e.sid for e in signals(await drain(visitor, 0.3))] == [f"s{n}" for n in range(6)] + ["s1", "s0"]
    assert visitor.duplicate_signals == 2


# --- the agent SDK sends a signal again under its sid --------------------------


class ScriptedHerald:
    """A stand-in for Herald's agent endpoints (login, websocket) that answers
    the n-th signal with ``answers[n]`` (the last one from then on): "ack", an
    error code, or "drop" (the socket goes away before any answer). It also
    serves the browser client and a blank page to import it into, for the JS
    tests."""

    def __init__(self, answers: list[str], delay: float = 0.0) -> None:
        self.delay = delay
        self.script(answers)
        self.logins = 0
        self._connections = itertools.count(1)
        self.app = web.Application()
        self.app.router.add_post("/v1/agent/login", self._login)
        self.app.router.add_get("/v1/agent", self._agent)
        self.app.router.add_get("/blank", self._blank)
        for path in ("herald.js", "vendor/msgpack.mjs"):
            self.app.router.add_get(f"/js/{path}", self._file(JS_DIR / path))
        self.runner = web.AppRunner(self.app, shutdown_timeout=1)
        self.base_url = ""

    def script(self, answers: list[str]) -> None:
        """Answer the signals from now on with ``answers``, counted afresh."""
        self.answers = answers
        self.received: list[Signal] = []

    @staticmethod
    def _file(path: Path) -> Callable[[web.Request], Awaitable[web.Response]]:
        body = path.read_bytes()  # read once, at set-up

        async def serve(_: web.Request) -> web.Response:
            return web.Response(body=body, content_type="text/javascript")

        return serve

    async def start(self) -> ScriptedHerald:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}"
        return self

    @staticmethod
    async def _blank(_: web.Request) -> web.Response:
        return web.Response(text="<!doctype html><title>blank</title>", content_type="text/html")

    async def _login(self, request: web.Request) -> web.Response:
        self.logins += 1
        body = await request.json()
        return web.json_response({"group": body["group"], "agent": body["agent"], "expires": int(time.time()) + 3600})

    async def _agent(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        assert codec.decode(await ws.receive_bytes(timeout=5)).TYPE == "hello"
        welcome = Welcome(
            protocol=1, connection=f"c{next(self._connections)}", role="agent", group="acme", keepalive=0, agent="alice"
        )
        await ws.send_bytes(codec.encode(welcome))
        async for frame in ws:
            message = codec.decode(frame.data)
            if not isinstance(message, Signal):
                continue
            answer = self.answers[min(len(self.received), len(self.answers) - 1)]
            self.received.append(message)
            await asyncio.sleep(self.delay)
            if answer == "drop":
                await ws.close(code=4002, message=b"reconnect")
            elif answer == "ack":
                await ws.send_bytes(codec.encode(Ack(id=message.id or 0, delivered=1)))
            else:
                await ws.send_bytes(codec.encode(Error(code=answer, message=f"scripted {answer}", id=message.id)))
        return ws


@contextlib.asynccontextmanager
async def scripted_agent(
    answers: list[str], delay: float = 0.0, **options: object
) -> AsyncIterator[tuple[ScriptedHerald, AgentClient]]:
    server = await ScriptedHerald(answers, delay).start()
    agent = AgentClient(server.base_url, "acme", "alice", "key", backoff=Backoff(initial=0.01), **options)
    try:
        await agent.connect()
        yield server, agent
    finally:
        await agent.close()
        await server.runner.cleanup()


async def test_the_agent_sdk_sends_a_signal_again_with_the_same_sid_after_delivery_failed() -> None:
    async with scripted_agent(["delivery_failed", "ack"]) as (server, agent):
        assert await agent.show_terms("v1") == 1
        first, again = server.received
        assert first.sid is not None and IDENTIFIER.fullmatch(first.sid)
        assert (again.sid, again.event, again.visitor, again.to) == (first.sid, "showterms", "v1", "focused")
        assert again.id != first.id, "a new request, the same signal"
    async with scripted_agent(["delivery_failed", "delivery_failed", "ack"]) as (server, agent):
        assert await agent.signal("v1", "highlight", {"selector": "#pay"}, to="all", sid="mine-1") == 1
        assert [(m.sid, m.data, m.to) for m in server.received] == [("mine-1", {"selector": "#pay"}, "all")] * 3


async def test_the_agent_sdk_sends_a_signal_again_after_losing_its_socket_before_the_answer() -> None:
    async with scripted_agent(["drop", "ack"]) as (server, agent):
        assert await agent.signal("v1", "showterms") == 1
        assert len({m.sid for m in server.received}) == 1 and len(server.received) == 2
        assert server.logins == 2, "it came back on a new connection"


async def test_the_agent_sdk_gives_up_after_its_retries_with_the_last_error() -> None:
    async with scripted_agent(["delivery_failed"]) as (server, agent):
        with pytest.raises(RequestFailed) as failed:
            await agent.show_terms("v1")
        assert failed.value.code == "delivery_failed"
        assert len(server.received) == 1 + SIGNAL_RETRIES == 3
        assert len({m.sid for m in server.received}) == 1
        with pytest.raises(RequestFailed):
            await agent.show_terms("v1", retries=0)
        assert len(server.received) == 4


async def test_the_agent_sdk_retries_only_within_its_request_timeout() -> None:
    async with scripted_agent(["delivery_failed"], delay=0.3, request_timeout=0.5) as (server, agent):
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await agent.show_terms("v1")
        assert time.monotonic() - started < 0.9
        await asyncio.sleep(0.2)
        assert len(server.received) == 2, "one retry fitted in the timeout"


@pytest.mark.parametrize(
    "code", ["visitor_offline", "signal_expired", "forbidden", "limit_exceeded", "rate_limited", "invalid"]
)
async def test_the_agent_sdk_does_not_send_a_signal_again_after_other_errors(code: str) -> None:
    async with scripted_agent([code, "ack"]) as (server, agent):
        with pytest.raises(RequestFailed) as failed:
            await agent.show_terms("v1")
        assert failed.value.code == code
        assert len(server.received) == 1


async def test_a_signal_sent_again_after_a_real_delivery_failed_is_shown_once(
    start_instance: Start, redis_server: RedisServer, prefix: str, tmp_path: Path
) -> None:
    """The visitor's instance is frozen (SIGSTOP) past ``delivery_timeout``: the
    agent gets delivery_failed and its SDK sends the signal again, same sid.
    When the instance thaws, the first send is past the time its sender
    answered without it (it is dropped; were it delivered, the visitor would
    drop it as a repeat) and the second is delivered: shown once."""
    frozen = start_server(
        tmp_path,
        str(HERALD), "serve", "--group", f"acme={SECRET}", "--redis-url", redis_server.url,
        "--redis-prefix", prefix, "--instance-dead-after", "30",
    )  # fmt: skip
    try:
        here = await start_instance(delivery_timeout=1.5, instance_dead_after=30)
        agent = await here.agent("alice")
        visitor = await here.visitor("v1", connect=False)
        visitor.base_url = frozen.base_url
        await visitor.connect()
        assert (await agent.lookup("v1"))["online"]

        os.kill(frozen.proc.pid, os_signal.SIGSTOP)
        try:
            pending = asyncio.create_task(agent.show_terms("v1"))
            await asyncio.sleep(2.25)  # the first send failed at 1.5 s; the second waits until 3 s
            assert not pending.done(), "past delivery_timeout: the first send's answer was an error"
        finally:
            os.kill(frozen.proc.pid, os_signal.SIGCONT)
        assert await pending == 1, "the second send was confirmed"
        shown = signals(await drain(visitor, 0.5))
        assert [e.event for e in shown] == ["showterms"]
        assert shown[0].sid is not None and visitor.duplicate_signals <= 1
    finally:
        frozen.stop()
