"""The agent console for real agent work (issue 17, item 5), in Chromium at
1366x768: a dense sortable list (20 visitors on screen), unwatch and clear,
presence shown as stale while the console reconnects, errors in words,
Show terms only for online visitors, readable names for code callers, ended
sessions dismissed. Visitors are the Python SDK's; screenshots go to
test-artifacts/ (git-ignored).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from playwright.async_api import Browser, Locator, Page, expect

from herald_presence.protocol.errors import CloseCode
from herald_presence.server.web.keys import HUB

from ..harness import HeraldServer
from .conftest import STEP_TIMEOUT_MS, demo_settings

SCREEN = {"width": 1366, "height": 768}
Shot = Callable[[Page, str], Awaitable[None]]


@pytest.fixture
async def herald() -> AsyncIterator[HeraldServer]:
    server = await HeraldServer(demo_settings(grace_period=5)).start()
    yield server
    await server.stop()


@pytest.fixture
async def console(browser: Browser, herald: HeraldServer) -> AsyncIterator[Page]:
    """The console on a 1366x768 screen, logged in with a demo key."""
    context = await browser.new_context(viewport=SCREEN)
    page = await context.new_page()
    page.set_default_timeout(STEP_TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.goto(herald.base_url + "/console")
    await page.locator("body[data-ready='true']").wait_for()
    await page.get_by_role("button", name="Log in").click()
    await expect(page.locator("#connection-text")).to_have_text("agent-1 · demo")
    yield page
    await context.close()
    assert not errors, errors


def rows(console: Page) -> Locator:
    return console.locator("#visitors tr")


def row(console: Page, visitor: str) -> Locator:
    return console.locator(f'#visitors tr[data-visitor="{visitor}"]')


async def watch(console: Page, ids: list[str]) -> None:
    await console.get_by_label("Visitor IDs").fill(", ".join(ids))
    await console.get_by_role("button", name="Watch", exact=True).click()


async def ids_in_order(console: Page) -> list[str]:
    return await rows(console).evaluate_all("(rows) => rows.map((r) => r.dataset.visitor)")


async def test_twenty_visitors_fit_on_a_1366x768_screen_sorted_unwatched_and_cleared(
    herald: HeraldServer, console: Page, shot: Shot
) -> None:
    ids = [f"cust-{i:02d}" for i in range(20)]
    for i, visitor in enumerate(ids[:16]):  # 16 online, 4 watched but offline
        page = {"title": f"Statement {i} — Acme Bank", "url": f"https://bank.example/accounts/{i}/statement"}
        if i == 3:  # two tabs: the one in the background first, then the visible one, which has focus
            await herald.visitor(visitor, group="demo", data={**page, "title": "Cards — Acme Bank"}, visible=False)
        await herald.visitor(visitor, group="demo", data=page)
    await watch(console, ids)
    await expect(rows(console)).to_have_count(20)
    await expect(console.locator("#visitor-count")).to_have_text("20 watched · 16 online")
    await expect(row(console, "cust-05")).to_have_attribute("data-online", "true")
    await shot(console, "twenty-visitors")

    # All 20 on screen, with no scrolling: within the 768 pixels of the window.
    for visitor in ids:
        box = await row(console, visitor).bounding_box()
        assert box and box["y"] >= 0 and box["y"] + box["height"] <= SCREEN["height"], (visitor, box)
    assert await console.evaluate("window.scrollY") == 0

    # What a row says: the focused tab's page, how many tabs and which has focus, since when.
    three = row(console, "cust-03")
    await expect(three.locator('[data-field="title"]')).to_have_text("Statement 3 — Acme Bank")
    await expect(three.locator('[data-field="url"]')).to_have_text("https://bank.example/accounts/3/statement")
    await expect(three.locator(".tabs")).to_have_text("2 · #2 visible")
    await expect(three.locator('[data-field="seen"]')).to_contain_text("since ")
    offline = row(console, "cust-17")
    await expect(offline.locator('[data-field="online"]')).to_have_text("Offline")
    await expect(offline.get_by_role("button", name="Show terms")).to_be_disabled()
    await expect(three.get_by_role("button", name="Show terms")).to_be_enabled()

    # Sorted: online first (the default), by ID either way, by tabs.
    assert (await ids_in_order(console))[16:] == ids[16:]
    visitor_header = console.get_by_role("button", name="Visitor", exact=True)
    await visitor_header.click()
    assert await ids_in_order(console) == ids
    await expect(console.locator("th", has=visitor_header)).to_have_attribute("aria-sort", "ascending")
    await visitor_header.click()
    assert await ids_in_order(console) == ids[::-1]
    await expect(console.locator("th", has=visitor_header)).to_have_attribute("aria-sort", "descending")
    await console.get_by_role("button", name="Tabs", exact=True).click()
    order = await ids_in_order(console)
    assert set(order[:4]) == set(ids[16:]) and order[-1] == "cust-03", order
    await shot(console, "sorted-by-tabs")

    # Unwatch one; a visitor that comes online later is not listed again.
    await three.get_by_role("button", name="Unwatch").click()
    await expect(rows(console)).to_have_count(19)
    await herald.visitor("cust-03", group="demo")
    await console.wait_for_timeout(300)
    await expect(row(console, "cust-03")).to_have_count(0)

    await console.get_by_role("button", name="Clear list").click()
    await expect(rows(console)).to_have_count(0)
    await expect(console.locator("#no-visitors")).to_be_visible()
    await herald.visitor("cust-18", group="demo")
    await console.wait_for_timeout(300)
    await expect(rows(console)).to_have_count(0)


async def test_presence_is_shown_stale_while_the_console_reconnects(
    herald: HeraldServer, console: Page, shot: Shot
) -> None:
    visitor = await herald.visitor("cust-42", group="demo", data={"title": "Billing — Acme Bank"})
    await watch(console, ["cust-42", "cust-43"])
    await expect(row(console, "cust-42")).to_have_attribute("data-online", "true")

    # The console's connection drops and cannot come back for now (its instance drains, and
    # refuses new connections): nobody's presence is known for sure.
    hub = herald.app[HUB]
    hub.draining = True
    for agent in hub.watchers.agents():
        agent.leave(CloseCode.RECONNECT, "server draining")
    panel = console.locator("#visitors-panel")
    await expect(panel).to_have_attribute("data-stale", "true")
    await expect(console.locator("#stale-note")).to_be_visible()
    await expect(row(console, "cust-42").locator('[data-field="online"]')).to_have_text("Reconnecting…")
    await expect(row(console, "cust-42").get_by_role("button", name="Show terms")).to_be_disabled()
    await expect(console.locator("#connection-text")).to_have_text("Reconnecting…")
    log = console.locator("#log")
    await expect(log).to_contain_text("Disconnected: the server is restarting; reconnecting")
    await shot(console, "stale")

    await visitor.close()  # meanwhile the visitor leaves: the console learns it once back
    hub.draining = False
    await expect(panel).to_have_attribute("data-stale", "false", timeout=20_000)
    await expect(console.locator("#stale-note")).to_be_hidden()
    await expect(row(console, "cust-42").locator('[data-field="online"]')).to_have_text("Offline", timeout=10_000)
    assert "4002" not in (await log.text_content() or "")  # errors in words, not codes
    await shot(console, "fresh-again")


async def test_a_code_callers_session_is_named_readably_and_dismissed_once_over(
    browser: Browser, herald: HeraldServer, console: Page, shot: Shot
) -> None:
    await console.get_by_label("Code the visitor reads out").fill("000000")
    await console.get_by_role("button", name="Join", exact=True).click()
    await expect(console.locator("#code-error")).to_have_text("No live session has that code.")

    caller = await browser.new_page()
    await caller.goto(herald.base_url + "/demo/shortcode")
    await caller.locator("body[data-ready='true']").wait_for()
    await caller.get_by_role("button", name="Get a code").click()
    await expect(caller.locator("#connection-text")).to_have_text("Connected")
    code = await caller.locator("#session-code").text_content()
    assert code and code.isdigit()

    await console.get_by_label("Code the visitor reads out").fill(code)
    await console.get_by_role("button", name="Join", exact=True).click()
    card = console.locator("#sessions li")
    await expect(card.locator('[data-field="visitor"]')).to_have_text(f"Caller with code {code}")
    await expect(card.locator('[data-field="screen"]')).to_have_text("Waiting for the visitor to share their screen…")
    await expect(card.get_by_role("button", name="Dismiss")).to_be_hidden()
    await shot(console, "caller-session")

    await card.get_by_role("button", name="Leave").click()
    await expect(card.locator('[data-field="state"]')).to_have_text("Left")
    await expect(card.locator('[data-field="screen"]')).to_have_text("You left the session.")
    await card.get_by_role("button", name="Dismiss").click()
    await expect(card).to_have_count(0)
    await expect(console.locator("#no-sessions")).to_be_visible()
