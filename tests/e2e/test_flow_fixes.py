"""The one-click flow's fixes (issue 17, item 6) in Chromium: what a page
publishes as presence, and the terms dialog in a tab in the background. The
server's side of them, with the Python SDK, is in tests/test_flow_fixes.py.

Headless Chromium shows every page, so a tab "in the background" is a page
whose ``document.visibilityState`` an init script controls (``hidden`` until
``__show()``), with the ``visibilitychange`` event a browser fires.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from playwright.async_api import Browser, Page, expect

from herald_presence.protocol import tokens
from herald_presence.protocol.messages import Signal

from ..harness import SECRET, HeraldServer, drain, settings
from .conftest import STEP_TIMEOUT_MS

BACKGROUND_TAB = """
(() => {
  let state = "hidden";
  Object.defineProperty(Document.prototype, "visibilityState", { get: () => state, configurable: true });
  Object.defineProperty(Document.prototype, "hidden", { get: () => state !== "visible", configurable: true });
  window.__show = () => { state = "visible"; document.dispatchEvent(new Event("visibilitychange")); };
})();
"""


@pytest.fixture
async def herald() -> AsyncIterator[HeraldServer]:
    server = await HeraldServer(settings()).start()
    yield server
    await server.stop()


async def visitor_page(browser: Browser, url: str, background: bool = False) -> Page:
    context = await browser.new_context(viewport={"width": 1200, "height": 860})
    if background:
        await context.add_init_script(BACKGROUND_TAB)
    page = await context.new_page()
    page.set_default_timeout(STEP_TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.goto(url)
    await page.locator("body[data-ready='true']").wait_for()
    assert not errors, errors
    return page


def demo_visitor_url(herald: HeraldServer, visitor: str, query: str = "") -> str:
    token = tokens.visitor_token(SECRET, "acme", visitor)
    # The README's advice: credentials in the fragment, never sent to a server... nor to agents.
    return f"{herald.base_url}/demo/visitor{query}#group=acme&visitor={visitor}&token={token}"


async def connected(page: Page, visitor: str) -> None:
    await expect(page.locator("#connection-text")).to_have_text(f"Connected as {visitor}")


def terms(events: list[Any]) -> list[Signal]:
    return [e for e in events if isinstance(e, Signal) and e.event == "terms"]


async def test_track_page_publishes_the_address_without_its_query_and_fragment(
    browser: Browser, herald: HeraldServer
) -> None:
    page = await visitor_page(browser, demo_visitor_url(herald, "v-frag", "?email=jo%40example.com"))
    await connected(page, "v-frag")
    agent = await herald.agent("alice")
    state = await agent.lookup("v-frag")
    data = state["connections"][0]["data"]
    assert data["url"] == herald.base_url + "/demo/visitor", data
    assert "token" not in str(data) and "example.com" not in str(data)

    # Opt-in: the query, the fragment, or both.
    token = tokens.visitor_token(SECRET, "acme", "v-opt")
    await page.evaluate(
        """async (token) => {
            history.replaceState(null, "", "/demo/visitor?step=2#faq");
            const herald = await import("/js/herald.js");
            window.optIn = new herald.VisitorClient(undefined, {group: "acme", visitor: "v-opt", token});
            optIn.trackPage({query: true, fragment: true});
            await optIn.connect();
        }""",
        token,
    )
    data = (await agent.lookup("v-opt"))["connections"][0]["data"]
    assert data["url"] == herald.base_url + "/demo/visitor?step=2#faq"
    await page.evaluate("() => optIn.close()")


async def test_a_background_tab_takes_no_terms_from_the_visible_one_and_says_displayed_only_once_shown(
    browser: Browser, herald: HeraldServer
) -> None:
    agent = await herald.agent("alice")
    await agent.subscribe(["v-tabs"])
    seen = await visitor_page(browser, demo_visitor_url(herald, "v-tabs"))
    await connected(seen, "v-tabs")
    background = await visitor_page(browser, demo_visitor_url(herald, "v-tabs"), background=True)
    await connected(background, "v-tabs")
    state = await agent.lookup("v-tabs")
    by_visibility = {c["visible"]: c for c in state["connections"]}
    assert by_visibility[True]["focused"] and not by_visibility[False]["focused"], state
    hidden_connection = by_visibility[False]["connection"]

    # The terms go to the tab the visitor looks at, not to the one that connected last.
    assert await agent.show_terms("v-tabs") == 1
    await expect(seen.get_by_role("dialog")).to_be_visible()
    displayed = (await agent.wait_for(lambda e: isinstance(e, Signal) and e.event == "terms")).data
    assert displayed == {"status": "displayed"}
    assert not await background.evaluate("document.getElementById('terms-dialog').open")
    await seen.get_by_role("button", name="Decline").click()
    assert terms(await drain(agent, 0.5))[0].data == {"status": "declined"}

    # With the visible tab gone, the background one has focus: the dialog opens there, but
    # the agent hears "displayed" only once the visitor can see it.
    await seen.context.close()
    await agent.wait_for(lambda e: getattr(e, "change", None) == "connections")
    assert await agent.show_terms("v-tabs") == 1
    await background.wait_for_function("document.getElementById('terms-dialog').open")
    await asyncio.sleep(0.5)
    assert not terms(await drain(agent, 0.5)), "displayed while the visitor could not see it"
    await background.evaluate("() => __show()")
    answer = await agent.wait_for(lambda e: isinstance(e, Signal) and e.event == "terms")
    assert (answer.data, answer.connection) == ({"status": "displayed"}, hidden_connection)
    await background.get_by_role("button", name="Accept").click()
    accepted = await agent.wait_for(lambda e: isinstance(e, Signal) and e.event == "terms")
    assert accepted.data == {"status": "accepted"}
