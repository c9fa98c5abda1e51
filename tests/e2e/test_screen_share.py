"""One-click screen share, end to end (issue 17, items 3 and 4): the visitor
shares, the agent sees the picture, over WebRTC with Herald relaying the
session signals (PROTOCOL.md §11.11), in Chromium.

The picture is checked the way the issue asks: the agent's peer connection
decodes frames (``getStats()``'s ``framesDecoded`` rises). Chromium runs with
fake media (conftest.py): ``--use-fake-ui-for-media-stream`` answers the
browser's own "share this tab?" prompt (the visitor's consent on the page is
*Accept*), so the visitor page's own tab is captured. The pages are driven as a
person would; what they capture is recorded by an init script that wraps
``getDisplayMedia`` and ``getUserMedia``, so a test can tell that nothing was
captured before *Accept*, and that every track stopped. Screenshots go to
``test-artifacts/`` (git-ignored).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from playwright.async_api import Browser, Page, expect

from herald_presence.protocol import tokens
from herald_presence.protocol.errors import CloseCode
from herald_presence.server.process.drain import drain
from herald_presence.server.web.keys import HUB

from ..conftest import FAST
from ..harness import SECRET, HeraldServer, settings
from ..redis_server import RedisServer
from .conftest import DEMO_SECRET, STEP_TIMEOUT_MS, demo_settings

# A page of Herald's origin with no script of its own: the client is imported into it.
BLANK = "/js/vendor/msgpack.LICENSE"
# Long enough that a drained visitor is back before its session would end (visitor_offline).
GRACE = 5
PICTURE_TIMEOUT = 20.0  # ICE, DTLS and the first decoded frames on a busy machine

# Records what the page captures, and every track it got, for the test to look at.
RECORD_CAPTURES = """
(() => {
  window.__captures = [];
  const devices = navigator.mediaDevices;
  for (const name of ["getDisplayMedia", "getUserMedia"]) {
    const original = devices[name].bind(devices);
    devices[name] = async (...args) => {
      const stream = await original(...args);
      window.__captures.push({ name, tracks: stream.getTracks() });
      return stream;
    };
  }
  window.__live = () => window.__captures.flatMap((c) => c.tracks).filter((t) => t.readyState === "live").length;
})();
"""
# Every peer connection a page makes, and the video tracks it received.
RECORD_PEERS = """
(() => {
  window.__peers = [];
  const Original = window.RTCPeerConnection;
  window.RTCPeerConnection = class extends Original {
    constructor(...args) { super(...args); window.__peers.push(this); }
  };
  window.__received = () => window.__peers.flatMap((pc) => pc.getReceivers().map((r) => r.track));
  window.__framesDecoded = async () => {
    let frames = 0;
    for (const pc of window.__peers) {
      if (pc.connectionState === "closed") continue;
      for (const report of (await pc.getStats()).values()) {
        if (report.type === "inbound-rtp" && report.kind === "video") frames += report.framesDecoded || 0;
      }
    }
    return frames;
  };
})();
"""

# Any Content-Security-Policy violation on the page (the pages keep within theirs).
RECORD_CSP = """
window.__csp = [];
document.addEventListener("securitypolicyviolation", (e) => __csp.push(`${e.violatedDirective} ${e.blockedURI}`));
"""

Servers = tuple[HeraldServer, HeraldServer]
Shot = Callable[[Page, str], Awaitable[None]]


@pytest.fixture(params=["one instance", "two instances"])
async def servers(request: pytest.FixtureRequest) -> AsyncIterator[Servers]:
    """(the agent's server, the visitor's server) in demo mode: one instance, or two sharing a Redis."""
    started: list[HeraldServer] = []
    try:
        if request.param == "one instance":
            started.append(await HeraldServer(demo_settings(grace_period=GRACE)).start())
            yield started[0], started[0]
        else:
            redis: RedisServer = request.getfixturevalue("redis_server")
            if redis.process is None or redis.process.poll() is not None:
                redis.start()
            cluster = {
                **FAST,
                "grace_period": GRACE,
                "redis_url": redis.url,
                "redis_prefix": f"s{uuid.uuid4().hex[:10]}",
            }
            for _ in range(2):
                started.append(await HeraldServer(demo_settings(**cluster)).start())
            yield started[0], started[1]
    finally:
        for server in started:
            await server.stop()


async def open_page(browser: Browser, url: str, *scripts: str, errors: list[str]) -> Page:
    context = await browser.new_context(viewport={"width": 1366, "height": 768})
    for script in scripts:
        await context.add_init_script(script)
    page = await context.new_page()
    page.set_default_timeout(STEP_TIMEOUT_MS)
    page.on("pageerror", lambda error: errors.append(f"{url}: {error}"))
    await page.goto(url)
    if url.endswith(BLANK):
        return page
    await page.locator("body[data-ready='true']").wait_for()
    return page


async def frames_rise(page: Page, more: int = 3) -> None:
    """The page's peer connections decode frames (getStats' framesDecoded), and then ``more``
    of them, within PICTURE_TIMEOUT: the picture is live. (A captured tab that does not change
    gives about a frame a second.)"""
    deadline = asyncio.get_running_loop().time() + PICTURE_TIMEOUT
    first = None
    while True:
        frames = await page.evaluate("__framesDecoded()")
        if frames > 0 and first is None:
            first = frames
        elif first is not None and frames >= first + more:
            return
        assert asyncio.get_running_loop().time() < deadline, f"frames decoded: {frames} (first seen: {first})"
        await asyncio.sleep(0.25)


def move(server: HeraldServer, role: str) -> None:
    """What a drain does to each connection (close 4002: reconnect), without closing the listener:
    the test's pages know one address, where a load balancer would send them to another instance."""
    hub = server.app[HUB]
    for conn in hub.visitors.all() if role == "visitor" else hub.watchers.agents():
        conn.leave(CloseCode.RECONNECT, "server draining")


# --- the API, on blank pages ---------------------------------------------------------


async def test_the_js_api_shares_a_canvas_and_the_view_decodes_frames_across_reconnects(browser: Browser) -> None:
    herald = await HeraldServer(settings(grace_period=GRACE)).start()
    errors: list[str] = []
    try:
        visitor = await open_page(browser, herald.base_url + BLANK, RECORD_PEERS, errors=errors)
        token = tokens.visitor_token(SECRET, "acme", "v-api")
        await visitor.evaluate(
            """async (token) => {
                window.herald = await import('/js/herald.js');
                window.client = new herald.VisitorClient(undefined, {group: "acme", visitor: "v-api", token});
                await client.connect();
                await client.startSession("visitor");
                // A canvas stands in for the screen: it draws a new frame every 40 ms.
                const canvas = Object.assign(document.createElement("canvas"), {width: 320, height: 180});
                const g = canvas.getContext("2d");
                let tick = 0;
                setInterval(() => { g.fillStyle = `hsl(${tick++ % 360} 80% 50%)`; g.fillRect(0, 0, 320, 180); }, 40);
                window.share = new herald.ScreenShare(client);
                window.ended = [];
                share.addEventListener("ended", (e) => ended.push(e.detail.reason));
                await share.start(canvas.captureStream(25));
            }""",
            token,
        )
        agent = await open_page(browser, herald.base_url + BLANK, RECORD_PEERS, errors=errors)
        key = tokens.agent_key(SECRET, "acme", "alice")
        await agent.evaluate(
            """async (key) => {
                window.herald = await import('/js/herald.js');
                window.client = new herald.AgentClient(undefined, {group: "acme", agent: "alice", key});
                await client.connect();
                const joined = await client.joinSession({key: "v-api"});
                window.view = new herald.ScreenView(client, joined);
                window.ended = [];
                view.addEventListener("ended", (e) => ended.push(e.detail.reason));
                view.addEventListener("stream", (e) => {
                    const video = Object.assign(document.createElement("video"), {autoplay: true, muted: true});
                    video.srcObject = e.detail.stream;
                    document.body.append(video);
                });
                await view.start();
            }""",
            key,
        )
        await frames_rise(agent, more=20)  # the canvas draws 25 frames/s
        assert await agent.evaluate("view.videoStats().then((s) => s.framesDecoded > 0)")

        # The visitor is moved (a drain): it offers again from its new connection, an ICE restart.
        move(herald, "visitor")
        await visitor.wait_for_function("share.negotiations >= 2", timeout=PICTURE_TIMEOUT * 1000)
        await agent.wait_for_function("view.negotiations >= 2")
        await frames_rise(agent)
        # The agent is moved: it asks again from its new connection.
        move(herald, "agent")
        await visitor.wait_for_function("share.negotiations >= 3", timeout=PICTURE_TIMEOUT * 1000)
        await frames_rise(agent)
        assert await agent.evaluate("__peers.length") == 1  # renegotiated, not a new call

        # An outsider (another agent of the group, who knows the session ID) is refused.
        outsider = await open_page(browser, herald.base_url + BLANK, errors=errors)
        refused = await outsider.evaluate(
            """async ([key, session]) => {
                const herald = await import('/js/herald.js');
                const client = new herald.AgentClient(undefined, {group: "acme", agent: "mallory", key});
                await client.connect();
                return client.sessionSignal(session, herald.RTC.request, undefined,
                    {to: "visitor", data: {viewer: "x"}}).catch((e) => e.code);
            }""",
            [tokens.agent_key(SECRET, "acme", "mallory"), await agent.evaluate("view.session")],
        )
        assert refused == "session_not_found"

        # The agent ends the sharing: both sides stop every track.
        await agent.evaluate("view.endSharing()")
        await visitor.wait_for_function("ended.length === 1")
        assert await visitor.evaluate("ended") == ["agent"]
        assert await visitor.evaluate("share.sharing") is False
        assert await agent.evaluate("ended") == ["agent"]
        assert await agent.evaluate("__received().every((t) => t.readyState === 'ended')")
        assert await visitor.evaluate("__peers.every((pc) => pc.connectionState === 'closed')")
    finally:
        await herald.stop()
    assert not errors, errors


# --- the pages: the demo visitor page shares, the console shows it -----------------------


async def console_watching(browser: Browser, server: HeraldServer, visitor: str, errors: list[str]) -> Page:
    console = await open_page(browser, server.base_url + "/console", RECORD_PEERS, RECORD_CSP, errors=errors)
    await console.get_by_role("button", name="Log in").click()
    await console.get_by_label("Visitor IDs").fill(visitor)
    await console.get_by_role("button", name="Watch", exact=True).click()
    await expect(console.locator(f'tr[data-visitor="{visitor}"]')).to_be_visible()
    return console


async def accepted_and_joined(console: Page, site: Page, visitor: str) -> None:
    """Show terms, Accept (the tab is captured only now), Join: the picture arrives."""
    row = console.locator(f'tr[data-visitor="{visitor}"]')
    await expect(row).to_have_attribute("data-online", "true")
    await row.get_by_role("button", name="Show terms").click()
    dialog = site.get_by_role("dialog", name="Share your screen with Acme support?")
    await expect(dialog).to_be_visible()
    await expect(row.locator('[data-field="terms"]')).to_have_text("displayed")
    assert await site.evaluate("__captures.length") == 0, "captured before the visitor accepted"
    await dialog.get_by_role("button", name="Accept").click()
    await expect(site.locator("#share-status")).to_have_text("You are sharing this tab.")
    assert await site.evaluate("__captures.map((c) => c.name)") == ["getDisplayMedia"]
    join = row.get_by_role("button", name="Join")
    await expect(join).to_be_enabled()
    await expect(join).not_to_have_class(re.compile(r"\bsecondary\b"))  # emphasised: the visitor accepted
    await join.click()
    card = console.locator(f'#sessions li[data-visitor="{visitor}"]')
    await expect(card.locator("video")).to_be_visible(timeout=PICTURE_TIMEOUT * 1000)
    await frames_rise(console)
    await expect(card.locator('[data-field="screen"]')).to_contain_text("Visitor's screen: ")
    await expect(site.locator("#share-status")).to_have_text("1 agent sees this tab.")


async def test_the_visitor_accepts_the_agent_sees_the_tab_a_drain_renegotiates_and_end_sharing_stops_both(
    servers: Servers, browser: Browser, shot: Shot
) -> None:
    agent_server, visitor_server = servers
    errors: list[str] = []
    console = await console_watching(browser, agent_server, "cust-42", errors)
    site = await open_page(
        browser, visitor_server.base_url + "/demo/visitor#visitor=cust-42", RECORD_CAPTURES, RECORD_CSP, errors=errors
    )
    await accepted_and_joined(console, site, "cust-42")
    card = console.locator('#sessions li[data-visitor="cust-42"]')
    await shot(console, "console-sharing-view")
    await shot(site, "visitor-sharing")

    # The visitor's instance drains: the visitor reconnects, offers again, the picture comes back.
    move(visitor_server, "visitor")
    await expect(console.locator("#log")).to_contain_text(
        "Renegotiated the screen of cust-42", timeout=PICTURE_TIMEOUT * 1000
    )
    await frames_rise(console)
    await expect(card.locator("video")).to_be_visible()

    # The agent ends the sharing: every track stops, on both sides.
    await card.get_by_role("button", name="End sharing").click()
    await expect(site.locator("#share-status")).to_have_text("The agent ended the screen sharing.")
    assert await site.evaluate("__live()") == 0
    await expect(card.locator("video")).to_be_hidden()
    await expect(card.locator('[data-field="screen"]')).to_have_text("You ended the screen sharing.")
    assert await console.evaluate("__received().length") > 0
    assert await console.evaluate("__received().every((t) => t.readyState === 'ended')")
    await expect(site.get_by_role("button", name="Share this tab")).to_be_visible()
    await shot(console, "console-sharing-ended")
    assert await console.evaluate("__csp") == [] and await site.evaluate("__csp") == []
    assert not errors, errors


async def test_declining_captures_nothing_and_ending_the_session_stops_every_track(
    browser: Browser, shot: Shot
) -> None:
    server = await HeraldServer(demo_settings(grace_period=GRACE)).start()
    errors: list[str] = []
    try:
        console = await console_watching(browser, server, "cust-7", errors)
        site = await open_page(
            browser, server.base_url + "/demo/visitor#visitor=cust-7", RECORD_CAPTURES, RECORD_CSP, errors=errors
        )
        row = console.locator('tr[data-visitor="cust-7"]')
        await expect(row).to_have_attribute("data-online", "true")
        await row.get_by_role("button", name="Show terms").click()
        await site.get_by_role("button", name="Decline").click()
        await expect(row.locator('[data-field="terms"]')).to_have_text("declined")
        await expect(site.locator("#session-status")).to_have_text("You declined. Nothing is shared.")
        assert await site.evaluate("__captures.length") == 0, "a decline captured something"
        assert await site.evaluate("navigator.mediaDevices.getDisplayMedia !== undefined")

        # Asked again, the visitor accepts; it stops sharing, and shares again.
        await accepted_and_joined(console, site, "cust-7")
        card = console.locator('#sessions li[data-visitor="cust-7"]')
        await site.get_by_role("button", name="Stop sharing").click()
        await expect(card.locator('[data-field="screen"]')).to_have_text("The visitor stopped sharing.")
        await expect(card.locator("video")).to_be_hidden()
        assert await site.evaluate("__live()") == 0
        await site.get_by_role("button", name="Share this tab").click()
        await expect(card.locator("video")).to_be_visible(timeout=PICTURE_TIMEOUT * 1000)
        await frames_rise(console)
        assert await site.evaluate("__captures.length") == 2

        # The visitor ends the session: every track stops, on both sides.
        await site.get_by_role("button", name="End session").click()
        await expect(site.locator("#share-status")).to_have_text("Sharing stopped: the session ended.")
        assert await site.evaluate("__live()") == 0
        await expect(card.locator('[data-field="state"]')).to_have_text("Ended")
        await expect(card.locator("video")).to_be_hidden()
        assert await console.evaluate("__received().every((t) => t.readyState === 'ended')")
        await shot(console, "console-session-ended")
        await card.get_by_role("button", name="Dismiss").click()
        await expect(card).to_have_count(0)
        await expect(console.locator("#no-sessions")).to_be_visible()
    finally:
        await server.stop()
    assert not errors, errors


class FailoverProxy:
    """The load balancer in front of a cluster, for one test: each TCP connection goes to the
    first instance (by port) that accepts it, so a drained instance's clients come back on the
    other, as behind a real one. While ``refusing``, it closes every new connection at once (the
    way back is cut; connections already open go on)."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.port = 0
        self.refusing = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> FailoverProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.close()
            return
        for port in self.ports:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError:
                continue
        else:
            writer.close()
            return
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while chunk := await source.read(65536):
                sink.write(chunk)
                await sink.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            sink.close()

    async def stop(self) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def behind_a_balancer(
    redis_server: RedisServer,
) -> AsyncIterator[tuple[HeraldServer, HeraldServer, FailoverProxy]]:
    """Two instances on the tests' Redis (agents', visitors'), fast drains, and the test's load
    balancer in front of the visitors' instance (the agents' one behind it): stopped after."""
    if redis_server.process is None or redis_server.process.poll() is not None:
        redis_server.start()
    cluster = {
        **FAST, "grace_period": GRACE, "drain_spread": 0.2, "drain_timeout": 4,
        "redis_url": redis_server.url, "redis_prefix": f"d{uuid.uuid4().hex[:10]}",
    }  # fmt: skip
    agents_instance = await HeraldServer(demo_settings(**cluster)).start()
    visitors_instance = await HeraldServer(demo_settings(**cluster)).start()
    balancer = await FailoverProxy([visitors_instance.port, agents_instance.port]).start()
    try:
        yield agents_instance, visitors_instance, balancer
    finally:
        await balancer.stop()
        await visitors_instance.stop()
        await agents_instance.stop()


async def test_draining_the_visitors_instance_moves_it_and_the_picture_comes_back(
    browser: Browser, redis_server: RedisServer, shot: Shot
) -> None:
    """A real drain (drain.py, what SIGTERM runs) of the instance the visitor is on: its listener
    closes, the visitor is told to reconnect (4002), comes back on the other instance through the
    load balancer, and the call is renegotiated from there."""
    errors: list[str] = []
    async with behind_a_balancer(redis_server) as (agents_instance, visitors_instance, balancer):
        console = await console_watching(browser, agents_instance, "cust-99", errors)
        site = await open_page(
            browser, balancer.base_url + "/demo/visitor#visitor=cust-99", RECORD_CAPTURES, RECORD_CSP, errors=errors
        )
        await accepted_and_joined(console, site, "cust-99")
        assert len(visitors_instance.app[HUB].visitors.all()) == 1

        await drain(visitors_instance.app, [visitors_instance.site])
        await expect(console.locator("#log")).to_contain_text(
            "Renegotiated the screen of cust-99", timeout=PICTURE_TIMEOUT * 1000
        )
        assert [c.subject for c in agents_instance.app[HUB].visitors.all()] == ["cust-99"]  # moved over
        await frames_rise(console)
        card = console.locator('#sessions li[data-visitor="cust-99"]')
        await expect(card.locator("video")).to_be_visible()
        await expect(card.locator('[data-field="state"]')).to_have_text("Live")
        await expect(site.locator("#share-status")).to_have_text("1 agent sees this tab.")
        await shot(console, "picture-back-after-drain")
    assert not errors, errors


async def test_a_session_ended_while_the_visitor_was_away_stops_every_track_when_it_is_back(
    browser: Browser, redis_server: RedisServer, shot: Shot
) -> None:
    """The visitor shares; its instance drains and the way back is cut for a while; meanwhile
    the group's back end ends the session (the control route, reason ``terminated``), which the
    visitor cannot hear. Back on the other instance, its hello names the session, the server
    answers ``session_event ended`` right after the welcome (PROTOCOL.md §11.2), and the page
    stops every track it captured."""
    errors: list[str] = []
    async with behind_a_balancer(redis_server) as (agents_instance, visitors_instance, balancer):
        console = await console_watching(browser, agents_instance, "cust-away", errors)
        site = await open_page(
            browser, balancer.base_url + "/demo/visitor#visitor=cust-away", RECORD_CAPTURES, RECORD_CSP, errors=errors
        )
        await accepted_and_joined(console, site, "cust-away")
        (session,) = [c.session for c in visitors_instance.app[HUB].visitors.all() if c.subject == "cust-away"]
        assert session is not None

        balancer.refusing = True
        await drain(visitors_instance.app, [visitors_instance.site])
        assert visitors_instance.app[HUB].visitors.all() == []
        api = {"Authorization": f"Bearer {tokens.api_key(DEMO_SECRET, 'demo')}"}
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{agents_instance.base_url}/v1/groups/demo/sessions/{session}/end", headers=api) as response,
        ):
            assert response.status == 200, await response.text()
        card = console.locator('#sessions li[data-visitor="cust-away"]')
        await expect(card.locator('[data-field="state"]')).to_have_text("Ended")
        assert await site.evaluate("__live()") > 0, "away, the visitor could not hear of it: still capturing"
        await shot(site, "still-sharing-while-away")

        balancer.refusing = False
        await expect(site.locator("#share-status")).to_have_text(
            "Sharing stopped: the session ended.", timeout=PICTURE_TIMEOUT * 1000
        )
        assert [c.subject for c in agents_instance.app[HUB].visitors.all()] == ["cust-away"]  # back, on the other
        assert await site.evaluate("__live()") == 0
        assert await site.evaluate("__captures.flatMap((c) => c.tracks).every((t) => t.readyState === 'ended')")
        for gone in ("Share this tab", "Stop sharing", "End session"):  # no session left to share in
            await expect(site.get_by_role("button", name=gone)).to_be_hidden()
        await shot(site, "sharing-stopped-after-reconnect")
        assert await site.evaluate("__csp") == []
    assert not errors, errors
