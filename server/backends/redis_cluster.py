"""What a Redis Cluster adds to the Redis backend: commands routed to the
master of their key's slot, and sharded pub/sub.

* ``Topology``: the cluster's slot map (redis-py's ``RedisCluster`` keeps
  it), refreshed on demand, one refresh at a time, after a command met a
  dead node, a replica, or a moved slot.
* ``ClusterBatcher``: ``CommandBatcher``'s interface, one batcher (one held
  connection) per master; a command goes to its key's master (a script to
  its first key's, ``SPUBLISH`` to its channel's). A ``MOVED`` answer
  updates the map and the command is sent again; ``ASK`` (a slot being
  migrated) goes through redis-py's own redirect handling.
* ``Shards``: the bus's subscriptions, one pub/sub connection per master,
  each channel ``SSUBSCRIBE``d on the master of its slot, with a probe
  channel in each shard (``shard_tags``). ``redis.py`` owns its life: built
  from the slot map when the bus (re)connects, torn down and built again
  when a connection drops, a probe stops coming back, or the map moves a
  subscribed channel elsewhere (``moved``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import AskError, MovedError, NoScriptError, RedisClusterException, RedisError

from .base import BackendUnavailable
from .redis_batch import CommandBatcher, NodeLink

log = logging.getLogger(__name__)

REFRESH_EVERY = 0.25  # seconds between two refreshes of the slot map, at least
KEYED_AT = {"EVALSHA": 2, "EVAL": 2}  # where a command's routing key is (else its first argument)
# What a command can raise when Redis is away (redis-py's cluster errors are no RedisError).
REDIS_ERRORS: tuple[type[Exception], ...] = (RedisError, RedisClusterException, OSError)


def slot(key: str | bytes) -> int:
    return key_slot(key.encode() if isinstance(key, str) else key)


def shard_tags(masters: Iterable[tuple[str, set[int]]]) -> dict[str, str]:
    """For each master (name, its slots), a short hash tag in one of its slots:
    its probe channel's."""
    tags = {}
    for name, slots in masters:
        # Decimal strings reach every slot within the first few hundred thousand.
        tags[name] = next(str(n) for n in range(1_000_000) if slot(str(n)) in slots)
    return tags


class Topology:
    """The slot map of ``cluster``, and its refresh."""

    def __init__(self, cluster: RedisCluster) -> None:
        self.cluster = cluster
        self._refresh: asyncio.Task[None] | None = None
        self._last = 0.0

    async def ready(self) -> None:
        """The map, read once (redis-py reads it on first use)."""
        try:
            await self.cluster.initialize()
        except REDIS_ERRORS as exc:
            raise BackendUnavailable() from exc

    def master(self, key: str | bytes) -> ClusterNode:
        try:
            return self.cluster.nodes_manager.get_node_from_slot(slot(key))
        except RedisClusterException as exc:  # a slot not covered (mid-failover)
            self.stale()
            raise BackendUnavailable() from exc

    def masters(self) -> dict[str, tuple[ClusterNode, set[int]]]:
        """Every master with the slots it serves."""
        found: dict[str, tuple[ClusterNode, set[int]]] = {}
        for number, nodes in self.cluster.nodes_manager.slots_cache.items():
            if nodes:
                found.setdefault(nodes[0].name, (nodes[0], set()))[1].add(number)
        return found

    def stale(self) -> None:
        """Something went wrong where the map pointed: read it again soon."""
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.get_running_loop().create_task(self.refresh(), name="redis-cluster-slots")

    async def refresh(self) -> None:
        """Read the map again (at most every ``REFRESH_EVERY``; failures are logged, not raised)."""
        await asyncio.sleep(max(0.0, self._last + REFRESH_EVERY - time.monotonic()))
        self._last = time.monotonic()
        try:
            await self.cluster.initialize()
            await self.cluster.nodes_manager.initialize()
        except REDIS_ERRORS as exc:
            log.warning("Redis Cluster: could not read the slot map: %r", exc)

    async def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            await asyncio.wait([self._refresh])


class ClusterBatcher:
    """``CommandBatcher`` for a cluster: one per master, commands routed by slot."""

    def __init__(self, topology: Topology, name: str) -> None:
        self._topology = topology
        self._name = name
        self._batchers: dict[str, tuple[ClusterNode, CommandBatcher]] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def _batcher(self, node: ClusterNode) -> CommandBatcher:
        known = self._batchers.get(node.name)
        if known is None or known[0] is not node:  # a new node, or the same address after a refresh
            if known is not None:  # its connection goes back to the node it came from
                self._closing.add(task := asyncio.get_running_loop().create_task(known[1].close()))
                task.add_done_callback(self._closing.discard)
            known = self._batchers[node.name] = (node, CommandBatcher(NodeLink(node), f"{self._name}-{node.name}"))
        return known[1]

    async def call(self, command: str, *args: Any) -> Any:
        key = args[KEYED_AT.get(command.upper(), 0)]
        await self._topology.ready()
        for _ in range(3):
            try:
                return await self._batcher(self._topology.master(key)).call(command, *args)
            except MovedError as moved:  # the slot has another master now
                await self._topology.cluster.nodes_manager.move_slot(moved)
            except AskError:  # the slot is being migrated: redis-py follows ASK
                return await self._direct(command, *args)
            except NoScriptError:  # script() sends it with EVAL
                raise
            except BackendUnavailable:
                self._topology.stale()  # a dead master, a replica now, a slot no longer served
                raise
            except REDIS_ERRORS as exc:  # TRYAGAIN, CLUSTERDOWN: a failover under way
                self._topology.stale()
                raise BackendUnavailable() from exc
        raise BackendUnavailable("the Redis Cluster kept moving the slot")

    async def _direct(self, command: str, *args: Any) -> Any:
        try:
            return await self._topology.cluster.execute_command(command, *args)
        except NoScriptError:
            raise
        except REDIS_ERRORS as exc:
            raise BackendUnavailable() from exc

    async def script(self, script: str, keys: int, *args: Any) -> Any:
        # The same EVALSHA, then EVAL, as CommandBatcher.script: each node loads it on first use.
        sha = CommandBatcher.sha(script)
        try:
            return await self.call("EVALSHA", sha, keys, *args)
        except NoScriptError:
            return await self.call("EVAL", script, keys, *args)

    async def close(self) -> None:
        for _node, batcher in self._batchers.values():
            await batcher.close()
        self._batchers.clear()


class Shards:
    """One pub/sub connection per master of the cluster, each subscribed to
    the channels of that master's slots. Built by ``redis.py``'s bus loop,
    which reads what arrives (``readers``) and rebuilds it on any fault."""

    def __init__(self, topology: Topology, options: dict[str, Any]) -> None:
        self._topology = topology
        self._options = options
        self._masters = topology.masters()
        self._layout = _layout(self._masters)
        self._pubsubs: dict[str, PubSub] = {}
        self._clients: list[aioredis.Redis] = []

    def probes(self, channel_of: Callable[[str], bytes]) -> list[bytes]:
        """One probe channel per shard: ``channel_of(tag)`` with a tag in its slots."""
        tags = shard_tags((name, slots) for name, (_node, slots) in self._masters.items())
        return [channel_of(tag) for tag in tags.values()]

    def _pubsub(self, channel: bytes) -> PubSub:
        node = self._topology.master(channel)
        if node.name not in self._masters:
            raise BackendUnavailable("the cluster's shards changed")  # the bus loop builds them again
        pubsub = self._pubsubs.get(node.name)
        if pubsub is None:
            client = aioredis.Redis(host=node.host, port=node.port, **self._options)
            self._clients.append(client)
            pubsub = self._pubsubs[node.name] = client.pubsub()
        return pubsub

    async def subscribe(self, *channels: bytes) -> None:
        """``SSUBSCRIBE`` each channel on its shard (one slot per command, as Redis requires)."""
        for channel in channels:
            await self._pubsub(channel).ssubscribe(channel)

    async def unsubscribe(self, *channels: bytes) -> None:
        for channel in channels:
            node = self._topology.master(channel)
            pubsub = self._pubsubs.get(node.name)
            if pubsub is not None:
                await pubsub.sunsubscribe(channel)

    def moved(self) -> bool:
        """Whether the slot map has changed since these subscriptions were
        made (a failover, a slot migrated): then they are made again."""
        return self._layout != _layout(self._topology.masters())

    def readers(self) -> list[PubSub]:
        return list(self._pubsubs.values())

    async def close(self) -> None:
        for pubsub in self._pubsubs.values():
            with contextlib.suppress(Exception):
                await pubsub.aclose()
        for client in self._clients:
            with contextlib.suppress(Exception):
                await client.aclose()
        self._pubsubs.clear()
        self._clients.clear()


def _layout(masters: dict[str, tuple[ClusterNode, set[int]]]) -> dict[str, set[int]]:
    return {name: slots for name, (_node, slots) in masters.items()}
