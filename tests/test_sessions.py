"""Support sessions over the websocket (PROTOCOL.md §11): the visitor starts
one, agents wait for it, find it by key, code or ID, join and leave it, and
hear how it ends. Runs on every backend."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from herald_presence.protocol import RequestFailed, codec, tokens
from herald_presence.protocol.client.base import Backoff, Connected, Disconnected, SessionLost
from herald_presence.protocol.client.visitor import VisitorClient
from herald_presence.protocol.errors import CloseCode, ErrorCode
from herald_presence.protocol.messages import (
    Error,
    GuestCount,
    Hello,
    SessionConnected,
    SessionEvent,
    Signal,
    Welcome,
)
from herald_presence.server.core import short_codes
from herald_presence.server.web.keys import HUB

from .harness import HeraldServer, away, drain, receive, signal
from .test_revoke import call
from .topologies import backend_name  # noqa: F401  (memory, redis and a Redis Cluster)

Start = Callable[..., Awaitable[HeraldServer]]


def session_event(event: str, reason: str | None = None, session: str | None = None) -> Callable[[Any], bool]:
    """Matcher for ``wait_for``: a session lifecycle event (with this reason / session)."""

    def match(item: Any) -> bool:
        return (
            isinstance(item, SessionEvent)
            and item.event == event
            and (reason is None or item.reason == reason)
            and (session is None or item.session == session)
        )

    return match


def guest_count(guests: int) -> Callable[[Any], bool]:
    return lambda item: isinstance(item, GuestCount) and item.guests == guests


def session_events(events: list[Any]) -> list[tuple[str, str | None]]:
    return [(e.event, e.reason) for e in events if isinstance(e, SessionEvent)]


async def refused(request: Awaitable[Any], code: str) -> RequestFailed:
    with pytest.raises(RequestFailed) as failure:
        await request
    assert failure.value.code == code, failure.value
    return failure.value


@contextlib.asynccontextmanager
async def raw_agent(herald: HeraldServer, agent: str = "raw", group: str = "acme") -> AsyncIterator[Any]:
    """A logged-in agent's bare websocket, for frames the SDK never sends."""
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        key = tokens.agent_key(herald.secret(group), group, agent)
        body = {"group": group, "agent": agent, "key": key}
        async with http.post(herald.base_url + "/v1/agent/login", json=body) as response:
            assert response.status == 200, await response.text()
        async with http.ws_connect(herald.base_url + "/v1/agent") as ws:
            await ws.send_bytes(codec.encode(Hello(versions=[1])))
            assert isinstance(await receive(ws), Welcome)
            yield ws


# --- one-click: the key is the visitor's ID ------------------------------------


async def test_one_click_session_from_terms_to_join_leave_and_end(herald: HeraldServer) -> None:
    agent = await herald.agent("alice")
    await agent.subscribe(["cust-42"])  # to hear the visitor's answers to the terms
    await agent.wait_session("cust-42")
    assert agent.waiting == {"cust-42"}
    visitor = await herald.visitor("cust-42")

    assert await agent.show_terms("cust-42") == 1
    await visitor.wait_for(signal("showterms"))
    await visitor.terms("displayed")
    await visitor.terms("accepted")
    answers = [await agent.wait_for(Signal) for _ in range(2)]
    assert [s.data["status"] for s in answers] == ["displayed", "accepted"]

    connected = await visitor.start_session("visitor")
    assert (connected.key, connected.key_type, connected.show_key, connected.guests) == ("cust-42", "visitor", False, 0)
    assert visitor.session == connected
    started = await agent.wait_for(session_event("started"))
    assert (started.key, started.session, started.visitor, started.key_type) == (
        "cust-42", connected.session, "cust-42", "visitor",
    )  # fmt: skip
    assert agent.waiting == frozenset(), "a started wait is not sent again after a reconnect"

    joined = await agent.join_session(key="cust-42")
    assert (joined.session, joined.key, joined.visitor, joined.guests) == (connected.session, "cust-42", "cust-42", 1)
    told = await visitor.wait_for(GuestCount)
    assert (told.session, told.guests) == (connected.session, 1)
    assert visitor.session is not None and visitor.session.guests == 1

    await agent.leave_session(joined.session)
    assert (await visitor.wait_for(GuestCount)).guests == 0

    assert (await agent.join_session(key="cust-42")).guests == 1
    assert (await visitor.wait_for(GuestCount)).guests == 1
    await visitor.end_session()
    assert visitor.session is None
    ended = await agent.wait_for(session_event("ended"))
    assert (ended.session, ended.key, ended.reason) == (connected.session, "cust-42", "ended")
    assert not session_events(await drain(agent, 0.3)), "the end is told once, though the agent waited and joined"


async def test_an_agent_asked_to_reconnect_joins_its_sessions_again(herald: HeraldServer) -> None:
    """A drain (close 4002) moves an agent to another instance: it stays in
    the sessions it had joined, and one that ended meanwhile is reported."""
    visitor = await herald.visitor("cust-moved")
    connected = await visitor.start_session("visitor")
    gone = await herald.visitor("cust-gone")
    gone_session = await gone.start_session("visitor")
    agent = await herald.agent("alice")
    await agent.join_session(session=connected.session)
    await agent.join_session(session=gone_session.session)
    assert agent.joined == {connected.session, gone_session.session}
    assert (await visitor.wait_for(GuestCount)).guests == 1

    await gone.end_session()
    await agent.wait_for(session_event("ended"))
    assert agent.joined == {connected.session}
    for conn in herald.app[HUB].watchers.agents():
        conn.leave(CloseCode.RECONNECT, "server draining")
    await agent.wait_for(Disconnected)
    await agent.wait_for(Connected)
    counts = [(await visitor.wait_for(GuestCount)).guests for _ in range(2)]
    assert counts == [0, 1], "the old connection's seat goes, the new one's comes"
    assert agent.joined == {connected.session}


async def test_a_session_that_ended_while_its_agent_was_away_is_reported_lost(herald: HeraldServer) -> None:
    visitor = await herald.visitor("cust-brief")
    connected = await visitor.start_session("visitor")
    agent = await herald.agent("alice", backoff=Backoff(initial=0.5, factor=1.0, cap=0.5))
    await agent.join_session(session=connected.session)
    for conn in herald.app[HUB].watchers.agents():
        conn.close(CloseCode.RECONNECT, "test")
    await agent.wait_for(Disconnected)
    await visitor.end_session()  # while the agent is away: it never hears "ended"
    lost = await agent.wait_for(SessionLost)
    assert (lost.session, lost.code) == (connected.session, "session_not_found")
    assert agent.joined == frozenset()


async def test_waiting_for_a_session_that_already_started_is_told_at_once(herald: HeraldServer) -> None:
    visitor = await herald.visitor("cust-7")
    connected = await visitor.start_session("visitor")
    agent = await herald.agent("alice")
    await agent.wait_session("cust-7")
    started = await agent.wait_for(session_event("started"), timeout=2)
    assert (started.session, started.key, started.visitor) == (connected.session, "cust-7", "cust-7")
    assert agent.waiting == frozenset()


async def test_waiting_for_a_visitor_without_a_session_hears_nothing_yet(herald: HeraldServer) -> None:
    await herald.visitor("cust-7")
    agent = await herald.agent("alice")
    await agent.wait_session("cust-7")
    assert not session_events(await drain(agent, 0.3))
    assert agent.waiting == {"cust-7"}


# --- random keys: short codes ----------------------------------------------------


async def test_random_key_is_a_six_digit_code_to_show_and_agents_join_with_it(herald: HeraldServer) -> None:
    visitor = await herald.visitor("v1")
    connected = await visitor.start_session("random")
    code = connected.key
    assert code.isdigit() and len(code) == 6, code
    assert (connected.key_type, connected.show_key, connected.guests) == ("random", True, 0)

    first = await herald.agent("alice")
    joined = await first.join_session(code=code)
    assert (joined.session, joined.key, joined.visitor, joined.guests) == (connected.session, code, "v1", 1)
    assert (await visitor.wait_for(GuestCount)).guests == 1

    second = await herald.agent("bob")
    assert (await second.join_session(code=code)).guests == 2
    assert (await visitor.wait_for(GuestCount)).guests == 2
    assert visitor.session is not None and visitor.session.guests == 2


async def test_joining_by_session_id_works_too(herald: HeraldServer) -> None:
    visitor = await herald.visitor("v1")
    connected = await visitor.start_session("random")
    agent = await herald.agent("alice")
    joined = await agent.join_session(session=connected.session)
    assert (joined.key, joined.guests) == (connected.key, 1)


async def test_code_length_comes_from_the_settings(start_herald: Start) -> None:
    herald = await start_herald(code_length=8)
    visitor = await herald.visitor("v1")
    code = (await visitor.start_session("random")).key
    assert code.isdigit() and len(code) == 8, code


# --- who hears the lifecycle ----------------------------------------------------------


async def test_agents_watching_the_visitor_hear_the_session_start_and_end_once_each(herald: HeraldServer) -> None:
    watcher = await herald.agent("watcher")
    await watcher.subscribe(["v1"])
    group_watcher = await herald.agent("group-watcher")
    await group_watcher.subscribe_group()
    everything = await herald.agent("everything")  # watches both ways and waits for the key
    await everything.subscribe(["v1"])
    await everything.subscribe_group()
    await everything.wait_session("v1")
    bystander = await herald.agent("bystander")
    await bystander.subscribe(["someone-else"])

    visitor = await herald.visitor("v1")
    connected = await visitor.start_session("visitor")
    await visitor.end_session()
    for agent in (watcher, group_watcher, everything):
        events = [e for e in await drain(agent, 0.5) if isinstance(e, SessionEvent)]
        assert [(e.event, e.reason, e.session) for e in events] == [
            ("started", None, connected.session),
            ("ended", "ended", connected.session),
        ], agent.agent
    assert not session_events(await drain(bystander, 0.1))


async def test_agents_watching_the_visitor_hear_of_a_random_key_session_too(herald: HeraldServer) -> None:
    watcher = await herald.agent("watcher")
    await watcher.subscribe(["v1"])
    visitor = await herald.visitor("v1")
    connected = await visitor.start_session("random")
    started = await watcher.wait_for(session_event("started"))
    assert (started.key, started.key_type, started.visitor) == (connected.key, "random", "v1")


# --- how sessions end -------------------------------------------------------------


async def test_session_ends_when_the_visitor_stays_away_past_the_grace_period(herald: HeraldServer) -> None:
    grace = herald.settings.grace_period
    visitor = await herald.visitor("v1")
    connected = await visitor.start_session("visitor")
    agent = await herald.agent("alice")
    await agent.join_session(key="v1")

    closed_at = time.monotonic()
    await visitor.close()
    ended = await agent.wait_for(session_event("ended"), timeout=grace + 5)
    took = time.monotonic() - closed_at
    assert (ended.session, ended.reason) == (connected.session, "visitor_offline")
    assert grace * 0.9 <= took < grace + 3, f"ended {took:.2f}s after the close"
    await refused(agent.join_session(key="v1"), "session_not_found")
    await refused(agent.join_session(session=connected.session), "session_not_found")


async def test_a_quick_reconnect_within_the_grace_period_keeps_the_session(herald: HeraldServer) -> None:
    grace = herald.settings.grace_period
    first = await herald.visitor("v1")
    connected = await first.start_session("visitor")
    agent = await herald.agent("alice")
    await agent.join_session(key="v1")

    await first.close()
    await asyncio.sleep(grace / 4)
    await herald.visitor("v1")
    assert not session_events(await drain(agent, grace * 2)), "no end while the visitor came back in time"
    other = await herald.agent("bob")
    joined = await other.join_session(key="v1")
    assert (joined.session, joined.guests) == (connected.session, 2)


async def test_a_visitor_back_within_the_grace_period_is_still_told_the_guest_count(herald: HeraldServer) -> None:
    """§11.2: the visitor keeps its session, and §11.3: on every join the visitor
    gets ``guest_count``; so its new connection hears of the next join."""
    first = await herald.visitor("v1")
    connected = await first.start_session("visitor")
    await first.close()
    await asyncio.sleep(herald.settings.grace_period / 4)
    back = await herald.visitor("v1")
    agent = await herald.agent("alice")
    await agent.join_session(key="v1")
    told = await back.wait_for(GuestCount, timeout=2)
    assert (told.session, told.guests) == (connected.session, 1)


# --- a session that ended while its visitor was away (§11.2) ------------------------------

QUICK = Backoff(initial=0.05, factor=1.0, cap=0.05)  # reconnect attempts every 50 ms or less


def lifecycle(event: Any) -> bool:
    """What a visitor hears of its sessions."""
    return isinstance(event, SessionEvent | SessionConnected)


async def heard_on_return(visitor: VisitorClient, settle: float = 0.3) -> list[Any]:
    """What the visitor hears of its sessions once it is back: up to its
    ``Connected`` (the frames after the welcome may come first) and ``settle`` s more."""
    events: list[Any] = []
    async with asyncio.timeout(10):
        while not isinstance(event := await visitor.next_event(), Connected):
            events.append(event)
    events += await drain(visitor, settle)
    return [event for event in events if lifecycle(event)]


async def test_a_session_ended_over_rest_while_its_visitor_was_away_is_reported_after_its_welcome(
    herald: HeraldServer,
) -> None:
    visitor = await herald.visitor("v1", backoff=QUICK)
    connected = await visitor.start_session("random")
    agent = await herald.agent("alice")
    await agent.join_session(code=connected.key)
    async with away(herald, visitor):
        status, _ = await call(herald, f"/v1/groups/acme/sessions/{connected.session}/end")
        assert status == 200
        await agent.wait_for(session_event("ended", "terminated"))
        assert visitor.session_id == connected.session, "away: nothing told it yet"
    heard = await heard_on_return(visitor)
    assert len(heard) == 1 and isinstance(heard[0], SessionEvent), "told once, and no session to take over"
    told = heard[0]
    assert (told.event, told.session, told.visitor, told.reason) == ("ended", connected.session, "v1", "terminated")
    assert (told.key, told.key_type) == (None, None), "a reconnect's ended names no key"
    assert visitor.session is None

    async with away(herald, visitor):  # with no session held, a reconnect hears nothing of sessions
        pass
    assert await heard_on_return(visitor) == []


async def test_a_session_replaced_from_another_tab_while_away_is_reported_before_the_new_one(
    herald: HeraldServer,
) -> None:
    tab = await herald.visitor("v1", backoff=QUICK)
    first = await tab.start_session("visitor")
    async with away(herald, tab):
        other_tab = await herald.visitor("v1")
        second = await other_tab.start_session("visitor")
    ended, taken_over = await heard_on_return(tab)
    assert isinstance(ended, SessionEvent) and (ended.event, ended.session, ended.reason) == (
        "ended", first.session, "replaced",
    )  # fmt: skip
    assert isinstance(taken_over, SessionConnected) and taken_over.id is None
    assert taken_over.session == second.session and tab.session == taken_over, "the newest connection takes it"


async def test_a_session_that_ended_with_its_visitor_offline_is_reported_when_it_comes_back(
    herald: HeraldServer,
) -> None:
    visitor = await herald.visitor("v1", backoff=QUICK)
    connected = await visitor.start_session("visitor")
    agent = await herald.agent("alice")
    await agent.join_session(key="v1")
    async with away(herald, visitor):  # past the grace period: offline, and its session ends
        await agent.wait_for(session_event("ended", "visitor_offline"), timeout=herald.settings.grace_period + 5)
    heard = await heard_on_return(visitor)
    assert [(e.TYPE, e.session, getattr(e, "reason", None)) for e in heard] == [
        ("session_event", connected.session, "visitor_offline"),
    ]
    assert visitor.session is None


async def test_a_visitor_back_while_its_session_lives_only_takes_it_over(start_herald: Start) -> None:
    herald = await start_herald(grace_period=5)
    visitor = await herald.visitor("v1", backoff=QUICK)
    connected = await visitor.start_session("visitor")
    async with away(herald, visitor):
        pass
    heard = await heard_on_return(visitor)
    assert [(type(e), e.session) for e in heard] == [(SessionConnected, connected.session)], heard
    assert visitor.session is not None and visitor.session.session == connected.session


async def test_a_hello_naming_an_unknown_session_is_told_it_ended_with_the_plain_reason(herald: HeraldServer) -> None:
    token = tokens.visitor_token(herald.secret("acme"), "acme", "v1")
    async with aiohttp.ClientSession() as http, http.ws_connect(herald.base_url + "/v1/visitor") as ws:
        await ws.send_bytes(codec.encode(Hello(versions=[1], group="acme", visitor="v1", token=token, session="s0")))
        assert isinstance(await receive(ws), Welcome)
        told = await receive(ws)
        assert isinstance(told, SessionEvent)
        assert (told.event, told.session, told.visitor, told.reason, told.key) == ("ended", "s0", "v1", "ended", None)


async def test_starting_another_session_ends_the_first_as_replaced(herald: HeraldServer) -> None:
    visitor = await herald.visitor("v1")
    first = await visitor.start_session("random")
    agent = await herald.agent("alice")
    await agent.join_session(code=first.key)

    second = await visitor.start_session("visitor")
    assert second.session != first.session and second.guests == 0
    ended = await agent.wait_for(session_event("ended"))
    assert (ended.session, ended.reason, ended.key) == (first.session, "replaced", first.key)
    assert visitor.session == second
    await refused(agent.join_session(code=first.key), "session_not_found")
    await refused(agent.join_session(session=first.session), "session_not_found")
    assert (await agent.join_session(key="v1")).session == second.session


async def test_replacing_a_one_click_session_tells_a_waiting_agent_of_the_new_one(herald: HeraldServer) -> None:
    agent = await herald.agent("alice")
    await agent.subscribe(["v1"])
    visitor = await herald.visitor("v1")
    first = await visitor.start_session("visitor")
    second = await visitor.start_session("visitor")
    events = [e for e in await drain(agent, 0.5) if isinstance(e, SessionEvent)]
    assert [(e.event, e.reason, e.session) for e in events] == [
        ("started", None, first.session),
        ("ended", "replaced", first.session),
        ("started", None, second.session),
    ]


async def test_ending_without_a_session_is_refused(herald: HeraldServer) -> None:
    visitor = await herald.visitor("v1")
    await refused(visitor.end_session(), "session_not_found")


# --- finding sessions: what is not found ---------------------------------------------


async def test_unknown_key_code_or_session_is_not_found(herald: HeraldServer) -> None:
    agent = await herald.agent("alice")
    await herald.visitor("online-but-no-session")
    await refused(agent.join_session(key="nobody"), "session_not_found")
    await refused(agent.join_session(key="online-but-no-session"), "session_not_found")
    await refused(agent.join_session(code="000000"), "session_not_found")
    await refused(agent.join_session(code="not-digits"), "session_not_found")
    await refused(agent.join_session(session="s0000000000000000"), "session_not_found")
    assert agent.connected, "refusals keep the connection"


async def test_join_needs_exactly_one_of_key_code_and_session(herald: HeraldServer) -> None:
    agent = await herald.agent("alice")
    with pytest.raises(ValueError):
        await agent.join_session()
    with pytest.raises(ValueError):
        await agent.join_session(key="v1", code="123456")
    with pytest.raises(ValueError):
        await agent.join_session(key="v1", code="123456", session="s1")


@pytest.mark.parametrize(
    "fields",
    [{"key": "v1", "code": "123456"}, {"code": "123456", "session": "s1"}, {}],
    ids=["key_and_code", "code_and_session", "none"],
)
async def test_a_raw_join_without_exactly_one_way_to_find_the_session_is_invalid(
    herald: HeraldServer, fields: dict[str, str]
) -> None:
    visitor = await herald.visitor("v1")
    await visitor.start_session("visitor")
    async with raw_agent(herald) as ws:
        await ws.send_bytes(codec.encode_map({"type": "join_session", "id": 7, **fields}))
        error = await receive(ws)
        assert isinstance(error, Error) and (error.code, error.id) == (ErrorCode.INVALID, 7), error
        await ws.send_bytes(codec.encode_map({"type": "join_session", "id": 8, "key": "v1"}))
        joined = await receive(ws)
        assert (joined.TYPE, joined.id, joined.guests) == ("session_joined", 8, 1)


async def test_an_agent_of_another_group_cannot_join(herald: HeraldServer) -> None:
    visitor = await herald.visitor("v1")
    by_key = await visitor.start_session("visitor")
    other_visitor = await herald.visitor("v2")
    by_code = await other_visitor.start_session("random")
    outsider = await herald.agent("mallory", group="other")
    await refused(outsider.join_session(key="v1"), "session_not_found")
    await refused(outsider.join_session(code=by_code.key), "session_not_found")
    await refused(outsider.join_session(session=by_key.session), "session_not_found")
    await refused(outsider.join_session(session=by_code.session), "session_not_found")
    assert not [e for e in await drain(visitor, 0.2) if isinstance(e, GuestCount)]


# --- code lifetime ------------------------------------------------------------------------


async def test_an_unclaimed_code_expires_and_a_claimed_one_lives_on(start_herald: Start) -> None:
    herald = await start_herald(code_ttl=0.5)
    unclaimed = await (await herald.visitor("v1")).start_session("random")
    claimed = await (await herald.visitor("v2")).start_session("random")
    first = await herald.agent("alice")
    await first.join_session(code=claimed.key)

    await asyncio.sleep(1.0)
    later = await herald.agent("bob")
    await refused(later.join_session(code=unclaimed.key), "session_not_found")
    joined = await later.join_session(code=claimed.key)
    assert (joined.session, joined.guests) == (claimed.session, 2)


async def test_a_full_code_space_is_refused_promptly_and_the_server_serves_on(
    herald: HeraldServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(short_codes, "random_code", lambda length: "1234")
    holder = await herald.visitor("v1")
    taken = await holder.start_session("random")
    assert taken.key == "1234"

    unlucky = await herald.visitor("v2")
    started = time.monotonic()
    await refused(unlucky.start_session("random"), "code_space_exhausted")
    assert time.monotonic() - started < 2
    assert unlucky.connected and unlucky.session is None

    agent = await herald.agent("alice")
    assert (await agent.join_session(code="1234")).session == taken.session
    assert (await unlucky.start_session("visitor")).key == "v2"
    await holder.end_session()  # the code is released, so it can be drawn again
    await unlucky.end_session()
    assert (await unlucky.start_session("random")).key == "1234"


async def test_an_ended_sessions_code_is_released(herald: HeraldServer) -> None:
    visitor = await herald.visitor("v1")
    claimed = await visitor.start_session("random")
    agent = await herald.agent("alice")
    await agent.join_session(code=claimed.key)
    await visitor.end_session()
    await agent.wait_for(session_event("ended", "ended"))
    await refused(agent.join_session(code=claimed.key), "session_not_found")

    unclaimed = await visitor.start_session("random")
    await visitor.end_session()
    await refused(agent.join_session(code=unclaimed.key), "session_not_found")
