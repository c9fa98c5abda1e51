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

A presence change is one script (``STORE_IF_SCRIPT``): if the visitor's
hash still has the version the change was computed from, write it, the
group's sets that index it and its announcements, all in one step; so one
visitor's versions and announcements stay in order across instances. Every
key and channel that step touches carries the group's hash tag (one slot of
a Redis Cluster); the one thing outside it, the instance's index of groups
(``RedisNames.instance_groups``), is written before, idempotently, and
written again whenever the instance registers again.

A record's write that carries events for the group's log (``LogWrite``: a
session started, joined, left or ended, a code made or used) is one script
too (``RECORD_SCRIPT``), the log's writes and the record's in the group's
slot; so is a publish with its event (``PUBLISH_LOGGED_SCRIPT``: a visitor's
terms answer).

Pub/sub runs on its own connection (on a Redis Cluster one per shard,
sharded pub/sub: ``SSUBSCRIBE``/``SPUBLISH``), without silent retries: when
one drops, a probe published to ourselves (one per shard) does not come
back, or the cluster's slot map moves, the instance resubscribes and tells
the listener, which re-registers its connections and resyncs its agents.
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

from redis.exceptions import WatchError

from herald_presence.protocol.messages import VisitorState
from herald_presence.server.model import presence_rules
from herald_presence.server.model.names import RedisNames, event_log_group, pack, unpack
from herald_presence.server.model.records import (
    ConnectionRecord,
    HeldSignal,
    PresenceChange,
    VisitorRecord,
    offline_state,
)
from herald_presence.server.tasks import TaskSupervisor, until_done

from .base import (
    Announce,
    Arrival,
    Backend,
    BackendListener,
    BackendUnavailable,
    Changed,
    LogWrite,
    Mutation,
    Refused,
)
from .redis_batch import CommandBatcher, unpack_messages
from .redis_cluster import REDIS_ERRORS, ClusterBatcher, Shards, Topology
from .redis_connect import connect
from .redis_events import LOG_LIB, LOG_WRITE, RedisEventLog
from .redis_socket import read_messages

log = logging.getLogger(__name__)
T = TypeVar("T")
Command = tuple[Any, ...]  # (name, key the command writes or None, arguments...)

CONNECTION_FIELD = b"c:"
MESSAGES = (b"message", b"smessage")  # pub/sub kinds of what a channel carried (``smessage``: a cluster shard's)
SUBSCRIBED = (b"subscribe", b"ssubscribe")
MAX_WATCH_RETRIES = 50
# An instance's heartbeat, stamped with Redis's own clock (instances' clocks
# may disagree; Redis's is the one every instance reads). Answers whether the
# instance was missing from the set (it was taken for dead and reaped) and
# Redis's time, against which staleness is judged.
HEARTBEAT_SCRIPT = """#!lua
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
return {redis.call('ZADD', KEYS[1], ms, ARGV[1]), ms}
"""

# A presence change in one round trip: if the visitor's hash (KEYS[1]) still
# has the version the change was computed from (ARGV[1], '' for none), run
# its writes and publishes and answer 1; else answer the hash as it is now,
# to compute the change again. With a guard key (ARGV[2]: its index in KEYS,
# 0: none) that exists, nothing happens and the answer is {{its value}} (a
# hash is never nested). A joining connection's reads (ARGV[3] and ARGV[4]:
# the session index's and the held signals' indexes in KEYS, 0: none) make
# the answer {1, the index's value, whether signals are held}, read after
# the writes. The rest of ARGV (from ARGV[5]) is the commands, each as its
# length n, its name, the index in KEYS of the key it writes (0: none, a
# publish), then its other arguments: every key it touches is declared, and
# ``#!lua`` makes Redis refuse any that is not in the same slot.
STORE_IF_SCRIPT = """#!lua
local guard = tonumber(ARGV[2])
if guard > 0 then
  local held = redis.call('GET', KEYS[guard])
  if held then return {{held}} end
end
if (redis.call('HGET', KEYS[1], 'version') or '') ~= ARGV[1] then
  return redis.call('HGETALL', KEYS[1])
end
local i = 5
while i <= #ARGV do
  local n, k = tonumber(ARGV[i]), tonumber(ARGV[i + 2])
  if k == 0 then
    redis.call(ARGV[i + 1], unpack(ARGV, i + 3, i + n))
  else
    redis.call(ARGV[i + 1], KEYS[k], unpack(ARGV, i + 3, i + n))
  end
  i = i + n + 1
end
local session, held = tonumber(ARGV[3]), tonumber(ARGV[4])
if session > 0 then
  return {1, redis.call('GET', KEYS[session]), redis.call('EXISTS', KEYS[held])}
end
return 1
"""

# Compare-and-delete in one step (kv_delete_if): no WATCH to lose against other writers.
DELETE_IF_SCRIPT = """#!lua
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# A record's write and its event-log write (``LogWrite``) in one step. KEYS[1]: the record,
# then the log's (``RedisEventLog.write_args``). ARGV: how (``set``; ``add``: only if absent;
# ``swap``: logged only if it replaced a live value; ``if``: only if the record still is as
# read: absent when ARGV[5] is 0, else ARGV[6]), whether there is a value (1) or the record goes
# (0), the value, its ttl (ms; '' none; 'keep' its own), ARGV[5] and ARGV[6], whether a log
# write follows (1: its arguments from ARGV[8]). The log's writes go first: one Redis refuses
# stops the script before the record is touched. Answers {written (1 or 0), the record before,
# which claims found their timer}.
RECORD_SCRIPT = (
    "#!lua\n"
    + LOG_LIB
    + LOG_WRITE
    + """
local mode, before = ARGV[1], redis.call('GET', KEYS[1])
if mode == 'add' and before then return {0, before, {}} end
if mode == 'if' and ((ARGV[5] == '0' and before) or (ARGV[5] == '1' and before ~= ARGV[6])) then
  return {0, before, {}}
end
local claimed = {}
if ARGV[7] == '1' and (mode ~= 'swap' or before) then claimed = write_log(2, 8) end
if ARGV[2] == '0' then
  redis.call('DEL', KEYS[1])
elseif ARGV[4] == '' then
  redis.call('SET', KEYS[1], ARGV[3])
elseif ARGV[4] == 'keep' then
  redis.call('SET', KEYS[1], ARGV[3], 'KEEPTTL')
else
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
end
return {1, before, claimed}
"""
)

# Publishes and their event-log write in one step (the log's first: a write Redis refuses
# stops the script before any publish). ARGV: the publish command, how many, each channel and
# message, then the log's arguments; KEYS: the log's. Answers {each publish's count, which
# claims found their timer}.
PUBLISH_LOGGED_SCRIPT = (
    "#!lua\n"
    + LOG_LIB
    + LOG_WRITE
    + """
local count, reached = tonumber(ARGV[2]), {}
local claimed = write_log(1, 3 + 2 * count)
for i = 1, count do reached[i] = redis.call(ARGV[1], ARGV[1 + 2 * i], ARGV[2 + 2 * i]) end
return {reached, claimed}
"""
)


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
        ca_file: str = "",
    ) -> None:
        self.instance_id = instance_id or uuid.uuid4().hex[:12]
        self.names = RedisNames(prefix)
        self._probe_channel = self.names.probe(self.instance_id)
        self._probes: dict[bytes, float] = {self._probe_channel: 0.0}  # probe channel -> when it last came back
        self.grace_period = grace_period
        self.heartbeat = heartbeat
        self.dead_after = dead_after
        self.probe_timeout = probe_timeout
        self.command_timeout = command_timeout
        self.tombstone_ms = int(tombstone_ttl * 1000)
        clients = connect(url, command_timeout, ca_file)
        self._redis, self._bus, self._node_options = clients.commands, clients.bus, clients.node_options
        # A Redis Cluster: commands to their slot's master, sharded pub/sub.
        self._topology = Topology(clients.cluster) if clients.cluster is not None else None
        self._publish = "SPUBLISH" if self._topology else "PUBLISH"
        self._batch: CommandBatcher | ClusterBatcher  # the hot path's commands
        if self._topology is None:
            self._batch = CommandBatcher(self._redis, self.instance_id)
        else:
            self._batch = ClusterBatcher(self._topology, self.instance_id)
        self.events = RedisEventLog(self._batch, self.names)  # webhooks and the audit trail (redis_events.py)
        self.events.ordered_with_publishes = self._topology is None
        self._indexed: set[str] = set()  # groups in this instance's index (instance_groups), as far as we know
        self._groups_here: set[str] = set()  # every group this instance ever indexed: indexed again on restores
        self._leaving: dict[bytes, int] = {}  # sharded channels we asked to leave, not yet confirmed
        self._hashes: dict[str, dict[bytes, bytes]] = {}  # visitor key -> its hash as last written here (mutate)
        self._listener: BackendListener | None = None
        self._topics: set[str] = set()
        self._confirmed: dict[bytes, asyncio.Future[None]] = {}
        self._pubsub: Any = None
        self._tasks = TaskSupervisor()  # the bus listener, upkeep and restores: named, logged, cancelled
        self._listen_task: asyncio.Task[None] | None = None
        self._bus_lost = False
        self._redis_ok = False
        self._last_error: BaseException | None = None  # why the last heartbeat failed
        self._beats = 0
        self._last_beat: float | None = None  # monotonic time of the last heartbeat that reached Redis
        self._in_contact_since = 0.0  # monotonic: heartbeats since then with no gap
        self._redis_ms = 0  # Redis's clock at the last heartbeat
        self._resyncs: dict[str, asyncio.Task[None]] = {}  # by what they do: one of each at a time
        self.reconnects = 0

    # -- lifecycle ---------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self._redis_ok and self._pubsub is not None and not self._stale_probes()

    def _stale_probes(self) -> bool:
        """A probe (of any shard) has not come back within ``probe_timeout``."""
        oldest = time.monotonic() - self.probe_timeout
        return any(seen <= oldest for seen in self._probes.values())

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
            error = self._last_error
            why = f" ({type(error).__name__}: {error})" if error is not None else ""
            log.error("Redis is not reachable yet%s; serving local connections only until it is", why)

    async def close(self) -> None:
        """Stop the background work, tell the others we are gone, close the
        connections; each step bounded, so a stuck socket never stops a
        shutdown."""
        await self._tasks.close()
        await self._batch.close()
        steps: list[tuple[Callable[[], Awaitable[Any]], str]] = [
            # Heartbeat 0: our remaining connections and grace periods are now
            # for the other instances to settle.
            (partial(self._redis.zadd, self.names.instances, {self.instance_id: 0}), "last heartbeat"),
        ]
        if self._topology is not None:
            steps += [(self._topology.close, "stopping the slot map's refresh")]
            steps += [(self._redis.aclose, "closing the command connections")]
        else:
            assert self._bus is not None
            steps += [(self._bus.aclose, "closing the bus connection")]
            steps += [(self._redis.aclose, "closing the command connections")]
            steps += [(self._redis.connection_pool.disconnect, "closing the command connections")]
        for step, name in steps:
            try:
                async with asyncio.timeout(self.command_timeout * 2):
                    await step()
            except (*REDIS_ERRORS, TimeoutError) as exc:
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
        except REDIS_ERRORS as exc:
            raise BackendUnavailable() from exc
        raise BackendUnavailable(f"{what} is changing too fast to update")

    async def mutate(
        self, group: str, visitor: str, mutation: Mutation, announce: Announce, arrival: Arrival | None = None
    ) -> PresenceChange | None:
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
            stored, commands, indexed = self._store(record, raw, *before)
            publish = self._publish
            for topic, message in announce(change):
                logged = event_log_group(topic)  # the change's event (visitor.online/offline): logged in this step
                if logged is not None:
                    commands += self.events.append_commands(logged, message)
                else:
                    commands.append((publish, None, self.names.channel(topic), message))
            for instance in indexed:
                await self._index(group, instance)
            args = _script_args(key, raw.get(b"version", b""), commands, self._arrival_keys(group, visitor, arrival))
            answer = await self._batch.script(STORE_IF_SCRIPT, *args)
            if answer == 1 or (answer and answer[0] == 1):
                self._remember(key, record, stored)
                if arrival is not None:
                    arrival.session, arrival.held, arrival.read = answer[1], bool(answer[2]), True
                return change
            if answer and isinstance(answer[0], list):
                raise Refused(answer[0][0])
            raw, read = dict(zip(answer[::2], answer[1::2], strict=True)), True
        raise BackendUnavailable(f"visitor {visitor} is changing too fast to update")

    def _arrival_keys(self, group: str, visitor: str, arrival: Arrival | None) -> tuple[str, str, str] | None:
        """The guard, session-index and held-signals keys of a joining connection's registration."""
        if arrival is None:
            return None
        names = self.names
        return names.record(arrival.refused_by), names.record(arrival.session_key), names.held(group, visitor)

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
    ) -> tuple[dict[bytes, bytes], list[Command], set[str]]:
        """The visitor's hash as Redis will hold it, the commands that
        take it there from ``raw`` (what Redis holds, as the version check
        makes sure: only the fields that changed are written) and keep the
        group's sets that index it in step, and the instances that gain a
        member in those sets (each must have the group in its index first)."""
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
        commands: list[Command] = []
        if gone := [field for field in raw if field not in stored]:
            commands.append(("HDEL", key, *gone))
        commands.append(("HSET", key, *(item for f, v in stored.items() if raw.get(f) != v for item in (f, v))))
        was_online = b"away" in raw or any(field.startswith(CONNECTION_FIELD) for field in raw)
        if record.online and not was_online:
            commands += [("PERSIST", key), ("SADD", online, visitor)]  # a tombstone no more
        elif not record.online:
            commands += [("PEXPIRE", key, b"%d" % self.tombstone_ms), ("SREM", online, visitor)]
        connections_after = {c: r.instance for c, r in record.connections.items()}
        indexed: set[str] = set()
        for connection, instance in connections_before.items():
            if connection not in connections_after:
                commands.append(("SREM", self.names.instance_connections(group, instance), pack((visitor, connection))))
        for connection, instance in connections_after.items():
            if connection not in connections_before:
                commands.append(("SADD", self.names.instance_connections(group, instance), pack((visitor, connection))))
                indexed.add(instance)
        if away_by_before and away_by_before != away_by:
            commands.append(("SREM", self.names.instance_away(group, away_by_before), visitor))
        if away_by and away_by != away_by_before:
            commands.append(("SADD", self.names.instance_away(group, away_by), visitor))
            indexed.add(away_by)
        return stored, commands, indexed

    async def _index(self, group: str, instance: str) -> None:
        """Make sure ``group`` is in ``instance``'s index before a member of
        its sets in that group is written: whoever reaps the instance finds
        its sets from there. Once per group while nothing was lost (a
        restore indexes every group again: ``_reindex``)."""
        if instance == self.instance_id and group in self._indexed:
            return
        await self._batch.call("SADD", self.names.instance_groups(instance), group)
        if instance == self.instance_id:
            self._indexed.add(group)
            self._groups_here.add(group)

    async def _reindex(self) -> None:
        """Before registering again (this instance was reaped, or Redis lost
        what it held): every group it ever indexed goes back in its index."""
        self._indexed.clear()
        if self._groups_here:
            groups = sorted(self._groups_here)
            await self._batch.call("SADD", self.names.instance_groups(self.instance_id), *groups)
            self._indexed.update(groups)

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
        except REDIS_ERRORS as exc:
            raise BackendUnavailable() from exc
        records = (self._load(group, visitor, raw)[0] for visitor, raw in zip(members, raws, strict=True))
        return [record.state() for record in records if record.online]

    async def registered_connections(self) -> list[tuple[str, str, str]]:
        return [(g, v, c) for g, v, c, _key, _member in await self._registered(self.instance_id)]

    async def _registered(self, instance: str) -> list[tuple[str, str, str, str, bytes]]:
        """(group, visitor, connection, set, member) of every connection ``instance`` registered."""
        try:
            groups = sorted(g.decode() for g in await self._redis.smembers(self.names.instance_groups(instance)))
            found = []
            for group in groups:
                key = self.names.instance_connections(group, instance)
                for member in await self._redis.smembers(key):
                    visitor, connection = unpack(member)
                    found.append((group, visitor, connection, key, member))
            if self._topology is None:  # a dead instance of the layout before groups had sets (standalone only)
                key = self.names.legacy_instance_sets(instance)[0]
                for member in await self._redis.smembers(key):
                    group, visitor, connection = unpack(member)
                    found.append((group, visitor, connection, key, member))
            return found
        except REDIS_ERRORS as exc:
            raise BackendUnavailable() from exc

    async def _away(self, instance: str) -> list[tuple[str, str, str, bytes]]:
        """(group, visitor, set, member) of every grace period ``instance`` runs."""
        try:
            groups = sorted(g.decode() for g in await self._redis.smembers(self.names.instance_groups(instance)))
            found = []
            for group in groups:
                key = self.names.instance_away(group, instance)
                found += [(group, member.decode(), key, member) for member in await self._redis.smembers(key)]
            if self._topology is None:
                key = self.names.legacy_instance_sets(instance)[1]
                for member in await self._redis.smembers(key):
                    group, visitor = unpack(member)
                    found.append((group, visitor, key, member))
            return found
        except REDIS_ERRORS as exc:
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
            except (*REDIS_ERRORS, BackendUnavailable) as exc:
                if self._confirmed.get(channel) is confirmed:  # not sent: the next call sends it again
                    del self._confirmed[channel]
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
            if self._topology is not None:
                self._leaving[channel] = self._leaving.get(channel, 0) + 1
            with contextlib.suppress(*REDIS_ERRORS, BackendUnavailable):
                await self._pubsub.unsubscribe(channel)

    async def publish(self, topic: str, message: bytes) -> int:
        return int(await self._batch.call(self._publish, self.names.channel(topic), message))

    async def publish_all(self, messages: list[tuple[str, bytes]], log: LogWrite) -> list[int]:
        """One script in the group's slot (its channels carry the group's hash tag)."""
        keys, args = self.events.write_args(log)
        channels = [item for topic, message in messages for item in (self.names.channel(topic), message)]
        reached, claimed = await self._batch.script(
            PUBLISH_LOGGED_SCRIPT, len(keys), *keys, self._publish, len(messages), *channels, *args
        )
        log.done([bool(took) for took in claimed])
        return [int(count) for count in reached]

    async def _listen(self) -> None:
        """Own the one pub/sub connection: (re)subscribe, dispatch, notice loss."""
        if self._topology is not None:
            await self._listen_shards(self._topology)
            return
        assert self._bus is not None
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
                backoff = 0.05
                await read_messages(pubsub, self._dispatch)
            except REDIS_ERRORS as exc:
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

    async def _listen_shards(self, topology: Topology) -> None:
        """``_listen`` on a Redis Cluster: one pub/sub connection per shard
        (``Shards``), a probe channel in each; any of them lost, and all are
        made again from a fresh slot map."""
        backoff = 0.05
        while True:
            shards: Shards | None = None
            readers: list[asyncio.Task[None]] = []
            try:
                await topology.refresh()
                shards = Shards(topology, self._node_options)
                loop = asyncio.get_running_loop()
                self._confirmed = {self.names.channel(t): loop.create_future() for t in self._topics}
                probes = shards.probes(partial(self.names.probe, self.instance_id))
                now = time.monotonic()
                self._probes = dict.fromkeys(probes, now)  # each shard has probe_timeout to answer
                self._confirmed.update({probe: loop.create_future() for probe in probes})
                self._leaving.clear()
                await shards.subscribe(*self._confirmed)
                self._pubsub = shards
                readers = [loop.create_task(self._read_shard(pubsub)) for pubsub in shards.readers()]
                if self._bus_lost:
                    self._tasks.spawn(self._restore(), f"redis-restore-{self.instance_id}")
                backoff = 0.05
                done, _ = await asyncio.wait(readers, return_when=asyncio.FIRST_COMPLETED)
                for reader in done:
                    reader.result()  # its error, if it failed
                log.warning("a Redis Cluster shard's pub/sub ended; subscribing again")
            except (*REDIS_ERRORS, BackendUnavailable) as exc:
                log.warning("Redis Cluster pub/sub connection lost: %r", exc)
            except Exception:
                log.exception("Redis Cluster pub/sub failed; reconnecting")  # as in _listen: outlive anything
            finally:
                self._pubsub = None
                self._bus_lost = True
                for reader in readers:
                    reader.cancel()
                if readers:
                    await asyncio.wait(readers)
                if shards is not None:
                    await shards.close()
                topology.stale()  # whatever failed may be a failover: read the map again
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def _read_shard(self, pubsub: Any) -> None:
        await read_messages(pubsub, self._dispatch)

    def _dispatch(self, kind: bytes, channel: bytes, data: Any) -> None:
        if kind in MESSAGES:
            if channel in self._probes:
                self._probes[channel] = time.monotonic()
            elif self._listener is not None:
                topic = self.names.topic(channel)
                for message in unpack_messages(data):  # one, or a batch's (``coalesced``)
                    self._listener.on_bus_message(topic, message)
        elif kind in SUBSCRIBED:
            confirmed = self._confirmed.get(channel)
            if confirmed is not None and not confirmed.done():
                confirmed.set_result(None)
            if channel in self._probes:
                self._probes[channel] = time.monotonic()
        elif kind == b"sunsubscribe":
            leaving = self._leaving.pop(channel, 0)
            if leaving > 1:
                self._leaving[channel] = leaving - 1
            elif not leaving and channel in self._confirmed:
                # Not asked for: the channel's slot left that shard (migrated).
                log.warning("Redis Cluster moved subscribed channel %r; subscribing again", channel)
                self._tasks.spawn(self._restart_listener(), f"redis-resubscribe-{self.instance_id}")

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
            call = getattr(listener, callback)

            async def register_again() -> None:
                await self._reindex()  # what we registered may be gone: our index of groups too
                await call()

            await until_done(register_again, callback)

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
                if self._pubsub is not None and self._stale_probes():
                    log.warning("Redis pub/sub stopped delivering (probe lost); reconnecting it")
                    await self._restart_listener()
                elif isinstance(self._pubsub, Shards) and self._pubsub.moved():
                    log.warning("the Redis Cluster's slot map changed; subscribing again")
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
            if self._topology is None:
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.eval(HEARTBEAT_SCRIPT, 1, self.names.instances, self.instance_id)
                    pipe.publish(self._probe_channel, b"probe")
                    (missing, redis_ms), _ = await pipe.execute()
            else:  # the heartbeat to its key's shard, a probe to every shard
                beat = self._batch.script(HEARTBEAT_SCRIPT, 1, self.names.instances, self.instance_id)
                probes = [self._batch.call("SPUBLISH", probe, b"probe") for probe in self._probes]
                answers = await asyncio.gather(beat, *probes, return_exceptions=True)
                if isinstance(answers[0], BaseException):
                    raise answers[0]
                missing, redis_ms = answers[0]
        except (*REDIS_ERRORS, BackendUnavailable) as exc:
            self._last_error = exc.__cause__ if isinstance(exc, BackendUnavailable) and exc.__cause__ else exc
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
        except REDIS_ERRORS as exc:
            raise BackendUnavailable() from exc

    async def _reap_instance(self, instance: str) -> None:
        """Drop a dead instance's connections and end the grace periods it
        ran (once over), group by group, each in its group's slot; then
        forget it: its index, then its heartbeat. Members are removed one by
        one as they are settled, never their sets at once, so a registration
        the instance makes meanwhile (it was only cut off) is not lost; and
        an instance that finds itself gone from the heartbeats indexes all
        its groups again."""
        listener = self._listener
        if listener is None:
            return
        connections = await self._registered(instance)
        try:
            for group, visitor, connection, key, member in connections:
                drop = partial(presence_rules.drop, connection=connection)
                change = await self.mutate(group, visitor, drop, listener.announcement)
                if change is not None:
                    listener.presence_changed(change)
                else:  # gone already: only its member is left
                    await self._redis.srem(key, member)
            grace_us = int(self.grace_period * 1_000_000)
            now_us = time.time_ns() // 1000
            pending = 0
            for group, visitor, key, member in await self._away(instance):
                record = await self._read(group, visitor)
                if record.away_since is not None and now_us - record.away_since < grace_us:
                    pending += 1  # its grace period is not over yet: a later pass ends it
                    continue
                change = await self.mutate(
                    group, visitor, partial(presence_rules.expire_away, away_since=None), listener.announcement
                )
                if change is not None:
                    listener.presence_changed(change)
                await self._redis.srem(key, member)
            if connections:
                log.warning("reaped %d connections of dead instance %s", len(connections), instance)
            if not pending:
                await self._redis.delete(self.names.instance_groups(instance))
                if self._topology is None:
                    for key in self.names.legacy_instance_sets(instance):
                        await self._redis.delete(key)
                await self._redis.zrem(self.names.instances, instance)
        except REDIS_ERRORS as exc:
            raise BackendUnavailable() from exc

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
        except REDIS_ERRORS as exc:
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

    async def kv_set(
        self,
        key: str,
        value: bytes,
        ttl: float | None = None,
        only_if_absent: bool = False,
        log: LogWrite | None = None,
    ) -> bool:
        if log is not None:
            mode = "add" if only_if_absent else "set"
            return (await self._record_script(key, mode, value, "" if ttl is None else _ms(ttl), None, log))[0]
        expiry = _ms(ttl) if ttl is not None else None
        try:
            return bool(await self._redis.set(self.names.record(key), value, px=expiry, nx=only_if_absent))
        except REDIS_ERRORS as exc:
            raise BackendUnavailable() from exc

    async def kv_delete(self, key: str) -> bool:
        try:
            return bool(await self._redis.delete(self.names.record(key)))
        except REDIS_ERRORS as exc:
            raise BackendUnavailable() from exc

    async def _record_script(
        self, key: str, mode: str, value: bytes | None, ttl: int | str, expected: bytes | None, log: LogWrite | None
    ) -> tuple[bool, bytes | None]:
        """``RECORD_SCRIPT``: the record's write and ``log`` in one step;
        (whether it was written, the record before). ``log`` is marked done
        when it was written."""
        keys, args = self.events.write_args(log) if log is not None else ([], [])
        how = [mode, 0 if value is None else 1, value or b"", ttl, 0 if expected is None else 1, expected or b""]
        written, before, claimed = await self._batch.script(
            RECORD_SCRIPT, 1 + len(keys), self.names.record(key), *keys, *how, 0 if log is None else 1, *args
        )
        if log is not None and written and (mode != "swap" or before is not None):
            log.done([bool(took) for took in claimed])
        return bool(written), before

    async def _update_logged(
        self, key: str, update: Callable[[bytes | None], bytes | None], ttl: float | None, log: Changed
    ) -> bytes | None:
        """``kv_update`` with its log: compare-and-set in one script per
        attempt (no WATCH, no pooled connection held); Redis answers the
        record as it is now when another writer came first."""
        current = await self._batch.call("GET", self.names.record(key))
        expiry = "keep" if ttl is None else _ms(ttl)
        for _ in range(MAX_WATCH_RETRIES):
            value = update(current)
            written, now = await self._record_script(key, "if", value, expiry, current, log(current, value))
            if written:
                return value
            current = now
        raise BackendUnavailable(f"{key} is changing too fast to update")

    async def kv_update(
        self,
        key: str,
        update: Callable[[bytes | None], bytes | None],
        ttl: float | None = None,
        log: Changed | None = None,
    ) -> bytes | None:
        if log is not None:
            return await self._update_logged(key, update, ttl, log)
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

    async def kv_swap(
        self, key: str, value: bytes | None, ttl: float | None = None, log: LogWrite | None = None
    ) -> bytes | None:
        if log is not None:
            return (await self._record_script(key, "swap", value, "" if ttl is None else _ms(ttl), None, log))[1]
        name = self.names.record(key)
        try:
            if value is None:
                return await self._redis.getdel(name)
            expiry = _ms(ttl) if ttl is not None else None
            return await self._redis.set(name, value, px=expiry, get=True)
        except REDIS_ERRORS as exc:
            raise BackendUnavailable() from exc

    async def kv_delete_if(self, key: str, value: bytes) -> bool:
        try:
            return bool(await self._redis.eval(DELETE_IF_SCRIPT, 1, self.names.record(key), value))
        except REDIS_ERRORS as exc:
            raise BackendUnavailable() from exc

    async def kv_count(self, key: str, window: float) -> int:
        name = self.names.record(key)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.incr(name)
                pipe.pexpire(name, _ms(window), nx=True)
                count, _ = await pipe.execute()
        except REDIS_ERRORS as exc:
            raise BackendUnavailable() from exc
        return int(count)


def _ms(seconds: float) -> int:
    """A ttl in Redis's milliseconds: rounded up, so any positive ttl expires
    (``PX 0`` is an error, not an instant expiry)."""
    return max(1, math.ceil(seconds * 1000))


def _pack_held(signal: HeldSignal, expires: float, claimed: bool) -> bytes:
    return pack((signal.reply_to, signal.frame, signal.to_all, signal.answer_by, expires, claimed))


def _script_args(
    key: str, version: bytes, commands: list[Command], arrival: tuple[str, str, str] | None = None
) -> list[Any]:
    """``STORE_IF_SCRIPT``'s numkeys, KEYS and ARGV for ``commands``: the
    visitor's hash first, each other key once, referred to by its index;
    with ``arrival``, its guard, session-index and held-signals keys."""
    keys = {key: 1}
    argv: list[Any] = (
        [version, *(keys.setdefault(k, len(keys) + 1) for k in arrival)] if arrival else [version, 0, 0, 0]
    )
    for name, target, *args in commands:
        index = 0 if target is None else keys.setdefault(target, len(keys) + 1)
        argv += [2 + len(args), name, index, *args]
    return [len(keys), *keys, *argv]
