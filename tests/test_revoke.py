"""A group's back end cutting someone off (PROTOCOL.md §12.4) and credentials
that run out on open connections (§3.4): across a cluster of two instances
on one Redis, and on both backends alone."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
import yarl

from herald_presence.protocol import codec, tokens
from herald_presence.protocol.client.base import Disconnected, Refused
from herald_presence.protocol.errors import CloseCode, ErrorCode
from herald_presence.protocol.messages import Error, Hello, Refresh, SessionEvent, Welcome

from .conftest import Start
from .harness import SECRET, HeraldServer, changed, receive

API_KEY = tokens.api_key(SECRET, "acme")


async def call(herald: HeraldServer, path: str, body: dict[str, Any] | None = None, key: str = API_KEY) -> Any:
    """POST a control route with the group's API key; (status, JSON body)."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(herald.base_url + path, json=body, headers={"Authorization": f"Bearer {key}"}) as response,
    ):
        return response.status, await response.json(content_type=None)


async def closed_with(ws: aiohttp.ClientWebSocketResponse, seconds: float = 3) -> tuple[list[Any], int | None]:
    """Frames until the server closes the socket, and the close code its close frame carried."""
    frames = []
    async with asyncio.timeout(seconds):
        while (msg := await ws.receive()).type is aiohttp.WSMsgType.BINARY:
            frames.append(codec.decode(msg.data))
    return frames, msg.data if msg.type is aiohttp.WSMsgType.CLOSE else ws.close_code


def stopped(event: Any) -> bool:
    """Matcher for ``wait_for``: the client stopped for good (refused)."""
    return isinstance(event, Disconnected) and not event.reconnecting


async def raw_visitor(http: aiohttp.ClientSession, herald: HeraldServer, visitor: str, token: str) -> Any:
    ws = await http.ws_connect(herald.base_url + "/v1/visitor")
    await ws.send_bytes(codec.encode(Hello(versions=[1], group="acme", visitor=visitor, token=token)))
    return ws, await receive(ws)


# --- agents ----------------------------------------------------------------------------


async def test_an_agent_revoked_on_a_is_cut_off_on_b_within_a_second_and_its_old_cookie_is_refused(
    start_instance: Start,
) -> None:
    a, b = await start_instance(), await start_instance()
    agent = await b.agent("alice", reconnect=False)
    bystander = await b.agent("bob", reconnect=False)
    cookies = agent.http_session.cookie_jar.filter_cookies(yarl.URL(b.base_url))
    old_cookie = cookies["HERALD_SESSION"].value

    started = time.monotonic()
    status, body = await call(a, "/v1/groups/acme/agents/alice/revoke")
    assert status == 200 and body["agent"] == "alice" and body["not_before"] <= time.time()
    error = await agent.wait_for(Error, timeout=1.0)
    assert error.code == ErrorCode.REVOKED
    await agent.wait_for(stopped, timeout=1.0)
    assert time.monotonic() - started < 1.0, "cut off within a second"
    assert isinstance(agent.failure, Refused) and agent.failure.close_code == CloseCode.REVOKED

    for instance in (a, b):  # the cookie copied before the revocation opens nothing, anywhere
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
            headers = {"Cookie": f"HERALD_SESSION={old_cookie}"}
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(instance.base_url + "/v1/agent", headers=headers)
            assert refused.value.status == 401
            lookup = await http.get(instance.base_url + "/assistserver/shortcode/agent?appkey=123456", headers=headers)
            assert lookup.status == 401
    assert bystander.connected, "another agent of the group is untouched"
    again = await a.agent("alice", reconnect=False)  # a new login (the back end still mints keys) works
    assert again.connected


async def test_revoking_an_agent_with_another_groups_key_is_forbidden(herald: HeraldServer) -> None:
    agent = await herald.agent("alice", reconnect=False)
    other_key = tokens.api_key(herald.secret("other"), "other")
    assert (await call(herald, "/v1/groups/acme/agents/alice/revoke", key=other_key))[0] == 403
    assert (await call(herald, "/v1/groups/acme/agents/alice/revoke", key="1.forged.acme"))[0] == 401
    await asyncio.sleep(0.2)
    assert agent.connected


# --- visitors ----------------------------------------------------------------------------


async def test_a_visitor_disconnected_on_a_loses_its_connections_on_both_and_is_refused_a_while(
    start_instance: Start,
) -> None:
    a, b = await start_instance(), await start_instance()
    token = tokens.visitor_token(SECRET, "acme", "v1")
    async with aiohttp.ClientSession() as http:
        (on_a, _), (on_b, _) = await raw_visitor(http, a, "v1", token), await raw_visitor(http, b, "v1", token)
        (other, _) = await raw_visitor(http, b, "v2", tokens.visitor_token(SECRET, "acme", "v2"))
        status, body = await call(a, "/v1/groups/acme/visitors/v1/disconnect", {"refuse_for": 2})
        assert status == 200 and body["closed"] == 2 and body["refused_until"] > time.time() + 1
        for ws in (on_a, on_b):
            frames, code = await closed_with(ws)
            assert code == CloseCode.REVOKED
            assert [f.code for f in frames if isinstance(f, Error)] == [ErrorCode.REVOKED]
        assert not other.closed

        refused, first = await raw_visitor(http, b, "v1", token)
        _, code = await closed_with(refused)
        assert code == CloseCode.REVOKED and first.code == ErrorCode.REVOKED, first
        assert "more seconds" in first.message
        await asyncio.sleep(2.1)  # the refusal runs out
        back, welcome = await raw_visitor(http, a, "v1", token)
        assert isinstance(welcome, Welcome)
        await back.close()
        await other.close()


async def test_a_disconnect_without_refusal_lets_the_visitor_back_at_once(herald: HeraldServer) -> None:
    agent = await herald.agent("alice")
    await agent.subscribe(["v1"])
    visitor = await herald.visitor("v1", reconnect=False)
    await agent.wait_for(changed("online", "v1"))
    status, body = await call(herald, "/v1/groups/acme/visitors/v1/disconnect", {"reason": "fraud check"})
    assert (status, body) == (200, {"closed": 1, "refused_until": None})
    await visitor.wait_for(stopped, timeout=3)
    assert isinstance(visitor.failure, Refused) and visitor.failure.close_code == CloseCode.REVOKED
    assert visitor.failure.message == "fraud check"
    await agent.wait_for(changed("offline", "v1"))  # after the grace period, as any clean close
    assert (await herald.visitor("v1", reconnect=False)).connected


@pytest.mark.parametrize("body", [{"refuse_for": -1}, {"refuse_for": 86401}, {"refuse_for": "5"}, {"reason": 5}])
async def test_a_disconnect_with_bad_fields_is_invalid(herald: HeraldServer, body: dict[str, Any]) -> None:
    status, answer = await call(herald, "/v1/groups/acme/visitors/v1/disconnect", body)
    assert (status, answer["error"]["code"]) == (400, "invalid")


# --- sessions ----------------------------------------------------------------------------


async def test_a_session_ended_over_rest_tells_its_agents_and_its_visitor_terminated(start_instance: Start) -> None:
    a, b = await start_instance(), await start_instance()
    visitor = await a.visitor("v1")
    agent = await b.agent("alice")
    started = await visitor.start_session("random")
    await agent.join_session(code=started.key)

    status, body = await call(b, f"/v1/groups/acme/sessions/{started.session}/end")
    assert (status, body) == (200, {"session": started.session, "ended": True})
    told = await agent.wait_for(lambda e: isinstance(e, SessionEvent) and e.event == "ended")
    assert (told.session, told.reason) == (started.session, "terminated")
    heard = await visitor.wait_for(SessionEvent)
    assert (heard.event, heard.session, heard.reason) == ("ended", started.session, "terminated")
    assert visitor.session is None

    status, body = await call(a, f"/v1/groups/acme/sessions/{started.session}/end")
    assert (status, body["error"]["code"]) == (404, "session_not_found")


# --- expiry ----------------------------------------------------------------------------


async def test_an_expired_visitor_token_without_refresh_is_closed_at_expiry(start_herald: Start) -> None:
    herald = await start_herald()
    herald.settings.groups["acme"].enforce_expiry = True
    token = tokens.make_token(SECRET, tokens.VISITOR, "acme", "v1", ttl=2)
    expires = int(token.split(".")[0])
    async with aiohttp.ClientSession() as http:
        ws, welcome = await raw_visitor(http, herald, "v1", token)
        assert isinstance(welcome, Welcome) and welcome.expires == expires
        frames, code = await closed_with(ws, seconds=5)
    closed_at = time.time()
    assert code == CloseCode.UNAUTHORIZED
    assert [f.code for f in frames if isinstance(f, Error)] == [ErrorCode.TOKEN_EXPIRED]
    assert expires <= closed_at < expires + 1.0, "closed at its expiry"


async def test_a_refreshed_visitor_connection_outlives_its_first_token(start_herald: Start) -> None:
    herald = await start_herald()
    herald.settings.groups["acme"].enforce_expiry = True
    first = tokens.make_token(SECRET, tokens.VISITOR, "acme", "v1", ttl=2)
    async with aiohttp.ClientSession() as http:
        ws, _ = await raw_visitor(http, herald, "v1", first)
        await ws.send_bytes(codec.encode(Refresh(id=1, token=tokens.visitor_token(SECRET, "acme", "v2"))))
        refused = await receive(ws)
        assert (refused.code, refused.id) == (ErrorCode.UNAUTHORIZED, 1), "a token of another visitor"
        fresh = tokens.make_token(SECRET, tokens.VISITOR, "acme", "v1", ttl=60)
        await ws.send_bytes(codec.encode(Refresh(id=2, token=fresh)))
        ack = await receive(ws)
        assert (ack.TYPE, ack.id, ack.expires) == ("ack", 2, int(fresh.split(".")[0]))
        await asyncio.sleep(3)  # past the first token's expiry
        assert not ws.closed
        await ws.close()


async def test_the_sdks_token_callback_refreshes_before_expiry(start_herald: Start) -> None:
    herald = await start_herald()
    herald.settings.groups["acme"].enforce_expiry = True
    minted: list[str] = []

    def fresh_token() -> str:
        minted.append(tokens.make_token(SECRET, tokens.VISITOR, "acme", "v1", ttl=6))
        return minted[-1]

    visitor = await herald.visitor("v1", token=fresh_token, reconnect=False)
    await asyncio.sleep(8)  # refreshed about 5 s before each expiry
    assert visitor.connected and visitor.failure is None
    assert len(minted) >= 3, minted  # the hello's, then at least two refreshes


async def test_without_enforcement_an_expired_token_keeps_its_connection(start_herald: Start) -> None:
    herald = await start_herald()
    token = tokens.make_token(SECRET, tokens.VISITOR, "acme", "v1", ttl=1)
    async with aiohttp.ClientSession() as http:
        ws, _ = await raw_visitor(http, herald, "v1", token)
        await asyncio.sleep(2.2)
        assert not ws.closed
        await ws.close()


async def test_enforcement_set_at_run_time_closes_an_agent_whose_login_ran_out(start_herald: Start) -> None:
    herald = await start_herald(session_max_age=2, admin_token="admin-token-0123456789")
    async with aiohttp.ClientSession() as http:
        put = await http.put(
            herald.base_url + "/v1/admin/groups/acme/settings",
            json={"enforce_expiry": True},
            headers={"Authorization": "Bearer admin-token-0123456789"},
        )
        assert (await put.json())["enforce_expiry"] is True
    fixed = await herald.agent("alice", reconnect=False)  # a fixed key: no refresh
    keyed = await herald.agent("bob", key=lambda: tokens.agent_key(SECRET, "acme", "bob"), reconnect=False)
    assert fixed.welcome is not None and fixed.welcome.expires is not None
    await fixed.wait_for(stopped, timeout=5)
    assert isinstance(fixed.failure, Refused) and fixed.failure.code == ErrorCode.TOKEN_EXPIRED
    assert keyed.connected, "an agent whose key factory refreshed stays"
