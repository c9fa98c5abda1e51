"""What a visitor, an agent and an anonymous address leave in Redis, the
shared store every instance depends on (SECURITY.md, "Resource budgets"):
a handful of keys while they are live, and nothing without a deadline
afterwards. A key without a TTL that anonymous or departed clients can make
is a way to fill Redis, which with ``noeviction`` stops the whole cluster."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from ..harness import HeraldServer
from .helpers import assert_bystanders_served, login, session

GRACE = 0.3
SESSION_TTL = 30


@pytest.fixture
def backend_name() -> str:
    return "redis"  # the memory backend's records die with the process


@pytest.fixture
async def keys_of(start_herald) -> AsyncIterator[Any]:  # type: ignore[no-untyped-def]
    herald: HeraldServer = await start_herald(grace_period=GRACE, session_ttl=SESSION_TTL)
    client = aioredis.from_url(herald.settings.redis_url)

    async def keys() -> dict[str, float]:
        """Every key of this test's prefix and its TTL in seconds (-1: none)."""
        found = [key async for key in client.scan_iter(match=f"{herald.settings.redis_prefix}*", count=1000)]
        return {key.decode(): await client.ttl(key) for key in found}

    keys.herald = herald  # type: ignore[attr-defined]
    yield keys
    await client.aclose()


def immortal(keys: dict[str, float], ignore: set[str]) -> set[str]:
    return {key for key, ttl in keys.items() if ttl < 0 and key not in ignore}


async def test_what_a_visitor_and_its_sessions_leave_in_redis(keys_of) -> None:  # type: ignore[no-untyped-def]
    """Three tabs, a random-key session with its code, a signal held while it
    is away: a visitor's own keys are its presence hash and its session's
    three (session, index, code); when it has left, only its version
    tombstone remains, with a TTL."""
    herald: HeraldServer = keys_of.herald
    baseline = await keys_of()
    tabs = [await herald.visitor("v-budget") for _ in range(3)]
    await tabs[0].start_session("random")
    agent = await herald.agent("a-budget")
    await agent.subscribe(["v-budget"])
    live = await keys_of()
    own = {key for key in live if "v-budget" in key}
    assert len(own) <= 3, sorted(own)  # presence hash, session index, held-signal list (when one waits)
    # The group's event log (one stream, its timers, the session's index): bounded per group, each with a TTL.
    logged = {key for key in set(live) - set(baseline) if ":events" in key}
    assert len(logged) <= 4 and all(live[key] > 0 for key in logged), {key: live[key] for key in logged}
    # and what it shares: the group's online set, its instance's connection set in the group and the
    # instance's index of groups (one per instance), its session and code
    assert len(set(live) - set(baseline) - logged) <= 7, sorted(set(live) - set(baseline))
    for tab in tabs:
        await tab.close()
    await asyncio.sleep(GRACE + 1.0)  # offline: the session ends with it
    after = await keys_of()
    assert not immortal(after, set(baseline)) - {k for k in after if k.endswith(":online") or ":inst:" in k}, after
    assert all(ttl > 0 for key, ttl in after.items() if "v-budget" in key), after
    took = await assert_bystanders_served(herald.base_url)
    assert took < 5.0


async def test_what_anonymous_addresses_leave_in_redis(keys_of) -> None:  # type: ignore[no-untyped-def]
    """Failed logins, code look-ups and code guesses from an address without
    any credential make only counters, each with a TTL of at most a minute."""
    herald: HeraldServer = keys_of.herald
    baseline = await keys_of()
    async with session() as http:
        for n in range(5):
            await login(http, herald.base_url, f"guess-{n}", key="x" * 40)
            async with http.get(f"{herald.base_url}/v1/groups/acme/codes/{100000 + n}") as response:
                await response.read()
    made = {key: ttl for key, ttl in (await keys_of()).items() if key not in baseline}
    assert made and all(0 < ttl <= 60 for ttl in made.values()), made
    took = await assert_bystanders_served(herald.base_url)
    assert took < 5.0
