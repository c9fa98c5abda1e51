"""Consumers: pages that redeem a short code over REST and connect as the
visitor of its session. Only groups that opt in (``allow_consumer_codes``)
take them; a consumer is its session's and nothing more: no presence any
agent sees, one connection per session token, closed when its session
ends, and its token opens nothing afterwards. Unredeemed REST sessions go
with their code's ``code_ttl``. Code look-ups: one address cannot spend its
group's budget, and an agent's ``join_session {code}`` has budgets too."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from herald_presence.protocol import RequestFailed, codec
from herald_presence.protocol.client.agent import AgentClient
from herald_presence.protocol.client.visitor import VisitorClient
from herald_presence.protocol.errors import CloseCode, ErrorCode
from herald_presence.protocol.messages import (
    Ack,
    EndSession,
    Error,
    GuestCount,
    Hello,
    PresenceChanged,
    SessionConnected,
    SessionEvent,
    Signal,
    Welcome,
)

from ..harness import HeraldServer, changed, drain, receive, signal
from .helpers import assert_bystanders_served, error_of, handshake, hello, session

ADMIN_TOKEN = "admin-token-for-consumer-tests"
CONSUMERS = {"consumer_codes": ("acme",)}


async def _json(http: aiohttp.ClientSession, method: str, url: str, **options: Any) -> tuple[int, Any]:
    async with http.request(method, url, **options) as response:
        text = await response.text()
        return response.status, json.loads(text) if text else None


async def _code_and_token(base_url: str) -> tuple[str, str, str]:
    """(code, session, session token): what a consumer page gets over REST."""
    async with aiohttp.ClientSession() as http:
        status, created = await _json(http, "POST", f"{base_url}/v1/groups/acme/codes")
        assert status == 201, created
        status, redeemed = await _json(http, "GET", f"{base_url}/v1/groups/acme/codes/{created['code']}")
        assert status == 200, redeemed
    return created["code"], redeemed["session"], redeemed["session_token"]


def _consumer_hello(token: str) -> bytes:
    return codec.encode(Hello(versions=[1], group="acme", session_token=token))


@contextlib.asynccontextmanager
async def _consumer(base_url: str, token: str) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    """A consumer's bare websocket, past its welcome and its session_connected."""
    async with aiohttp.ClientSession() as http, http.ws_connect(base_url + "/v1/visitor") as ws:
        await ws.send_bytes(_consumer_hello(token))
        assert isinstance(await receive(ws), Welcome)
        assert isinstance(await receive(ws), SessionConnected)
        yield ws


async def _closed_with(ws: aiohttp.ClientWebSocketResponse) -> int | None:
    """Read until the server closes (bounded); the close code."""
    async with asyncio.timeout(5):
        while True:
            msg = await ws.receive()
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                return ws.close_code


# -- 1. consumer codes are a group's choice ---------------------------------------------


async def test_becoming_a_visitor_of_a_group_that_takes_no_consumer_codes(start_herald) -> None:  # type: ignore[no-untyped-def]
    herald: HeraldServer = await start_herald(admin_token=ADMIN_TOKEN)
    base = herald.base_url
    async with aiohttp.ClientSession() as http:
        for method, url in (
            ("POST", f"{base}/v1/groups/acme/codes"),
            ("GET", f"{base}/v1/groups/acme/codes/123456"),
            ("PUT", f"{base}/assistserver/shortcode/create?group=acme"),
            ("GET", f"{base}/assistserver/shortcode/consumer?group=acme&appkey=123456"),
        ):
            async with http.request(method, url) as refused:
                assert (refused.status, await error_of(refused)) == (403, ErrorCode.FORBIDDEN), (method, url)

        # Opted in at run time, a consumer gets in; opted out again, its token opens nothing.
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        settings_url = f"{base}/v1/admin/groups/acme/settings"
        status, body = await _json(http, "PUT", settings_url, json={"allow_consumer_codes": True}, headers=admin)
        assert status == 200 and body["allow_consumer_codes"] is True, body
        _code, _session, token = await _code_and_token(base)
        welcome, _ = await handshake(base, _consumer_hello(token))
        assert isinstance(welcome, Welcome), welcome
        status, body = await _json(http, "PUT", settings_url, json={"allow_consumer_codes": False}, headers=admin)
        assert status == 200 and body["allow_consumer_codes"] is False, body
    error, close_code = await handshake(base, _consumer_hello(token))
    assert isinstance(error, Error) and error.code == ErrorCode.UNAUTHORIZED, error
    assert close_code == CloseCode.UNAUTHORIZED
    await assert_bystanders_served(base)


async def test_a_visitor_token_claiming_a_consumer_id(start_herald) -> None:  # type: ignore[no-untyped-def]
    herald: HeraldServer = await start_herald(**CONSUMERS)
    _code, session_id, _token = await _code_and_token(herald.base_url)
    # Even the group's own back end cannot mint a visitor of a consumer's ID.
    error, close_code = await handshake(herald.base_url, hello(visitor=f"consumer.{session_id}"))
    assert isinstance(error, Error) and error.code == ErrorCode.UNAUTHORIZED, error
    assert close_code == CloseCode.UNAUTHORIZED
    await assert_bystanders_served(herald.base_url)


# -- 1. a consumer is its session's ---------------------------------------------------------


async def test_consumer_presence_reaching_the_groups_agents(start_herald) -> None:  # type: ignore[no-untyped-def]
    herald: HeraldServer = await start_herald(**CONSUMERS)
    _code, session_id, token = await _code_and_token(herald.base_url)
    consumer_id = f"consumer.{session_id}"
    agent = await herald.agent("alice")
    await agent.subscribe_group()
    await agent.subscribe([consumer_id])  # even watched by its ID

    async with _consumer(herald.base_url, token):
        # A regular visitor is announced (the control), the consumer is not.
        await herald.visitor("v-control")
        await agent.wait_for(changed("online", "v-control"))
        heard = await drain(agent, 0.5)
        about_consumer = [e for e in heard if isinstance(e, PresenceChanged | SessionEvent) and consumer_id in repr(e)]
        assert about_consumer == [], about_consumer
        snapshot = await agent.subscribe_group()
        assert consumer_id not in [state["visitor"] for state in snapshot.visitors]
        looked_up = await agent.lookup(consumer_id)
        assert (looked_up["online"], looked_up["connections"]) == (False, [])
        # The agents in its session still reach it.
        await agent.join_session(session=session_id)
        assert await agent.show_terms(consumer_id) == 1
    await assert_bystanders_served(herald.base_url)


async def test_many_connections_with_one_session_token(start_herald) -> None:  # type: ignore[no-untyped-def]
    herald: HeraldServer = await start_herald(**CONSUMERS)
    _code, _session, token = await _code_and_token(herald.base_url)
    async with _consumer(herald.base_url, token):
        for _ in range(3):
            error, close_code = await handshake(herald.base_url, _consumer_hello(token))
            assert isinstance(error, Error) and error.code == ErrorCode.LIMIT_EXCEEDED, error
            assert close_code == CloseCode.TOO_MANY_CONNECTIONS
    # Its one connection gone, it may reconnect (within the grace period: its session lives).
    async with _consumer(herald.base_url, token):
        pass
    await assert_bystanders_served(herald.base_url)


async def test_consumer_connection_and_token_after_its_session_ended(start_herald) -> None:  # type: ignore[no-untyped-def]
    herald: HeraldServer = await start_herald(**CONSUMERS)
    agent = await herald.agent("alice")

    # Ended by end_session: the agent is told, the consumer closed, the token spent.
    _code, session_id, token = await _code_and_token(herald.base_url)
    async with _consumer(herald.base_url, token) as ws:
        await agent.join_session(session=session_id)
        assert isinstance(await receive(ws), GuestCount)
        await ws.send_bytes(codec.encode(EndSession(id=7)))
        assert await receive(ws) == Ack(id=7)
        assert await _closed_with(ws) == CloseCode.SESSION_ENDED
    ended = await agent.wait_for(lambda e: isinstance(e, SessionEvent) and e.event == "ended", timeout=5)
    assert (ended.session, ended.reason) == (session_id, "ended")
    error, close_code = await handshake(herald.base_url, _consumer_hello(token))
    assert isinstance(error, Error) and error.code == ErrorCode.SESSION_NOT_FOUND, error
    assert close_code == CloseCode.SESSION_ENDED

    # Ended by going offline (past the grace period): the token no longer connects.
    _code, session_id, token = await _code_and_token(herald.base_url)
    async with _consumer(herald.base_url, token):
        pass
    await asyncio.sleep(herald.settings.grace_period + 0.6)
    error, close_code = await handshake(herald.base_url, _consumer_hello(token))
    assert isinstance(error, Error) and error.code == ErrorCode.SESSION_NOT_FOUND, error
    assert close_code == CloseCode.SESSION_ENDED
    await assert_bystanders_served(herald.base_url)


# -- 3. smaller findings ------------------------------------------------------------------------


async def test_abandoned_rest_codes_holding_sessions_for_hours(start_herald) -> None:  # type: ignore[no-untyped-def]
    herald: HeraldServer = await start_herald(code_ttl=0.5, **CONSUMERS)
    async with aiohttp.ClientSession() as http:
        status, unredeemed = await _json(http, "POST", f"{herald.base_url}/v1/groups/acme/codes")
        assert status == 201
    _code, unconnected, token = await _code_and_token(herald.base_url)  # redeemed, never connected
    agent = await herald.agent("alice")
    await asyncio.sleep(1.0)
    for session_id in (unredeemed["session"], unconnected):
        assert await _join_error(agent, session=session_id) == ErrorCode.SESSION_NOT_FOUND, session_id
    error, close_code = await handshake(herald.base_url, _consumer_hello(token))
    assert isinstance(error, Error) and error.code == ErrorCode.SESSION_NOT_FOUND, error
    assert close_code == CloseCode.SESSION_ENDED

    # One that is connected lives on past its code_ttl.
    _code, connected, token = await _code_and_token(herald.base_url)
    async with _consumer(herald.base_url, token):
        await asyncio.sleep(1.0)
        assert (await agent.join_session(session=connected)).session == connected
    await assert_bystanders_served(herald.base_url)


async def _join_error(agent: AgentClient, **how: str) -> str:
    """The error code a ``join_session`` gets (``"joined"`` if it got in)."""
    try:
        await agent.join_session(**how)
    except RequestFailed as failure:
        return failure.code
    return "joined"


async def test_one_address_spending_its_groups_code_lookup_budget(start_herald) -> None:  # type: ignore[no-untyped-def]
    herald: HeraldServer = await start_herald(code_lookups_per_address=3, code_lookups_per_group=10, **CONSUMERS)
    url = herald.base_url + "/v1/groups/acme/codes/{:06d}"
    async with session() as attacker, session("127.0.0.2") as customer:
        statuses = [(await attacker.get(url.format(guess))).status for guess in range(40)]
        assert statuses == [404] * 3 + [429] * 37, statuses
        # The group's budget holds only the attacker's 3: another address still looks up.
        for guess in range(3):
            assert (await customer.get(url.format(guess))).status == 404
        assert (await customer.get(url.format(3))).status == 429  # its own budget, 3
    await assert_bystanders_served(herald.base_url)


async def test_agent_guessing_codes_over_its_websocket(start_herald) -> None:  # type: ignore[no-untyped-def]
    herald: HeraldServer = await start_herald(code_lookups_per_address=5, code_lookups_per_group=8)
    visitor = await herald.visitor("v-shows-code")
    live = await visitor.start_session("random")
    guesser = await herald.agent("mallory")
    answers = [await _join_error(guesser, code=f"{guess:06d}") for guess in range(12)]
    assert answers == [ErrorCode.SESSION_NOT_FOUND] * 5 + [ErrorCode.RATE_LIMITED] * 7, answers
    assert await _join_error(guesser, code=live.key) == ErrorCode.RATE_LIMITED  # even the right one, now
    # Joining by key or session ID is no guess: not counted.
    assert (await guesser.join_session(session=live.session)).session == live.session

    # Another agent has its own budget, within the group's (8: the guesser spent 5).
    other = await herald.agent("bob")
    assert (await other.join_session(code=live.key)).session == live.session
    answers = [await _join_error(other, code=f"{guess:06d}") for guess in range(100, 104)]
    assert answers == [ErrorCode.SESSION_NOT_FOUND] * 2 + [ErrorCode.RATE_LIMITED] * 2, answers
    await assert_bystanders_served(herald.base_url)


async def test_a_consumers_signals_reach_only_the_agents_of_its_session(start_herald: Any) -> None:
    """A consumer is scoped to its session: an agent watching the whole group
    hears nothing from it; the agent that joined its session does."""
    herald = await start_herald(**CONSUMERS)
    watcher = await herald.agent("watcher")
    await watcher.subscribe_group()
    helper = await herald.agent("helper")
    code, _session, token = await _code_and_token(herald.base_url)
    consumer = VisitorClient.for_session(herald.base_url, "acme", token, reconnect=False)
    herald.clients.append(consumer)
    await consumer.connect()
    await helper.join_session(code=code)
    await consumer.signal_agent("hello", {"n": 1})
    assert (await helper.wait_for(signal("hello"))).data == {"n": 1}
    assert not [e for e in await drain(watcher, 0.3) if isinstance(e, Signal)]
    await assert_bystanders_served(herald.base_url)
