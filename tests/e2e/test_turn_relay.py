"""Chromium relays through a real coturn with the TURN credentials Herald
gives a session member (PROTOCOL.md §11.10): an ``RTCPeerConnection`` made
with the ``ice_servers`` of the visitor's ``session_connected`` and
``iceTransportPolicy: "relay"`` gathers a relay candidate; with a tampered
credential it gathers none. ``tests/test_coturn.py`` checks the same
credentials with a TURN client of its own.
"""

from __future__ import annotations

import asyncio

import pytest
from playwright.async_api import Browser

from herald_presence.protocol import tokens

from ..harness import SECRET, HeraldServer
from ..turn_server import TurnServer
from .conftest import STEP_TIMEOUT_MS

BLANK = "/js/vendor/msgpack.LICENSE"  # a page of Herald's origin with no script of its own

# Gathers with the session's ICE servers, relay only; returns the candidates' types (and the
# first relay's address), tampering with the TURN credential first when asked to.
GATHER = """
async ([token, tamper]) => {
  const herald = await import('/js/herald.js');
  const client = new herald.VisitorClient(undefined, {group: "acme", visitor: "v-turn", token});
  await client.connect();
  const session = await client.startSession("visitor");
  const iceServers = session.ice_servers.map((server) =>
    tamper ? {...server, credential: server.credential.slice(0, -2) + (server.credential.at(-2) === "A" ? "B=" : "A=")}
           : server);
  const pc = new RTCPeerConnection({iceServers, iceTransportPolicy: "relay"});
  const candidates = [];
  const done = new Promise((resolve) => {
    pc.onicecandidate = ({candidate}) => (candidate ? candidates.push(candidate) : resolve());
    setTimeout(resolve, 10000);
  });
  pc.createDataChannel("probe");
  await pc.setLocalDescription(await pc.createOffer());
  await done;
  pc.close();
  await client.close();
  const relay = candidates.find((c) => c.type === "relay");
  return {types: candidates.map((c) => c.type), relay: relay ? relay.address : null, username: iceServers[0].username,
          connection: client.connectionId};
}
"""


async def test_chromium_relays_through_coturn_with_a_members_credentials_and_not_with_tampered_ones(
    browser: Browser, herald_with_turn: HeraldServer, coturn: TurnServer
) -> None:
    context = await browser.new_context()
    page = await context.new_page()
    page.set_default_timeout(STEP_TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.goto(herald_with_turn.base_url + BLANK)
    token = tokens.visitor_token(SECRET, "acme", "v-turn")

    granted = await page.evaluate(GATHER, [token, False])
    assert "relay" in granted["types"] and granted["relay"] == "127.0.0.1", granted
    assert set(granted["types"]) == {"relay"}, "relay only: no host or server-reflexive candidate"
    assert granted["username"].endswith(":" + granted["connection"]), "credentials made for this member"

    refused = await page.evaluate(GATHER, [token, True])
    assert refused["types"] == [], refused
    await refusal_logged(coturn, refused["username"])  # coturn was asked, and said no
    assert not errors, errors


async def refusal_logged(coturn: TurnServer, username: str) -> None:
    """coturn's log names ``username`` in a failed credential check, within 5 s (its log is buffered)."""
    for _ in range(50):
        if any("check_stun_auth" in line and f"<{username}>" in line for line in coturn.log().splitlines()):
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"coturn logged no refusal of {username}:\n{coturn.log()}")
