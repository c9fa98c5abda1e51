from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from herald_presence.server.config import check_ice_servers

from . import slot_check
from .harness import HeraldServer, settings
from .redis_cluster import RedisClusterServers
from .redis_server import RedisServer
from .turn_server import TurnServer

BACKENDS = ["memory", "redis"]
# Modules that run on a Redis Cluster too import their fixtures from ``tests/topologies.py``
# (a test there that stops its own Redis is STANDALONE_ONLY).
STANDALONE_ONLY = pytest.mark.parametrize("redis_topology", ["standalone"])

# Short cluster timings so that deaths are noticed within a test.
FAST = {"instance_heartbeat": 0.25, "instance_dead_after": 1.5, "grace_period": 0.4, "signal_hold": 2.0}

Start = Callable[..., Awaitable[HeraldServer]]


@pytest.fixture(scope="session", autouse=True)
def _check_slots_all_along() -> Iterator[None]:
    yield from slot_check.installed()


@pytest.fixture(autouse=True)
def one_slot_per_operation() -> Iterator[None]:
    """Fails a test during which this process sent Redis a multi-key command,
    a script or a transaction over several slots (``tests/slot_check.py``)."""
    slot_check.take()
    yield
    found = slot_check.take()
    assert not found, f"Redis operations a Redis Cluster refuses (CROSSSLOT): {found[:10]}"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    """One Redis Cluster (three masters, a replica each) for the whole run;
    a test that kills a node heals it again before the next one uses it."""
    cluster = RedisClusterServers().start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def backend_settings(backend_name: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """Settings that pick the backend; each test gets its own Redis prefix."""
    if backend_name == "memory":
        return {}
    if backend_name == "cluster":
        return {"redis_url": request.getfixturevalue("redis_cluster").url, "redis_prefix": f"t{uuid.uuid4().hex[:10]}"}
    redis: RedisServer = request.getfixturevalue("redis_server")
    if redis.process is None or redis.process.poll() is not None:
        redis.start()  # a previous test stopped it
    return {"redis_url": redis.url, "redis_prefix": f"t{uuid.uuid4().hex[:10]}"}


@pytest.fixture
async def start_herald(backend_settings: dict[str, Any]) -> AsyncIterator[Callable[..., Awaitable[HeraldServer]]]:
    """Start instances (of one cluster) with setting overrides; all stop afterwards."""
    started: list[HeraldServer] = []

    async def start(**overrides: Any) -> HeraldServer:
        server = await HeraldServer(settings(**{**backend_settings, **overrides})).start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


@pytest.fixture
async def herald(start_herald: Callable[..., Awaitable[HeraldServer]]) -> HeraldServer:
    return await start_herald()


# --- clusters: several instances on one Redis --------------------------------


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own, to stop and restart at will."""
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def prefix() -> str:
    return f"c{uuid.uuid4().hex[:10]}"


@pytest.fixture
def redis_topology() -> str:
    """What ``start_instance``'s instances share: "standalone" (one redis-server,
    the default) or "cluster" (a Redis Cluster); ``tests/topologies.py`` runs both."""
    return "standalone"


@pytest.fixture
def redis_url(redis_topology: str, request: pytest.FixtureRequest) -> str:
    """The Redis URL of ``start_instance``'s cluster."""
    if redis_topology == "cluster":
        return str(request.getfixturevalue("redis_cluster").url)
    redis: RedisServer = request.getfixturevalue("redis_server")
    if redis.process is None or redis.process.poll() is not None:
        redis.start()  # a previous test stopped it
    return redis.url


@pytest.fixture
async def start_instance(redis_url: str, prefix: str) -> AsyncIterator[Start]:
    """Start in-process instances of one cluster (one Redis, one prefix)."""
    started: list[HeraldServer] = []

    async def start(redis: RedisServer | None = None, **overrides: Any) -> HeraldServer:
        url = redis.url if redis is not None else redis_url
        overrides = {**FAST, **overrides}
        instance = await HeraldServer(settings(redis_url=url, redis_prefix=prefix, **overrides)).start()
        started.append(instance)
        return instance

    yield start
    for instance in started:
        await instance.stop()


TURN_SECRET = "coturn-static-auth-secret-for-tests"


@pytest.fixture(scope="module")
def coturn() -> Iterator[TurnServer]:
    """A coturn of the tests' own (``tests/turn_server.py``) with ``TURN_SECRET``."""
    server = TurnServer(TURN_SECRET).start()
    yield server
    server.stop()


@pytest.fixture
async def herald_with_turn(coturn: TurnServer) -> AsyncIterator[HeraldServer]:
    """A Herald whose group ``acme`` has the tests' coturn as its TURN server."""
    server_settings = settings()
    server_settings.groups["acme"].ice_servers = check_ice_servers(
        [{"urls": [coturn.url], "secret": TURN_SECRET, "ttl": 600}]
    )
    server = await HeraldServer(server_settings).start()
    yield server
    await server.stop()
