"""The product in a browser: the agent console and the visitor's pages, end to end.

Each flow runs against one instance and against two instances sharing a
Redis (the agent's page on one, the visitor's on the other), in demo mode
as a zero-config ``herald serve`` runs: the pages get their credentials
from Herald's demo route. A screenshot of every step lands in
test-artifacts/<test>/.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from playwright.async_api import Locator, Page, expect

from herald_presence.protocol import tokens

from ..harness import SECRET, HeraldServer, settings
from .conftest import STEP_TIMEOUT_MS, demo_settings

Servers = tuple[HeraldServer, HeraldServer]
OpenPage = Callable[[str], Awaitable[Page]]
Shot = Callable[[Page, str], Awaitable[None]]


async def log_in_and_watch(open_page: OpenPage, server: HeraldServer, visitor: str) -> Page:
    """The console, logged in with a demo key, watching ``visitor``."""
    console = await open_page(server.base_url + "/console")
    await console.get_by_role("button", name="Log in").click()
    await console.get_by_label("Visitor IDs").fill(visitor)
    await console.get_by_role("button", name="Watch", exact=True).click()
    await expect(visitor_card(console, visitor)).to_be_visible()
    return console


async def log_in_and_join_by_code(open_page: OpenPage, server: HeraldServer, code: str) -> Page:
    """The console, logged in with a demo key, in the session of ``code`` (one agent: itself)."""
    console = await open_page(server.base_url + "/console")
    await console.get_by_role("button", name="Log in").click()
    await console.get_by_label("Code the visitor reads out").fill(code)
    await console.get_by_role("button", name="Join", exact=True).click()
    await expect(console.locator("#sessions li [data-field='guests']")).to_have_text("1")
    return console


def visitor_card(console: Page, visitor: str) -> Locator:
    return console.locator(f'#visitors tr[data-visitor="{visitor}"]')


async def test_one_click_flow_from_show_terms_to_session_end(
    demo_servers: Servers, open_page: OpenPage, shot: Shot
) -> None:
    agent_server, visitor_server = demo_servers
    console = await log_in_and_watch(open_page, agent_server, "cust-42")
    card = visitor_card(console, "cust-42")
    await expect(card).to_have_attribute("data-online", "false")
    await shot(console, "agent-watches-offline-visitor")

    site = await open_page(visitor_server.base_url + "/demo/visitor#visitor=cust-42")
    await expect(site.locator("#connection-text")).to_have_text("Connected as cust-42")
    await expect(card).to_have_attribute("data-online", "true")
    await expect(card.locator('[data-field="title"]')).to_have_text("Billing — Acme Bank")
    await expect(card.locator('[data-field="url"]')).to_contain_text("/demo/visitor")
    await expect(card.locator('[data-field="visible"]')).to_have_text("visible")
    await shot(console, "agent-sees-visitor-online")

    await card.get_by_role("button", name="Show terms").click()
    dialog = site.get_by_role("dialog", name="Share your screen with Acme support?")
    await expect(dialog).to_be_visible()
    await shot(site, "visitor-sees-terms")
    await expect(card.locator('[data-field="terms"]')).to_have_text("displayed")
    await shot(console, "agent-sees-displayed")

    await dialog.get_by_role("button", name="Accept").click()
    await expect(dialog).to_be_hidden()
    await expect(card.locator('[data-field="terms"]')).to_have_text("accepted")
    await expect(card.locator('[data-field="session"]')).to_have_text("ready to join")
    await shot(console, "agent-sees-accepted-and-session")

    await card.get_by_role("button", name="Join").click()
    await expect(card.locator('[data-field="session"]')).to_have_text("joined · 1 agent")
    await expect(site.locator("#session-status")).to_have_text("1 agent is with you.")
    await shot(site, "visitor-sees-guest-count")

    await site.get_by_role("button", name="End session").click()
    await expect(site.locator("#session-status")).to_have_text("Session ended.")
    await expect(card.locator('[data-field="session"]')).to_have_text("ended: the visitor ended it")
    await expect(console.locator("#sessions [data-field='state']")).to_have_text("Ended")
    await shot(console, "agent-sees-session-ended")


async def test_random_code_flow_the_agent_joins_with_the_code_the_visitor_reads_out(
    demo_servers: Servers, open_page: OpenPage, shot: Shot
) -> None:
    agent_server, visitor_server = demo_servers
    site = await open_page(visitor_server.base_url + "/demo/visitor#visitor=cust-7")
    await expect(site.locator("#connection-text")).to_have_text("Connected as cust-7")
    await site.get_by_role("button", name="Cobrowse").click()
    code_display = site.locator("#session-code")
    await expect(code_display).to_have_text(re.compile(r"^\d{6}$"))
    code = await code_display.text_content()
    await shot(site, "visitor-shows-code")

    console = await log_in_and_join_by_code(open_page, agent_server, code or "")
    await expect(console.locator("#sessions li [data-field='visitor']")).to_have_text("cust-7")
    await expect(site.locator("#session-status")).to_have_text("1 agent is with you.")
    await shot(console, "agent-joined-by-code")
    await shot(site, "visitor-sees-guest-count")


async def test_agent_sees_the_visitor_go_offline_when_its_tab_closes(
    demo_servers: Servers, open_page: OpenPage, shot: Shot
) -> None:
    agent_server, visitor_server = demo_servers
    console = await open_page(agent_server.base_url + "/console")
    await console.get_by_role("button", name="Log in").click()
    await console.get_by_role("button", name="Watch whole group").click()
    site = await open_page(visitor_server.base_url + "/demo/visitor#visitor=cust-9")
    card = visitor_card(console, "cust-9")  # appears when it comes online: the group is watched
    await expect(card).to_have_attribute("data-online", "true")
    await shot(console, "visitor-online")

    await site.context.close()  # the customer closes the tab
    await expect(card).to_have_attribute("data-online", "false", timeout=STEP_TIMEOUT_MS)
    await expect(card.locator('[data-field="online"]')).to_have_text("Offline")
    await shot(console, "visitor-offline")


async def test_consumer_page_gets_a_short_code_over_rest_and_the_agent_joins_with_it(
    demo_servers: Servers, open_page: OpenPage, shot: Shot
) -> None:
    agent_server, visitor_server = demo_servers
    page = await open_page(visitor_server.base_url + "/demo/shortcode")
    await expect(page.get_by_label("Group")).to_have_value("demo")
    await page.get_by_role("button", name="Get a code").click()
    await expect(page.locator("#connection-text")).to_have_text("Connected")
    code = await page.locator("#session-code").text_content()
    assert code and code.isdigit(), code
    await shot(page, "consumer-shows-code")

    await log_in_and_join_by_code(open_page, agent_server, code)
    await expect(page.locator("#status")).to_have_text("1 agent is with you.")
    await shot(page, "consumer-sees-agent")


async def test_a_configured_group_takes_credentials_from_the_url_fragment(open_page: OpenPage, shot: Shot) -> None:
    """Outside demo mode nothing is minted: the customer's back end hands the
    pages a visitor token and an agent key, here in the URL fragment."""
    server = await HeraldServer(settings()).start()
    try:
        key = tokens.agent_key(SECRET, "acme", "alice")
        console = await open_page(f"{server.base_url}/console#group=acme&agent=alice&key={key}")
        await expect(console.locator("#connection-text")).to_have_text("alice · acme")
        await console.get_by_label("Visitor IDs").fill("v-frag")
        await console.get_by_role("button", name="Watch", exact=True).click()
        token = tokens.visitor_token(SECRET, "acme", "v-frag")
        site = await open_page(f"{server.base_url}/demo/visitor#group=acme&visitor=v-frag&token={token}")
        await expect(site.locator("#connection-text")).to_have_text("Connected as v-frag")
        card = visitor_card(console, "v-frag")
        await expect(card).to_have_attribute("data-online", "true")
        await card.get_by_role("button", name="Show terms").click()
        await site.get_by_role("button", name="Decline").click()
        await expect(card.locator('[data-field="terms"]')).to_have_text("declined")
        await shot(console, "agent-sees-declined")
    finally:
        await server.stop()


async def test_the_index_page_points_to_the_demo_pages_in_demo_mode_only(open_page: OpenPage, shot: Shot) -> None:
    demo, configured = await HeraldServer(demo_settings()).start(), await HeraldServer(settings()).start()
    try:
        index = await open_page(demo.base_url + "/")
        await expect(index.get_by_role("link", name="a customer's page")).to_be_visible()
        await shot(index, "demo-mode")
        await index.get_by_role("link", name="agent console").first.click()
        await expect(index).to_have_url(demo.base_url + "/console")

        index = await open_page(configured.base_url + "/")
        await expect(index.get_by_role("link", name="agent console")).to_be_visible()
        await expect(index.get_by_role("link", name="a customer's page")).to_be_hidden()
        await shot(index, "configured")
    finally:
        await demo.stop()
        await configured.stop()
