"""Groups are walls, and only credentials open doors."""

from __future__ import annotations

import aiohttp
import pytest

from herald_presence.protocol import RequestFailed, tokens
from herald_presence.protocol.client.agent import LoginRefused
from herald_presence.protocol.client.base import Refused
from herald_presence.protocol.messages import PresenceChanged, Signal

from .harness import SECRET, HeraldServer, drain


async def _login(
    session: aiohttp.ClientSession, herald: HeraldServer, group: str = "acme", key: str | None = None
) -> aiohttp.ClientResponse:
    key = key or tokens.agent_key(SECRET, group, "alice")
    return await session.post(herald.base_url + "/v1/agent/login", json={"group": group, "agent": "alice", "key": key})


async def test_an_agent_cannot_see_or_signal_another_groups_visitor(herald: HeraldServer) -> None:
    visitor = await herald.visitor("shared-id", group="acme")
    intruder = await herald.agent("mallory", group="other")
    (state,) = (await intruder.subscribe(["shared-id"])).visitors
    assert state["online"] is False, "other's agent sees its own group's (offline) shared-id"
    assert (await intruder.lookup("shared-id"))["online"] is False
    assert (await intruder.subscribe_group()).visitors == []
    with pytest.raises(RequestFailed) as refused:
        await intruder.show_terms("shared-id")
    assert refused.value.code == "visitor_offline"
    await visitor.publish(url="/secret")
    await visitor.terms("displayed")
    assert not [e for e in await drain(intruder, 0.3) if isinstance(e, PresenceChanged | Signal)]
    assert not [e for e in await drain(visitor, 0.1) if isinstance(e, Signal)]


async def test_a_visitor_cannot_address_an_agent_of_another_group(herald: HeraldServer) -> None:
    await herald.agent("alice", group="other")
    visitor = await herald.visitor("v1", group="acme")
    with pytest.raises(RequestFailed) as refused:
        await visitor.signal_agent("terms", {"status": "accepted"}, agent="alice")
    assert refused.value.code == "agent_offline"


async def test_a_bad_visitor_token_is_refused_and_not_retried(herald: HeraldServer) -> None:
    forged = tokens.visitor_token("not-the-groups-secret", "acme", "v1")
    visitor = await herald.visitor("v1", connect=False, token=forged)
    with pytest.raises(Refused) as refused:
        await visitor.connect()
    assert refused.value.code == "unauthorized" and refused.value.close_code == 4500


async def test_agent_login_with_a_wrong_key_is_refused(herald: HeraldServer) -> None:
    forged = tokens.agent_key("not-the-groups-secret", "acme", "alice")
    agent = await herald.agent("alice", connect=False, key=forged)
    with pytest.raises(LoginRefused):
        await agent.connect()


async def test_agent_key_of_another_group_does_not_log_in(herald: HeraldServer) -> None:
    async with aiohttp.ClientSession() as session:
        response = await _login(session, herald, group="other", key=tokens.agent_key(SECRET, "acme", "alice"))
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "unauthorized"


async def test_agent_websocket_without_a_login_is_refused_before_upgrade(herald: HeraldServer) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(herald.base_url + "/v1/agent")
        assert refused.value.status == 401


async def test_agent_websocket_from_a_foreign_origin_is_refused(herald: HeraldServer) -> None:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        assert (await _login(session, herald)).status == 200
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(herald.base_url + "/v1/agent", headers={"Origin": "https://evil.example"})
        assert refused.value.status == 403
        same_origin = await session.ws_connect(herald.base_url + "/v1/agent", headers={"Origin": herald.base_url})
        await same_origin.close()


async def test_logout_ends_the_agent_session(herald: HeraldServer) -> None:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        await _login(session, herald)
        assert (await session.post(herald.base_url + "/v1/agent/logout")).status == 200
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(herald.base_url + "/v1/agent")
        assert refused.value.status == 401


MALFORMED_LOGINS = [b"not json", b"[]", b'{"group": "acme"}', b'{"group": "a b", "agent": "x", "key": "1.x"}']


@pytest.mark.parametrize("body", MALFORMED_LOGINS)
async def test_malformed_login_is_a_400(herald: HeraldServer, body: bytes) -> None:
    async with aiohttp.ClientSession() as session:
        response = await session.post(herald.base_url + "/v1/agent/login", data=body)
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "invalid"
