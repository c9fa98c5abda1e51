"""The cluster backend: many instances, one Redis.

Channel layout (why not one channel for everything): each bus topic is its
own Redis channel, and an instance subscribes only to the topics its local
agents watch plus its own inbox. A presence change is published to its
visitor's and its group's channel, so Redis forwards it only to instances
that have an agent watching; a signal to a visitor goes to the inbox of the
one instance holding the visitor's connection. Nothing is broadcast to
every instance. Every key and channel is named in ``model.names.RedisNames``.

A visitor's hash holds ``version``, ``away``/``away_by`` while in the grace
period, and one ``c:<connection>`` field per live connection (msgpack:
instance, data, visible, since, active). Offline visitors keep only
``version``, expiring after ``tombstone_ttl``. When an instance's heartbeat
is older than ``dead_after``, any other instance reaps it: its connections
are dropped and its visitors' grace periods ended on its behalf, so a killed
pod leaves no ghost.

Presence changes are optimistic transactions (WATCH the visitor's hash,
apply the rule, MULTI: write + PUBLISH, EXEC), so one visitor's versions and
announcements stay in order across instances. Pub/sub runs on its own
connection, without silent retries: when it drops (or a probe published to
ourselves does not come back), the instance resubscribes and tells the
listener, which re-registers its connections and resyncs its agents.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import RedisError, WatchError

from herald_presence.protocol.messages import VisitorState
from herald_presence.server.model import presence_rules
from herald_presence.server.model.names import RedisNames, pack, unpack
from herald_presence.server.model.records import (
    ConnectionRecord,
    HeldSignal,
    PresenceChange,
    VisitorRecord,
    offline_state,
)

from .base import Announce, Backend, BackendListener, BackendUnavailable, Mutation
from .redis_batch import CommandBatcher

log = logging.getLogger(__name__)

CONNECTION_FIELD = b"c:"
MAX_WATCH_RETRIES = 50
MAX_CONNECTIONS = 32  # per instance, besides the pub/sub connection


class RedisBackend(Backend):
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "herald",
        instance_id: str | None = None,
        grace_period: float = 5.0,
        heartbeat: float = 1.0,
        dead_after: float = 8.0,
        probe_timeout: float = 3.0,
        command_timeout: float = 2.0,
        tombstone_ttl: float = 600.0,
    ) -> None:
        self.instance_id = instance_id or uuid.uuid4().hex[:12]
        self.names = RedisNames(prefix)
        self._probe_channel = self.names.probe(self.instance_id)
        self.grace_period = grace_period
        self.heartbeat = heartbeat
        self.dead_after = dead_after
        self.probe_timeout = probe_timeout
        self.command_timeout = command_timeout
        self.tombstone_ms = int(tombstone_ttl * 1000)
        timeouts = {"socket_timeout": command_timeout, "socket_connect_timeout": command_timeout}
        # A bounded pool that makes bursts wait for a connection rather than
        # fail. Commands retry once: the first use of a pooled connection
        # after a Redis restart fails, the retry reconnects.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=command_timeout,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 1),
            **timeouts,
        )
        self._redis = aioredis.Redis(connection_pool=pool)
        self._batch = CommandBatcher(self._redis, self.instance_id)  # the hot path's commands
        # Pub/sub never retries silently: a dropped subscription must be seen.
        self._bus = aioredis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **timeouts)
        self._listener: BackendListener | None = None
        self._topics: set[str] = set()
        self._confirmed: dict[bytes, asyncio.Future[None]] = {}
        self._pubsub: Any = None
        self._listen_task: asyncio.Task[None] | None = None
        self._upkeep_task: asyncio.Task[None] | None = None
        self._restore_task: asyncio.Task[None] | None = None
        self._bus_lost = False
        self._redis_ok = False
        self._last_probe = 0.0
        self.reconnects = 0

    # -- lifecycle ---------------------------------------------------------
    @property
    def healthy(self) -> bool:
        probe_fresh = time.monotonic() - self._last_probe < self.probe_timeout
        return self._redis_ok and self._pubsub is not None and probe_fresh

    async def start(self, listener: BackendListener) -> None:
        self._listener = listener
        self._listen_task = asyncio.create_task(self._listen(), name=f"redis-bus-{self.instance_id}")
        self._upkeep_task = asyncio.create_task(self._upkeep(), name=f"redis-upkeep-{self.instance_id}")
        # Serve once the bus works, or start degraded and recover in the background.
        deadline = time.monotonic() + self.command_timeout * 2
        while not self.healthy and time.monotonic() < deadline:
            await self._beat()
            await asyncio.sleep(0.02)
        if not self.healthy:
            log.error("Redis is not reachable yet; serving local connections only until it is")

    async def close(self) -> None:
        tasks = [t for t in (self._upkeep_task, self._listen_task, self._restore_task) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        await self._batch.close()
        # Heartbeat 0: our remaining connections and grace periods are now
        # for the other instances to settle.
        with contextlib.suppress(RedisError, OSError):
            await self._redis.zadd(self.names.instances, {self.instance_id: 0})
        await self._bus.aclose()
        await self._redis.aclose()
        await self._redis.connection_pool.disconnect()

    # -- presence ----------------------------------------------------------
    def _load(self, group: str, visitor: str, raw: dict[bytes, bytes]) -> tuple[VisitorRecord, str | None]:
        record = VisitorRecord(group, visitor, int(raw.get(b"version", 0)))
        if b"away" in raw:
            record.away_since = int(raw[b"away"])
        for name, value in raw.items():
            if name.startswith(CONNECTION_FIELD):
                instance, data, visible, since, active = unpack(value)
                connection = name[len(CONNECTION_FIELD) :].decode()
                record.connections[connection] = ConnectionRecord(connection, instance, data, visible, since, active)
        away_by = raw.get(b"away_by")
        return record, away_by.decode() if away_by else None

    async def mutate(self, group: str, visitor: str, mutation: Mutation, announce: Announce) -> PresenceChange | None:
        key = self.names.visitor(group, visitor)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                for _ in range(MAX_WATCH_RETRIES):
                    try:
                        await pipe.watch(key)
                        record, away_by = self._load(group, visitor, await pipe.hgetall(key))
                        before = ({c: r.instance for c, r in record.connections.items()}, record.away_since, away_by)
                        change = mutation(record)
                        if change is None:
                            await pipe.unwatch()
                            return None
                        pipe.multi()
                        self._store(pipe, record, *before)
                        for topic, message in announce(change):
                            pipe.publish(self.names.channel(topic), message)
                        await pipe.execute()
                        return change
                    except WatchError:
                        continue  # another instance changed this visitor first: redo on its result
        except (RedisError, OSError) as exc:
            raise BackendUnavailable() from exc
        raise BackendUnavailable(f"visitor {visitor} is changing too fast to update")

    def _store(
        self,
        pipe: Any,
        record: VisitorRecord,
        connections_before: dict[str, str],
        away_before: int | None,
        away_by_before: str | None,
    ) -> None:
        group, visitor = record.group, record.visitor
        key, online = self.names.visitor(group, visitor), self.names.online(group)
        away_by = None
        if record.away_since is not None:
            away_by = away_by_before if record.away_since == away_before else self.instance_id
        pipe.delete(key)
        if record.online:
            fields: dict[str | bytes, Any] = {"version": record.version}
            if record.away_since is not None and away_by is not None:
                fields.update(away=record.away_since, away_by=away_by)
            for c in record.connections.values():
                packed = pack((c.instance, c.data, c.visible, c.since, c.active))
                fields[CONNECTION_FIELD + c.connection.encode()] = packed
            pipe.hset(key, mapping=fields)
            pipe.sadd(online, visitor)
        else:
            pipe.hset(key, "version", record.version)
            pipe.pexpire(key, self.tombstone_ms)
            pipe.srem(online, visitor)
        connections_after = {c: r.instance for c, r in record.connections.items()}
        for connection, instance in connections_before.items():
            if connection not in connections_after:
                pipe.srem(self.names.instance_connections(instance), pack((group, visitor, connection)))
        for connection, instance in connections_after.items():
            if connection not in connections_before:
                pipe.sadd(self.names.instance_connections(instance), pack((group, visitor, connection)))
        if away_by_before and away_by_before != away_by:
            pipe.srem(self.names.instance_away(away_by_before), pack((group, visitor)))
        if away_by and away_by != away_by_before:
            pipe.sadd(self.names.instance_away(away_by), pack((group, visitor)))

    async def _read(self, group: str, visitor: str) -> VisitorRecord:
        raw = await self._batch.call("hgetall", self.names.visitor(group, visitor))
        return self._load(group, visitor, raw)[0]

    async def visitor(self, group: str, visitor: str) -> VisitorState:
        record = await self._read(group, visitor)
        return record.state() if record.online else offline_state(visitor, record.version)

    async def visitor_record(self, group: str, visitor: str) -> VisitorRecord | None:
        record = await self._read(group, visitor)
        return record if record.online else None

    async def group_visitors(self, group: str) -> list[VisitorState]:
        try:
            members = sorted(m.decode() for m in await self._redis.smembers(self.names.online(group)))
            async with self._redis.pipeline(transaction=False) as pipe:
                for visitor in members:
                    pipe.hgetall(self.names.visitor(group, visitor))
                raws = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise BackendUnavailable() from exc
        records = (self._load(group, visitor, raw)[0] for visitor, raw in zip(members, raws, strict=True))
        return [record.state() for record in records if record.online]

    async def registered_connections(self) -> list[tuple[str, str, str]]:
        return await self._members(self.names.instance_connections(self.instance_id))

    async def _members(self, key: str) -> list[Any]:
        try:
            return [tuple(unpack(m)) for m in await self._redis.smembers(key)]
        except (RedisError, OSError) as exc:
            raise BackendUnavailable() from exc

    # -- bus ---------------------------------------------------------------
    async def subscribe(self, topic: str) -> None:
        """Returns once Redis confirmed the subscription, so a snapshot read
        afterwards cannot miss a change published in between."""
        self._topics.add(topic)
        channel = self.names.channel(topic)
        confirmed = self._confirmed.get(channel)
        if confirmed is None:
            confirmed = self._confirmed[channel] = asyncio.get_running_loop().create_future()
            if self._pubsub is None:
                raise BackendUnavailable()
            try:
                await self._pubsub.subscribe(channel)
            except (RedisError, OSError) as exc:
                raise BackendUnavailable() from exc
        try:
            await asyncio.wait_for(asyncio.shield(confirmed), self.command_timeout)
        except TimeoutError:
            raise BackendUnavailable("Redis did not confirm the subscription") from None

    async def unsubscribe(self, topic: str) -> None:
        self._topics.discard(topic)
        channel = self.names.channel(topic)
        self._confirmed.pop(channel, None)
        if self._pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.unsubscribe(channel)

    async def publish(self, topic: str, message: bytes) -> int:
        return int(await self._batch.call("publish", self.names.channel(topic), message))

    async def _listen(self) -> None:
        """Own the one pub/sub connection: (re)subscribe, dispatch, notice loss."""
        backoff = 0.05
        while True:
            pubsub = self._bus.pubsub()
            try:
                self._confirmed = {
                    self.names.channel(t): asyncio.get_running_loop().create_future() for t in self._topics
                }
                self._confirmed[self._probe_channel] = asyncio.get_running_loop().create_future()
                await pubsub.subscribe(*self._confirmed)
                self._pubsub = pubsub
                if self._bus_lost:
                    self._restore_task = asyncio.create_task(self._restore(), name=f"redis-restore-{self.instance_id}")
                async for message in pubsub.listen():
                    self._dispatch(message)
                    backoff = 0.05
            except (RedisError, OSError) as exc:
                log.warning("Redis pub/sub connection lost: %r", exc)
            finally:
                self._pubsub = None
                self._bus_lost = True
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind, channel = message["type"], message["channel"]
        if kind == "subscribe":
            confirmed = self._confirmed.get(channel)
            if confirmed is not None and not confirmed.done():
                confirmed.set_result(None)
            if channel == self._probe_channel:
                self._last_probe = time.monotonic()
        elif kind == "message":
            if channel == self._probe_channel:
                self._last_probe = time.monotonic()
            elif self._listener is not None:
                topic = self.names.topic(channel)
                self._listener.on_bus_message(topic, message["data"])

    async def _restore(self) -> None:
        """After the bus came back: wait for every resubscription, then let
        the hub re-register and resync (it may have missed messages)."""
        try:
            await asyncio.wait_for(asyncio.gather(*self._confirmed.values()), self.command_timeout * 2)
        except TimeoutError:
            log.warning("Redis did not confirm the resubscription; starting over")
            await self._restart_listener()  # it schedules the next restore
            return
        self.reconnects += 1
        self._bus_lost = False
        log.warning("Redis pub/sub restored (%d channels); resyncing", len(self._confirmed))
        if self._listener is not None:
            try:
                await self._listener.backend_restored()
            except BackendUnavailable:
                self._bus_lost = True  # lost again meanwhile; the next restore retries

    # -- liveness ----------------------------------------------------------
    async def _upkeep(self) -> None:
        """Heartbeat, probe our own subscription, reap dead instances."""
        while True:
            await asyncio.sleep(self.heartbeat)
            await self._beat()
            if self._pubsub is not None and time.monotonic() - self._last_probe > self.probe_timeout:
                log.warning("Redis pub/sub stopped delivering (probe lost); reconnecting it")
                await self._restart_listener()
            if self._redis_ok:
                with contextlib.suppress(BackendUnavailable):
                    await self._reap()

    async def _beat(self) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zadd(self.names.instances, {self.instance_id: int(time.time() * 1000)})
                pipe.publish(self._probe_channel, b"probe")
                await pipe.execute()
            self._redis_ok = True
        except (RedisError, OSError) as exc:
            if self._redis_ok:
                log.warning("Redis unreachable: %r", exc)
            self._redis_ok = False

    async def _restart_listener(self) -> None:
        """Drop the pub/sub connection and start over (the old one is fully
        gone before the new one starts)."""
        old = self._listen_task
        if old is not None:
            old.cancel()
            await asyncio.wait([old])  # unlike awaiting it, never swallows our own cancellation
        self._bus_lost = True
        self._listen_task = asyncio.create_task(self._listen(), name=f"redis-bus-{self.instance_id}")

    async def _reap(self) -> None:
        cutoff = int((time.time() - self.dead_after) * 1000)
        try:
            dead = [d.decode() for d in await self._redis.zrangebyscore(self.names.instances, 0, cutoff)]
        except (RedisError, OSError) as exc:
            raise BackendUnavailable() from exc
        for instance in dead:
            if instance == self.instance_id:
                continue  # we were cut off for a while; the restore re-registers us
            lock = self.names.reap_lock(instance)
            if await self._redis.set(lock, self.instance_id, nx=True, px=int(self.dead_after * 1000)):
                try:
                    await self._reap_instance(instance)
                finally:
                    await self._redis.delete(lock)

    async def _reap_instance(self, instance: str) -> None:
        listener = self._listener
        if listener is None:
            return
        connections = await self._members(self.names.instance_connections(instance))
        for group, visitor, connection in connections:
            drop = partial(presence_rules.drop, connection=connection)
            change = await self.mutate(group, visitor, drop, listener.announcement)
            if change is not None:
                listener.presence_changed(change)
        grace_us = int(self.grace_period * 1_000_000)
        now_us = time.time_ns() // 1000
        pending = 0
        for group, visitor in await self._members(self.names.instance_away(instance)):
            record = await self._read(group, visitor)
            if record.away_since is not None and now_us - record.away_since < grace_us:
                pending += 1  # its grace period is not over yet: a later pass ends it
                continue
            change = await self.mutate(
                group, visitor, partial(presence_rules.expire_away, away_since=None), listener.announcement
            )
            if change is not None:
                listener.presence_changed(change)
            await self._redis.srem(self.names.instance_away(instance), pack((group, visitor)))
        if connections:
            log.warning("reaped %d connections of dead instance %s", len(connections), instance)
        if not pending:
            await self._redis.zrem(self.names.instances, instance)
            await self._redis.delete(self.names.instance_connections(instance), self.names.instance_away(instance))

    # -- held signals --------------------------------------------------------
    async def hold(self, group: str, visitor: str, signal: HeldSignal, ttl: float) -> None:
        key = self.names.held(group, visitor)
        expires = time.time() + ttl
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(key, signal.key, pack((signal.reply_to, signal.frame, signal.to_all, expires)))
                pipe.pexpire(key, int(ttl * 1000))
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise BackendUnavailable() from exc

    async def take_held(self, group: str, visitor: str) -> list[HeldSignal]:
        key = self.names.held(group, visitor)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(key)
                pipe.delete(key)
                raw, _ = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise BackendUnavailable() from exc
        now = time.time()
        held = []
        for name, value in raw.items():
            reply_to, frame, to_all, expires = unpack(value)
            if expires > now:
                held.append(HeldSignal(name.decode(), reply_to, frame, to_all))
        return held

    async def drop_held(self, group: str, visitor: str, key: str) -> bool:
        try:
            return bool(await self._redis.hdel(self.names.held(group, visitor), key))
        except (RedisError, OSError) as exc:
            raise BackendUnavailable() from exc

    # -- records -------------------------------------------------------------
    async def kv_get(self, key: str) -> bytes | None:
        try:
            return await self._redis.get(self.names.record(key))
        except (RedisError, OSError) as exc:
            raise BackendUnavailable() from exc

    async def kv_set(self, key: str, value: bytes, ttl: float | None = None, only_if_absent: bool = False) -> bool:
        expiry = int(ttl * 1000) if ttl is not None else None
        try:
            return bool(await self._redis.set(self.names.record(key), value, px=expiry, nx=only_if_absent))
        except (RedisError, OSError) as exc:
            raise BackendUnavailable() from exc

    async def kv_delete(self, key: str) -> bool:
        try:
            return bool(await self._redis.delete(self.names.record(key)))
        except (RedisError, OSError) as exc:
            raise BackendUnavailable() from exc

    async def kv_update(
        self, key: str, update: Callable[[bytes | None], bytes | None], ttl: float | None = None
    ) -> bytes | None:
        name = self.names.record(key)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                for _ in range(MAX_WATCH_RETRIES):
                    try:
                        await pipe.watch(name)
                        value = update(await pipe.get(name))
                        pipe.multi()
                        if value is None:
                            pipe.delete(name)
                        else:
                            pipe.set(name, value, px=int(ttl * 1000) if ttl is not None else None)
                        await pipe.execute()
                        return value
                    except WatchError:
                        continue
        except (RedisError, OSError) as exc:
            raise BackendUnavailable() from exc
        raise BackendUnavailable(f"{key} is changing too fast to update")

    async def kv_count(self, key: str, window: float) -> int:
        name = self.names.record(key)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.incr(name)
                pipe.pexpire(name, int(window * 1000), nx=True)
                count, _ = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise BackendUnavailable() from exc
        return int(count)
