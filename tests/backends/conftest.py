"""One contract suite, two backends, three ways to run Redis.

Every test here talks to a ``Backend`` through its public methods only, the
way an instance does: no websockets, no HTTP, no mocks. The ``backend``
fixture runs each test against ``MemoryBackend``, against ``RedisBackend``
on a real redis-server ("redis") and against ``RedisBackend`` on a real
Redis Cluster of three masters with a replica each ("cluster"; one for the
whole run, ``tests/redis_cluster.py``); each test with its own key prefix.

Tests that need two instances of one cluster are Redis-only: they say so
with ``@REDIS_ONLY``, which parametrizes them over "redis" and "cluster", so
the memory backend is visibly not run rather than silently skipped; those
that stop Redis itself are ``@STANDALONE_ONLY``.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Protocol

import pytest

from herald_presence.server.backends.base import Announce, Backend, Mutation
from herald_presence.server.backends.memory import MemoryBackend
from herald_presence.server.backends.redis import RedisBackend
from herald_presence.server.model import presence_rules
from herald_presence.server.model.names import pack, unpack, visitor_topic
from herald_presence.server.model.records import ConnectionRecord, PresenceChange

from ..redis_server import RedisServer

KINDS = ["memory", "redis", "cluster"]
REDIS_ONLY = pytest.mark.parametrize("backend_kind", ["redis", "cluster"])
STANDALONE_ONLY = pytest.mark.parametrize("backend_kind", ["redis"])

# Short cluster timings, so that a closed instance is reaped within a test.
REDIS_TIMINGS: dict[str, float] = {"heartbeat": 0.25, "dead_after": 1.5, "grace_period": 0.5, "command_timeout": 1.0}

GROUP = "acme"
WAIT = 3.0  # the longest any single expected event may take to arrive
FENCE = "t:fence"

Message = tuple[str, bytes]


class RecordingListener:
    """Stands in for the instance a backend calls back into."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[Message] = asyncio.Queue()
        self.changes: asyncio.Queue[PresenceChange] = asyncio.Queue()
        self.restores = 0
        self.restored = asyncio.Event()

    # -- BackendListener ---------------------------------------------------
    def on_bus_message(self, topic: str, message: bytes) -> None:
        self.messages.put_nowait((topic, message))

    def announcement(self, change: PresenceChange) -> list[tuple[str, bytes]]:
        """What a real instance does: the change goes to its visitor's topic."""
        if change.record is None:
            return []
        return announce_on(visitor_topic(change.record.group, change.record.visitor))(change)

    def presence_changed(self, change: PresenceChange) -> None:
        self.changes.put_nowait(change)

    async def backend_restored(self) -> None:
        self.restores += 1
        self.restored.set()

    async def registrations_lost(self) -> None:
        self.restores += 1
        self.restored.set()

    # -- for the tests -----------------------------------------------------
    async def next_message(self, within: float = WAIT) -> Message:
        async with asyncio.timeout(within):
            return await self.messages.get()

    async def next_change(self, within: float = WAIT) -> PresenceChange:
        async with asyncio.timeout(within):
            return await self.changes.get()

    async def messages_so_far(self, backend: Backend) -> list[Message]:
        """Every message delivered for what was published before this call.

        Publishes a marker to a fence topic through ``backend`` and collects
        what arrives before it: the bus keeps publish order, so anything
        published earlier and delivered at all has arrived by then. Proves
        "nothing arrived" without sleeping and hoping.
        """
        await backend.subscribe(FENCE)
        # Never 0xc1 first (the Bus contract: that byte marks a batch); a bare random marker was, 1 time in 256.
        marker = b"fence:" + uuid.uuid4().bytes
        await backend.publish(FENCE, marker)
        before: list[Message] = []
        async with asyncio.timeout(WAIT):
            while (message := await self.messages.get()) != (FENCE, marker):
                if message[0] != FENCE:
                    before.append(message)
        return before


class StartBackend(Protocol):
    async def __call__(self, listener: RecordingListener | None = None, redis: RedisServer | None = None) -> Backend:
        """Another started instance of this test's cluster."""
        ...


# -- fixtures ------------------------------------------------------------------


@pytest.fixture(params=KINDS)
def backend_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def redis_prefix() -> str:
    return f"k{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def another_instance(
    backend_kind: str, redis_prefix: str, request: pytest.FixtureRequest
) -> AsyncIterator[StartBackend]:
    """Start instances of this test's cluster (one Redis, one prefix); each
    is closed at teardown. Redis-only: memory has no second instance."""
    started: list[Backend] = []

    async def start(listener: RecordingListener | None = None, redis: RedisServer | None = None) -> Backend:
        if backend_kind == "memory":
            pytest.fail("a second instance of one cluster exists only with Redis: mark the test @REDIS_ONLY")
        if backend_kind == "cluster":
            assert redis is None, "a test that stops its Redis is @STANDALONE_ONLY"
            url = request.getfixturevalue("redis_cluster").url
        else:
            if redis is None:
                redis = request.getfixturevalue("redis_server")
                if redis.process is None or redis.process.poll() is not None:
                    redis.start()  # a previous test stopped it
            url = redis.url
        backend = RedisBackend(url, prefix=redis_prefix, **REDIS_TIMINGS)
        started.append(backend)
        await backend.start(listener or RecordingListener())
        return backend

    yield start
    for backend in reversed(started):
        await closed_in_time(backend)


async def closed_in_time(backend: Backend, within: float = 10.0) -> None:
    """Close ``backend``; a close that hangs fails the test with what is still running."""
    try:
        async with asyncio.timeout(within):
            await backend.close()
    except TimeoutError:
        pytest.fail("backend.close() hung:\n" + "\n".join(awaiting(task) for task in asyncio.all_tasks()))


def awaiting(task: asyncio.Task[Any]) -> str:
    """A task's chain of awaits, outermost first."""
    chain, coro = [], task.get_coro()
    while coro is not None and hasattr(coro, "cr_frame"):
        if coro.cr_frame is not None:
            chain.append(f"{coro.cr_code.co_name}:{coro.cr_frame.f_lineno}")
        coro = coro.cr_await
    chain.append(repr(coro)[:120])
    return f"{task.get_name()}: " + " -> ".join(chain)


@pytest.fixture
def listener() -> RecordingListener:
    """The listener ``backend`` was started with."""
    return RecordingListener()


@pytest.fixture
async def backend(
    backend_kind: str, listener: RecordingListener, another_instance: StartBackend
) -> AsyncIterator[Backend]:
    """A started backend: each test runs with memory, Redis and a Redis Cluster."""
    if backend_kind != "memory":
        yield await another_instance(listener)  # closed by another_instance
        return
    memory = MemoryBackend()
    await memory.start(listener)
    yield memory
    await memory.close()


# -- helpers ---------------------------------------------------------------------


def conn(backend: Backend, name: str, visible: bool = True, **data: Any) -> ConnectionRecord:
    """A connection of ``backend``'s instance."""
    return ConnectionRecord(name, backend.instance_id, dict(data), visible, time.time())


def joins(connection: ConnectionRecord, limit: int | None = None) -> Mutation:
    return functools.partial(presence_rules.join, connection=connection, limit=limit)


def leaves(connection: str) -> Mutation:
    return functools.partial(presence_rules.leave, connection=connection)


def updates(connection: str, data: dict[str, Any] | None = None, visible: bool | None = None) -> Mutation:
    return functools.partial(presence_rules.update, connection=connection, data=data, visible=visible)


def rejoins(connection: ConnectionRecord) -> Mutation:
    return functools.partial(presence_rules.rejoin, connection=connection)


def goes_offline() -> Mutation:
    """The grace period is over."""
    return functools.partial(presence_rules.expire_away, away_since=None)


def drops(connection: str) -> Mutation:
    return functools.partial(presence_rules.drop, connection=connection)


def silent(change: PresenceChange) -> list[tuple[str, bytes]]:
    """An announcement nobody needs to hear."""
    return []


def announce_on(*topics: str) -> Announce:
    """Announce ``[change word, version]`` on each topic."""

    def announce(change: PresenceChange) -> list[tuple[str, bytes]]:
        return [(topic, pack([change.change, change.version])) for topic in topics]

    return announce


def announced(message: Message) -> tuple[str, str | None, int]:
    """(topic, change word, version) of a message made by ``announce_on``."""
    topic, data = message
    word, version = unpack(data)
    return topic, word, version


async def change_of(backend: Backend, visitor: str, mutation: Mutation, announce: Announce = silent) -> PresenceChange:
    """``mutate`` that must change something."""
    change = await backend.mutate(GROUP, visitor, mutation, announce)
    assert change is not None, "the mutation changed nothing"
    return change


async def eventually(check: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    """Poll ``check`` until true, or fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {within}s: {what}")
        await asyncio.sleep(0.05)


def strictly_rising(values: Iterable[int]) -> bool:
    return all(a < b for a, b in itertools.pairwise(values))
