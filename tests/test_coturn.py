"""The TURN credentials Herald hands a session's members, checked by a real
coturn (PROTOCOL.md §11.10): a ``turnserver`` with ``use-auth-secret`` and
the group's secret grants a relay to the credentials a visitor gets in its
``session_connected`` and an agent in its ``session_joined``, and refuses
them tampered with, expired, or made with another secret.

``tests/turn_server.py`` starts coturn and asks it for a relay with a small
TURN client (an Allocate with the long-term credential mechanism). The same
check in Chromium, an ``RTCPeerConnection`` gathering relay candidates, is
``tests/e2e/test_turn_relay.py``.
"""

from __future__ import annotations

import asyncio
import time

from herald_presence.protocol.messages import IceServer
from herald_presence.server.model.ice import turn_credentials

from .conftest import TURN_SECRET
from .harness import HeraldServer
from .turn_server import Allocation, TurnServer, allocate


def turn_entry(servers: list[IceServer] | None) -> tuple[str, str]:
    """The username and credential of the one TURN server a member got."""
    assert servers is not None and len(servers) == 1
    (entry,) = servers
    assert "username" in entry and "credential" in entry, entry
    return entry["username"], entry["credential"]


async def relay(coturn: TurnServer, username: str, password: str) -> Allocation:
    return await asyncio.to_thread(allocate, coturn.address, username, password)


async def test_coturn_grants_a_relay_to_the_credentials_each_session_member_gets(
    herald_with_turn: HeraldServer, coturn: TurnServer
) -> None:
    visitor = await herald_with_turn.visitor("v1")
    connected = await visitor.start_session("visitor")
    agent = await herald_with_turn.agent("alice")
    joined = await agent.join_session(key="v1")
    members = {visitor.connection_id: connected.ice_servers, agent.connection_id: joined.ice_servers}
    for member, servers in members.items():
        username, password = turn_entry(servers)
        assert username.endswith(f":{member}")
        granted = await relay(coturn, username, password)
        assert granted.error is None and granted.relayed is not None, granted
        assert granted.relayed[0] == "127.0.0.1" and granted.realm == coturn.realm
        assert granted.integrity_ok, "coturn signed its answer with the key of the same password"


async def test_coturn_refuses_credentials_tampered_with_expired_or_made_with_another_secret(
    herald_with_turn: HeraldServer, coturn: TurnServer
) -> None:
    visitor = await herald_with_turn.visitor("v1")
    username, password = turn_entry((await visitor.start_session("visitor")).ice_servers)
    expires, _, member = username.partition(":")
    now = int(time.time())
    flipped = password[:-2] + ("A=" if password[-2] != "A" else "B=")
    refused = {
        "password tampered with": (username, flipped),
        "another member's name": (f"{expires}:c0000000000000000", password),
        "a later expiry": (f"{int(expires) + 86400}:{member}", password),
        "expired": turn_credentials(TURN_SECRET, member, now - 5),
        "another secret": turn_credentials("not-the-groups-secret", member, now + 600),
    }
    for case, (name, secret) in refused.items():
        answer = await relay(coturn, name, secret)
        assert (answer.error, answer.relayed) == (401, None), f"{case}: {answer}"
    # What differs is only what was tampered with: the same member, made now, and Herald's own.
    assert (await relay(coturn, *turn_credentials(TURN_SECRET, member, now + 60))).relayed is not None
    assert (await relay(coturn, username, password)).relayed is not None
