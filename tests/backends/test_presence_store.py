"""The PresenceStore contract: one atomic step per visitor change, stored
and announced together; versions only rise; offline visitors keep their
last version; an instance's connections are its own."""

from __future__ import annotations

import asyncio
import time

import pytest

from herald_presence.protocol.messages import VisitorState
from herald_presence.server.backends.base import Arrival, Backend, Refused
from herald_presence.server.model.limits import ConnectionLimit
from herald_presence.server.model.names import refused_visitor, session_by_visitor, visitor_topic
from herald_presence.server.model.records import HeldSignal, PresenceChange, offline_state

from .conftest import (
    GROUP,
    REDIS_ONLY,
    REDIS_TIMINGS,
    RecordingListener,
    StartBackend,
    announce_on,
    announced,
    change_of,
    conn,
    drops,
    goes_offline,
    joins,
    leaves,
    rejoins,
    silent,
    strictly_rising,
    updates,
)


def focused(state: VisitorState) -> list[str]:
    """The focused connection(s) of a visitor: exactly one while it has any."""
    return [c["connection"] for c in state["connections"] if c["focused"]]


async def test_a_visitor_never_seen_is_offline_at_version_zero(backend: Backend) -> None:
    assert await backend.visitor(GROUP, "nobody") == offline_state("nobody", 0)
    assert await backend.visitor_record(GROUP, "nobody") is None
    assert await backend.group_visitors(GROUP) == []


async def test_a_joined_connection_is_stored_exactly_as_given(backend: Backend) -> None:
    connection = conn(backend, "c1", visible=False, page="/billing", cart=[1, 2], nested={"a": None})
    change = await change_of(backend, "v1", joins(connection))
    assert change.change == "online"

    record = await backend.visitor_record(GROUP, "v1")
    assert record is not None
    assert (record.group, record.visitor, record.version, record.away_since) == (GROUP, "v1", change.version, None)
    assert record.connections == {"c1": connection}
    assert connection.active == change.version  # the joining connection took focus
    assert await backend.visitor(GROUP, "v1") == record.state()
    assert record.state()["online"] is True


async def test_mutate_publishes_the_announcement_with_the_change(backend: Backend, listener: RecordingListener) -> None:
    topic = visitor_topic(GROUP, "v1")
    await backend.subscribe(topic)
    given: list[PresenceChange] = []

    def announce(change: PresenceChange) -> list[tuple[str, bytes]]:
        given.append(change)
        return announce_on(topic)(change)

    change = await change_of(backend, "v1", joins(conn(backend, "c1")), announce)

    assert given == [change]  # built from the very change mutate returns
    assert announced(await listener.next_message()) == (topic, "online", change.version)
    # Stored together with the announcement: whoever hears it reads at least that version.
    assert (await backend.visitor(GROUP, "v1"))["version"] >= change.version


async def test_an_arrival_refused_by_its_record_stores_nothing_and_announces_nothing(
    backend: Backend, listener: RecordingListener
) -> None:
    topic = visitor_topic(GROUP, "v1")
    await backend.subscribe(topic)
    refusal = refused_visitor(GROUP, "v1")
    await backend.kv_set(refusal, b"until-then", ttl=30)

    arrival = Arrival(refusal, session_by_visitor(GROUP, "v1"))
    with pytest.raises(Refused) as refused:
        await backend.mutate(GROUP, "v1", joins(conn(backend, "c1")), announce_on(topic), arrival)
    assert refused.value.value == b"until-then" and not arrival.read
    assert await backend.visitor_record(GROUP, "v1") is None  # nothing stored…
    await backend.kv_delete(refusal)
    change = await backend.mutate(GROUP, "v1", joins(conn(backend, "c1")), announce_on(topic), arrival)
    assert change is not None
    # …and nothing announced: the first announcement is the join made once the record was gone.
    assert announced(await listener.next_message()) == (topic, "online", change.version)


async def test_an_arrival_reads_its_session_index_and_held_signals_in_the_same_step(backend: Backend) -> None:
    arrival = Arrival(refused_visitor(GROUP, "v1"), session_by_visitor(GROUP, "v1"))
    await backend.mutate(GROUP, "v1", joins(conn(backend, "c1")), silent, arrival)
    assert (arrival.read, arrival.session, arrival.held) == (True, None, False)

    await backend.kv_set(session_by_visitor(GROUP, "v1"), b"s-42", ttl=30)
    await backend.hold(GROUP, "v1", HeldSignal("k1", "agent-instance", b"frame", False, time.time() + 60), ttl=30)
    again = Arrival(refused_visitor(GROUP, "v1"), session_by_visitor(GROUP, "v1"))
    await backend.mutate(GROUP, "v1", joins(conn(backend, "c2")), silent, again)
    assert (again.read, again.session, again.held) == (True, b"s-42", True)
    assert [signal.key for signal, _first in await backend.take_held(GROUP, "v1")] == ["k1"]  # read, not taken


async def test_versions_rise_and_never_go_back_after_a_visitor_goes_offline(backend: Backend) -> None:
    versions = [
        (await change_of(backend, "v1", joins(conn(backend, "c1")))).version,
        (await change_of(backend, "v1", joins(conn(backend, "c2")))).version,
        (await change_of(backend, "v1", updates("c1", {"page": "/x"}))).version,
        (await change_of(backend, "v1", leaves("c2"))).version,
        (await change_of(backend, "v1", leaves("c1"))).version,
    ]
    offline = await change_of(backend, "v1", goes_offline())
    assert offline.change == "offline"
    versions.append(offline.version)

    # Offline, the visitor is gone but its last version is not.
    assert await backend.visitor(GROUP, "v1") == offline_state("v1", offline.version)
    assert await backend.visitor_record(GROUP, "v1") is None

    back = await change_of(backend, "v1", joins(conn(backend, "c3")))
    assert back.change == "online"
    versions.append(back.version)
    assert strictly_rising(versions), versions
    assert (await backend.visitor(GROUP, "v1"))["version"] == back.version


async def test_a_visitor_in_its_grace_period_is_online_and_comes_back_without_going_offline(
    backend: Backend,
) -> None:
    await change_of(backend, "v1", joins(conn(backend, "c1")))
    away = await change_of(backend, "v1", leaves("c1"))
    assert away.change is None  # agents hear nothing yet

    state = await backend.visitor(GROUP, "v1")
    assert (state["online"], state["connections"], state["version"]) == (True, [], away.version)
    record = await backend.visitor_record(GROUP, "v1")
    assert record is not None
    assert (record.connections, record.away_since) == ({}, away.version)
    assert [s["visitor"] for s in await backend.group_visitors(GROUP)] == ["v1"]

    back = await change_of(backend, "v1", joins(conn(backend, "c2")))
    assert back.change == "connections"  # the stored grace period made it a mere reconnect
    record = await backend.visitor_record(GROUP, "v1")
    assert record is not None
    assert (list(record.connections), record.away_since) == (["c2"], None)


async def test_a_mutation_that_changes_nothing_stores_and_publishes_nothing(
    backend: Backend, listener: RecordingListener
) -> None:
    topic = visitor_topic(GROUP, "v1")
    await backend.subscribe(topic)
    announced_changes: list[PresenceChange] = []

    def announce(change: PresenceChange) -> list[tuple[str, bytes]]:
        announced_changes.append(change)
        return announce_on(topic)(change)

    # A visitor never seen: nothing to leave, nothing to expire.
    assert await backend.mutate(GROUP, "v1", leaves("c1"), announce) is None
    assert await backend.mutate(GROUP, "v1", goes_offline(), announce) is None
    assert await backend.visitor(GROUP, "v1") == offline_state("v1", 0)
    assert await backend.group_visitors(GROUP) == []

    connection = conn(backend, "c1", page="/a")
    await change_of(backend, "v1", joins(connection))
    before = await backend.visitor(GROUP, "v1")
    unchanged = [
        leaves("c9"),  # not a connection of the visitor
        updates("c9", {"page": "/b"}),
        goes_offline(),  # it has a connection: no grace period to end
        rejoins(conn(backend, "c1", page="/a")),  # already there, same data
    ]
    for mutation in unchanged:
        assert await backend.mutate(GROUP, "v1", mutation, announce) is None

    assert announced_changes == []
    assert await backend.visitor(GROUP, "v1") == before
    assert await listener.messages_so_far(backend) == []


async def test_a_join_over_the_connection_limit_raises_and_changes_nothing(
    backend: Backend, listener: RecordingListener
) -> None:
    topic = visitor_topic(GROUP, "v1")
    await backend.subscribe(topic)
    for name in ("c1", "c2"):
        await change_of(backend, "v1", joins(conn(backend, name), limit=2), announce_on(topic))
    assert len(await listener.messages_so_far(backend)) == 2
    before = await backend.visitor(GROUP, "v1")

    with pytest.raises(ConnectionLimit):
        await backend.mutate(GROUP, "v1", joins(conn(backend, "c3"), limit=2), announce_on(topic))

    assert await backend.visitor(GROUP, "v1") == before
    assert await listener.messages_so_far(backend) == []
    # The store is still usable for that visitor afterwards.
    await change_of(backend, "v1", leaves("c1"))
    await change_of(backend, "v1", joins(conn(backend, "c3"), limit=2))


async def test_the_focused_connection_is_the_most_recently_active(backend: Backend) -> None:
    await change_of(backend, "v1", joins(conn(backend, "c1")))
    await change_of(backend, "v1", joins(conn(backend, "c2")))
    assert focused(await backend.visitor(GROUP, "v1")) == ["c2"]

    change = await change_of(backend, "v1", updates("c1", {"page": "/x"}))
    assert change.focus_moved
    assert focused(await backend.visitor(GROUP, "v1")) == ["c1"]

    await change_of(backend, "v1", updates("c2", visible=False))  # hiding is not activity
    assert focused(await backend.visitor(GROUP, "v1")) == ["c1"]


async def test_group_visitors_lists_only_online_visitors(backend: Backend) -> None:
    for visitor in ("a", "b", "c", "d"):
        await change_of(backend, visitor, joins(conn(backend, f"{visitor}1", who=visitor)))
    await backend.mutate("other", "x", joins(conn(backend, "x1")), silent)  # another group
    await change_of(backend, "b", leaves("b1"))  # away: still online
    await change_of(backend, "c", drops("c1"))  # gone without a goodbye: offline
    await change_of(backend, "d", leaves("d1"))
    await change_of(backend, "d", goes_offline())

    states = sorted(await backend.group_visitors(GROUP), key=lambda s: s["visitor"])
    assert [s["visitor"] for s in states] == ["a", "b"]
    assert states == [await backend.visitor(GROUP, "a"), await backend.visitor(GROUP, "b")]
    assert all(s["online"] for s in states)
    assert [s["visitor"] for s in await backend.group_visitors("other")] == ["x"]
    assert await backend.group_visitors("empty") == []


async def test_registered_connections_follow_joins_and_leaves(backend: Backend) -> None:
    await change_of(backend, "v1", joins(conn(backend, "c1")))
    await change_of(backend, "v1", joins(conn(backend, "c2")))
    await backend.mutate("other", "v2", joins(conn(backend, "c3")), silent)
    assert sorted(await backend.registered_connections()) == [
        (GROUP, "v1", "c1"),
        (GROUP, "v1", "c2"),
        ("other", "v2", "c3"),
    ]

    await change_of(backend, "v1", leaves("c1"))
    await backend.mutate("other", "v2", drops("c3"), silent)
    assert await backend.registered_connections() == [(GROUP, "v1", "c2")]
    await change_of(backend, "v1", leaves("c2"))  # away, no connection left
    assert await backend.registered_connections() == []


@REDIS_ONLY
async def test_registered_connections_are_this_instances_own(backend: Backend, another_instance: StartBackend) -> None:
    other = await another_instance()
    await change_of(backend, "v1", joins(conn(backend, "mine")))
    await change_of(other, "v1", joins(conn(other, "theirs")))  # the same visitor, on the other instance
    await change_of(other, "v2", joins(conn(other, "theirs-too")))

    assert await backend.registered_connections() == [(GROUP, "v1", "mine")]
    assert sorted(await other.registered_connections()) == [(GROUP, "v1", "theirs"), (GROUP, "v2", "theirs-too")]

    # Either instance may make the change; the connection stays its instance's.
    await change_of(backend, "v1", leaves("theirs"))
    assert await other.registered_connections() == [(GROUP, "v2", "theirs-too")]
    assert await backend.registered_connections() == [(GROUP, "v1", "mine")]


async def test_concurrent_mutations_of_one_visitor_lose_no_connection(
    backend: Backend, listener: RecordingListener
) -> None:
    topic = visitor_topic(GROUP, "v1")
    await backend.subscribe(topic)
    names = [f"c{n}" for n in range(40)]
    changes = await asyncio.gather(
        *(change_of(backend, "v1", joins(conn(backend, name)), announce_on(topic)) for name in names)
    )

    record = await backend.visitor_record(GROUP, "v1")
    assert record is not None
    assert sorted(record.connections) == sorted(names)
    versions = sorted(change.version for change in changes)
    assert strictly_rising(versions)  # one change at a time: no two saw the same record
    assert record.version == versions[-1]
    heard = [announced(message)[2] for message in await listener.messages_so_far(backend)]
    assert heard == versions  # every announcement, in version order


@REDIS_ONLY
async def test_concurrent_mutations_of_one_visitor_from_two_instances_lose_no_connection(
    backend: Backend, listener: RecordingListener, another_instance: StartBackend
) -> None:
    other = await another_instance()
    topic = visitor_topic(GROUP, "v1")
    await backend.subscribe(topic)
    joins_a = [change_of(backend, "v1", joins(conn(backend, f"a{n}")), announce_on(topic)) for n in range(20)]
    joins_b = [change_of(other, "v1", joins(conn(other, f"b{n}")), announce_on(topic)) for n in range(20)]
    changes = await asyncio.gather(*(job for pair in zip(joins_a, joins_b, strict=True) for job in pair))

    for instance in (backend, other):
        record = await instance.visitor_record(GROUP, "v1")
        assert record is not None
        assert sorted(record.connections) == sorted([f"a{n}" for n in range(20)] + [f"b{n}" for n in range(20)])
        assert {c.instance for name, c in record.connections.items() if name.startswith("a")} == {backend.instance_id}
        assert {c.instance for name, c in record.connections.items() if name.startswith("b")} == {other.instance_id}
    versions = sorted(change.version for change in changes)
    assert strictly_rising(versions)
    assert record.version == versions[-1]
    # Announcements of one visitor reach the topic in version order, whichever instance made them.
    heard = [announced(message)[2] for message in await listener.messages_so_far(backend)]
    assert heard == versions
    assert len(await backend.registered_connections()) == len(await other.registered_connections()) == 20


@REDIS_ONLY
async def test_a_change_made_on_one_instance_is_seen_by_every_instance(
    backend: Backend, another_instance: StartBackend
) -> None:
    other = await another_instance()
    change = await change_of(other, "v1", joins(conn(other, "c1", page="/x")))
    assert await backend.visitor(GROUP, "v1") == await other.visitor(GROUP, "v1")
    assert (await backend.visitor(GROUP, "v1"))["version"] == change.version
    assert await backend.group_visitors(GROUP) == await other.group_visitors(GROUP)

    offline = await change_of(backend, "v1", drops("c1"))
    assert await other.visitor(GROUP, "v1") == offline_state("v1", offline.version)


@REDIS_ONLY
async def test_a_closed_instances_connections_are_dropped_by_the_others(
    backend: Backend, listener: RecordingListener, another_instance: StartBackend
) -> None:
    doomed = await another_instance()
    topic = visitor_topic(GROUP, "v1")
    await backend.subscribe(topic)
    await change_of(backend, "v1", joins(conn(backend, "stays")))
    await change_of(doomed, "v1", joins(conn(doomed, "goes")))
    joined = await change_of(doomed, "v2", joins(conn(doomed, "goes-too")))
    await doomed.close()  # its heartbeat is now 0: dead at once

    changes: dict[str, PresenceChange] = {}
    for _ in range(2):
        change = await listener.next_change()
        assert change.record is not None
        changes[change.record.visitor] = change
    assert changes["v1"].change == "connections"
    assert changes["v2"].change == "offline"
    assert changes["v2"].version > joined.version

    record = await backend.visitor_record(GROUP, "v1")
    assert record is not None
    assert list(record.connections) == ["stays"]
    assert await backend.visitor(GROUP, "v2") == offline_state("v2", changes["v2"].version)
    # The reaper announced what it did, with the listener's announcement.
    assert announced(await listener.next_message()) == (topic, "connections", changes["v1"].version)


@REDIS_ONLY
async def test_a_closed_instances_away_visitors_go_offline_after_the_grace_period(
    backend: Backend, listener: RecordingListener, another_instance: StartBackend
) -> None:
    doomed = await another_instance()
    await change_of(doomed, "v1", joins(conn(doomed, "c1")))
    away = await change_of(doomed, "v1", leaves("c1"))  # its grace period runs on the doomed instance
    left = time.monotonic()
    await doomed.close()

    change = await listener.next_change(within=5.0)
    assert change.record is not None
    assert (change.record.visitor, change.change) == ("v1", "offline")
    assert time.monotonic() - left >= REDIS_TIMINGS["grace_period"] - 0.05  # not before its grace period ended
    assert change.version > away.version
    assert await backend.visitor(GROUP, "v1") == offline_state("v1", change.version)
    assert await backend.group_visitors(GROUP) == []
