"""The browser client's session signals (PROTOCOL.md §11.9), inside Chromium:
the API both sides of a WebRTC call need (an SDP-sized offer, an answer to
the sender's connection, trickled ICE candidates in order, the session's ICE
servers), reconnect-safe. The media itself (getDisplayMedia, the video) is
the pages' business."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Browser, Page

from herald_presence.protocol import tokens
from herald_presence.protocol.checks import MAX_PAYLOAD_BYTES
from herald_presence.protocol.errors import CloseCode
from herald_presence.protocol.messages import SessionSignal
from herald_presence.server.web.keys import HUB

from ..harness import SECRET, HeraldServer, drain, settings

# A page of Herald's origin with no script of its own: the client is imported into it.
BLANK = "/js/vendor/msgpack.LICENSE"
TURN_SECRET = "coturn-static-auth-secret"


@pytest.fixture
async def herald() -> AsyncIterator[HeraldServer]:
    server_settings = settings(keepalive="0.5")
    turn = {"urls": ["turn:turn.acme.example"], "secret": TURN_SECRET, "ttl": 600}
    server_settings.groups["acme"].ice_servers = [turn]
    server = await HeraldServer(server_settings).start()
    yield server
    await server.stop()


async def js_visitor_in_session(browser: Browser, herald: HeraldServer, visitor: str) -> tuple[Page, str]:
    page = await browser.new_page()
    page.set_default_timeout(5_000)
    await page.goto(herald.base_url + BLANK)
    token = tokens.visitor_token(SECRET, "acme", visitor)
    session = await page.evaluate(
        """async ([visitor, token]) => {
            window.herald = await import('/js/herald.js');
            window.got = [];
            window.connects = 0;
            window.client = new herald.VisitorClient(undefined, {group: "acme", visitor, token});
            client.addEventListener("session_signal", (e) => got.push(e.detail));
            client.addEventListener("connected", () => connects++);
            await client.connect();
            return (await client.startSession("visitor")).session;
        }""",
        [visitor, token],
    )
    return page, session


async def test_js_visitor_and_a_python_agent_exchange_an_offer_an_answer_and_candidates(
    browser: Browser, herald: HeraldServer
) -> None:
    page, session = await js_visitor_in_session(browser, herald, "v-call")
    servers = await page.evaluate("() => client.session.ice_servers")
    assert servers[0]["urls"] == ["turn:turn.acme.example"] and servers[0]["username"].endswith(
        ":" + await page.evaluate("() => client.connectionId")
    )
    agent = await herald.agent("alice")
    joined = await agent.join_session(key="v-call")
    assert joined.ice_servers is not None
    assert joined.ice_servers[0]["username"].endswith(":" + (agent.connection_id or ""))

    # The visitor's offer, as big as one may be (64 KiB of UTF-8), then its candidates, fired together.
    delivered = await page.evaluate(
        """async ([session, size]) => {
            const sdp = "v=0\\r\\n" + "é".repeat((size - 5) / 2) + "x".repeat((size - 5) % 2);
            const offer = client.sessionSignal(session, "offer", sdp);
            const candidates = [];
            for (let i = 0; i < 20; i++) {
                candidates.push(client.sessionSignal(session, "candidate", JSON.stringify({candidate: `c${i}`})));
            }
            return Promise.all([offer, ...candidates]);
        }""",
        [session, MAX_PAYLOAD_BYTES],
    )
    assert delivered == [1] * 21
    offer = await agent.wait_for(SessionSignal)
    assert offer.event == "offer" and len(offer.payload.encode()) == MAX_PAYLOAD_BYTES
    candidates = [await agent.wait_for(SessionSignal) for _ in range(20)]
    assert [c.payload for c in candidates] == [f'{{"candidate":"c{i}"}}' for i in range(20)]
    too_big = await page.evaluate(
        """(session) => client.sessionSignal(session, "offer", "x".repeat(65537)).catch((e) => e.code)""", session
    )
    assert too_big == "invalid"

    # The agent answers the sender's connection; the page gets it as a "session_signal" event.
    assert await agent.session_signal(session, "answer", "v=0 answer", to=offer.connection) == 1
    await page.wait_for_function("got.length === 1")
    got = await page.evaluate("() => got[0]")
    assert (got["event"], got["payload"], got["agent"], got["connection"]) == (
        "answer", "v=0 answer", "alice", agent.connection_id,
    )  # fmt: skip
    not_member = await page.evaluate(
        """() => client.sessionSignal("s0000000000000000", "offer", "x").catch((e) => e.code)"""
    )
    assert not_member == "session_not_found"
    await page.evaluate("() => client.close()")


async def test_js_session_signals_sent_across_a_reconnect_arrive_once_and_in_order(
    browser: Browser, herald: HeraldServer
) -> None:
    page, session = await js_visitor_in_session(browser, herald, "v-moved")
    agent = await herald.agent("alice")
    await agent.join_session(key="v-moved")
    await page.evaluate(
        """(session) => {
            window.sent = [];
            for (let i = 0; i < 30; i++) sent.push(client.sessionSignal(session, "candidate", `c${i}`));
        }""",
        session,
    )
    for conn in herald.app[HUB].visitors.all():  # a drain moves the visitor mid-stream
        conn.close(CloseCode.RECONNECT, "draining")
    assert await page.evaluate("() => Promise.all(sent)") == [1] * 30
    await page.wait_for_function("connects === 2")  # the acks may all have come before the close
    got = [s.payload for s in await drain(agent, 1.0) if isinstance(s, SessionSignal)]
    assert got == [f"c{i}" for i in range(30)], got
    await page.evaluate("() => client.close()")
