"""The routes an instance keeps from the bus (core/routes.py): a change the
bus brings while the first read is out wins over an older read, and
nothing is kept for a visitor the instance does not follow."""

from __future__ import annotations

import asyncio

from herald_presence.server.core.routes import VisitorRoutes, route_of
from herald_presence.server.model.names import visitor_topic
from herald_presence.server.model.records import ConnectionRecord, VisitorRecord


def record(version: int, *connections: tuple[str, str]) -> VisitorRecord:
    conns = {c: ConnectionRecord(c, i, {}, True, 0.0, n) for n, (c, i) in enumerate(connections)}
    return VisitorRecord("acme", "v1", version, conns)


async def test_a_change_heard_during_the_first_read_wins_over_the_read() -> None:
    followed = {visitor_topic("acme", "v1")}
    routes = VisitorRoutes(followed.__contains__)
    release = asyncio.Event()

    async def slow_read(group: str, visitor: str) -> VisitorRecord | None:
        await release.wait()
        return record(5, ("c1", "i1"))  # read before the change below was stored

    reading = asyncio.create_task(routes.record("acme", "v1", slow_read))
    await asyncio.sleep(0)
    newer = record(6, ("c1", "i1"), ("c2", "i2"))
    routes.heard("acme", "v1", 6, route_of(newer))
    release.set()
    learnt = await reading
    assert learnt is not None and learnt.version == 6 and learnt.focused().connection == "c2"

    async def no_read(group: str, visitor: str) -> VisitorRecord | None:
        raise AssertionError("the route is known")

    routes.heard("acme", "v1", 7, [["c1", "i1"]])  # c2 left
    known = await routes.record("acme", "v1", no_read)
    assert known is not None and list(known.connections) == ["c1"]
    routes.heard("acme", "v1", 8, [])  # the last one left: away, signals wait
    away = await routes.record("acme", "v1", no_read)
    assert away is not None and away.online and not away.connections
    routes.heard("acme", "v1", 9, None)  # offline: forgotten
    assert await routes.record("acme", "v1", slow_read) is not None  # read again


async def test_nothing_is_kept_for_a_visitor_not_followed_or_no_longer_followed() -> None:
    followed: set[str] = set()
    routes = VisitorRoutes(followed.__contains__)
    reads = 0

    async def read(group: str, visitor: str) -> VisitorRecord | None:
        nonlocal reads
        reads += 1
        return record(reads, ("c1", "i1"))

    await routes.record("acme", "v1", read)
    await routes.record("acme", "v1", read)
    assert reads == 2  # not followed: every signal reads
    followed.add(visitor_topic("acme", "v1"))
    await routes.record("acme", "v1", read)
    await routes.record("acme", "v1", read)
    assert reads == 3
    followed.clear()
    routes.forget(visitor_topic("acme", "v1"))
    followed.add(visitor_topic("acme", "v1"))
    await routes.record("acme", "v1", read)
    assert reads == 4  # followed again: learnt again, never the old route
