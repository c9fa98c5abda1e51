"""The RecordStore contract: small records by key, each with an optional
ttl after which it is never returned; ``only_if_absent``, ``kv_update``,
``kv_swap`` and ``kv_delete_if`` are atomic, across instances too;
``kv_count`` counts hits in a window that starts at the first hit."""

from __future__ import annotations

import asyncio

from herald_presence.server.backends.base import Backend
from herald_presence.server.model.names import code_key, group_settings_key, lookups_by_group, session_key

from .conftest import REDIS_ONLY, StartBackend

KEY = code_key("acme", "123456")


def increment(value: bytes | None) -> bytes:
    return str(int(value or b"0") + 1).encode()


async def test_a_record_is_stored_read_and_deleted(backend: Backend) -> None:
    assert await backend.kv_get(KEY) is None
    assert await backend.kv_set(KEY, b"\x00session\xff") is True
    assert await backend.kv_get(KEY) == b"\x00session\xff"
    assert await backend.kv_get(code_key("acme", "654321")) is None
    assert await backend.kv_get(code_key("other", "123456")) is None  # the group is part of the key

    assert await backend.kv_delete(KEY) is True
    assert await backend.kv_get(KEY) is None
    assert await backend.kv_delete(KEY) is False


async def test_setting_a_record_again_replaces_its_value_and_its_ttl(backend: Backend) -> None:
    await backend.kv_set(KEY, b"first", ttl=0.3)
    assert await backend.kv_set(KEY, b"second") is True  # no ttl now: it stays
    await backend.kv_set(session_key("acme", "s1"), b"long", ttl=10)
    await backend.kv_set(session_key("acme", "s1"), b"short", ttl=0.3)
    await asyncio.sleep(0.45)
    assert await backend.kv_get(KEY) == b"second"
    assert await backend.kv_get(session_key("acme", "s1")) is None


async def test_records_expire_after_their_ttl(backend: Backend) -> None:
    await backend.kv_set(KEY, b"code", ttl=0.3)
    await backend.kv_set(group_settings_key("acme"), b"settings")  # no ttl
    await backend.kv_set(session_key("acme", "s1"), b"session", ttl=10)
    assert await backend.kv_get(KEY) == b"code"
    await asyncio.sleep(0.45)
    assert await backend.kv_get(KEY) is None
    assert await backend.kv_get(group_settings_key("acme")) == b"settings"
    assert await backend.kv_get(session_key("acme", "s1")) == b"session"


async def test_an_expired_record_is_not_there_to_delete(backend: Backend) -> None:
    await backend.kv_set(KEY, b"code", ttl=0.2)
    await asyncio.sleep(0.35)
    assert await backend.kv_delete(KEY) is False


async def test_a_ttl_under_a_millisecond_still_stores_a_record_that_expires(backend: Backend) -> None:
    assert await backend.kv_set(KEY, b"brief", ttl=0.0005) is True
    await asyncio.sleep(0.01)
    assert await backend.kv_get(KEY) is None


async def test_set_if_absent_stores_only_when_there_is_no_record(backend: Backend) -> None:
    assert await backend.kv_set(KEY, b"first", ttl=0.3, only_if_absent=True) is True
    assert await backend.kv_set(KEY, b"second", only_if_absent=True) is False
    assert await backend.kv_get(KEY) == b"first"
    await asyncio.sleep(0.45)  # expired: absent again
    assert await backend.kv_set(KEY, b"third", only_if_absent=True) is True
    assert await backend.kv_delete(KEY) is True  # deleted: absent again
    assert await backend.kv_set(KEY, b"fourth", only_if_absent=True) is True
    assert await backend.kv_get(KEY) == b"fourth"


async def test_set_if_absent_has_exactly_one_winner_among_racers(backend: Backend) -> None:
    for round_ in range(10):
        key = code_key("acme", f"{round_:06d}")
        values = [f"s{n}".encode() for n in range(20)]
        won = await asyncio.gather(*(backend.kv_set(key, v, ttl=10, only_if_absent=True) for v in values))
        assert won.count(True) == 1, won
        assert await backend.kv_get(key) == values[won.index(True)]


@REDIS_ONLY
async def test_set_if_absent_has_exactly_one_winner_among_instances(
    backend: Backend, another_instance: StartBackend
) -> None:
    other = await another_instance()
    for round_ in range(20):
        key = code_key("acme", f"{round_:06d}")
        racers = [
            (instance, f"{name}{n}".encode()) for n in range(5) for instance, name in ((backend, "a"), (other, "b"))
        ]
        won = await asyncio.gather(*(i.kv_set(key, v, ttl=10, only_if_absent=True) for i, v in racers))
        assert won.count(True) == 1, won
        winner = racers[won.index(True)][1]
        assert await backend.kv_get(key) == await other.kv_get(key) == winner


async def test_update_sees_the_current_value_and_returns_the_new_one(backend: Backend) -> None:
    seen: list[bytes | None] = []

    def append(value: bytes | None) -> bytes:
        seen.append(value)
        return (value or b"") + b"x"

    assert await backend.kv_update(KEY, append) == b"x"
    assert await backend.kv_update(KEY, append) == b"xx"
    assert seen == [None, b"x"]
    assert await backend.kv_get(KEY) == b"xx"

    assert await backend.kv_update(KEY, lambda value: None) is None  # None deletes
    assert await backend.kv_get(KEY) is None
    assert await backend.kv_update(KEY, lambda value: None) is None  # and deleting nothing is fine


async def test_update_gives_the_record_its_ttl(backend: Backend) -> None:
    await backend.kv_set(KEY, b"kept")
    assert await backend.kv_update(KEY, lambda value: b"short-lived", ttl=0.3) == b"short-lived"
    await backend.kv_update(session_key("acme", "s1"), lambda value: b"lasting", ttl=10)
    await asyncio.sleep(0.45)
    assert await backend.kv_get(KEY) is None
    assert await backend.kv_get(session_key("acme", "s1")) == b"lasting"


async def test_update_without_a_ttl_keeps_the_records_expiry(backend: Backend) -> None:
    """An index rewritten as it was (a session's end releasing only its own
    entries) must still expire when it would have."""
    await backend.kv_set(KEY, b"expiring", ttl=0.3)
    assert await backend.kv_update(KEY, lambda value: value) == b"expiring"  # rewritten as it was, ttl None
    assert await backend.kv_get(KEY) == b"expiring"
    await asyncio.sleep(0.45)
    assert await backend.kv_get(KEY) is None


async def test_update_without_a_ttl_of_a_new_record_does_not_expire(backend: Backend) -> None:
    assert await backend.kv_update(KEY, lambda value: b"settings") == b"settings"
    await asyncio.sleep(0.3)
    assert await backend.kv_get(KEY) == b"settings"


async def test_update_of_an_expired_record_starts_from_nothing(backend: Backend) -> None:
    await backend.kv_set(KEY, b"41", ttl=0.2)
    await asyncio.sleep(0.35)
    assert await backend.kv_update(KEY, increment) == b"1"


async def test_update_is_atomic_under_concurrent_updates(backend: Backend) -> None:
    results = await asyncio.gather(*(backend.kv_update(KEY, increment, ttl=10) for _ in range(50)))
    assert await backend.kv_get(KEY) == b"50"
    assert sorted(int(r or b"0") for r in results) == list(range(1, 51))  # each saw its own predecessor


@REDIS_ONLY
async def test_update_is_atomic_across_instances(backend: Backend, another_instance: StartBackend) -> None:
    other = await another_instance()
    updates = [instance.kv_update(KEY, increment) for _ in range(20) for instance in (backend, other)]
    results = await asyncio.gather(*updates)
    assert await other.kv_get(KEY) == b"40"
    assert sorted(int(r or b"0") for r in results) == list(range(1, 41))


async def test_swap_stores_and_returns_what_it_replaced(backend: Backend) -> None:
    assert await backend.kv_swap(KEY, b"first", ttl=10) is None
    assert await backend.kv_swap(KEY, b"second", ttl=0.3) == b"first"
    assert await backend.kv_get(KEY) == b"second"
    await asyncio.sleep(0.45)  # the ttl given with the swap applies: an expired record is not returned
    assert await backend.kv_swap(KEY, b"third") is None
    assert await backend.kv_swap(KEY, None) == b"third"  # None takes it away
    assert await backend.kv_get(KEY) is None
    assert await backend.kv_swap(KEY, None) is None


async def test_swap_hands_each_value_to_exactly_one_racer(backend: Backend) -> None:
    """A session index claimed by racing starts: every value stored is
    returned to exactly one later swapper, except the one that stays."""
    values = [f"s{n}".encode() for n in range(50)]
    before = await asyncio.gather(*(backend.kv_swap(KEY, v, ttl=10) for v in values))
    last = await backend.kv_get(KEY)
    assert before.count(None) == 1
    assert sorted(v for v in before if v is not None) == sorted(v for v in values if v != last)


@REDIS_ONLY
async def test_swap_hands_each_value_to_exactly_one_racer_across_instances(
    backend: Backend, another_instance: StartBackend
) -> None:
    other = await another_instance()
    racers = [(instance, f"{name}{n}".encode()) for n in range(20) for instance, name in ((backend, "a"), (other, "b"))]
    before = await asyncio.gather(*(i.kv_swap(KEY, v, ttl=10) for i, v in racers))
    last = await other.kv_get(KEY)
    assert before.count(None) == 1
    assert sorted(v for v in before if v is not None) == sorted(v for _, v in racers if v != last)


async def test_delete_if_deletes_only_the_value_it_names(backend: Backend) -> None:
    await backend.kv_set(KEY, b"mine", ttl=10)
    assert await backend.kv_delete_if(KEY, b"theirs") is False
    assert await backend.kv_get(KEY) == b"mine"
    assert await backend.kv_delete_if(KEY, b"mine") is True
    assert await backend.kv_get(KEY) is None
    assert await backend.kv_delete_if(KEY, b"mine") is False
    await backend.kv_set(KEY, b"mine", ttl=0.2)
    await asyncio.sleep(0.35)
    assert await backend.kv_delete_if(KEY, b"mine") is False  # expired: nothing to delete


async def test_count_counts_hits_in_a_window_then_starts_again(backend: Backend) -> None:
    key = lookups_by_group("acme")
    assert [await backend.kv_count(key, window=0.4) for _ in range(3)] == [1, 2, 3]
    assert await backend.kv_count(lookups_by_group("other"), window=0.4) == 1  # each key its own count
    await asyncio.sleep(0.55)
    assert await backend.kv_count(key, window=0.4) == 1
    assert await backend.kv_count(key, window=0.4) == 2


async def test_a_counting_window_starts_at_the_first_hit_not_the_last(backend: Backend) -> None:
    key = lookups_by_group("acme")
    assert await backend.kv_count(key, window=0.5) == 1
    await asyncio.sleep(0.3)
    assert await backend.kv_count(key, window=0.5) == 2  # a later hit does not stretch the window
    await asyncio.sleep(0.35)
    assert await backend.kv_count(key, window=0.5) == 1


async def test_concurrent_hits_are_all_counted(backend: Backend) -> None:
    counts = await asyncio.gather(*(backend.kv_count(lookups_by_group("acme"), window=10) for _ in range(50)))
    assert sorted(counts) == list(range(1, 51))
