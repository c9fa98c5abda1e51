"""The Backend lifecycle: a started backend is healthy; when shared state
cannot be reached every operation raises ``BackendUnavailable`` (never
another error, never a hang); when it is back, the listener is told and
everything works again, subscriptions included."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from herald_presence.server.backends.base import Backend, BackendUnavailable, LogWrite
from herald_presence.server.model import events as ev
from herald_presence.server.model.names import code_key, group_topic, lookups_by_group, session_key, visitor_topic
from herald_presence.server.model.records import HeldSignal

from ..redis_server import RedisServer
from .conftest import GROUP, STANDALONE_ONLY, RecordingListener, StartBackend, conn, eventually, joins, silent

UNAVAILABLE_WITHIN = 3.0  # seconds an operation may take to give up


def logged() -> LogWrite:
    """A change's event: with the backend away, neither the change nor it happens."""
    return LogWrite(GROUP, append=[ev.new_event(ev.SESSION_STARTED, GROUP, session="s1", visitor="v1")])


async def test_a_started_backend_is_healthy(backend: Backend) -> None:
    assert backend.healthy
    assert backend.instance_id


async def outcome(operation: Callable[[], Awaitable[object]]) -> str:
    """What the operation did: "ok", "BackendUnavailable", another exception's name, or "hung"."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(UNAVAILABLE_WITHIN):
            await operation()
    except TimeoutError:
        if time.monotonic() - started >= UNAVAILABLE_WITHIN:
            return "hung"
        return "TimeoutError"
    except BackendUnavailable:
        return "BackendUnavailable"
    except Exception as exc:
        return type(exc).__name__
    return "ok"


@STANDALONE_ONLY
async def test_every_operation_raises_backend_unavailable_when_redis_is_gone(
    private_redis: RedisServer, another_instance: StartBackend
) -> None:
    listener = RecordingListener()
    backend = await another_instance(listener, redis=private_redis)
    await backend.subscribe(group_topic(GROUP))
    await backend.mutate(GROUP, "v1", joins(conn(backend, "c1")), silent)
    private_redis.stop()

    held = HeldSignal("k1", backend.instance_id, b"frame", False, time.time() + 60)
    operations: dict[str, Callable[[], Awaitable[object]]] = {
        "mutate": lambda: backend.mutate(GROUP, "v2", joins(conn(backend, "c2")), silent),
        "visitor": lambda: backend.visitor(GROUP, "v1"),
        "visitor_record": lambda: backend.visitor_record(GROUP, "v1"),
        "group_visitors": lambda: backend.group_visitors(GROUP),
        "registered_connections": lambda: backend.registered_connections(),
        "subscribe": lambda: backend.subscribe(visitor_topic(GROUP, "v1")),
        "publish": lambda: backend.publish(group_topic(GROUP), b"lost"),
        "hold": lambda: backend.hold(GROUP, "v1", held, ttl=10),
        "take_held": lambda: backend.take_held(GROUP, "v1"),
        "drop_held": lambda: backend.drop_held(GROUP, "v1", "k1"),
        "kv_get": lambda: backend.kv_get(code_key(GROUP, "1")),
        "kv_set": lambda: backend.kv_set(code_key(GROUP, "1"), b"x", ttl=10),
        "kv_set only_if_absent": lambda: backend.kv_set(code_key(GROUP, "1"), b"x", only_if_absent=True),
        "kv_delete": lambda: backend.kv_delete(code_key(GROUP, "1")),
        "kv_update": lambda: backend.kv_update(code_key(GROUP, "1"), lambda value: b"x"),
        "kv_swap": lambda: backend.kv_swap(code_key(GROUP, "1"), b"x", ttl=10),
        "kv_swap None": lambda: backend.kv_swap(code_key(GROUP, "1"), None),
        "kv_delete_if": lambda: backend.kv_delete_if(code_key(GROUP, "1"), b"x"),
        "kv_count": lambda: backend.kv_count(lookups_by_group(GROUP), window=10),
        "kv_set logged": lambda: backend.kv_set(session_key(GROUP, "s1"), b"x", log=logged()),
        "kv_update logged": lambda: backend.kv_update(
            session_key(GROUP, "s1"), lambda value: b"x", log=lambda old, new: logged()
        ),
        "kv_swap logged": lambda: backend.kv_swap(session_key(GROUP, "s1"), None, log=logged()),
        "publish_all": lambda: backend.publish_all([(group_topic(GROUP), b"lost")], logged()),
    }
    outcomes = {name: await outcome(operation) for name, operation in operations.items()}
    assert outcomes == dict.fromkeys(operations, "BackendUnavailable")
    # Unsubscribing from a connection that is gone may simply succeed; it must not fail otherwise.
    assert await outcome(lambda: backend.unsubscribe(group_topic(GROUP))) in ("ok", "BackendUnavailable")
    assert not backend.healthy

    private_redis.start()  # same port, empty

    async def works_again() -> bool:
        return await outcome(lambda: backend.kv_set(code_key(GROUP, "1"), b"back")) == "ok"

    await eventually(works_again, within=8, what="kv_set works once Redis is back")
    assert await backend.kv_get(code_key(GROUP, "1")) == b"back"
    assert await backend.mutate(GROUP, "v2", joins(conn(backend, "c2")), silent) is not None


@STANDALONE_ONLY
async def test_when_redis_comes_back_the_listener_is_told_and_subscriptions_deliver_again(
    private_redis: RedisServer, another_instance: StartBackend
) -> None:
    listener = RecordingListener()
    backend = await another_instance(listener, redis=private_redis)
    topic = group_topic(GROUP)
    await backend.subscribe(topic)
    assert listener.restores == 0

    private_redis.stop()

    async def unhealthy() -> bool:
        return not backend.healthy

    await eventually(unhealthy, within=5, what="the backend notices Redis is gone")
    private_redis.start()

    async with asyncio.timeout(10):
        await listener.restored.wait()
    assert listener.restores == 1

    async def healthy() -> bool:
        return backend.healthy

    await eventually(healthy, within=5, what="healthy again")
    # Subscriptions made before the outage are in effect again.
    assert await backend.publish(topic, b"after") == 1
    assert await listener.next_message() == (topic, b"after")
