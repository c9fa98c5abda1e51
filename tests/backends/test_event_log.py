"""The ``EventLog`` contract (``backends/base.py``), on both backends: IDs
that rise in append order, a presence change's event logged in the change's
own step, so are a record's write's and a publish's events (``LogWrite``:
both or neither), each session's timeline, a consumer group whose events
outlive a consumer that stops, timers, retention and dead letters."""

from __future__ import annotations

import asyncio
import time

import pytest

from herald_presence.server.backends.base import Backend, BackendUnavailable, LogWrite
from herald_presence.server.model import events as ev
from herald_presence.server.model.names import event_log_topic, group_topic, pack, session_key, visitor_topic

from .conftest import (
    GROUP,
    REDIS_ONLY,
    RecordingListener,
    StartBackend,
    change_of,
    conn,
    goes_offline,
    joins,
    leaves,
)


def event(event_type: str, **fields: object) -> dict[str, object]:
    return ev.new_event(event_type, GROUP, **fields)


async def test_ids_rise_in_append_order_and_read_pages_after_a_cursor(backend: Backend) -> None:
    ids = [await backend.events.append(GROUP, event("session.started", session=f"s{i}", visitor="v")) for i in range(7)]
    keys = [ev.parse_id(i) for i in ids]
    assert all(key is not None for key in keys) and keys == sorted(keys) and len(set(ids)) == 7
    first = await backend.events.read(GROUP, None, 4)
    rest = await backend.events.read(GROUP, first[-1][0], 10)
    assert [i for i, _ in first + rest] == ids
    assert [e["session"] for _, e in first + rest] == [f"s{i}" for i in range(7)]
    assert await backend.events.read("other", None, 10) == []


async def test_a_presence_change_announced_on_the_event_log_is_logged_with_it(backend: Backend) -> None:
    def announce(change: object) -> list[tuple[str, bytes]]:
        return [(event_log_topic(GROUP), pack(event("visitor.online", visitor="v1")))]

    await change_of(backend, "v1", joins(conn(backend, "c1")), announce)
    ((_, logged),) = await backend.events.read(GROUP, None, 10)
    assert logged["type"] == "visitor.online" and logged["visitor"] == "v1"
    # A change that is not stored (it changed nothing) logs nothing.
    assert await backend.mutate(GROUP, "v1", leaves("nobody"), announce) is None
    assert len(await backend.events.read(GROUP, None, 10)) == 1
    await change_of(backend, "v1", leaves("c1"))
    await change_of(backend, "v1", goes_offline())
    assert len(await backend.events.read(GROUP, None, 10)) == 1


async def test_a_sessions_timeline_holds_the_terms_that_led_to_it(backend: Backend) -> None:
    log = backend.events
    await log.append(GROUP, event("terms.requested", visitor="v1", agent="alice"), asks=True)
    await log.append(GROUP, event("terms.requested", visitor="v2", agent="bob"), asks=True)
    displayed = await log.append(GROUP, event("terms.displayed", visitor="v1", connection="c1"), answer=True)
    await log.append(GROUP, event("terms.accepted", visitor="v1", connection="c1"), answer=True)
    await log.append(GROUP, event("session.started", visitor="v1", session="s1"))
    await log.append(GROUP, event("session.joined", visitor="v1", session="s1", agent="alice"))
    await log.append(GROUP, event("terms.declined", visitor="v1", connection="c1", session="s1"), answer=True)
    await log.append(GROUP, event("session.ended", visitor="v1", session="s1", reason="ended"))
    await log.append(GROUP, event("session.started", visitor="v1", session="s2"))

    timeline = await log.session_events(GROUP, "s1")
    assert [(e["type"], e.get("agent")) for _, e in timeline] == [
        ("terms.requested", "alice"),
        ("terms.displayed", "alice"),  # who asked, filled in by the log
        ("terms.accepted", "alice"),
        ("session.started", None),
        ("session.joined", "alice"),
        ("terms.declined", "alice"),
        ("session.ended", None),
    ]
    assert timeline[1][0] == displayed
    # The next session of v1 starts with no terms of its own; v2's stay pending for v2.
    assert [e["type"] for _, e in await log.session_events(GROUP, "s2")] == ["session.started"]
    await log.append(GROUP, event("session.started", visitor="v2", session="s3"))
    assert [e["type"] for _, e in await log.session_events(GROUP, "s3")] == ["terms.requested", "session.started"]
    assert await log.session_events(GROUP, "nothing") == []


async def test_taken_events_are_pending_until_acknowledged(backend: Backend) -> None:
    log = backend.events
    ids = [await log.append(GROUP, event("code.created", session=f"s{i}")) for i in range(5)]
    first = await log.take(GROUP, "a", 3)
    second = await log.take(GROUP, "b", 10)
    assert [i for i, _ in first] == ids[:3] and [i for i, _ in second] == ids[3:]
    assert await log.take(GROUP, "a", 10) == []  # each event is taken once
    await log.ack(GROUP, ids[:3])
    await asyncio.sleep(0.3)
    # Only b's unacknowledged events are left for another consumer.
    assert [i for i, _ in await log.reclaim(GROUP, "c", 0.2, 10)] == ids[3:]


async def test_skipped_events_are_never_taken(backend: Backend) -> None:
    log = backend.events
    await log.skip(GROUP)  # no log yet: nothing to skip
    await log.append(GROUP, event("code.created", session="before"))
    await log.skip(GROUP)
    after = await log.append(GROUP, event("code.created", session="after"))
    assert [i for i, _ in await log.take(GROUP, "a", 10)] == [after]
    await log.skip(GROUP)
    assert await log.take(GROUP, "a", 10) == []


async def test_events_kept_alive_are_not_reclaimed_and_those_let_go_are(backend: Backend) -> None:
    log = backend.events
    kept_id = await log.append(GROUP, event("code.created", session="kept"))
    dropped_id = await log.append(GROUP, event("code.created", session="dropped"))
    await log.take(GROUP, "dying", 10)
    for _ in range(4):  # the one still being worked on is renewed; the other is not
        await asyncio.sleep(0.1)
        await log.keep(GROUP, "dying", [kept_id])
    reclaimed = await log.reclaim(GROUP, "survivor", 0.3, 10)
    assert [i for i, _ in reclaimed] == [dropped_id]
    assert reclaimed[0][1]["session"] == "dropped"
    assert await log.reclaim(GROUP, "third", 0.3, 10) == []  # the survivor's now, freshly


async def test_a_timer_fires_once_unless_cancelled(backend: Backend) -> None:
    log = backend.events
    soon = time.time() + 0.2
    await log.schedule(GROUP, "s1", soon, event("code.expired", session="s1"))
    await log.schedule(GROUP, "s2", soon, event("code.expired", session="s2"))
    await log.schedule(GROUP, "s3", time.time() + 60, event("code.expired", session="s3"))
    assert await log.cancel(GROUP, "s2") is True
    assert await log.cancel(GROUP, "s2") is False
    assert await log.fire_due(GROUP) == 0
    await asyncio.sleep(0.3)
    assert sum(await asyncio.gather(log.fire_due(GROUP), log.fire_due(GROUP))) == 1
    assert await log.fire_due(GROUP) == 0
    assert [e["session"] for _, e in await log.read(GROUP, None, 10)] == ["s1"]
    assert [e["type"] for _, e in await log.session_events(GROUP, "s1")] == ["code.expired"]
    assert await log.cancel(GROUP, "s1") is False  # fired: too late to cancel
    assert await log.cancel(GROUP, "s3") is True


async def test_old_events_go_after_the_retention(backend: Backend) -> None:
    log = backend.events
    log.configure(lambda group: 0.3 if group == GROUP else 3600.0, 100_000)
    await log.append(GROUP, event("code.created", session="old"))
    await log.append("other", event("code.created", session="kept"))
    await asyncio.sleep(0.4)
    await log.append(GROUP, event("code.created", session="new"))
    await log.trim(GROUP)
    assert [e["session"] for _, e in await log.read(GROUP, None, 10)] == ["new"]
    assert len(await log.read("other", None, 10)) == 1


async def test_the_log_keeps_at_most_max_len_events(backend: Backend) -> None:
    log = backend.events
    log.configure(lambda group: 3600.0, 100)
    for i in range(300):
        await log.append(GROUP, event("code.created", session=f"s{i}"))
    await log.trim(GROUP)
    kept = await log.read(GROUP, None, 1000)
    assert 100 <= len(kept) < 300  # Redis trims approximately (whole nodes of the stream)
    assert kept[-1][1]["session"] == "s299"


async def test_dead_letters_newest_first(backend: Backend) -> None:
    for i in range(3):
        await backend.events.dead_letter(GROUP, {"event": f"e{i}", "endpoint": "crm", "error": "HTTP 500"})
    assert [r["event"] for r in await backend.events.dead_letters(GROUP, 2)] == ["e2", "e1"]
    assert await backend.events.dead_letters("other", 2) == []


@REDIS_ONLY
async def test_another_instance_takes_over_what_a_closed_one_had_taken(
    backend: Backend, another_instance: StartBackend
) -> None:
    other = await another_instance()
    ids = [await backend.events.append(GROUP, event("code.created", session=f"s{i}")) for i in range(3)]
    assert len(await backend.events.take(GROUP, backend.instance_id, 10)) == 3
    await asyncio.sleep(0.3)
    taken_over = await other.events.reclaim(GROUP, other.instance_id, 0.2, 10)
    assert [i for i, _ in taken_over] == ids
    await other.events.ack(GROUP, ids)
    await asyncio.sleep(0.3)
    assert await backend.events.reclaim(GROUP, backend.instance_id, 0.2, 10) == []


# -- a change and its events, in one step (LogWrite) ---------------------------------------------


def session_write(*events: dict[str, object], **parts: object) -> LogWrite:
    return LogWrite(GROUP, append=list(events), **parts)  # type: ignore[arg-type]


async def types_logged(backend: Backend) -> list[str]:
    return [e["type"] for _, e in await backend.events.read(GROUP, None, 100)]


async def test_a_records_write_and_its_events_are_stored_together(backend: Backend) -> None:
    """kv_set, kv_update and kv_swap with a LogWrite: the record and its events (timers claimed,
    cancelled and set with them) in one step; a write that does not happen logs nothing."""
    key, log = session_key(GROUP, "s1"), backend.events
    fields = {"session": "s1", "visitor": "v1"}
    started = session_write(
        event("session.started", **fields),
        event("code.created", **fields),
        schedule=[("end:s1", time.time() + 0.3, event("session.ended", reason="expired", **fields)),
                  ("code:s1", time.time() + 60, event("code.expired", **fields))],
    )  # fmt: skip
    assert await backend.kv_set(key, b"started", ttl=10, log=started) is True
    assert started.appended == ["session.started", "code.created"]
    assert await backend.kv_get(key) == b"started"
    again = session_write(event("session.started", **fields))
    assert await backend.kv_set(key, b"again", only_if_absent=True, log=again) is False
    assert again.appended == [] and await types_logged(backend) == ["session.started", "code.created"]

    joined: list[LogWrite] = []  # one per attempt: the last is the one stored

    def logged(old: bytes | None, new: bytes | None) -> LogWrite | None:
        if old is None:
            return None
        redeemed = event("code.redeemed", by="agent", **fields)
        joined.append(session_write(event("session.joined", **fields), claim=[("code:s1", redeemed)]))
        return joined[-1]

    assert await backend.kv_update(key, lambda value: (value or b"") + b"+", ttl=10, log=logged) == b"started+"
    assert joined[-1].appended == ["code.redeemed", "session.joined"]  # the code's first use
    assert await backend.kv_update(key, lambda value: (value or b"") + b"+", log=logged) == b"started++"
    assert joined[-1].appended == ["session.joined"]  # its timer is gone: used once
    assert await backend.kv_update(session_key(GROUP, "gone"), lambda value: None, log=logged) is None

    ended = session_write(event("session.ended", reason="ended", **fields), cancel=["end:s1"])
    assert await backend.kv_swap(key, None, log=ended) == b"started++"
    assert ended.appended == ["session.ended"] and await backend.kv_get(key) is None
    twice = session_write(event("session.ended", reason="ended", **fields), cancel=["end:s1"])
    assert await backend.kv_swap(key, None, log=twice) is None  # nothing replaced: nothing logged
    assert twice.appended == []
    await asyncio.sleep(0.4)
    assert await log.fire_due(GROUP) == 0  # its end by TTL was cancelled with the end
    timeline = ["session.started", "code.created", "code.redeemed", "session.joined", "session.joined", "session.ended"]
    assert await types_logged(backend) == timeline
    assert [e["type"] for _, e in await log.session_events(GROUP, "s1")] == timeline
    assert await log.cancel(GROUP, "code:s1") is False  # claimed by the first join


async def test_a_publish_and_its_event_are_one_step(backend: Backend, listener: RecordingListener) -> None:
    """publish_all: the messages and the log's events together; terms events indexed as append does."""
    topic = visitor_topic(GROUP, "v1")
    await backend.subscribe(topic)
    asked = session_write(event("terms.requested", visitor="v1", agent="alice"))
    assert await backend.publish_all([(topic, b"showterms")], asked) == [1]
    answered = session_write(event("terms.accepted", visitor="v1", connection="c1"))
    assert await backend.publish_all([(topic, b"accepted"), (group_topic(GROUP), b"unheard")], answered) == [1, 0]
    assert asked.appended == ["terms.requested"] and answered.appended == ["terms.accepted"]
    assert [await listener.next_message() for _ in range(2)] == [(topic, b"showterms"), (topic, b"accepted")]
    logged = [e for _, e in await backend.events.read(GROUP, None, 10)]
    assert [(e["type"], e.get("agent")) for e in logged] == [("terms.requested", "alice"), ("terms.accepted", "alice")]
    await backend.events.append(GROUP, event("session.started", visitor="v1", session="s9"))
    assert [e["type"] for _, e in await backend.events.session_events(GROUP, "s9")] == [
        "terms.requested", "terms.accepted", "session.started",
    ]  # fmt: skip


@REDIS_ONLY
async def test_a_change_whose_events_redis_refuses_is_not_made(backend: Backend, listener: RecordingListener) -> None:
    """Neither without the other: when the log's write fails (here the stream's key holds a
    string, so XADD is refused), the record is left as it was and nothing is published."""
    key, fields = session_key(GROUP, "s1"), {"session": "s1", "visitor": "v1"}
    assert await backend.kv_set(key, b"before", ttl=10)
    assert await backend.kv_set("{acme}:events", b"not a stream")  # the log's own key, as a record
    topic = visitor_topic(GROUP, "v1")
    await backend.subscribe(topic)
    changes = {
        "kv_set": lambda: backend.kv_set(key, b"after", log=session_write(event("session.started", **fields))),
        "kv_update": lambda: backend.kv_update(
            key, lambda value: b"after", log=lambda old, new: session_write(event("session.joined", **fields))
        ),
        "kv_swap": lambda: backend.kv_swap(key, None, log=session_write(event("session.ended", **fields))),
        "publish_all": lambda: backend.publish_all(
            [(topic, b"lost")], session_write(event("terms.accepted", visitor="v1"))
        ),
    }
    for name, change in changes.items():
        with pytest.raises(BackendUnavailable):
            await change()
        assert await backend.kv_get(key) == b"before", name
    assert await listener.messages_so_far(backend) == []
