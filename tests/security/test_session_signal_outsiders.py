"""Session signals stay inside their session: nobody but its members (the
session's visitor connection and the agents that joined it) can send one or
receive one, whatever session ID they know or guess (PROTOCOL.md §11.9). An
outsider's attempt gets ``session_not_found``, the answer an unknown session
gets, and members hear nothing of it."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from herald_presence.protocol import RequestFailed, codec
from herald_presence.protocol.errors import ErrorCode
from herald_presence.protocol.messages import Error, SessionEvent, SessionSignal

from ..harness import HeraldServer, drain, receive
from .helpers import assert_bystanders_served

NOT_FOUND = ErrorCode.SESSION_NOT_FOUND


def signals_in(events: list[Any]) -> list[SessionSignal]:
    return [event for event in events if isinstance(event, SessionSignal)]


async def refused(request: Any) -> None:
    with pytest.raises(RequestFailed) as failure:
        await request
    assert failure.value.code == NOT_FOUND, failure.value


async def test_outsiders_who_know_a_session_id_can_neither_send_nor_hear_its_session_signals(
    herald: HeraldServer,
) -> None:
    other_tab = await herald.visitor("cust-42")  # the same visitor; the session is its other connection's
    visitor = await herald.visitor("cust-42")
    # An agent watching the visitor learns the session ID from session_event "started".
    watcher = await herald.agent("eve")
    await watcher.subscribe(["cust-42"])
    session = (await visitor.start_session("visitor")).session
    assert (await watcher.wait_for(SessionEvent)).session == session
    member = await herald.agent("alice")
    await member.join_session(session=session)
    visitor_of_session = await herald.visitor("cust-43")
    other_session = (await visitor_of_session.start_session("visitor")).session
    foreign = await herald.agent("mallory", group="other")

    # Members talk; outsiders hear nothing.
    assert await visitor.session_signal(session, "offer", "v=0 secret sdp") == 1
    assert await member.session_signal(session, "answer", "v=0", to="visitor") == 1
    # Outsiders sending: refused as if there were no such session, and nothing reaches a member.
    await refused(watcher.session_signal(session, "offer", "v=0 forged"))
    await refused(watcher.session_signal(session, "offer", "v=0 forged", to="visitor"))
    await refused(other_tab.session_signal(session, "offer", "v=0 forged", to=member.connection_id))
    await refused(visitor_of_session.session_signal(session, "offer", "v=0 forged"))  # its own session is another
    await refused(member.session_signal(other_session, "offer", "v=0 forged"))  # a member of one is not of all
    await refused(foreign.session_signal(session, "offer", "v=0 forged"))  # another group
    await refused(watcher.session_signal("s0000000000000000", "offer", "v=0"))  # a guess: the same answer

    for outsider in (watcher, other_tab, visitor_of_session, foreign):
        assert not signals_in(await drain(outsider, 0.2)), "an outsider heard a session signal"
    assert [s.event for s in signals_in(await drain(member, 0.1))] == ["offer"]
    assert [s.event for s in signals_in(await drain(visitor, 0.1))] == ["answer"]

    # An agent that left, and everyone once the session ended, are outsiders too.
    await member.leave_session(session)
    await refused(member.session_signal(session, "late", "x"))
    await member.join_session(session=session)
    await visitor.end_session()
    await refused(member.session_signal(session, "after-end", "x"))
    await refused(visitor.session_signal(session, "after-end", "x"))
    await assert_bystanders_served(herald.base_url)


async def test_an_outsider_cannot_send_the_large_frames_members_may(herald: HeraldServer) -> None:
    """Frames over ``max_frame_bytes`` are read only from a session's member:
    an outsider's session signal that size closes its connection (1009)."""
    visitor = await herald.visitor("cust-42")
    session = (await visitor.start_session("visitor")).session
    frame = codec.encode(SessionSignal(session=session, event="offer", payload="x" * 65536, id=1))
    assert len(frame) > herald.settings.max_frame_bytes
    async with herald.raw_visitor("mallory") as ws:
        await ws.send_bytes(frame)
        msg = await ws.receive(timeout=5)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED) and ws.close_code == 1009
    async with herald.raw_visitor("mallory-2") as ws:  # within max_frame_bytes: refused, the connection stays
        small = codec.encode(SessionSignal(session=session, event="offer", payload="x" * 1000, id=2))
        await ws.send_bytes(small)
        answer = await receive(ws)
        assert isinstance(answer, Error) and (answer.code, answer.id) == (NOT_FOUND, 2)
    assert not signals_in(await drain(visitor, 0.2))
    await assert_bystanders_served(herald.base_url)


async def test_a_flood_of_forged_session_signals_costs_members_nothing(start_herald: Any) -> None:
    herald = await start_herald(message_rate=50, message_burst=100)
    visitor = await herald.visitor("cust-42")
    session = (await visitor.start_session("visitor")).session
    member = await herald.agent("alice")
    await member.join_session(session=session)
    attacker = await herald.agent("eve")
    results = await asyncio.gather(
        *(attacker.session_signal(session, "offer", "x" * 1000, retries=0) for _ in range(50)), return_exceptions=True
    )
    assert all(isinstance(r, RequestFailed) and r.code == NOT_FOUND for r in results), results[:3]
    assert not signals_in(await drain(visitor, 0.2))
    assert await member.session_signal(session, "offer", "v=0") == 1
    await assert_bystanders_served(herald.base_url)
