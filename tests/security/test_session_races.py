"""Racing ``start_session``: many connections of one visitor starting
sessions at once must leave at most one live session (PROTOCOL.md §11.2),
and every other session's code must be released, or a small group's code
space runs out for everyone."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from herald_presence.protocol import RequestFailed
from herald_presence.protocol.client.agent import AgentClient
from herald_presence.protocol.errors import ErrorCode
from herald_presence.protocol.messages import SessionConnected
from herald_presence.server.core import short_codes

from ..harness import HeraldServer
from .helpers import assert_bystanders_served

CODES = [f"{n:04d}" for n in range(1000, 1008)]  # the whole code space of this test: 8 codes
TABS = 10  # connections of the racing visitor (its maximum)
STARTS = 8  # start_session each of them sends, all at once


async def _joins(agent: AgentClient, **how: str) -> bool:
    try:
        await agent.join_session(**how)
    except RequestFailed as failure:
        assert failure.code == ErrorCode.SESSION_NOT_FOUND, failure
        return False
    return True


async def _start(tab: object, key_type: str) -> SessionConnected | None:
    """A start that may lose the race for a code (the code space is tiny)."""
    try:
        return await tab.start_session(key_type)  # type: ignore[attr-defined, no-any-return]
    except RequestFailed as failure:
        assert failure.code == ErrorCode.CODE_SPACE_EXHAUSTED, failure
        return None


async def test_racing_start_session_from_many_connections_of_one_visitor(
    start_herald,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Codes are drawn in turn from 8: a draw finds a free one whenever there is one.
    draws = itertools.cycle(CODES)
    monkeypatch.setattr(short_codes, "random_code", lambda length: next(draws))
    herald: HeraldServer = await start_herald(code_lookups_per_address=100, code_lookups_per_group=1000)
    tabs = [await herald.visitor("v-racer") for _ in range(TABS)]

    async with asyncio.timeout(30):
        rounds = [asyncio.gather(*(_start(tab, "random") for tab in tabs)) for _ in range(STARTS)]
        started = [s for s in itertools.chain.from_iterable(await asyncio.gather(*rounds)) if s is not None]
    assert started, "no start won a code at all"

    agent = await herald.agent("alice")
    live = [s.session for s in started if await _joins(agent, session=s.session)]
    assert len(live) == 1, f"{len(live)} sessions of one visitor are live"  # the last to claim the visitor's
    joinable = [code for code in CODES if await _joins(agent, code=code)]
    assert len(joinable) <= 1, f"codes {joinable} still lead to sessions"

    # Every other code was released: seven other visitors get the seven others.
    others = [await herald.visitor(f"v-other-{n}") for n in range(len(CODES) - len(joinable))]
    fresh = [(await other.start_session("random")).key for other in others]
    assert sorted(fresh + joinable) == CODES

    # The racer has exactly that one live session.
    await tabs[0].end_session()
    with pytest.raises(RequestFailed) as none_left:
        await tabs[0].end_session()
    assert none_left.value.code == ErrorCode.SESSION_NOT_FOUND
    await assert_bystanders_served(herald.base_url)


async def test_racing_one_click_starts_leave_one_session_that_its_key_finds(start_herald) -> None:  # type: ignore[no-untyped-def]
    herald: HeraldServer = await start_herald()
    tabs = [await herald.visitor("v-racer") for _ in range(TABS)]
    async with asyncio.timeout(30):
        rounds = [asyncio.gather(*(tab.start_session("visitor") for tab in tabs)) for _ in range(STARTS)]
        started = list(itertools.chain.from_iterable(await asyncio.gather(*rounds)))
    agent = await herald.agent("alice")
    live = [s.session for s in started if await _joins(agent, session=s.session)]
    assert len(live) == 1, f"{len(live)} sessions of one visitor are live"
    assert (await agent.join_session(key="v-racer")).session == live[0]  # the key finds the live one
    await assert_bystanders_served(herald.base_url)
