"""Logs are read by more people than credentials should be: at DEBUG, after
every kind of credential has been used (and refused), none of them is in
the server's output."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from herald_presence.protocol import tokens
from herald_presence.protocol.client.agent import AgentClient
from herald_presence.protocol.client.visitor import VisitorClient

from ..harness import SECRET
from ..processes import HERALD, start_server
from .helpers import login, session, show_terms_round_trip

ADMIN_TOKEN = "admin-token-of-the-log-test-0123456789"


async def test_credentials_never_reach_the_logs(tmp_path: Path) -> None:
    server = start_server(
        tmp_path, str(HERALD), "serve", "--group", f"acme={SECRET}", "--log-level", "DEBUG",
        "--code-length", "12", "--admin-token", ADMIN_TOKEN, "--grace-period", "0.2", "--signal-hold", "0.2",
    )  # fmt: skip
    base = server.base_url
    visitor_token = tokens.visitor_token(SECRET, "acme", "v-logged")
    agent_key = tokens.agent_key(SECRET, "acme", "alice")
    api_key = tokens.api_key(SECRET, "acme")
    forged_token = tokens.visitor_token("not-the-secret-0123456789", "acme", "v-logged")
    forged_key = tokens.agent_key("not-the-secret-0123456789", "acme", "alice")
    seen: dict[str, str] = {}
    try:
        async with session() as http:
            # Agent login (and a refused one), then the websocket with the cookie.
            assert (await login(http, base, key=forged_key)).status == 401
            response = await login(http, base, key=agent_key)
            assert response.status == 200
            seen["session cookie"] = response.cookies["HERALD_SESSION"].value
            # A visitor hello with a token (and a refused one), and a signal round trip.
            refused = VisitorClient(base, "acme", "v-logged", forged_token, reconnect=False)
            try:
                await refused.connect()
            except Exception:
                pass
            finally:
                await refused.close()
            async with (
                VisitorClient(base, "acme", "v-logged", visitor_token, reconnect=False) as visitor,
                AgentClient(base, "acme", "alice", agent_key, reconnect=False) as agent,
            ):
                await agent.subscribe(["v-logged"])
                await show_terms_round_trip(agent, visitor)
            # A consumer: the group opts in (admin API), then a code is created, redeemed over the
            # compat route (?appkey=), redeemed again (refused).
            opt_in = {"allow_consumer_codes": True}
            admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            assert (await http.put(base + "/v1/admin/groups/acme/settings", json=opt_in, headers=admin)).status == 200
            created = await http.put(base + "/assistserver/shortcode/create")
            code = (await created.json())["shortCode"]
            seen["short code"] = code
            redeemed = await http.get(base + "/assistserver/shortcode/consumer", params={"appkey": code})
            session_token = (await redeemed.json())["session-token"]
            seen["session token"] = session_token
            assert (await http.get(base + "/assistserver/shortcode/consumer", params={"appkey": code})).status == 403
            assert (await http.get(base + "/assistserver/shortcode/agent", params={"appkey": code})).status == 200
            async with VisitorClient.for_session(base, "acme", session_token, reconnect=False) as consumer:
                assert consumer.visitor is not None
            # CRM back end and admin API with bearer credentials (and a wrong one).
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {api_key}"}) as crm:
                assert (await crm.get(base + "/v1/groups/acme/visitors/v-logged")).status == 200
                signal = await crm.post(base + "/v1/groups/acme/visitors/v-logged/signals", json={"event": "x"})
                assert signal.status in (404, 410)  # gone by now: the error path is logged too
            assert (await http.get(base + "/v1/admin/groups/acme/settings", headers=admin)).status == 200
            wrong = {"Authorization": f"Bearer {ADMIN_TOKEN[::-1]}"}
            assert (await http.get(base + "/v1/admin/groups/acme/settings", headers=wrong)).status == 401
    finally:
        server.stop()
    # What the process wrote (server.output() would add its command line, which holds the flags).
    output = server.stdout() + server.stderr_path.read_text(errors="replace")
    assert "GET /assistserver/shortcode/consumer" in output, "the access log should be on at DEBUG"
    credentials = {
        "group secret": SECRET,
        "visitor token": visitor_token,
        "agent login key": agent_key,
        "API key": api_key,
        "admin token": ADMIN_TOKEN,
        "forged visitor token": forged_token,
        "forged agent key": forged_key,
        **seen,
    }
    for name, value in list(credentials.items()):
        if value.count(".") and name != "short code":  # also each signature on its own
            credentials[f"{name} signature"] = value.split(".")[-1 if name != "API key" else -2]
    leaked = [name for name, value in credentials.items() if value in output]
    assert leaked == [], f"credentials in the server's output: {leaked}\n{output[-3000:]}"
