"""The HeldSignalStore contract: signals wait per visitor; each is claimed
exactly once, by the first ``take_held`` (which answers the sender) or by
``drop_held``, never both. A signal for the focused connection is gone once
taken; a signal for every connection (``to_all``) is taken again by each
connection that comes back while it is held, not as the first. Each held
signal expires by itself after its own ttl."""

from __future__ import annotations

import asyncio
import time

from herald_presence.server.backends.base import Backend
from herald_presence.server.model.records import HeldSignal

from .conftest import GROUP, REDIS_ONLY, StartBackend

ANSWER_BY = time.time() + 3600  # the senders of these signals wait long


def signal(key: str, to_all: bool = False) -> HeldSignal:
    return HeldSignal(key, "agent-instance", b"\x93frame-" + key.encode(), to_all, ANSWER_BY)


def keys(taken: list[tuple[HeldSignal, bool]]) -> list[tuple[str, bool]]:
    """(key, first) of each taken signal, in key order."""
    return sorted((held.key, first) for held, first in taken)


async def test_nothing_held_means_nothing_to_take_or_drop(backend: Backend) -> None:
    assert await backend.take_held(GROUP, "v1") == []
    assert await backend.drop_held(GROUP, "v1", "k1") is False


async def test_a_held_signal_is_taken_once(backend: Backend) -> None:
    await backend.hold(GROUP, "v1", signal("k1"), ttl=10)
    await backend.hold(GROUP, "v1", signal("k2"), ttl=10)

    taken = await backend.take_held(GROUP, "v1")
    assert sorted(taken, key=lambda item: item[0].key) == [(signal("k1"), True), (signal("k2"), True)]
    assert await backend.take_held(GROUP, "v1") == []
    assert await backend.drop_held(GROUP, "v1", "k1") is False  # claimed by the taker


async def test_a_signal_for_every_connection_reaches_each_returning_connection_but_is_claimed_once(
    backend: Backend,
) -> None:
    await backend.hold(GROUP, "v1", signal("all", to_all=True), ttl=10)
    await backend.hold(GROUP, "v1", signal("focused"), ttl=10)

    assert keys(await backend.take_held(GROUP, "v1")) == [("all", True), ("focused", True)]
    assert await backend.take_held(GROUP, "v1") == [(signal("all", to_all=True), False)]  # the next tab back
    assert await backend.take_held(GROUP, "v1") == [(signal("all", to_all=True), False)]
    assert await backend.drop_held(GROUP, "v1", "all") is False  # the first taker answers, not the hold


async def test_dropping_a_signal_removes_only_that_one(backend: Backend) -> None:
    await backend.hold(GROUP, "v1", signal("k1"), ttl=10)
    await backend.hold(GROUP, "v1", signal("k2", to_all=True), ttl=10)
    assert await backend.drop_held(GROUP, "v1", "k1") is True
    assert await backend.drop_held(GROUP, "v1", "k1") is False
    assert await backend.take_held(GROUP, "v1") == [(signal("k2", to_all=True), True)]


async def test_a_dropped_signal_for_every_connection_reaches_no_one(backend: Backend) -> None:
    await backend.hold(GROUP, "v1", signal("all", to_all=True), ttl=10)
    assert await backend.drop_held(GROUP, "v1", "all") is True
    assert await backend.take_held(GROUP, "v1") == []


async def test_held_signals_are_kept_per_visitor_and_group(backend: Backend) -> None:
    await backend.hold(GROUP, "v1", signal("k1"), ttl=10)
    await backend.hold(GROUP, "v2", signal("k2"), ttl=10)
    await backend.hold("other", "v1", signal("k3"), ttl=10)
    assert await backend.drop_held(GROUP, "v2", "k1") is False
    assert await backend.take_held(GROUP, "v1") == [(signal("k1"), True)]
    assert await backend.take_held("other", "v1") == [(signal("k3"), True)]
    assert await backend.take_held(GROUP, "v2") == [(signal("k2"), True)]


async def test_take_and_drop_are_exclusive(backend: Backend) -> None:
    for n in range(60):
        visitor, key, to_all = f"v{n}", f"k{n}", n % 3 == 0
        await backend.hold(GROUP, visitor, signal(key, to_all), ttl=10)
        take, drop = backend.take_held(GROUP, visitor), backend.drop_held(GROUP, visitor, key)
        if n % 2:  # either may be first to start
            taken, dropped = await asyncio.gather(take, drop)
        else:
            dropped, taken = await asyncio.gather(drop, take)
        assert (taken == [(signal(key, to_all), True)]) != dropped, (n, taken, dropped)
        if dropped:
            assert taken == []  # a dropped signal reaches nobody
        assert all(not first for _, first in await backend.take_held(GROUP, visitor))
        assert await backend.drop_held(GROUP, visitor, key) is False


async def test_connections_coming_back_together_have_exactly_one_first_taker(backend: Backend) -> None:
    for n in range(20):
        to_all = n % 2 == 0
        held = signal(f"k{n}", to_all)
        await backend.hold(GROUP, f"v{n}", held, ttl=10)
        takers = await asyncio.gather(*(backend.take_held(GROUP, f"v{n}") for _ in range(5)))
        received = [taken for taken in takers if taken]
        firsts = [first for taken in received for _, first in taken]
        assert all(taken[0][0] == held for taken in received)
        assert firsts.count(True) == 1, (n, takers)
        assert len(received) == (5 if to_all else 1)


@REDIS_ONLY
async def test_take_and_drop_from_two_instances_are_exclusive(backend: Backend, another_instance: StartBackend) -> None:
    other = await another_instance()
    for n in range(50):
        key, to_all = f"k{n}", n % 2 == 0
        await other.hold(GROUP, f"v{n}", signal(key, to_all), ttl=10)  # held by one instance, raced for by both
        taken, also_taken, dropped = await asyncio.gather(
            backend.take_held(GROUP, f"v{n}"), other.take_held(GROUP, f"v{n}"), other.drop_held(GROUP, f"v{n}", key)
        )
        firsts = [first for _, first in taken + also_taken]
        assert firsts.count(True) + dropped == 1, (n, taken, also_taken, dropped)


async def test_held_signals_expire_after_their_ttl(backend: Backend) -> None:
    await backend.hold(GROUP, "v1", signal("short"), ttl=0.3)
    await backend.hold(GROUP, "v2", signal("short-for-all", to_all=True), ttl=0.3)
    await backend.hold(GROUP, "v3", signal("long"), ttl=10)
    assert keys(await backend.take_held(GROUP, "v2")) == [("short-for-all", True)]
    await asyncio.sleep(0.45)
    assert await backend.take_held(GROUP, "v1") == []
    assert await backend.take_held(GROUP, "v2") == []  # no longer for the tabs that come back later
    assert await backend.take_held(GROUP, "v3") == [(signal("long"), True)]


async def test_a_shorter_hold_does_not_cut_short_a_longer_one(backend: Backend) -> None:
    await backend.hold(GROUP, "v1", signal("long"), ttl=10)
    await backend.hold(GROUP, "v1", signal("short"), ttl=0.3)  # held later, for less time
    await asyncio.sleep(0.45)
    assert await backend.take_held(GROUP, "v1") == [(signal("long"), True)]


async def test_an_expired_held_signal_cannot_be_dropped(backend: Backend) -> None:
    """Dropped after its ttl, a signal was not there any more: dropping it claims nothing."""
    await backend.hold(GROUP, "v1", signal("k1"), ttl=0.2)
    await asyncio.sleep(0.35)
    assert not await backend.drop_held(GROUP, "v1", "k1")
