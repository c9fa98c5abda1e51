"""The browser client on its own, inside Chromium: its frames are the
protocol's bytes, its backoff is full jitter, and it reconnects (or not) by
the close-code classes of PROTOCOL.md §6 against a real server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest
from playwright.async_api import Browser, Page

from herald_presence.protocol import codec, tokens
from herald_presence.protocol.errors import CloseCode
from herald_presence.protocol.messages import Ack, GuestCount, Hello, Signal
from herald_presence.server.web.keys import HUB

from ..harness import SECRET, HeraldServer, receive, settings
from ..test_signals import ScriptedHerald

# A page of Herald's origin with no script of its own: the client is imported into it.
BLANK = "/js/vendor/msgpack.LICENSE"
FRAMES: list[dict[str, Any]] = [
    {
        "type": "hello",
        "versions": [1],
        "group": "acme",
        "visitor": "v-42",
        "token": "1767229200.i7G7uQ0AZil4DS4z-cb",
        "data": {"page": "/account"},
    },
    {"type": "signal", "event": "terms", "data": {"status": "accepted", "n": -3, "ratio": 0.5, "gone": None}},
    {"type": "subscribe", "id": 9_007_199_254_740_991, "visitors": ["v-1", "v-2"]},
    {"type": "start_session", "id": 3, "key_type": "random"},
    {"type": "presence", "data": {"title": "ü" * 40 + "€" * 300, "big": 2**40, "flag": True}},
    {
        "type": "presence_changed",
        "change": "online",
        "state": {
            "visitor": "v-42",
            "online": True,
            "version": 1767225601234567,
            "connections": [
                {"connection": "c1", "data": {}, "visible": True, "focused": True, "since": 1767225601.234}
            ],
        },
    },
]


@pytest.fixture
async def herald() -> AsyncIterator[HeraldServer]:
    server = await HeraldServer(settings(keepalive="0.5")).start()
    yield server
    await server.stop()


async def client_page(browser: Browser, herald: HeraldServer) -> Page:
    page = await browser.new_page()
    page.set_default_timeout(5_000)
    await page.goto(herald.base_url + BLANK)
    await page.evaluate("async () => { window.herald = await import('/js/herald.js'); }")
    return page


async def test_js_frames_are_the_bytes_the_python_codec_makes(browser: Browser, herald: HeraldServer) -> None:
    page = await client_page(browser, herald)
    for frame in FRAMES:
        js_bytes = await page.evaluate("(frame) => Array.from(herald.encodeFrame(frame))", frame)
        assert bytes(js_bytes) == codec.encode_map(frame), frame["type"]
        wire = list(codec.encode_map(frame))
        decoded = await page.evaluate("(bytes) => herald.decodeFrame(new Uint8Array(bytes))", wire)
        assert decoded == frame
    # The spec's worked example (PROTOCOL.md §9), byte for byte.
    token = "1767229200.i7G7uQ0AZil4DS4z-cbni8uLffJFGm7d119ba35g58A"
    hello = {
        "type": "hello",
        "versions": [1],
        "group": "acme",
        "visitor": "v-42",
        "token": token,
        "data": {"page": "/account"},
    }
    js_hello = bytes(await page.evaluate("(frame) => Array.from(herald.encodeFrame(frame))", hello))
    assert js_hello == codec.encode(
        Hello(versions=[1], group="acme", visitor="v-42", token=token, data={"page": "/account"})
    )
    assert len(js_hello) == 129
    # Undefined fields are left out, as nil would be; a frame that is no map is refused.
    assert await page.evaluate("() => herald.encodeFrame({type: 'ping', id: undefined}).length") == 11
    refused = await page.evaluate(
        "() => { try { herald.decodeFrame(new Uint8Array([0x91, 1])); } catch (e) { return e.code; } }"
    )
    assert refused == "bad_frame"


async def test_js_backoff_is_full_jitter_capped_and_close_codes_decide_reconnects(
    browser: Browser, herald: HeraldServer
) -> None:
    page = await client_page(browser, herald)
    delays = "(backoff, n, attempt) => [...Array(n)].map((_, i) => backoff.delay(attempt ?? i))"
    ceilings = await page.evaluate(f"() => ({delays})(new herald.Backoff({{random: () => 1}}), 10)")
    assert ceilings == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30, 30])
    assert await page.evaluate("() => new herald.Backoff({random: () => 0}).delay(7)") == 0
    spread = await page.evaluate(f"() => ({delays})(new herald.Backoff(), 200, 3)")
    assert min(spread) >= 0 and max(spread) <= 1.6 and len(set(spread)) > 150
    codes = [None, 1000, 1001, 1006, 1009, 1012, 4000, 4002, 4003, 4499, 4500, 4501, 4503, 4999, 5000]
    answers = await page.evaluate("(codes) => codes.map((c) => herald.shouldReconnect(c))", codes)
    assert dict(zip(codes, answers, strict=True)) == {code: not (code and 4500 <= code <= 4999) for code in codes}


async def test_js_client_reconnects_on_4002_1001_and_1012_pings_and_stops_on_4500(
    browser: Browser, herald: HeraldServer
) -> None:
    page = await client_page(browser, herald)
    sent: list[str] = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda payload: sent.append(_frame_type(payload))))
    token = tokens.visitor_token(SECRET, "acme", "v-js")
    await page.evaluate(
        """async (token) => {
            window.connects = 0;
            window.client = new herald.VisitorClient(undefined, {group: "acme", visitor: "v-js", token,
                                                                  data: {title: "JS"}});
            client.addEventListener("connected", () => window.connects++);
            await client.connect();
        }""",
        token,
    )
    hub = herald.app[HUB]
    for attempt, code in enumerate((4002, 1001, 1012), start=2):
        for connection in list(hub.visitors.all()):
            connection.close(code, "test")
        await page.wait_for_function(f"window.connects === {attempt}")
        state = await page.evaluate("() => client.welcome.visitor")
        assert state == "v-js" and len(hub.visitors) == 1
    await asyncio.sleep(1.3)  # keepalive 0.5 s: the client pings the server
    assert sent.count("ping") >= 2, sent
    for connection in list(hub.visitors.all()):
        connection.close(4500, "token revoked")
    await page.wait_for_function("client.failure !== null")
    assert await page.evaluate("() => [client.failure.closeCode, client.connected]") == [4500, False]
    await asyncio.sleep(0.5)
    assert not hub.visitors and await page.evaluate("window.connects") == 4


def _frame_type(payload: str | bytes) -> str:
    frame = msgpack.unpackb(payload) if isinstance(payload, bytes) else {}
    return str(frame.get("type"))


async def test_js_agent_joins_its_session_again_after_being_moved(browser: Browser, herald: HeraldServer) -> None:
    """A drain asks the agent to reconnect (4002): the browser client is back in its session."""
    visitor = await herald.visitor("v-session")
    connected = await visitor.start_session("visitor")
    page = await client_page(browser, herald)
    key = tokens.agent_key(SECRET, "acme", "js-agent")
    await page.evaluate(
        """async ([key, session]) => {
            window.connects = 0;
            window.agent = new herald.AgentClient(undefined, {group: "acme", agent: "js-agent", key});
            agent.addEventListener("connected", () => window.connects++);
            await agent.connect();
            await agent.joinSession({session});
        }""",
        [key, connected.session],
    )
    assert (await visitor.wait_for(GuestCount)).guests == 1
    for connection in list(herald.app[HUB].watchers.agents()):
        connection.leave(CloseCode.RECONNECT, "server draining")
    await page.wait_for_function("window.connects === 2")
    assert [(await visitor.wait_for(GuestCount)).guests for _ in range(2)] == [0, 1]
    assert await page.evaluate("() => [...agent.joined]") == [connected.session]
    await page.evaluate("() => agent.close()")


# --- signal IDs ------------------------------------------------------------------


async def test_js_visitor_drops_a_signal_whose_sid_it_has_seen(browser: Browser, herald: HeraldServer) -> None:
    page = await client_page(browser, herald)
    token = tokens.visitor_token(SECRET, "acme", "v-sid")
    await page.evaluate(
        """async (token) => {
            window.got = [];
            window.client = new herald.VisitorClient(undefined, {group: "acme", visitor: "v-sid", token});
            client.addEventListener("signal", (e) => got.push(e.detail.sid ?? null));
            await client.connect();
        }""",
        token,
    )
    agent = await herald.agent("alice")
    assert await agent.show_terms("v-sid", sid="terms-1") == 1
    assert await agent.show_terms("v-sid", sid="terms-1") == 1  # sent again: the server relays it
    assert await agent.show_terms("v-sid", sid="terms-2") == 1
    for _ in range(2):  # no sid: never dropped
        assert (await agent.request(Signal(event="showterms", visitor="v-sid"), Ack)).delivered == 1
    await page.wait_for_function("got.length >= 4")
    await asyncio.sleep(0.2)
    assert await page.evaluate("() => [got, client.duplicateSignals]") == [["terms-1", "terms-2", None, None], 1]


async def test_js_agent_sends_fresh_sids_and_drops_a_visitor_signal_it_has_seen(
    browser: Browser, herald: HeraldServer
) -> None:
    page = await client_page(browser, herald)
    key = tokens.agent_key(SECRET, "acme", "js-agent")
    await page.evaluate(
        """async (key) => {
            window.got = [];
            window.agent = new herald.AgentClient(undefined, {group: "acme", agent: "js-agent", key});
            agent.addEventListener("signal", (e) => got.push([e.detail.event, e.detail.sid ?? null]));
            await agent.connect();
            await agent.subscribe(["v1"]);
        }""",
        key,
    )
    visitor = await herald.visitor("v1")
    await visitor.terms("accepted", sid="answer-1")
    await visitor.terms("accepted", sid="answer-1")
    await visitor.signal_agent("cobrowse")
    await page.wait_for_function("got.length >= 2")
    await asyncio.sleep(0.2)
    got = await page.evaluate("() => got")
    assert got[0] == ["terms", "answer-1"] and got[1][0] == "cobrowse" and len(got) == 2
    assert await page.evaluate("() => agent.duplicateSignals") == 1

    async with herald.raw_visitor("raw") as raw:
        delivered = await page.evaluate(
            "async () => [await agent.showTerms('raw'), await agent.signal('raw', 'highlight', {n: 1}, 'all')]"
        )
        assert delivered == [1, 1]
        sids = [(await receive(raw)).sid for _ in range(2)]  # type: ignore[attr-defined]
    assert all(isinstance(sid, str) and len(sid) == 16 and int(sid, 16) >= 0 for sid in sids) and sids[0] != sids[1]
    refused = await page.evaluate(
        "async () => { try { await agent.signal('raw', 'x', {}, 'all', {sid: 'a b'}); } catch (e) { return e.code; } }"
    )
    assert refused == "invalid"


async def test_js_agent_sends_a_signal_again_with_its_sid_after_delivery_failed_or_a_lost_socket(
    browser: Browser,
) -> None:
    server = await ScriptedHerald(["delivery_failed", "ack"]).start()
    try:
        page = await browser.new_page()
        page.set_default_timeout(5_000)
        await page.goto(server.base_url + "/blank")
        await page.evaluate(
            """async () => {
                window.herald = await import('/js/herald.js');
                window.agent = new herald.AgentClient(undefined, {group: "acme", agent: "alice", key: "k"},
                                                      {backoff: new herald.Backoff({initial: 0.01})});
                await agent.connect();
            }"""
        )
        show = (
            "async (options) => { try { return await agent.showTerms('v1', options); } catch (e) { return e.code; } }"
        )
        assert await page.evaluate(show) == 1
        assert len(server.received) == 2 and len({m.sid for m in server.received}) == 1

        server.script(["drop", "ack"])  # the socket goes away before the answer: sent again once back
        assert await page.evaluate(show, {"sid": "mine-1"}) == 1
        assert [m.sid for m in server.received] == ["mine-1", "mine-1"]

        server.script(["delivery_failed"])  # never delivered: two more sends, then the last error
        assert await page.evaluate(show) == "delivery_failed"
        assert len(server.received) == 3 and len({m.sid for m in server.received}) == 1

        server.script(["visitor_offline", "ack"])  # final: not sent again
        assert await page.evaluate(show) == "visitor_offline"
        assert len(server.received) == 1
        await page.evaluate("() => agent.close()")
    finally:
        await server.runner.cleanup()


async def test_js_apply_delta_builds_the_state_python_builds(browser: Browser, herald: HeraldServer) -> None:
    """The browser client keeps a visitor's state from deltas as the Python SDK does."""
    from herald_presence.protocol.presence import apply_delta
    from herald_presence.server.model import presence_rules
    from herald_presence.server.model.records import ConnectionRecord, VisitorRecord

    record = VisitorRecord("acme", "v1", 0)
    steps = [
        lambda: presence_rules.join(record, ConnectionRecord("c1", "i", {"title": "Home", "n": 1}, True, 1.5)),
        lambda: presence_rules.join(record, ConnectionRecord("c2", "i", {"title": "Cart"}, False, 2.5)),
        lambda: presence_rules.update(record, "c1", {"title": "Billing", "n": None, "x": 0.5}, None),
        lambda: presence_rules.update(record, "c2", None, True),
        lambda: presence_rules.leave(record, "c1"),
    ]
    page = await client_page(browser, herald)
    state = None
    for step in steps:
        change = step()
        delta = change.delta()
        if delta is None:
            state = record.state()
            continue
        expected = apply_delta(state, delta)
        assert expected is not None and expected == record.state() | {"connections": expected["connections"]}
        built = await page.evaluate("([state, delta]) => herald.applyDelta(state, delta)", [state, delta])
        assert built == expected
        state = expected
    assert (
        await page.evaluate("([state, delta]) => herald.applyDelta(state, delta)", [state, {**delta, "base": 1}])
        is None
    )


async def test_js_visitor_refreshes_its_token_from_its_token_function(browser: Browser, herald: HeraldServer) -> None:
    """PROTOCOL.md §3.4: a group that enforces expiry would close the connection when its token
    runs out; the client calls its token function before then and sends ``refresh``."""
    herald.settings.groups["acme"].enforce_expiry = True
    page = await client_page(browser, herald)
    minted: list[str] = []

    def mint() -> str:
        minted.append(tokens.make_token(SECRET, tokens.VISITOR, "acme", "v-fresh", ttl=6))
        return minted[-1]

    await page.expose_function("mint", mint)
    await page.evaluate(
        """async () => {
            window.client = new herald.VisitorClient(undefined, {group: "acme", visitor: "v-fresh",
                                                                 token: () => window.mint()});
            await client.connect();
        }"""
    )
    first = await page.evaluate("() => client.welcome.expires")
    assert first == int(minted[0].split(".")[0])
    await asyncio.sleep(8)  # past the first token's expiry: refreshed about 5 s before each
    assert await page.evaluate("() => client.connected") is True
    assert len(minted) >= 3, minted  # the hello's, then at least two refreshes
