"""Fixes in the one-click flow (issue 17, item 6), with the Python SDK; the
browser's side of them is in tests/e2e/test_flow_fixes.py. Runs on every
backend.

- A hidden connection takes focus only when no visible one exists: a
  background tab that connects, or publishes, leaves the signals of agents
  (``showterms``) with the tab the visitor looks at (PROTOCOL.md §5.5).
- Focus that moves is announced to agents, with the connection that has it.
- A group's allow-list of presence fields: the others never reach agents.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from herald_presence.protocol.messages import Focus, PresenceChanged, Signal
from herald_presence.server.config import Settings

from .harness import HeraldServer, drain, sample, scrape, settings, signal


def focused(state: dict[str, Any]) -> list[str]:
    return [c["connection"] for c in state["connections"] if c["focused"]]


async def test_a_hidden_tab_that_connects_leaves_focus_and_signals_with_the_visible_one(herald: HeraldServer) -> None:
    agent = await herald.agent("alice")
    await agent.subscribe(["cust-42"])
    seen = await herald.visitor("cust-42")
    background = await herald.visitor("cust-42", visible=False)
    assert seen.focused and not background.focused, "the hidden tab's welcome says it has no focus"
    change = await agent.wait_for(lambda e: isinstance(e, PresenceChanged) and e.change == "connections")
    assert focused(change.state) == [seen.connection_id]
    assert not [e for e in await drain(seen, 0.2) if isinstance(e, Focus)], "the visible tab kept focus: no word"

    assert await agent.show_terms("cust-42") == 1
    await seen.wait_for(signal("showterms"))
    assert not [e for e in await drain(background, 0.2) if isinstance(e, Signal)]

    # Publishing data is activity, but a hidden tab's does not take focus from a visible one.
    await background.publish(page="/cart")
    change = await agent.wait_for(lambda e: isinstance(e, PresenceChanged) and e.change == "data")
    assert focused(change.state) == [seen.connection_id]
    # Nor does sending the same data again (which changes nothing at all).
    await background.set_presence({"page": "/cart"})
    assert not [e for e in await drain(agent, 0.4) if isinstance(e, PresenceChanged)]


async def test_focus_that_moves_when_a_tab_is_shown_is_announced_to_agents(herald: HeraldServer) -> None:
    agent = await herald.agent("alice")
    await agent.subscribe(["cust-42"])
    first = await herald.visitor("cust-42")
    second = await herald.visitor("cust-42", visible=False)
    await agent.wait_for(lambda e: isinstance(e, PresenceChanged) and e.change == "connections")

    await second.set_visible(True)  # the visitor switches to the other tab
    change = await agent.wait_for(lambda e: isinstance(e, PresenceChanged) and e.change == "visibility")
    assert focused(change.state) == [second.connection_id]
    assert change.delta is not None and change.delta["focused"] == second.connection_id
    assert (await second.wait_for(Focus)).focused is True
    assert (await first.wait_for(Focus)).focused is False

    await second.set_visible(False)  # ...and back: the visible one has focus again
    change = await agent.wait_for(lambda e: isinstance(e, PresenceChanged) and e.change == "visibility")
    assert focused(change.state) == [first.connection_id]
    assert (await first.wait_for(Focus)).focused is True

    # A visible tab that becomes active again while already focused changes nothing;
    # one that is active while another visible tab has focus takes it: "focus" is all that changed.
    await second.set_visible(True)
    await agent.wait_for(lambda e: isinstance(e, PresenceChanged) and e.change == "visibility")
    await first.set_visible(True)
    change = await agent.wait_for(lambda e: isinstance(e, PresenceChanged) and e.change == "focus")
    assert focused(change.state) == [first.connection_id]


async def test_with_no_visible_tab_the_newest_hidden_one_takes_focus(herald: HeraldServer) -> None:
    old = await herald.visitor("cust-42", visible=False)
    new = await herald.visitor("cust-42", visible=False)
    assert new.focused
    assert (await old.wait_for(Focus)).focused is False


@pytest.fixture
async def allow_listed(backend_settings: dict[str, Any]) -> AsyncIterator[HeraldServer]:
    server_settings: Settings = settings(**backend_settings)
    server_settings.groups["acme"].presence_fields = ["url", "title"]
    server = await HeraldServer(server_settings).start()
    yield server
    await server.stop()


async def test_presence_fields_a_group_does_not_allow_never_reach_agents(allow_listed: HeraldServer) -> None:
    herald = allow_listed
    agent = await herald.agent("alice")
    await agent.subscribe(["cust-42"])
    before = await scrape(herald.base_url)
    visitor = await herald.visitor("cust-42", data={"url": "/billing", "email": "jo@example.com", "token": "t0k"})
    online = await agent.wait_for(lambda e: isinstance(e, PresenceChanged) and e.change == "online")
    assert online.state["connections"][0]["data"] == {"url": "/billing"}, "dropped from the hello"

    await visitor.set_presence({"title": "Billing", "card": "4111 1111 1111 1111"})
    change = await agent.wait_for(lambda e: isinstance(e, PresenceChanged) and e.change == "data")
    assert change.delta is not None and change.delta["changed"][0]["data"] == {"title": "Billing"}
    assert agent.visitors["cust-42"]["connections"][0]["data"] == {"url": "/billing", "title": "Billing"}

    await visitor.set_presence({"card": "5500 0000 0000 0004"})  # only a field agents may not see: nothing
    assert not [e for e in await drain(agent, 0.4) if isinstance(e, PresenceChanged)]
    assert visitor.connected, "dropped, not refused: the page stays connected"
    state = await agent.lookup("cust-42")
    assert state["connections"][0]["data"] == {"url": "/billing", "title": "Billing"}
    after = await scrape(herald.base_url)
    hits = sample(after, "herald_limit_hits_total", limit="presence_fields")
    assert hits - sample(before, "herald_limit_hits_total", limit="presence_fields") >= 3
