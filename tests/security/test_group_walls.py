"""Groups are walls: an agent, a consumer or a CRM back end of group
``other`` learns nothing about ``acme`` and reaches nobody in it."""

from __future__ import annotations

import aiohttp
import pytest

from herald_presence.protocol import RequestFailed, tokens
from herald_presence.protocol.errors import ErrorCode
from herald_presence.protocol.messages import PresenceChanged, SessionEvent, Signal

from ..harness import OTHER_SECRET, SECRET, HeraldServer, drain
from .helpers import assert_bystanders_served, error_of, login, session


async def test_agent_of_another_group_subscribing_looking_up_and_signalling(herald: HeraldServer) -> None:
    visitor = await herald.visitor("shared-id", group="acme", data={"url": "/acme/secret"})
    intruder = await herald.agent("mallory", group="other")
    (state,) = (await intruder.subscribe(["shared-id"])).visitors
    assert state == {"visitor": "shared-id", "online": False, "version": 0, "connections": []}
    assert (await intruder.lookup("shared-id"))["online"] is False
    assert (await intruder.subscribe_group()).visitors == []
    for to in ("focused", "all"):
        with pytest.raises(RequestFailed) as refused:
            await intruder.signal("shared-id", "showterms", to=to)
        assert refused.value.code == ErrorCode.VISITOR_OFFLINE
    await visitor.publish(url="/acme/more-secret")
    await visitor.terms("displayed")
    await visitor.start_session("visitor")
    leaked = [e for e in await drain(intruder, 0.3) if isinstance(e, PresenceChanged | Signal | SessionEvent)]
    assert leaked == []
    assert not [e for e in await drain(visitor, 0.1) if isinstance(e, Signal)]
    # The same ID in other is other's own visitor, and only that one is seen.
    await herald.visitor("shared-id", group="other", data={"url": "/other"})
    (state,) = (await intruder.subscribe(["shared-id"])).visitors
    assert state["online"] is True and state["connections"][0]["data"] == {"url": "/other"}
    await assert_bystanders_served(herald.base_url)
    await assert_bystanders_served(herald.base_url, secret=OTHER_SECRET, group="other")


async def test_agent_of_another_group_joining_a_session_by_code_key_or_id(herald: HeraldServer) -> None:
    visitor = await herald.visitor("v-acme")
    started = await visitor.start_session("random")
    intruder = await herald.agent("mallory", group="other")
    for how in ({"code": started.key}, {"key": "v-acme"}, {"session": started.session}):
        with pytest.raises(RequestFailed) as refused:
            await intruder.join_session(**how)
        assert refused.value.code == ErrorCode.SESSION_NOT_FOUND, how
    await intruder.wait_session("v-acme")
    await visitor.start_session("visitor")  # a one-click session the intruder waits for, in vain
    assert not [e for e in await drain(intruder, 0.3) if isinstance(e, SessionEvent)]
    assert visitor.session is not None and visitor.session.guests == 0
    # The code was live all along: acme's agent gets in.
    code = (await visitor.start_session("random")).key
    assert (await (await herald.agent("alice")).join_session(code=code)).visitor == "v-acme"
    await assert_bystanders_served(herald.base_url)


async def test_agent_of_another_group_looking_up_a_code_over_rest(start_herald) -> None:  # type: ignore[no-untyped-def]
    herald: HeraldServer = await start_herald(consumer_codes=["acme"])
    async with session() as http:
        created = await http.post(herald.base_url + "/v1/groups/acme/codes")
        assert created.status == 201
        code = (await created.json())["code"]
        assert (
            await login(
                http,
                herald.base_url,
                agent="mallory",
                group="other",
                key=tokens.agent_key(OTHER_SECRET, "other", "mallory"),
            )
        ).status == 200
        response = await http.get(f"{herald.base_url}/v1/groups/acme/codes/{code}/agent")
        assert response.status == 403 and await error_of(response) == ErrorCode.FORBIDDEN
        response = await http.get(f"{herald.base_url}/v1/groups/other/codes/{code}/agent")
        assert response.status == 404 and await error_of(response) == ErrorCode.SESSION_NOT_FOUND
        response = await http.get(f"{herald.base_url}/assistserver/shortcode/agent", params={"appkey": code})
        assert response.status == 404 and await error_of(response) == ErrorCode.SESSION_NOT_FOUND
    await assert_bystanders_served(herald.base_url)


async def test_crm_key_of_another_group_on_acme_rest(herald: HeraldServer) -> None:
    visitor = await herald.visitor("v-crm")
    url = herald.base_url + "/v1/groups/acme/visitors/v-crm"
    foreign = {"Authorization": f"Bearer {tokens.api_key(OTHER_SECRET, 'other')}"}
    async with aiohttp.ClientSession() as http:
        response = await http.get(url, headers=foreign)
        assert response.status == 403 and await error_of(response) == ErrorCode.FORBIDDEN
        response = await http.post(url + "/signals", json={"event": "showterms"}, headers=foreign)
        assert response.status == 403 and await error_of(response) == ErrorCode.FORBIDDEN
        # other's secret signing a key that names acme: forged, not foreign.
        forged = {"Authorization": f"Bearer {tokens.api_key(OTHER_SECRET, 'acme')}"}
        response = await http.post(url + "/signals", json={"event": "showterms"}, headers=forged)
        assert response.status == 401 and await error_of(response) == ErrorCode.UNAUTHORIZED
        expired = {"Authorization": f"Bearer {tokens.api_key(SECRET, 'acme', ttl=-1)}"}
        response = await http.get(url, headers=expired)
        assert response.status == 401 and await error_of(response) == ErrorCode.TOKEN_EXPIRED
        response = await http.get(url)
        assert response.status == 401 and await error_of(response) == ErrorCode.UNAUTHORIZED
        assert not [e for e in await drain(visitor, 0.2) if isinstance(e, Signal)]
        own = {"Authorization": f"Bearer {tokens.api_key(SECRET, 'acme')}"}
        response = await http.post(url + "/signals", json={"event": "showterms"}, headers=own)
        assert response.status == 200 and await response.json() == {"delivered": 1}
    await assert_bystanders_served(herald.base_url)


async def test_visitor_addressing_an_agent_of_another_group(herald: HeraldServer) -> None:
    intruder_target = await herald.agent("alice", group="other")
    visitor = await herald.visitor("v1", group="acme")
    with pytest.raises(RequestFailed) as refused:
        await visitor.signal_agent("terms", {"status": "accepted"}, agent="alice")
    assert refused.value.code == ErrorCode.AGENT_OFFLINE
    assert not [e for e in await drain(intruder_target, 0.2) if isinstance(e, Signal)]
    await assert_bystanders_served(herald.base_url)
