"""Anonymous visitors (pre-login pages): only where the group allows them,
and always under an ``anon.`` ID the server picks, never one they name."""

from __future__ import annotations

from herald_presence.protocol import codec
from herald_presence.protocol.errors import CloseCode, ErrorCode
from herald_presence.protocol.messages import Error, Hello, Welcome
from herald_presence.server.config import Settings

from ..harness import HeraldServer
from .conftest import Launch
from .helpers import assert_bystanders_served, handshake

ANONYMOUS_HELLO = codec.encode(Hello(versions=[1], group="acme"))


def _allow_anonymous(server_settings: Settings) -> None:
    server_settings.groups["acme"].allow_anonymous = True


async def test_anonymous_visitor_when_the_group_does_not_allow_it(herald: HeraldServer) -> None:
    error, close_code = await handshake(herald.base_url, ANONYMOUS_HELLO)
    assert isinstance(error, Error) and error.code == ErrorCode.UNAUTHORIZED, error
    assert close_code == CloseCode.UNAUTHORIZED
    await assert_bystanders_served(herald.base_url)


async def test_anonymous_visitor_gets_an_id_it_did_not_choose(launch: Launch) -> None:
    herald = await launch(configure=_allow_anonymous)
    first, _ = await handshake(herald.base_url, ANONYMOUS_HELLO)
    second, _ = await handshake(herald.base_url, ANONYMOUS_HELLO)
    assert isinstance(first, Welcome) and isinstance(second, Welcome)
    assert first.visitor is not None and first.visitor.startswith("anon.")
    assert second.visitor is not None and second.visitor.startswith("anon.")
    assert first.visitor != second.visitor
    await assert_bystanders_served(herald.base_url)


async def test_anonymous_visitor_claiming_an_id_without_a_token(launch: Launch) -> None:
    herald = await launch(configure=_allow_anonymous)
    victim = await herald.visitor("v-victim")
    anon_welcome, _ = await handshake(herald.base_url, ANONYMOUS_HELLO)
    assert isinstance(anon_welcome, Welcome) and anon_welcome.visitor is not None
    claims = [
        Hello(versions=[1], group="acme", visitor="v-victim"),  # a visitor ID, no token
        Hello(versions=[1], group="acme", visitor=anon_welcome.visitor),  # another anonymous visitor's ID
        Hello(versions=[1], group="acme", token="4102444800.AAAA"),  # a token, no visitor
        Hello(versions=[1], group="acme", session_token="s0123456789abcdef.4102444800.AAAA"),  # a made-up consumer
    ]
    for claim in claims:
        error, close_code = await handshake(herald.base_url, codec.encode(claim))
        assert isinstance(error, Error) and error.code == ErrorCode.UNAUTHORIZED, claim
        assert close_code == CloseCode.UNAUTHORIZED
    agent = await herald.agent("alice")
    assert len((await agent.lookup("v-victim"))["connections"]) == 1
    assert victim.connected
    await assert_bystanders_served(herald.base_url)
