"""Connections to Redis from a ``redis_url``: a single server, or the master
that Sentinel names.

* ``redis://host:port/db``, ``rediss://…`` (TLS), ``unix:///path``: one server.
* ``redis+sentinel://host:port,host:port,…/service[/db]``: ask these
  sentinels for the master of ``service`` (``rediss+sentinel://`` for TLS
  to the master). After a failover, connections are made to the promoted
  replica: commands in flight fail (``BackendUnavailable``), the next ones
  reach the new master, and the pub/sub connection reconnects there.

Two clients come back: a bounded pool for commands, whose bursts wait for a
connection rather than fail, and one for the bus, which never retries
silently (a dropped subscription must be seen).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff, NoBackoff

from herald_presence.server.config import ConfigError

MAX_CONNECTIONS = 32  # per instance, besides the pub/sub connection
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")


class BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """Sentinel's master discovery with the blocking pool's bounded waiting."""


@dataclass(frozen=True, slots=True)
class SentinelAddress:
    sentinels: list[tuple[str, int]]
    service: str
    db: int
    tls: bool
    username: str | None
    password: str | None


def sentinel_address(url: str) -> SentinelAddress | None:
    """The parts of a ``redis+sentinel://`` URL; None for any other URL.
    ValueError names what is wrong with a malformed one."""
    parts = urlsplit(url)
    if parts.scheme not in SENTINEL_SCHEMES:
        return None
    hosts = parts.netloc.rpartition("@")[2]
    sentinels = []
    for host in filter(None, hosts.split(",")):
        name, _, port = host.rpartition(":")
        if not name or not port.isdigit():
            raise ValueError(f"sentinel {host!r}: expected host:port")
        sentinels.append((name.strip("[]"), int(port)))
    path = [part for part in parts.path.split("/") if part]
    if not sentinels or not 1 <= len(path) <= 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError("expected redis+sentinel://host:port[,host:port...]/service[/db]")
    return SentinelAddress(
        sentinels,
        path[0],
        int(path[1]) if len(path) == 2 else 0,
        parts.scheme.startswith("rediss"),
        unquote(parts.username) if parts.username else None,
        unquote(parts.password) if parts.password else None,
    )


def connect(url: str, command_timeout: float) -> tuple[aioredis.Redis, aioredis.Redis]:
    """(commands, bus) clients for ``url``; nothing is connected yet. A
    malformed URL is a ``ConfigError``."""
    try:
        return _clients(url, command_timeout)
    except ValueError as exc:
        raise ConfigError(f"redis_url: {exc}") from None


def _clients(url: str, command_timeout: float) -> tuple[aioredis.Redis, aioredis.Redis]:
    timeouts: dict[str, Any] = {"socket_timeout": command_timeout, "socket_connect_timeout": command_timeout}
    # Commands retry once: the first use of a pooled connection after a Redis
    # restart or a failover fails, the retry reconnects.
    pooled = {"retry": Retry(ExponentialBackoff(cap=0.2, base=0.02), 1), **timeouts}
    bus = {"retry": Retry(NoBackoff(), 0), **timeouts}
    sentinel = sentinel_address(url)
    if sentinel is None:
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=MAX_CONNECTIONS, timeout=command_timeout, **pooled
        )
        return aioredis.Redis(connection_pool=pool), aioredis.Redis.from_url(url, **bus)
    master = {"db": sentinel.db, "ssl": sentinel.tls, "username": sentinel.username, "password": sentinel.password}
    manager = Sentinel(sentinel.sentinels, sentinel_kwargs=timeouts, **master)
    commands = manager.master_for(
        sentinel.service,
        connection_pool_class=BlockingSentinelPool,
        max_connections=MAX_CONNECTIONS,
        timeout=command_timeout,
        **pooled,
    )
    return commands, manager.master_for(sentinel.service, **bus)
