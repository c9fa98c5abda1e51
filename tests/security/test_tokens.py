"""Stolen, forged, stale and misused credentials: visitor tokens and agent
login keys are bound to role, group, subject and expiry (PROTOCOL.md §4)."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from herald_presence.protocol import tokens
from herald_presence.protocol.errors import CloseCode, ErrorCode
from herald_presence.protocol.messages import Error, Welcome

from ..harness import OTHER_SECRET, SECRET, HeraldServer
from .conftest import Launch
from .helpers import assert_bystanders_served, error_of, handshake, hello, login

NEW_SECRET = "rotated-new-secret-acme-0123456789"
ARABIC_INDIC = str.maketrans("0123456789", "".join(chr(0x0660 + i) for i in range(10)))
FULLWIDTH = str.maketrans("0123456789", "".join(chr(0xFF10 + i) for i in range(10)))


async def _refused(herald: HeraldServer, frame: bytes, code: ErrorCode) -> None:
    """The hello is answered with ``error code`` and closed 4500 (do not
    reconnect), and nobody else notices."""
    error, close_code = await handshake(herald.base_url, frame)
    assert isinstance(error, Error) and error.code == code, error
    assert close_code == CloseCode.UNAUTHORIZED
    await assert_bystanders_served(herald.base_url)


async def _login_refused(herald: HeraldServer, key: str, code: ErrorCode, agent: str = "alice") -> None:
    async with aiohttp.ClientSession() as http:
        response = await login(http, herald.base_url, agent=agent, key=key)
        assert response.status == 401
        assert await error_of(response) == code
        assert "Set-Cookie" not in response.headers
    await assert_bystanders_served(herald.base_url)


# --- visitor tokens -----------------------------------------------------------


async def test_expired_visitor_token(herald: HeraldServer) -> None:
    stale = tokens.make_token(SECRET, tokens.VISITOR, "acme", "v1", ttl=-1)
    await _refused(herald, hello("v1", token=stale), ErrorCode.TOKEN_EXPIRED)


async def test_forged_visitor_token_signature(herald: HeraldServer) -> None:
    await _refused(
        herald,
        hello("v1", token=tokens.visitor_token("guessed-secret-0123456789", "acme", "v1")),
        ErrorCode.UNAUTHORIZED,
    )
    expires, signature = tokens.visitor_token(SECRET, "acme", "v1").split(".")
    flipped = signature[:-1] + ("A" if signature[-1] != "A" else "B")
    await _refused(herald, hello("v1", token=f"{expires}.{flipped}"), ErrorCode.UNAUTHORIZED)
    # A valid signature with a later expiry pasted in front: the expiry is signed.
    await _refused(herald, hello("v1", token=f"{int(expires) + 86400}.{signature}"), ErrorCode.UNAUTHORIZED)


async def test_visitor_token_of_another_group(herald: HeraldServer) -> None:
    # Minted by group other's back end, presented to acme...
    await _refused(herald, hello("v1", token=tokens.visitor_token(OTHER_SECRET, "other", "v1")), ErrorCode.UNAUTHORIZED)
    # ...and acme's token presented as a visitor of other.
    await _refused(
        herald, hello("v1", group="other", token=tokens.visitor_token(SECRET, "acme", "v1")), ErrorCode.UNAUTHORIZED
    )


async def test_visitor_token_of_another_visitor_id(herald: HeraldServer) -> None:
    await _refused(
        herald, hello("victim", token=tokens.visitor_token(SECRET, "acme", "attacker")), ErrorCode.UNAUTHORIZED
    )


async def test_replayed_visitor_token_for_a_different_visitor_id(herald: HeraldServer) -> None:
    """A token seen on the wire (or in a page) is worth nothing for another ID."""
    token = tokens.visitor_token(SECRET, "acme", "v-owner")
    owner = await herald.visitor("v-owner", token=token)
    for other_id in ("v-victim", "v-owner2", "V-OWNER", "v-owner."):
        await _refused(herald, hello(other_id, token=token), ErrorCode.UNAUTHORIZED)
    agent = await herald.agent("alice")
    assert (await agent.lookup("v-victim"))["online"] is False
    assert len((await agent.lookup("v-owner"))["connections"]) == 1
    assert owner.connected


async def test_agent_login_key_used_as_visitor_token(herald: HeraldServer) -> None:
    await _refused(herald, hello("alice", token=tokens.agent_key(SECRET, "acme", "alice")), ErrorCode.UNAUTHORIZED)


async def test_api_key_used_as_visitor_token(herald: HeraldServer) -> None:
    signed = tokens.api_key(SECRET, "acme").rsplit(".", 1)[0]
    await _refused(herald, hello("acme", token=signed), ErrorCode.UNAUTHORIZED)


async def test_token_with_non_ascii_digits(herald: HeraldServer) -> None:
    """``int()`` reads Arabic-Indic and full-width digits, and the signature
    below is valid for that number: only the ASCII rule refuses it."""
    expires, signature = tokens.visitor_token(SECRET, "acme", "v1").split(".")
    for table in (ARABIC_INDIC, FULLWIDTH):
        await _refused(herald, hello("v1", token=f"{expires.translate(table)}.{signature}"), ErrorCode.UNAUTHORIZED)
    expires, signature = tokens.agent_key(SECRET, "acme", "alice").split(".")
    await _login_refused(herald, f"{expires.translate(ARABIC_INDIC)}.{signature}", ErrorCode.UNAUTHORIZED)


async def test_token_lifetime_over_366_days(herald: HeraldServer) -> None:
    forever = tokens.make_token(SECRET, tokens.VISITOR, "acme", "v1", ttl=400 * 86400)
    await _refused(herald, hello("v1", token=forever), ErrorCode.UNAUTHORIZED)


# --- agent login keys -----------------------------------------------------------


async def test_visitor_token_used_as_agent_login_key(herald: HeraldServer) -> None:
    await _login_refused(herald, tokens.visitor_token(SECRET, "acme", "alice"), ErrorCode.UNAUTHORIZED)


async def test_expired_agent_login_key(herald: HeraldServer) -> None:
    await _login_refused(herald, tokens.agent_key(SECRET, "acme", "alice", ttl=-1), ErrorCode.TOKEN_EXPIRED)


async def test_agent_login_key_of_another_agent(herald: HeraldServer) -> None:
    await _login_refused(herald, tokens.agent_key(SECRET, "acme", "alice"), ErrorCode.UNAUTHORIZED, agent="admin")


async def test_forged_agent_login_key(herald: HeraldServer) -> None:
    await _login_refused(herald, tokens.agent_key(OTHER_SECRET, "acme", "alice"), ErrorCode.UNAUTHORIZED)


# --- rotation ------------------------------------------------------------------------


def _config(tmp_path: Path, name: str, secrets: list[str]) -> Path:
    path = tmp_path / name
    quoted = ", ".join(f'"{s}"' for s in secrets)
    path.write_text(f"[groups.acme]\nsecrets = [{quoted}]\n")
    return path


async def _accepted(herald: HeraldServer, secret: str) -> None:
    welcome, _ = await handshake(herald.base_url, hello("v1", token=tokens.visitor_token(secret, "acme", "v1")))
    assert isinstance(welcome, Welcome) and welcome.visitor == "v1"
    async with aiohttp.ClientSession() as http:
        assert (await login(http, herald.base_url, key=tokens.agent_key(secret, "acme", "alice"))).status == 200


async def test_rotation_accepts_old_and_new_secret_while_both_are_configured(launch: Launch, tmp_path: Path) -> None:
    herald = await launch(config=_config(tmp_path, "rotating.toml", [NEW_SECRET, SECRET]))
    await _accepted(herald, SECRET)
    await _accepted(herald, NEW_SECRET)
    await _refused(herald, hello("v1", token=tokens.visitor_token(OTHER_SECRET, "acme", "v1")), ErrorCode.UNAUTHORIZED)
    await assert_bystanders_served(herald.base_url, secret=NEW_SECRET)


async def test_rotation_refuses_the_old_secret_once_it_is_removed(launch: Launch, tmp_path: Path) -> None:
    herald = await launch(config=_config(tmp_path, "rotated.toml", [NEW_SECRET]))
    error, close_code = await handshake(herald.base_url, hello("v1", token=tokens.visitor_token(SECRET, "acme", "v1")))
    assert isinstance(error, Error) and error.code == ErrorCode.UNAUTHORIZED and close_code == CloseCode.UNAUTHORIZED
    async with aiohttp.ClientSession() as http:
        response = await login(http, herald.base_url, key=tokens.agent_key(SECRET, "acme", "alice"))
        assert response.status == 401 and await error_of(response) == ErrorCode.UNAUTHORIZED
    await _accepted(herald, NEW_SECRET)
    await assert_bystanders_served(herald.base_url, secret=NEW_SECRET)
