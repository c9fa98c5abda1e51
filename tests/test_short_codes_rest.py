"""Herald over plain HTTP: short codes for consumer pages (native and Live
Assist shapes), their CORS and rate limits, the admin API for group
settings, and the CRM back end's visitor look-up and signal. Runs on every
backend."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from herald_presence.protocol import tokens
from herald_presence.protocol.client.base import Refused
from herald_presence.protocol.client.visitor import VisitorClient
from herald_presence.protocol.messages import GuestCount, SessionConnected

from .harness import OTHER_SECRET, SECRET, HeraldServer, signal

Start = Callable[..., Awaitable[HeraldServer]]
ADMIN_TOKEN = "admin-token-0123456789"
SHOP = "https://shop.example"


@dataclass
class Reply:
    status: int
    headers: Mapping[str, str]
    body: Any

    @property
    def error(self) -> str:
        """The code of a JSON error answer (and it is one)."""
        assert isinstance(self.body, dict) and set(self.body) == {"error"}, self.body
        assert set(self.body["error"]) == {"code", "message"}, self.body
        return str(self.body["error"]["code"])


async def fetch(http: aiohttp.ClientSession, method: str, url: str, **options: Any) -> Reply:
    async with http.request(method, url, **options) as response:
        text = await response.text()
        return Reply(response.status, response.headers.copy(), json.loads(text) if text else None)


# Both test groups opt into consumer codes (a group that does not is refused: tests/security/test_consumers.py).
CONSUMERS = {"consumer_codes": ("acme", "other")}


@pytest.fixture
async def herald(start_herald: Start) -> HeraldServer:
    return await start_herald(**CONSUMERS)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@contextlib.asynccontextmanager
async def logged_in(herald: HeraldServer, agent: str = "alice", group: str = "acme") -> AsyncIterator[Any]:
    """An HTTP session carrying an agent's login cookie."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        key = tokens.agent_key(herald.secret(group), group, agent)
        login = await fetch(
            session, "POST", herald.base_url + "/v1/agent/login", json={"group": group, "agent": agent, "key": key}
        )
        assert login.status == 200, login.body
        yield session


def is_code(value: Any, length: int = 6) -> bool:
    return isinstance(value, str) and value.isdigit() and len(value) == length


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


async def create(http: aiohttp.ClientSession, herald: HeraldServer, **options: Any) -> Reply:
    return await fetch(http, "PUT", herald.base_url + "/assistserver/shortcode/create?group=acme", **options)


async def consume(http: aiohttp.ClientSession, herald: HeraldServer, code: str, **options: Any) -> Reply:
    url = herald.base_url + "/assistserver/shortcode/consumer"
    return await fetch(http, "GET", url, params={"group": "acme", "appkey": code}, **options)


def consumer(herald: HeraldServer, session_token: str) -> VisitorClient:
    client = VisitorClient.for_session(herald.base_url, "acme", session_token)
    herald.clients.append(client)  # closed with the server
    return client


# --- short codes: the Live Assist shapes -----------------------------------------------


async def test_live_assist_round_trip_from_create_to_an_agent_in_the_session(
    herald: HeraldServer, http: aiohttp.ClientSession
) -> None:
    created = await create(http, herald)
    assert created.status == 200, created.body
    assert set(created.body) == {"shortCode"} and is_code(created.body["shortCode"]), created.body
    code = created.body["shortCode"]

    redeemed = await consume(http, herald, code)
    assert redeemed.status == 200, redeemed.body
    assert set(redeemed.body) == {"session-token", "cid"}, redeemed.body
    cid, session_token = redeemed.body["cid"], redeemed.body["session-token"]

    page = consumer(herald, session_token)
    welcome = await page.connect()
    assert welcome.visitor == page.visitor == f"consumer.{cid}"
    connected = await page.wait_for(SessionConnected, timeout=5)
    assert (connected.session, connected.key, connected.key_type, connected.show_key, connected.guests) == (
        cid, code, "random", True, 0,
    )  # fmt: skip
    assert connected.id is None, "unsolicited: no request asked for it"
    assert page.session == connected

    async with logged_in(herald) as agent_http:
        found = await fetch(
            agent_http, "GET", herald.base_url + "/assistserver/shortcode/agent", params={"appkey": code}
        )
    assert (found.status, found.body) == (200, {"cid": cid})

    agent = await herald.agent("alice")
    joined = await agent.join_session(code=code)
    assert (joined.session, joined.visitor, joined.guests) == (cid, page.visitor, 1)
    told = await page.wait_for(GuestCount)
    assert (told.session, told.guests) == (cid, 1)


async def test_unknown_and_used_codes_are_refused_and_the_agent_route_needs_a_login(
    herald: HeraldServer, http: aiohttp.ClientSession
) -> None:
    unnamed = await fetch(http, "PUT", herald.base_url + "/assistserver/shortcode/create")
    assert (unnamed.status, unnamed.error) == (400, "invalid"), "two groups configured: ?group= is needed"
    # Live Assist's consumer SDKs take 403 as "this code opens nothing" (the native route: 404).
    unknown = await consume(http, herald, "000000")
    assert (unknown.status, unknown.error) == (403, "forbidden")
    not_digits = await consume(http, herald, "abc")
    assert (not_digits.status, not_digits.error) == (403, "forbidden")

    # The query parameters Live Assist SDKs may add are taken and ignored.
    url = herald.base_url + "/assistserver/shortcode"
    code = (await fetch(http, "PUT", url + "/create", params={"group": "acme", "auditName": "t-42"})).body["shortCode"]
    extras = {"group": "acme", "appkey": code, "auditName": "t-42", "username": "jo", "displayName": "Jo"}
    assert (await fetch(http, "GET", url + "/consumer", params=extras)).status == 200
    again = await consume(http, herald, code)
    assert (again.status, again.error) == (403, "forbidden"), "a code is redeemed once only"
    native_again = await fetch(http, "GET", f"{herald.base_url}/v1/groups/acme/codes/{code}")
    assert (native_again.status, native_again.error) == (404, "session_not_found")

    anonymous = await fetch(http, "GET", herald.base_url + "/assistserver/shortcode/agent", params={"appkey": code})
    assert (anonymous.status, anonymous.error) == (401, "unauthorized")
    native_anonymous = await fetch(http, "GET", f"{herald.base_url}/v1/groups/acme/codes/{code}/agent")
    assert (native_anonymous.status, native_anonymous.error) == (401, "unauthorized")

    async with logged_in(herald, "mallory", "other") as outsider:
        foreign = await fetch(outsider, "GET", f"{herald.base_url}/v1/groups/acme/codes/{code}/agent")
        assert (foreign.status, foreign.error) == (403, "forbidden")
        compat = await fetch(
            outsider, "GET", herald.base_url + "/assistserver/shortcode/agent", params={"appkey": code}
        )
        assert (compat.status, compat.error) == (404, "session_not_found"), "not found in the agent's own group"


# --- short codes: the native shapes ---------------------------------------------------


async def test_native_create_redeem_and_agent_look_up(herald: HeraldServer, http: aiohttp.ClientSession) -> None:
    created = await fetch(http, "POST", herald.base_url + "/v1/groups/acme/codes")
    assert created.status == 201, created.body
    assert set(created.body) == {"code", "session"} and is_code(created.body["code"]), created.body
    code, session = created.body["code"], created.body["session"]

    redeemed = await fetch(http, "GET", f"{herald.base_url}/v1/groups/acme/codes/{code}")
    assert redeemed.status == 200, redeemed.body
    assert set(redeemed.body) == {"session", "session_token"} and redeemed.body["session"] == session

    async with logged_in(herald) as agent_http:
        found = await fetch(agent_http, "GET", f"{herald.base_url}/v1/groups/acme/codes/{code}/agent")
    assert (found.status, found.body) == (200, {"session": session, "key": code, "visitor": f"consumer.{session}"})

    page = consumer(herald, redeemed.body["session_token"])
    await page.connect()
    assert (await page.wait_for(SessionConnected, timeout=5)).session == session


async def test_a_session_token_opens_only_its_own_group(herald: HeraldServer, http: aiohttp.ClientSession) -> None:
    code = (await fetch(http, "POST", herald.base_url + "/v1/groups/acme/codes")).body["code"]
    token = (await fetch(http, "GET", f"{herald.base_url}/v1/groups/acme/codes/{code}")).body["session_token"]
    elsewhere = VisitorClient.for_session(herald.base_url, "other", token, reconnect=False)
    herald.clients.append(elsewhere)
    with pytest.raises(Refused) as refused:
        await elsewhere.connect()
    assert refused.value.code == "unauthorized", refused.value


async def test_a_code_a_visitors_app_shows_cannot_be_redeemed(
    herald: HeraldServer, http: aiohttp.ClientSession
) -> None:
    visitor = await herald.visitor("v1")
    code = (await visitor.start_session("random")).key
    compat = await consume(http, herald, code)
    assert (compat.status, compat.error) == (403, "forbidden")
    native = await fetch(http, "GET", f"{herald.base_url}/v1/groups/acme/codes/{code}")
    assert (native.status, native.error) == (404, "session_not_found")
    agent = await herald.agent("alice")
    assert (await agent.join_session(code=code)).visitor == "v1", "the code still works for agents"


# --- CORS -----------------------------------------------------------------------------


async def test_cors_follows_the_groups_allowed_origins(start_herald: Start, http: aiohttp.ClientSession) -> None:
    herald = await start_herald(admin_token=ADMIN_TOKEN, **CONSUMERS)
    changed = await fetch(
        http,
        "PUT",
        herald.base_url + "/v1/admin/groups/acme/settings",
        json={"allowed_origins": [SHOP]},
        headers=bearer(ADMIN_TOKEN),
    )
    assert changed.status == 200 and changed.body["allowed_origins"] == [SHOP], changed.body

    allowed = await create(http, herald, headers={"Origin": SHOP})
    assert allowed.status == 200, allowed.body
    assert allowed.headers.get("Access-Control-Allow-Origin") == SHOP
    redeemed = await consume(http, herald, allowed.body["shortCode"], headers={"Origin": SHOP})
    assert redeemed.status == 200 and redeemed.headers.get("Access-Control-Allow-Origin") == SHOP

    evil = await create(http, herald, headers={"Origin": "https://evil.example"})
    assert (evil.status, evil.error) == (403, "forbidden")
    assert "Access-Control-Allow-Origin" not in evil.headers

    url = herald.base_url + "/assistserver/shortcode/create?group=acme"
    ask = {"Access-Control-Request-Method": "PUT"}
    preflight = await fetch(http, "OPTIONS", url, headers={"Origin": SHOP, **ask})
    assert preflight.status == 204
    assert preflight.headers.get("Access-Control-Allow-Origin") == SHOP
    assert "PUT" in preflight.headers.get("Access-Control-Allow-Methods", "")
    foreign_preflight = await fetch(http, "OPTIONS", url, headers={"Origin": "https://evil.example", **ask})
    assert foreign_preflight.status == 403
    assert "Access-Control-Allow-Origin" not in foreign_preflight.headers

    native = await fetch(
        http,
        "OPTIONS",
        herald.base_url + "/v1/groups/acme/codes",
        headers={"Origin": SHOP, "Access-Control-Request-Method": "POST"},
    )
    assert native.status == 204 and native.headers.get("Access-Control-Allow-Origin") == SHOP
    assert "POST" in native.headers.get("Access-Control-Allow-Methods", "")

    no_origin = await create(http, herald)
    assert no_origin.status == 200 and "Access-Control-Allow-Origin" not in no_origin.headers


# --- rate limits ----------------------------------------------------------------------


async def test_look_ups_per_address_are_rate_limited(start_herald: Start, http: aiohttp.ClientSession) -> None:
    herald = await start_herald(code_lookups_per_address=5, **CONSUMERS)
    for guess in range(5):
        miss = await consume(http, herald, f"{guess:06d}")
        assert (miss.status, miss.error) == (403, "forbidden")
    limited = await consume(http, herald, "000005")
    assert (limited.status, limited.error) == (429, "rate_limited")
    assert int(limited.headers["Retry-After"]) > 0


async def test_look_ups_per_group_are_rate_limited_too(start_herald: Start, http: aiohttp.ClientSession) -> None:
    herald = await start_herald(code_lookups_per_group=5, code_lookups_per_address=100, **CONSUMERS)
    for guess in range(5):
        assert (await consume(http, herald, f"{guess:06d}")).status == 403
    limited = await consume(http, herald, "000005")
    assert (limited.status, limited.error) == (429, "rate_limited")
    assert int(limited.headers["Retry-After"]) > 0
    other_group = await fetch(http, "GET", f"{herald.base_url}/v1/groups/other/codes/000005")
    assert (other_group.status, other_group.error) == (404, "session_not_found"), "another group's budget is its own"


async def test_agent_look_ups_count_against_the_limit(start_herald: Start, http: aiohttp.ClientSession) -> None:
    herald = await start_herald(code_lookups_per_address=5, **CONSUMERS)
    for guess in range(3):
        assert (await consume(http, herald, f"{guess:06d}")).status == 403
    async with logged_in(herald) as agent_http:
        url = herald.base_url + "/assistserver/shortcode/agent"
        for guess in range(3, 5):
            miss = await fetch(agent_http, "GET", url, params={"appkey": f"{guess:06d}"})
            assert (miss.status, miss.error) == (404, "session_not_found")
        limited = await fetch(agent_http, "GET", url, params={"appkey": "000005"})
    assert (limited.status, limited.error) == (429, "rate_limited")
    assert int(limited.headers["Retry-After"]) > 0


# --- the admin API --------------------------------------------------------------------


async def test_admin_api_checks_its_token_and_values_and_changes_the_code_length(
    start_herald: Start, http: aiohttp.ClientSession
) -> None:
    herald = await start_herald(admin_token=ADMIN_TOKEN, **CONSUMERS)
    url = herald.base_url + "/v1/admin/groups/acme/settings"

    missing = await fetch(http, "GET", url)
    assert (missing.status, missing.error) == (401, "unauthorized")
    wrong = await fetch(http, "PUT", url, json={"code_length": 7}, headers=bearer("not-the-admin-token-at-all"))
    assert (wrong.status, wrong.error) == (401, "unauthorized")

    current = await fetch(http, "GET", url, headers=bearer(ADMIN_TOKEN))
    assert current.status == 200
    expected = {"code_length": 6, "code_ttl": 300.0, "allowed_origins": [], "allow_consumer_codes": True}
    assert current.body.items() >= {**expected, "enforce_expiry": False}.items()

    for bad in (
        {"code_length": 3},
        {"code_length": 13},
        {"code_length": "7"},
        {"code_length": 7.0},
        {"surprise": 1},
        {"code_ttl": 5},
        {"allowed_origins": "https://shop.example"},
        {"allow_consumer_codes": "yes"},
        {"allow_consumer_codes": 1},
        {},
    ):
        refused = await fetch(http, "PUT", url, json=bad, headers=bearer(ADMIN_TOKEN))
        assert (refused.status, refused.error) == (400, "invalid"), bad
    not_json = await fetch(http, "PUT", url, data=b"[1", headers=bearer(ADMIN_TOKEN))
    assert (not_json.status, not_json.error) == (400, "invalid")
    unknown_group = await fetch(
        http, "GET", herald.base_url + "/v1/admin/groups/nobody/settings", headers=bearer(ADMIN_TOKEN)
    )
    assert unknown_group.status == 404

    changed = await fetch(http, "PUT", url, json={"code_length": 7}, headers=bearer(ADMIN_TOKEN))
    assert changed.status == 200 and changed.body["code_length"] == 7, changed.body
    created = await fetch(http, "POST", herald.base_url + "/v1/groups/acme/codes")
    assert is_code(created.body["code"], 7), created.body
    visitor = await herald.visitor("v1")
    assert is_code((await visitor.start_session("random")).key, 7)
    other = await fetch(http, "POST", herald.base_url + "/v1/groups/other/codes")
    assert is_code(other.body["code"], 6), "other groups keep theirs"


async def test_admin_api_is_disabled_without_an_admin_token(herald: HeraldServer, http: aiohttp.ClientSession) -> None:
    url = herald.base_url + "/v1/admin/groups/acme/settings"
    for method in ("GET", "PUT"):
        refused = await fetch(http, method, url, json={"code_length": 7}, headers=bearer(ADMIN_TOKEN))
        assert (refused.status, refused.error) == (403, "forbidden"), method


# --- CRM REST ---------------------------------------------------------------------------


async def test_crm_looks_up_and_signals_a_visitor(herald: HeraldServer, http: aiohttp.ClientSession) -> None:
    api = bearer(tokens.api_key(SECRET, "acme"))
    visitor = await herald.visitor("v1", data={"url": "/cart"})

    state = await fetch(http, "GET", herald.base_url + "/v1/groups/acme/visitors/v1", headers=api)
    assert state.status == 200, state.body
    assert state.body["visitor"] == "v1" and state.body["online"] is True
    assert [c["data"] for c in state.body["connections"]] == [{"url": "/cart"}]

    sent = await fetch(
        http, "POST", herald.base_url + "/v1/groups/acme/visitors/v1/signals", json={"event": "showterms"}, headers=api
    )
    assert (sent.status, sent.body) == (200, {"delivered": 1})
    showterms = await visitor.wait_for(signal("showterms"))
    assert showterms.agent == "crm"

    absent = await fetch(http, "GET", herald.base_url + "/v1/groups/acme/visitors/nobody", headers=api)
    assert absent.status == 200 and absent.body["online"] is False
    offline = await fetch(
        http,
        "POST",
        herald.base_url + "/v1/groups/acme/visitors/nobody/signals",
        json={"event": "showterms"},
        headers=api,
    )
    assert (offline.status, offline.error) == (404, "visitor_offline")


async def test_crm_refuses_bad_credentials_and_bad_requests(herald: HeraldServer, http: aiohttp.ClientSession) -> None:
    await herald.visitor("v1")
    acme = bearer(tokens.api_key(SECRET, "acme"))
    lookup = herald.base_url + "/v1/groups/{}/visitors/v1"
    signals = lookup + "/signals"

    for method, url in (("GET", lookup), ("POST", signals)):
        foreign = await fetch(http, method, url.format("other"), json={"event": "showterms"}, headers=acme)
        assert (foreign.status, foreign.error) == (403, "forbidden"), method
        forged = await fetch(
            http,
            method,
            url.format("acme"),
            json={"event": "showterms"},
            headers=bearer(tokens.api_key("not-the-secret-0123456789", "acme")),
        )
        assert (forged.status, forged.error) == (401, "unauthorized"), method
        missing = await fetch(http, method, url.format("acme"), json={"event": "showterms"})
        assert (missing.status, missing.error) == (401, "unauthorized"), method

    visitor_token = bearer(tokens.visitor_token(SECRET, "acme", "v1"))
    assert (await fetch(http, "GET", lookup.format("acme"), headers=visitor_token)).status == 401
    other_key = bearer(tokens.api_key(OTHER_SECRET, "other"))
    assert (await fetch(http, "GET", lookup.format("other"), headers=other_key)).status == 200

    for body in (
        {"event": "bad event"},
        {"event": ""},
        {},
        {"event": "x", "to": "everyone"},
        {"event": "x", "data": {"nested": {"no": 1}}},
    ):
        bad = await fetch(http, "POST", signals.format("acme"), json=body, headers=acme)
        assert (bad.status, bad.error) == (400, "invalid"), body
    not_json = await fetch(http, "POST", signals.format("acme"), data=b"{", headers=acme)
    assert (not_json.status, not_json.error) == (400, "invalid")
