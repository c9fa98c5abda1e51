"""Session signals (PROTOCOL.md §11.9): the members of a support session, its
visitor connection and the agents that joined it, exchange WebRTC's offers,
answers and ICE candidates through Herald, in order, with acks, on one
instance and across a cluster; and ICE servers with short-lived TURN
credentials (§11.10) come with every join. Runs on every backend."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Awaitable
from typing import Any

import aiohttp
import pytest

from herald_presence.protocol import RequestFailed, codec, tokens
from herald_presence.protocol.checks import MAX_PAYLOAD_BYTES
from herald_presence.protocol.client.agent import AgentClient
from herald_presence.protocol.client.base import Disconnected
from herald_presence.protocol.client.visitor import VisitorClient
from herald_presence.protocol.errors import CloseCode, ErrorCode
from herald_presence.protocol.messages import (
    Ack,
    Error,
    GuestCount,
    Ping,
    Pong,
    SessionConnected,
    SessionSignal,
    StartSession,
)
from herald_presence.server.web.keys import HUB

from .conftest import Start
from .harness import HeraldServer, drain, receive
from .topologies import backend_name  # noqa: F401  (memory, redis and a Redis Cluster)

SDP = "v=0\r\n" + "a=candidate:" * ((MAX_PAYLOAD_BYTES - 5) // 12)  # an offer as big as one may be
SDP = SDP + "x" * (MAX_PAYLOAD_BYTES - len(SDP))
TURN_SECRET = "coturn-static-auth-secret"
ADMIN_TOKEN = "admin-token-0123456789"


def session_signals(events: list[Any]) -> list[SessionSignal]:
    return [event for event in events if isinstance(event, SessionSignal)]


async def refused(request: Awaitable[Any], code: str) -> None:
    with pytest.raises(RequestFailed) as failure:
        await request
    assert failure.value.code == code, failure.value


async def in_session(
    visitor_server: HeraldServer, agent_servers: list[HeraldServer], visitor_id: str = "v1"
) -> tuple[VisitorClient, list[AgentClient], str]:
    """A visitor's one-click session and one joined agent per server given."""
    visitor = await visitor_server.visitor(visitor_id)
    session = (await visitor.start_session("visitor")).session
    agents = []
    for i, server in enumerate(agent_servers):
        agent = await server.agent(f"agent-{i}")
        await agent.join_session(key=visitor_id)
        agents.append(agent)
    return visitor, agents, session


async def test_an_sdp_sized_offer_an_answer_and_trickled_candidates_go_between_members_in_order(
    herald: HeraldServer,
) -> None:
    visitor, (agent,), session = await in_session(herald, [herald])

    assert await visitor.session_signal(session, "offer", SDP) == 1
    offer = await agent.wait_for(SessionSignal)
    assert (offer.session, offer.event, offer.payload, offer.visitor, offer.agent) == (
        session, "offer", SDP, "v1", None,
    )  # fmt: skip
    assert offer.connection == visitor.connection_id and offer.sid

    assert await agent.session_signal(session, "answer", "v=0 answer", to=offer.connection) == 1
    answer = await visitor.wait_for(SessionSignal)
    assert (answer.event, answer.payload, answer.agent, answer.connection) == (
        "answer", "v=0 answer", "agent-0", agent.connection_id,
    )  # fmt: skip

    # Trickle ICE: fired together, they arrive in the order of the calls, each once.
    candidates = [
        json.dumps({"candidate": f"candidate:{i} 1 udp 2122260223 10.0.0.1 {50000 + i} typ host"}) for i in range(40)
    ]
    acks = await asyncio.gather(
        *(visitor.session_signal(session, "candidate", c, {"n": i}) for i, c in enumerate(candidates))
    )
    assert acks == [1] * 40
    got = [await agent.wait_for(SessionSignal) for _ in candidates]
    assert [(s.event, s.payload, s.data) for s in got] == [("candidate", c, {"n": i}) for i, c in enumerate(candidates)]
    assert not session_signals(await drain(agent, 0.2))


async def test_a_signal_goes_to_every_other_member_or_to_the_one_named(herald: HeraldServer) -> None:
    visitor, (alice, bob), session = await in_session(herald, [herald, herald])

    assert await visitor.session_signal(session, "hello") == 2  # both agents, not the sender
    assert [(await a.wait_for(SessionSignal)).event for a in (alice, bob)] == ["hello", "hello"]
    assert not session_signals(await drain(visitor, 0.1))

    assert await alice.session_signal(session, "to-all") == 2  # the visitor and bob
    assert (await visitor.wait_for(SessionSignal)).agent == "agent-0"
    assert (await bob.wait_for(SessionSignal)).connection == alice.connection_id

    assert await alice.session_signal(session, "to-visitor", to="visitor") == 1
    assert (await visitor.wait_for(SessionSignal)).event == "to-visitor"
    assert await visitor.session_signal(session, "to-bob", to=bob.connection_id) == 1
    assert (await bob.wait_for(SessionSignal)).event == "to-bob"
    assert await bob.session_signal(session, "bob-to-alice", to=alice.connection_id) == 1
    assert (await alice.wait_for(SessionSignal)).event == "bob-to-alice"
    for client in (visitor, alice, bob):  # nobody got what was not theirs
        assert not session_signals(await drain(client, 0.1))

    await refused(visitor.session_signal(session, "x", to="c0000000000000000"), ErrorCode.MEMBER_OFFLINE)
    await refused(alice.session_signal(session, "x", to=alice.connection_id or ""), ErrorCode.INVALID)
    await refused(visitor.session_signal(session, "x", to="visitor"), ErrorCode.INVALID)  # itself
    await bob.leave_session(session)
    await refused(alice.session_signal(session, "x", to=bob.connection_id or ""), ErrorCode.MEMBER_OFFLINE)
    assert await alice.session_signal(session, "after-bob") == 1  # the visitor only


async def test_a_visitor_between_connections_is_not_reachable_and_its_new_connection_is(herald: HeraldServer) -> None:
    visitor, (agent,), session = await in_session(herald, [herald])
    old = visitor.connection_id
    for conn in herald.app[HUB].visitors.all():
        conn.close(CloseCode.RECONNECT, "test")
    await visitor.wait_for(Disconnected)
    await visitor.wait_for(SessionConnected)  # its new connection is the session's from now on
    assert visitor.connection_id != old and visitor.session is not None and visitor.session.session == session
    await refused(agent.session_signal(session, "stale", to=old or ""), ErrorCode.MEMBER_OFFLINE)
    assert await agent.session_signal(session, "renegotiate", to="visitor") == 1
    assert (await visitor.wait_for(SessionSignal)).event == "renegotiate"


async def test_a_signal_sent_while_the_agent_reconnects_goes_once_it_is_back_in_the_session(
    herald: HeraldServer,
) -> None:
    visitor, (agent,), session = await in_session(herald, [herald])
    for conn in herald.app[HUB].watchers.agents():
        conn.close(CloseCode.RECONNECT, "draining")
    await agent.wait_for(Disconnected)
    assert await agent.session_signal(session, "offer-again", "sdp") == 1  # waits for the rejoin
    got = session_signals(await drain(visitor, 0.3))
    assert [s.event for s in got] == ["offer-again"] and got[0].connection == agent.connection_id


async def test_a_signal_sent_again_with_its_sid_is_acted_on_once(herald: HeraldServer) -> None:
    visitor, (agent,), session = await in_session(herald, [herald])
    for _ in range(3):
        assert await visitor.session_signal(session, "offer", "sdp", sid="offer-1") == 1
    assert [s.sid for s in session_signals(await drain(agent, 0.3))] == ["offer-1"]
    assert agent.duplicate_signals == 2


async def test_the_limits_and_what_exceeding_them_answers(herald: HeraldServer) -> None:
    visitor, (agent,), session = await in_session(herald, [herald])
    with pytest.raises(Exception, match="payload"):  # the SDK refuses it before sending
        await visitor.session_signal(session, "offer", SDP + "x")
    async with herald.raw_visitor("raw") as ws:
        await ws.send_bytes(codec.encode(StartSession(id=1, key_type="visitor")))
        raw_session = (await receive(ws)).session
        await agent.join_session(session=raw_session)
        assert isinstance(await receive(ws), GuestCount)
        # A payload one byte over: invalid, answered with its id; the connection stays.
        over = {"type": "session_signal", "id": 2, "session": raw_session, "event": "offer", "payload": SDP + "x"}
        await ws.send_bytes(codec.encode_map(over))
        answer = await receive(ws)
        assert isinstance(answer, Error) and (answer.code, answer.id) == (ErrorCode.INVALID, 2), answer
        # At the limit, in a frame over max_frame_bytes: a member may.
        frame = codec.encode(
            SessionSignal(session=raw_session, event="offer", payload=SDP, id=3, data={"k": "v" * 2048})
        )
        assert herald.settings.max_frame_bytes < len(frame) <= herald.settings.max_session_frame_bytes
        await ws.send_bytes(frame)
        assert await receive(ws) == Ack(id=3, delivered=1)
        # Signal data over max_signal_bytes: limit_exceeded.
        data = {f"k{i}": "v" * 300 for i in range(30)}
        await ws.send_bytes(codec.encode(SessionSignal(session=raw_session, event="x", data=data, id=4)))
        answer = await receive(ws)
        assert isinstance(answer, Error) and (answer.code, answer.id) == (ErrorCode.LIMIT_EXCEEDED, 4), answer
        # Any other frame that large, even from a member: closed with 1009.
        await ws.send_bytes(codec.encode_map({"type": "ping", "pad": "x" * herald.settings.max_frame_bytes}))
        assert (await ws.receive(timeout=5)).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == 1009
    async with herald.raw_visitor("raw-2") as ws:
        # A frame over max_session_frame_bytes closes even a member's connection.
        await ws.send_bytes(codec.encode(StartSession(id=1, key_type="visitor")))
        assert isinstance(await receive(ws), SessionConnected)
        await ws.send_bytes(b"\x81" + b"\x00" * herald.settings.max_session_frame_bytes)
        assert (await ws.receive(timeout=5)).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == 1009
    async with herald.raw_visitor("not-a-member") as ws:
        # Nobody outside a session may send a frame over max_frame_bytes, a session signal or not.
        await ws.send_bytes(frame)
        assert (await ws.receive(timeout=5)).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == 1009
    assert await visitor.session_signal(session, "still-fine") == 1


async def test_members_on_three_instances_get_each_others_signals_in_order_with_acks(start_instance: Start) -> None:
    a, b, c = await start_instance(), await start_instance(), await start_instance()
    visitor, (on_b, on_c), session = await in_session(a, [b, c])
    assert await visitor.session_signal(session, "offer", SDP) == 2
    for agent in (on_b, on_c):
        assert (await agent.wait_for(SessionSignal)).payload == SDP
    sent = [f"candidate-{i}" for i in range(30)]
    assert await asyncio.gather(*(on_b.session_signal(session, "candidate", p, to="visitor") for p in sent)) == [1] * 30
    assert [s.payload for s in [await visitor.wait_for(SessionSignal) for _ in sent]] == sent
    assert await on_c.session_signal(session, "to-b", to=on_b.connection_id) == 1
    assert (await on_b.wait_for(SessionSignal)).event == "to-b"
    assert not session_signals(await drain(visitor, 0.2))


async def test_a_visitor_moved_to_another_instance_keeps_its_session_signals(start_instance: Start) -> None:
    a, b = await start_instance(), await start_instance()
    visitor = VisitorClient(a.base_url, "acme", "v1", tokens.visitor_token(a.secret("acme"), "acme", "v1"))
    b.clients.append(visitor)  # closed with b: a's stop would close it
    await visitor.connect()
    session = (await visitor.start_session("visitor")).session
    agent = await b.agent("alice")
    await agent.join_session(session=session)
    await a.stop()  # the visitor's instance goes: it comes back on b (its base URL is a's, so: by hand)
    visitor.base_url = b.base_url
    await visitor.wait_for(Disconnected)
    back = await visitor.wait_for(SessionConnected, timeout=15)  # its new connection is the session's
    assert back.session == session
    assert await agent.session_signal(session, "renegotiate", to="visitor") == 1
    assert (await visitor.wait_for(SessionSignal)).event == "renegotiate"
    assert await visitor.session_signal(session, "offer", "sdp") == 1
    assert (await agent.wait_for(SessionSignal)).event == "offer"


# --- ICE servers and TURN credentials ---------------------------------------------------


def coturn_password(secret: str, username: str) -> str:
    """coturn's use-auth-secret (TURN REST API): base64(HMAC-SHA1(secret, username))."""
    return base64.b64encode(hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()).decode()


def with_ice(server_settings: Any) -> None:
    server_settings.groups["acme"].ice_servers = [
        {"urls": ["stun:stun.acme.example:3478"]},
        {"urls": ["turn:turn.acme.example:3478", "turns:turn.acme.example:5349"], "secret": TURN_SECRET, "ttl": 600},
    ]


@pytest.fixture
async def ice_herald(backend_settings: dict[str, Any]) -> Any:
    from .harness import settings

    server_settings = settings(**backend_settings, admin_token=ADMIN_TOKEN)
    with_ice(server_settings)
    server = await HeraldServer(server_settings).start()
    yield server
    await server.stop()


async def test_every_member_gets_the_groups_ice_servers_with_turn_credentials_of_its_own(
    ice_herald: HeraldServer,
) -> None:
    before = int(time.time())
    visitor = await ice_herald.visitor("v1")
    connected = await visitor.start_session("visitor")
    agent = await ice_herald.agent("alice")
    joined = await agent.join_session(key="v1")
    after = int(time.time())
    for member, servers in ((visitor.connection_id, connected.ice_servers), (agent.connection_id, joined.ice_servers)):
        assert servers is not None
        stun, turn = servers
        assert stun == {"urls": ["stun:stun.acme.example:3478"]}
        assert turn["urls"] == ["turn:turn.acme.example:3478", "turns:turn.acme.example:5349"]
        expiry, _, who = turn["username"].partition(":")
        assert who == member and before + 600 <= int(expiry) <= after + 600
        assert turn["credential"] == coturn_password(TURN_SECRET, turn["username"])
        assert TURN_SECRET not in json.dumps(servers)
    # A visitor back from a reconnect gets fresh ones for its new connection.
    for conn in ice_herald.app[HUB].visitors.all():
        conn.close(CloseCode.RECONNECT, "test")
    await visitor.wait_for(Disconnected)
    await visitor.wait_for(SessionConnected)  # unsolicited, after the new welcome
    assert visitor.session is not None and visitor.session.ice_servers is not None
    assert visitor.session.ice_servers[1]["username"].endswith(":" + (visitor.connection_id or ""))


async def test_ice_servers_set_through_the_admin_api_replace_the_configured_ones_and_hide_the_secret(
    ice_herald: HeraldServer,
) -> None:
    url = ice_herald.base_url + "/v1/admin/groups/acme/settings"
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers=admin) as response:
            shown = await response.json()
        assert shown["ice_servers"][1] == {
            "urls": ["turn:turn.acme.example:3478", "turns:turn.acme.example:5349"], "ttl": 600, "has_secret": True,
        }  # fmt: skip
        assert TURN_SECRET not in json.dumps(shown)
        changes = {"ice_servers": [{"urls": "turn:other.example", "secret": "another-secret", "ttl": 120}]}
        async with http.put(url, json=changes, headers=admin) as response:
            assert response.status == 200 and "another-secret" not in await response.text()
        for wrong in (
            [{"urls": ["turn:x"], "username": "u", "credential": "long-term"}],  # a fixed password: never
            [{"urls": ["turn:x"]}],  # TURN without its secret
            [{"urls": ["http://x"]}],
        ):
            async with http.put(url, json={"ice_servers": wrong}, headers=admin) as response:
                assert response.status == 400, wrong
    visitor = await ice_herald.visitor("v1")
    servers = (await visitor.start_session("visitor")).ice_servers
    assert servers is not None and [s["urls"] for s in servers] == [["turn:other.example"]]
    assert servers[0]["credential"] == coturn_password("another-secret", servers[0]["username"])


async def test_a_group_without_ice_servers_hands_out_none(herald: HeraldServer) -> None:
    visitor = await herald.visitor("v1")
    assert (await visitor.start_session("visitor")).ice_servers is None


async def test_a_ping_between_session_signals_is_still_answered(herald: HeraldServer) -> None:
    """The frame loop is not held by a session signal's ack."""
    async with herald.raw_visitor("raw") as ws:
        await ws.send_bytes(codec.encode(StartSession(id=1, key_type="visitor")))
        session = (await receive(ws)).session
        await ws.send_bytes(codec.encode(SessionSignal(session=session, event="x", id=2)))
        await ws.send_bytes(codec.encode(Ping()))
        answers = [await receive(ws), await receive(ws)]
        assert Pong() in answers and Ack(id=2, delivered=0) in answers
