"""Connections to Redis from a ``redis_url``: a single server, the master
that Sentinel names, or a Redis Cluster.

* ``redis://host:port/db``, ``rediss://…`` (TLS), ``unix:///path``: one server.
* ``redis+sentinel://host:port,host:port,…/service[/db]``: ask these
  sentinels for the master of ``service`` (``rediss+sentinel://`` for TLS
  to the master). After a failover, connections are made to the promoted
  replica: commands in flight fail (``BackendUnavailable``), the next ones
  reach the new master, and the pub/sub connection reconnects there.
* ``redis+cluster://host:port,host:port,…``: a Redis Cluster, found from
  these seed nodes (any of its nodes will do; give several, in case one is
  down at start); ``rediss+cluster://`` for TLS to every node. Commands go
  to the master of their key's slot, the bus uses sharded pub/sub.

Every form takes an ACL user and password in the URL
(``redis://herald:secret@host:6379/0``, percent-encoded), and TLS forms
verify the server's certificate against ``ca_file`` (a PEM bundle; the
system's CAs when empty): the ``redis_ca_file`` setting.

What comes back (``RedisClients``): a bounded pool for commands, whose
bursts wait for a connection rather than fail, and one for the bus, which
never retries silently (a dropped subscription must be seen); for a
cluster, the cluster client and what it takes to open a subscriber's
connection to one of its nodes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff, NoBackoff

from herald_presence.server.config import ConfigError

MAX_CONNECTIONS = 32  # per instance (per node of a cluster), besides the pub/sub connections
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


class BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """Sentinel's master discovery with the blocking pool's bounded waiting."""


class BoundedRedisCluster(RedisCluster):
    """A cluster client whose commands and pipelines wait for one of
    ``MAX_CONNECTIONS`` turns: redis-py's cluster pool fails a burst beyond
    its size (``MaxConnectionsError``) where the blocking pool waits."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.turns = asyncio.Semaphore(MAX_CONNECTIONS)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.turns:
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        return BoundedPipeline(self, transaction)


class BoundedPipeline(ClusterPipeline):
    """Holds one of its client's turns from ``async with`` to its end (a
    transaction holds its connection from WATCH to EXEC)."""

    cluster_client: BoundedRedisCluster

    async def __aenter__(self) -> ClusterPipeline:
        await self.cluster_client.turns.acquire()
        try:
            return await super().__aenter__()
        except BaseException:
            self.cluster_client.turns.release()
            raise

    async def __aexit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        try:
            await super().__aexit__(exc_type, exc_value, traceback)
        finally:
            self.cluster_client.turns.release()


@dataclass(frozen=True, slots=True)
class SentinelAddress:
    sentinels: list[tuple[str, int]]
    service: str
    db: int
    tls: bool
    username: str | None
    password: str | None


@dataclass(frozen=True, slots=True)
class ClusterAddress:
    nodes: list[tuple[str, int]]
    tls: bool
    username: str | None
    password: str | None


@dataclass(slots=True)
class RedisClients:
    """What a ``RedisBackend`` talks through. ``commands`` is a ``Redis`` or,
    for a cluster, a ``RedisCluster``; ``bus`` is the standalone bus client
    (None for a cluster, whose subscribers connect to each shard with
    ``node_options``)."""

    commands: Any
    bus: aioredis.Redis | None
    cluster: RedisCluster | None = None
    node_options: dict[str, Any] = field(default_factory=dict)


def _hosts(netloc: str, what: str) -> list[tuple[str, int]]:
    hosts = []
    for host in filter(None, netloc.rpartition("@")[2].split(",")):
        name, _, port = host.rpartition(":")
        if not name or not port.isdigit():
            raise ValueError(f"{what} {host!r}: expected host:port")
        hosts.append((name.strip("[]"), int(port)))
    return hosts


def _credentials(parts: Any) -> tuple[str | None, str | None]:
    return (
        unquote(parts.username) if parts.username else None,
        unquote(parts.password) if parts.password else None,
    )


def sentinel_address(url: str) -> SentinelAddress | None:
    """The parts of a ``redis+sentinel://`` URL; None for any other URL.
    ValueError names what is wrong with a malformed one."""
    parts = urlsplit(url)
    if parts.scheme not in SENTINEL_SCHEMES:
        return None
    sentinels = _hosts(parts.netloc, "sentinel")
    path = [part for part in parts.path.split("/") if part]
    if not sentinels or not 1 <= len(path) <= 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError("expected redis+sentinel://host:port[,host:port...]/service[/db]")
    return SentinelAddress(
        sentinels,
        path[0],
        int(path[1]) if len(path) == 2 else 0,
        parts.scheme.startswith("rediss"),
        *_credentials(parts),
    )


def cluster_address(url: str) -> ClusterAddress | None:
    """The parts of a ``redis+cluster://`` URL; None for any other URL.
    ValueError names what is wrong with a malformed one."""
    parts = urlsplit(url)
    if parts.scheme not in CLUSTER_SCHEMES:
        return None
    nodes = _hosts(parts.netloc, "cluster node")
    if not nodes or parts.path.strip("/") or parts.query:
        raise ValueError("expected redis+cluster://host:port[,host:port...] (a cluster has no db)")
    return ClusterAddress(nodes, parts.scheme.startswith("rediss"), *_credentials(parts))


def connect(url: str, command_timeout: float, ca_file: str = "") -> RedisClients:
    """The clients for ``url``; nothing is connected yet. A malformed URL is
    a ``ConfigError``."""
    try:
        return _clients(url, command_timeout, ca_file)
    except ValueError as exc:
        raise ConfigError(f"redis_url: {exc}") from None


def _tls(ca_file: str) -> dict[str, Any]:
    return {"ssl_ca_certs": ca_file} if ca_file else {}


def _clients(url: str, command_timeout: float, ca_file: str) -> RedisClients:
    timeouts: dict[str, Any] = {"socket_timeout": command_timeout, "socket_connect_timeout": command_timeout}
    # Commands retry once: the first use of a pooled connection after a Redis
    # restart or a failover fails, the retry reconnects.
    pooled = {"retry": Retry(ExponentialBackoff(cap=0.2, base=0.02), 1), **timeouts}
    bus = {"retry": Retry(NoBackoff(), 0), **timeouts}
    cluster = cluster_address(url)
    if cluster is not None:
        return _cluster_clients(cluster, timeouts, bus, ca_file)
    sentinel = sentinel_address(url)
    if sentinel is None:
        tls = _tls(ca_file) if urlsplit(url).scheme == "rediss" else {}
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=MAX_CONNECTIONS, timeout=command_timeout, **pooled, **tls
        )
        return RedisClients(aioredis.Redis(connection_pool=pool), aioredis.Redis.from_url(url, **bus, **tls))
    master = {"db": sentinel.db, "ssl": sentinel.tls, "username": sentinel.username, "password": sentinel.password}
    if sentinel.tls:
        master.update(_tls(ca_file))
    manager = Sentinel(sentinel.sentinels, sentinel_kwargs=timeouts, **master)
    commands = manager.master_for(
        sentinel.service,
        connection_pool_class=BlockingSentinelPool,
        max_connections=MAX_CONNECTIONS,
        timeout=command_timeout,
        **pooled,
    )
    return RedisClients(commands, manager.master_for(sentinel.service, **bus))


def _cluster_clients(
    address: ClusterAddress, timeouts: dict[str, Any], bus: dict[str, Any], ca_file: str
) -> RedisClients:
    auth: dict[str, Any] = {"username": address.username, "password": address.password}
    if address.tls:
        auth.update({"ssl": True, **_tls(ca_file)})
    commands = BoundedRedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in address.nodes],
        # Slots of a shard whose master is failing over are not covered for
        # a moment: the other shards go on meanwhile.
        require_full_coverage=False,
        max_connections=MAX_CONNECTIONS + 8,  # the turns, the batcher's own connection, the slot map's reads
        # One retry after a refreshed slot map (a failover, a moved slot).
        retry=Retry(NoBackoff(), 1),
        **timeouts,
        **auth,
    )
    return RedisClients(commands, None, commands, {**bus, **auth})
