"""A visitor's hello names the support session it believes it holds, so that
one that ended while it was away is reported (PROTOCOL.md §11.2). Naming
another visitor's session, live or ended, tells it nothing and does nothing
to it: the answer is the one a made-up ID gets (``session_event ended``,
reason ``ended``, its own visitor ID), and the session's visitor and agents
go on as if nothing happened."""

from __future__ import annotations

import contextlib
from typing import Any

import aiohttp

from herald_presence.protocol import codec
from herald_presence.protocol.messages import GuestCount, SessionEvent, SessionSignal, Welcome

from ..harness import HeraldServer, drain, receive
from ..test_revoke import call
from .helpers import assert_bystanders_served, hello


async def told_after_welcome(herald: HeraldServer, visitor: str, session: str) -> tuple[dict[str, Any], list[Any]]:
    """A hello of ``visitor`` (its own valid token) naming ``session``: what
    comes right after the welcome (as a map, without the session ID), and
    anything more within half a second."""
    async with aiohttp.ClientSession() as http, http.ws_connect(herald.base_url + "/v1/visitor") as ws:
        await ws.send_bytes(hello(visitor, session=session))
        assert isinstance(await receive(ws), Welcome)
        told = await receive(ws)
        assert isinstance(told, SessionEvent) and told.session == session, told
        more = []
        with contextlib.suppress(TimeoutError):
            while (msg := await ws.receive(timeout=0.5)).type is aiohttp.WSMsgType.BINARY:
                more.append(codec.decode(msg.data))
        return {k: v for k, v in told.to_wire().items() if k != "session"}, more


async def test_a_visitor_naming_another_visitors_session_in_its_hello_learns_nothing_and_takes_nothing(
    herald: HeraldServer,
) -> None:
    victim = await herald.visitor("cust-42")
    session = (await victim.start_session("random")).session
    agent = await herald.agent("alice")
    await agent.join_session(session=session)
    assert (await victim.wait_for(GuestCount)).guests == 1
    plain = {"type": "session_event", "event": "ended", "visitor": "mallory", "reason": "ended"}

    # Live: the same answer as a made-up ID; mallory is no member and the session stays the victim's.
    assert await told_after_welcome(herald, "mallory", session) == (plain, [])
    assert await told_after_welcome(herald, "mallory", "s00000000deadbeef") == (plain, [])
    assert not [e for e in await drain(agent, 0.3) if isinstance(e, SessionEvent)], "the agents heard nothing"
    other = await herald.agent("bob")
    assert (await other.join_session(session=session)).guests == 2
    assert (await victim.wait_for(GuestCount)).guests == 2, "guest counts still go to the victim"
    assert await victim.session_signal(session, "rtc.ready") == 2
    assert (await agent.wait_for(SessionSignal)).visitor == "cust-42"
    assert victim.session_id == session

    # Ended by the group's back end: its visitor would learn "terminated"; mallory, the plain answer.
    status, _ = await call(herald, f"/v1/groups/acme/sessions/{session}/end")
    assert status == 200
    assert await told_after_welcome(herald, "mallory", session) == (plain, [])
    await assert_bystanders_served(herald.base_url)
