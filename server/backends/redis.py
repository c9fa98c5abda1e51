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
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

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
from herald_presence.server.tasks import TaskSupervisor, until_done

from .base import Announce, Backend, BackendListener, BackendUnavailable, Mutation
from .redis_batch import CommandBatcher
from .redis_connect import connect

log = logging.getLogger(__name__)
T = TypeVar("T")

CONNECTION_FIELD = b"c:"
MAX_WATCH_RETRIES = 50
# An instance's heartbeat, stamped with Redis's own clock (instances' clocks
# may disagree; Redis's is the one every instance reads). Answers whether the
# instance was missing from the set (it was taken for dead and reaped) and
# Redis's time, against which staleness is judged.
HEARTBEAT_SCRIPT = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
return {redis.call('ZADD', KEYS[1], ms, ARGV[1]), ms}
"""

# A presence change in one round trip: if the visitor's hash still has the
# version the change was computed from (ARGV[1], '' for none), run its writes
# and publishes (the rest of ARGV: each command's length, then the command)
# and answer 1; else answer the hash as it is now, to compute the change again.
STORE_IF_SCRIPT = """
if (redis.call('HGET', KEYS[1], 'version') or '') ~= ARGV[1] then
  return redis.call('HGETALL', KEYS[1])
end
local i = 2
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return 1
"""

# Compare-and-delete in one step (kv_delete_if): no WATCH to lose against other writers.
DELETE_IF_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


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
        self._redis, self._bus = connect(url, command_timeout)
        self._batch = CommandBatcher(self._redis, self.instance_id)  # the hot path's commands
        self._hashes: dict[str, dict[bytes, bytes]] = {}  # visitor key -> its hash as last written here (mutate)
        self._listener: BackendListener | None = None
        self._topics: set[str] = set()
        self._confirmed: dict[bytes, asyncio.Future[None]] = {}
        self._pubsub: Any = None
        self._tasks = TaskSupervisor()  # the bus listener, upkeep and restores: named, logged, cancelled
        self._listen_task: asyncio.Task[None] | None = None
        self._bus_lost = False
        self._redis_ok = False
        self._last_probe = 0.0
        self._beats = 0
        self._last_beat: float | None = None  # monotonic time of the last heartbeat that reached Redis
        self._in_contact_since = 0.0  # monotonic: heartbeats since then with no gap
        self._redis_ms = 0  # Redis's clock at the last heartbeat
        self._resyncs: dict[str, asyncio.Task[None]] = {}  # by what they do: one of each at a time
        self.reconnects = 0

    # -- lifecycle ---------------------------------------------------------
    @property
    def healthy(self) -> bool:
        probe_fresh = time.monotonic() - self._last_probe < self.probe_timeout
        return self._redis_ok and self._pubsub is not None and probe_fresh

    async def start(self, listener: BackendListener) -> None:
        self._listener = listener
        self._listen_task = self._tasks.spawn(self._listen(), f"redis-bus-{self.instance_id}")
        self._tasks.spawn(self._upkeep(), f"redis-upkeep-{self.instance_id}")
        # Serve once the bus works, or start degraded and recover in the background.
        deadline = time.monotonic() + self.command_timeout * 2
        while not self.healthy and time.monotonic() < deadline:
            await self._beat()
            await asyncio.sleep(0.02)
        if not self.healthy:
            log.error("Redis is not reachable yet; serving local connections only until it is")

    async def close(self) -> None:
        """Stop the background work, tell the others we are gone, close the
        connections; each step bounded, so a stuck socket never stops a
        shutdown."""
        await self._tasks.close()
        await self._batch.close()
        for step, name in (
            # Heartbeat 0: our remaining connections and grace periods are now
            # for the other instances to settle.
            (partial(self._redis.zadd, self.names.instances, {self.instance_id: 0}), "last heartbeat"),
            (self._bus.aclose, "closing the bus connection"),
            (self._redis.aclose, "closing the command connections"),
            (self._redis.connection_pool.disconnect, "closing the command connections"),
        ):
            try:
                async with asyncio.timeout(self.command_timeout * 2):
                    await step()
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("closing: %s failed (%r); going on", name, exc)

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

    async def _watched(self, key: str, step: Callable[[Any], Awaitable[T]], what: str) -> T:
        """Run ``step(pipe)`` as an optimistic transaction on ``key``: it reads
        what it needs, then queues its writes after ``pipe.multi()`` and
        executes them (or unwatches and returns early). Another writer of the
        key in between makes EXEC fail, and ``step`` runs again on its result."""
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                for _ in range(MAX_WATCH_RETRIES):
                    try:
                        await pipe.watch(key)
                        return await step(pipe)
                    except WatchError:
                        continue
        except (RedisError, OSError) as exc:
            raise BackendUnavailable() from exc
        raise BackendUnavailable(f"{what} is changing too fast to update")

    async def mutate(self, group: str, visitor: str, mutation: Mutation, announce: Announce) -> PresenceChange | None:
        """Compute the change from the visitor's hash as this instance last
        wrote it (visitors with a connection or a grace period here), or
        from none, and store it if Redis still has that version
        (``STORE_IF_SCRIPT``): one round trip, no WATCH, no pooled
        connection held. Redis answers a newer hash instead, and the change
        is computed again from it."""
        key = self.names.visitor(group, visitor)
        raw = self._hashes.get(key) or {}  # else assumed absent until Redis says otherwise
        read = False  # whether raw is what Redis answered in this call
        for _ in range(MAX_WATCH_RETRIES):
            record, away_by = self._load(group, visitor, raw)
            before = ({c: r.instance for c, r in record.connections.items()}, record.away_since, away_by)
            change = mutation(record)
            if change is None and not read:
                raw, read = await self._batch.call("HGETALL", key), True  # nothing to do: is that still so?
                continue
            if change is None:
                self._remember(key, record, raw)
                return None
            stored, commands = self._store(record, raw, *before)
            commands += [("PUBLISH", self.names.channel(topic), message) for topic, message in announce(change)]
            flat = [item for command in commands for item in (len(command), *command)]
            answer = await self._batch.script(STORE_IF_SCRIPT, 1, key, raw.get(b"version", b""), *flat)
            if answer == 1:
                self._remember(key, record, stored)
                return change
            raw, read = dict(zip(answer[::2], answer[1::2], strict=True)), True
        raise BackendUnavailable(f"visitor {visitor} is changing too fast to update")

    def _remember(self, key: str, record: VisitorRecord, stored: dict[bytes, bytes]) -> None:
        """Keep the hash just written while its visitor's connections or grace period are here."""
        here = self.instance_id
        if any(c.instance == here for c in record.connections.values()) or stored.get(b"away_by") == here.encode():
            self._hashes[key] = stored
        else:
            self._hashes.pop(key, None)

    def _store(
        self,
        record: VisitorRecord,
        raw: dict[bytes, bytes],
        connections_before: dict[str, str],
        away_before: int | None,
        away_by_before: str | None,
    ) -> tuple[dict[bytes, bytes], list[tuple[str | bytes, ...]]]:
        """The visitor's hash as Redis will hold it, and the commands that
        take it there from ``raw`` (what Redis holds, as the version check
        makes sure: only the fields that changed are written) and keep the
        sets that index it in step."""
        group, visitor = record.group, record.visitor
        key, online = self.names.visitor(group, visitor), self.names.online(group)
        away_by = None
        if record.away_since is not None:
            away_by = away_by_before if record.away_since == away_before else self.instance_id
        stored: dict[bytes, bytes] = {b"version": b"%d" % record.version}
        if record.online:
            if record.away_since is not None and away_by is not None:
                stored.update({b"away": b"%d" % record.away_since, b"away_by": away_by.encode()})
            for c in record.connections.values():
                fields = (c.instance, c.data, c.visible, c.since, c.active)
                stored[CONNECTION_FIELD + c.connection.encode()] = pack(fields)
        commands: list[tuple[str | bytes, ...]] = []
        if gone := [field for field in raw if field not in stored]:
            commands.append(("HDEL", key, *gone))
        commands.append(("HSET", key, *(item for f, v in stored.items() if raw.get(f) != v for item in (f, v))))
        was_online = b"away" in raw or any(field.startswith(CONNECTION_FIELD) for field in raw)
        if record.online and not was_online:
            commands += [("PERSIST", key), ("SADD", online, visitor)]  # a tombstone no more
        elif not record.online:
            commands += [("PEXPIRE", key, b"%d" % self.tombstone_ms), ("SREM", online, visitor)]
        connections_after = {c: r.instance for c, r in record.connections.items()}
        for connection, instance in connections_before.items():
            if connection not in connections_after:
                commands.append(("SREM", self.names.instance_connections(instance), pack((group, visitor, connection))))
        for connection, instance in connections_after.items():
            if connection not in connections_before:
                commands.append(("SADD", self.names.instance_connections(instance), pack((group, visitor, connection))))
        if away_by_before and away_by_before != away_by:
            commands.append(("SREM", self.names.instance_away(away_by_before), pack((group, visitor))))
        if away_by and away_by != away_by_before:
            commands.append(("SADD", self.names.instance_away(away_by), pack((group, visitor))))
        return stored, commands

    async def _read(self, group: str, visitor: str) -> VisitorRecord:
        raw = await self._batch.call("HGETALL", self.names.visitor(group, visitor))
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
        return int(await self._batch.call("PUBLISH", self.names.channel(topic), message))

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
                    self._tasks.spawn(self._restore(), f"redis-restore-{self.instance_id}")
                async for message in pubsub.listen():
                    self._dispatch(message)
                    backoff = 0.05
            except (RedisError, OSError) as exc:
                log.warning("Redis pub/sub connection lost: %r", exc)
            except Exception:
                # Whatever a broken connection raises (during a failover redis-py
                # can raise RuntimeError from a closed transport), this loop
                # must outlive it: without it the instance never resubscribes.
                log.exception("Redis pub/sub failed; reconnecting")
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
        self._until_done("backend_restored")

    def _until_done(self, callback: str) -> None:
        """Call the listener's ``callback`` (``backend_restored`` or
        ``registrations_lost``) until it succeeds: a fault that outlives the
        first attempt must not leave this instance's visitors unregistered.
        One of each at a time: a call that starts later covers what the
        earlier trigger asked for."""
        running = self._resyncs.get(callback)
        if running is None or running.done():
            self._resyncs[callback] = self._tasks.spawn(self._retry(callback), f"redis-{callback}-{self.instance_id}")

    async def _retry(self, callback: str) -> None:
        listener = self._listener
        if listener is not None:
            await until_done(getattr(listener, callback), callback)

    # -- liveness ----------------------------------------------------------
    async def _upkeep(self) -> None:
        """Heartbeat, probe our own subscription, reap dead instances.

        Liveness that survives a stall: an instance is dead when its last
        heartbeat is older than ``dead_after`` by Redis's clock, and only an
        instance that has itself been heartbeating without a gap for a full
        ``dead_after`` may reap. After a Redis stall (or a failover, or this
        instance being frozen or cut off), every survivor's contact starts
        again, so each has a full ``dead_after`` to heartbeat before anyone
        judges it; an instance that was really gone is reaped ``dead_after``
        after contact resumed. An instance that finds itself missing from
        the heartbeat set (it was reaped while cut off or frozen) registers
        its live connections again at once."""
        while True:
            await asyncio.sleep(self.heartbeat)
            try:
                await self._beat()
                if self._pubsub is not None and time.monotonic() - self._last_probe > self.probe_timeout:
                    log.warning("Redis pub/sub stopped delivering (probe lost); reconnecting it")
                    await self._restart_listener()
                if self._redis_ok:
                    await self._reap()
            except BackendUnavailable:
                pass  # Redis went away mid-way: the next heartbeat tries again
            except Exception:
                # Upkeep must outlive any one bad pass: without heartbeats the
                # other instances would reap this one's live visitors.
                log.exception("Redis upkeep failed; trying again at the next heartbeat")

    async def _beat(self) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.eval(HEARTBEAT_SCRIPT, 1, self.names.instances, self.instance_id)
                pipe.publish(self._probe_channel, b"probe")
                (missing, redis_ms), _ = await pipe.execute()
        except (RedisError, OSError) as exc:
            if self._redis_ok:
                log.warning("Redis unreachable: %r", exc)
            self._redis_ok = False
            return
        now = time.monotonic()
        if self._last_beat is None or now - self._last_beat > self.heartbeat + self.command_timeout:
            self._in_contact_since = now  # a gap: judging the others starts again
        self._last_beat, self._redis_ms, self._redis_ok = now, int(redis_ms), True
        if missing and self._beats:
            log.warning("this instance was taken for dead and reaped; registering its connections again")
            self._until_done("registrations_lost")
        self._beats += 1

    async def _restart_listener(self) -> None:
        """Drop the pub/sub connection and start over (the old one is fully
        gone before the new one starts)."""
        old = self._listen_task
        if old is not None:
            old.cancel()
            await asyncio.wait([old])  # unlike awaiting it, never swallows our own cancellation
        self._bus_lost = True
        self._listen_task = self._tasks.spawn(self._listen(), f"redis-bus-{self.instance_id}")

    async def _reap(self) -> None:
        if time.monotonic() - self._in_contact_since < self.dead_after:
            return  # not in contact long enough to tell a dead instance from a stalled Redis
        cutoff = self._redis_ms - int(self.dead_after * 1000)
        try:
            dead = [d.decode() for d in await self._redis.zrangebyscore(self.names.instances, 0, cutoff)]
            for instance in dead:
                if instance == self.instance_id:
                    continue  # we were cut off for a while; the restore re-registers us
                lock = self.names.reap_lock(instance)
                if await self._redis.set(lock, self.instance_id, nx=True, px=_ms(self.dead_after)):
                    try:
                        await self._reap_instance(instance)
                    finally:
                        await self._redis.delete(lock)
        except (RedisError, OSError) as exc:
            raise BackendUnavailable() from exc

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
    # A held signal is the field <key> of the visitor's held hash: msgpack
    # [reply_to, frame, to_all, answer_by, expires (unix s), claimed].
    async def hold(self, group: str, visitor: str, signal: HeldSignal, ttl: float) -> None:
        key = self.names.held(group, visitor)
        ms = _ms(ttl)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(key, signal.key, _pack_held(signal, time.time() + ttl, claimed=False))
                # The hash lives as long as its longest-lived signal.
                pipe.pexpire(key, ms, nx=True)
                pipe.pexpire(key, ms, gt=True)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise BackendUnavailable() from exc

    async def take_held(self, group: str, visitor: str) -> list[tuple[HeldSignal, bool]]:
        key = self.names.held(group, visitor)
        if not await self._batch.call("EXISTS", key):
            return []  # every visitor connect asks; almost always nothing is held (one batched command)

        async def step(pipe: Any) -> list[tuple[HeldSignal, bool]]:
            raw = await pipe.hgetall(key)
            if not raw:
                await pipe.unwatch()
                return []
            now, taken = time.time(), []
            pipe.multi()
            for name, value in raw.items():
                reply_to, frame, to_all, answer_by, expires, claimed = unpack(value)
                signal = HeldSignal(name.decode(), reply_to, frame, to_all, answer_by)
                if expires <= now or not to_all:
                    pipe.hdel(key, name)
                elif not claimed:
                    pipe.hset(key, name, _pack_held(signal, expires, claimed=True))
                if expires > now:
                    taken.append((signal, not claimed))
            await pipe.execute()
            return taken

        return await self._watched(key, step, f"held signals of {visitor}")

    async def drop_held(self, group: str, visitor: str, key: str) -> bool:
        name = self.names.held(group, visitor)

        async def step(pipe: Any) -> bool:
            value = await pipe.hget(name, key)
            if value is None or unpack(value)[-1]:  # gone, or claimed by a taker
                await pipe.unwatch()
                return False
            pipe.multi()
            pipe.hdel(name, key)
            await pipe.execute()
            return True

        return await self._watched(name, step, f"held signals of {visitor}")

    # -- records -------------------------------------------------------------
    async def kv_get(self, key: str) -> bytes | None:
        return await self._batch.call("GET", self.names.record(key))  # on every visitor connect: batched

    async def kv_set(self, key: str, value: bytes, ttl: float | None = None, only_if_absent: bool = False) -> bool:
        expiry = _ms(ttl) if ttl is not None else None
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

        async def step(pipe: Any) -> bytes | None:
            value = update(await pipe.get(name))
            pipe.multi()
            if value is None:
                pipe.delete(name)
            elif ttl is None:
                pipe.set(name, value, keepttl=True)
            else:
                pipe.set(name, value, px=_ms(ttl))
            await pipe.execute()
            return value

        return await self._watched(name, step, key)

    async def kv_swap(self, key: str, value: bytes | None, ttl: float | None = None) -> bytes | None:
        name = self.names.record(key)
        try:
            if value is None:
                return await self._redis.getdel(name)
            expiry = _ms(ttl) if ttl is not None else None
            return await self._redis.set(name, value, px=expiry, get=True)
        except (RedisError, OSError) as exc:
            raise BackendUnavailable() from exc

    async def kv_delete_if(self, key: str, value: bytes) -> bool:
        try:
            return bool(await self._redis.eval(DELETE_IF_SCRIPT, 1, self.names.record(key), value))
        except (RedisError, OSError) as exc:
            raise BackendUnavailable() from exc

    async def kv_count(self, key: str, window: float) -> int:
        name = self.names.record(key)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.incr(name)
                pipe.pexpire(name, _ms(window), nx=True)
                count, _ = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise BackendUnavailable() from exc
        return int(count)


def _ms(seconds: float) -> int:
    """A ttl in Redis's milliseconds: rounded up, so any positive ttl expires
    (``PX 0`` is an error, not an instant expiry)."""
    return max(1, math.ceil(seconds * 1000))


def _pack_held(signal: HeldSignal, expires: float, claimed: bool) -> bytes:
    return pack((signal.reply_to, signal.frame, signal.to_all, signal.answer_by, expires, claimed))
