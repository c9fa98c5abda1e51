"""Support sessions, short codes and the REST API across a cluster: several
instances on one Redis act as one server."""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

import aiohttp
import pytest

from herald_presence.protocol import tokens
from herald_presence.protocol.client.base import Backoff
from herald_presence.protocol.messages import GuestCount, SessionEvent
from herald_presence.server.core import short_codes
from herald_presence.server.web.keys import HUB

from .conftest import Start
from .harness import OTHER_SECRET, SECRET, away, signal
from .test_revoke import call
from .topologies import redis_topology  # noqa: F401  (every test here: standalone and cluster)

ADMIN_TOKEN = "admin-token-0123456789"
CONSUMERS = {"consumer_codes": ("acme",)}  # acme opts into short codes from consumer pages


async def fetch(http: aiohttp.ClientSession, method: str, url: str, **options: Any) -> tuple[int, Any]:
    async with http.request(method, url, **options) as response:
        text = await response.text()
        return response.status, json.loads(text) if text else None


async def test_codes_created_concurrently_on_two_instances_are_unique(start_instance: Start) -> None:
    # 200 codes of 10**4: collisions between the instances' draws are likely,
    # the code space is far from full.
    limits = {"code_length": 4, "code_lookups_per_address": 10_000, "code_lookups_per_group": 10_000}
    a, b = await start_instance(**limits, **CONSUMERS), await start_instance(**limits, **CONSUMERS)
    async with aiohttp.ClientSession() as http:
        replies = await asyncio.gather(
            *(fetch(http, "POST", f"{(a, b)[i % 2].base_url}/v1/groups/acme/codes") for i in range(200))
        )
        assert [status for status, _ in replies] == [201] * 200, [r for r in replies if r[0] != 201][:3]
        codes = [body["code"] for _, body in replies]
        assert all(code.isdigit() and len(code) == 4 for code in codes), codes
        assert len(set(codes)) == 200, f"{200 - len(set(codes))} codes handed out twice"

        # Each code still leads to the session it was made for (no draw overwrote another).
        redeemed = await asyncio.gather(
            *(
                fetch(http, "GET", f"{(b, a)[i % 2].base_url}/v1/groups/acme/codes/{body['code']}")
                for i, (_, body) in enumerate(replies)
            )
        )
    assert [(status, body["session"]) for status, body in redeemed] == [(200, body["session"]) for _, body in replies]


async def test_a_code_length_changed_through_one_instance_is_used_by_another(start_instance: Start) -> None:
    a, b = (
        await start_instance(admin_token=ADMIN_TOKEN, **CONSUMERS),
        await start_instance(admin_token=ADMIN_TOKEN, **CONSUMERS),
    )
    async with aiohttp.ClientSession() as http:
        status, body = await fetch(
            http,
            "PUT",
            a.base_url + "/v1/admin/groups/acme/settings",
            json={"code_length": 8},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        assert (status, body["code_length"]) == (200, 8), body
        status, body = await fetch(http, "POST", b.base_url + "/v1/groups/acme/codes")
    assert status == 201 and body["code"].isdigit() and len(body["code"]) == 8, body
    visitor = await b.visitor("v1")
    code = (await visitor.start_session("random")).key
    assert code.isdigit() and len(code) == 8, code


async def test_crm_rest_through_one_instance_reaches_a_visitor_on_another(start_instance: Start) -> None:
    a, b = await start_instance(), await start_instance()
    visitor = await a.visitor("v1", data={"url": "/billing"})
    api = {"Authorization": f"Bearer {tokens.api_key(SECRET, 'acme')}"}
    async with aiohttp.ClientSession() as http:
        status, state = await fetch(http, "GET", b.base_url + "/v1/groups/acme/visitors/v1", headers=api)
        assert status == 200 and state["online"] is True, state
        assert [c["data"] for c in state["connections"]] == [{"url": "/billing"}]

        status, body = await fetch(
            http, "POST", b.base_url + "/v1/groups/acme/visitors/v1/signals", json={"event": "showterms"}, headers=api
        )
        assert (status, body) == (200, {"delivered": 1})
        assert (await visitor.wait_for(signal("showterms"))).agent == "crm"

        other = {"Authorization": f"Bearer {tokens.api_key(OTHER_SECRET, 'other')}"}
        status, body = await fetch(
            http, "POST", b.base_url + "/v1/groups/acme/visitors/v1/signals", json={"event": "showterms"}, headers=other
        )
        assert (status, body["error"]["code"]) == (403, "forbidden")


async def test_one_click_session_with_the_visitor_on_a_and_the_agent_on_b(start_instance: Start) -> None:
    a, b = await start_instance(), await start_instance()
    agent = await b.agent("alice")
    await agent.wait_session("cust-42")
    visitor = await a.visitor("cust-42")
    connected = await visitor.start_session("visitor")

    started = await agent.wait_for(lambda e: isinstance(e, SessionEvent) and e.event == "started")
    assert (started.session, started.key, started.visitor) == (connected.session, "cust-42", "cust-42")
    joined = await agent.join_session(key="cust-42")
    assert (joined.session, joined.guests) == (connected.session, 1)
    told = await visitor.wait_for(GuestCount)
    assert (told.session, told.guests) == (connected.session, 1)

    await visitor.end_session()
    ended = await agent.wait_for(lambda e: isinstance(e, SessionEvent) and e.event == "ended")
    assert (ended.session, ended.reason) == (connected.session, "ended")


async def test_a_visitor_away_from_a_whose_session_b_ended_is_told_when_it_comes_back_on_b(
    start_instance: Start,
) -> None:
    """The visitor's connection on a drops; its group's back end ends the session
    through b; the visitor comes back (a load balancer sends it to b) and hears,
    right after its welcome, that its session ended and why (PROTOCOL.md §11.2)."""
    a, b = await start_instance(), await start_instance()
    visitor = await a.visitor("v1", backoff=Backoff(initial=0.05, factor=1.0, cap=0.05))
    connected = await visitor.start_session("random")
    agent = await b.agent("alice")
    await agent.join_session(code=connected.key)
    async with away(a, visitor, back_to=b):
        status, _ = await call(b, f"/v1/groups/acme/sessions/{connected.session}/end")
        assert status == 200
        await agent.wait_for(lambda e: isinstance(e, SessionEvent) and e.event == "ended")
    told = await visitor.wait_for(SessionEvent)
    assert (told.event, told.session, told.reason) == ("ended", connected.session, "terminated")
    assert visitor.session is None
    assert [c.subject for c in b.app[HUB].visitors.all()] == ["v1"], "it is back, on b"


async def test_a_code_shown_on_a_is_joined_by_an_agent_on_b(start_instance: Start) -> None:
    a, b = await start_instance(), await start_instance()
    visitor = await a.visitor("v1")
    code = (await visitor.start_session("random")).key
    agent = await b.agent("alice")
    assert (await agent.join_session(code=code)).visitor == "v1"
    assert (await visitor.wait_for(GuestCount)).guests == 1


async def test_codes_stay_unique_when_concurrent_draws_collide_often(
    start_instance: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both instances run in this process: draw from only 400 codes, so that
    # many of the 200 concurrent draws hit a code the other instance just took.
    monkeypatch.setattr(short_codes, "random_code", lambda length: f"{secrets.randbelow(400):04d}")
    limits = {"code_length": 4, "code_lookups_per_address": 10_000, "code_lookups_per_group": 10_000}
    a, b = await start_instance(**limits, **CONSUMERS), await start_instance(**limits, **CONSUMERS)
    async with aiohttp.ClientSession() as http:
        replies = await asyncio.gather(
            *(fetch(http, "POST", f"{(a, b)[i % 2].base_url}/v1/groups/acme/codes") for i in range(200))
        )
    assert [status for status, _ in replies] == [201] * 200, [r for r in replies if r[0] != 201][:3]
    codes = [body["code"] for _, body in replies]
    assert len(set(codes)) == 200, f"{200 - len(set(codes))} codes handed out twice"
