"""Redis over TLS, as an ACL user limited to Herald's keys and channels.

The test makes a CA and a server certificate with openssl and starts Redis
that speaks TLS only (``--port 0 --tls-port``; a cluster's bus and
replication too) and knows the user ``herald``, allowed the keys
``<prefix>:*`` and the channels ``<prefix>:*`` and no dangerous command
(the default user, the tests' administrator, has a password). Two instances
then connect as ``herald`` with ``redis_ca_file`` and work as a cluster:
to one server (``rediss://herald:…@127.0.0.1:<port>/0``) and to a Redis
Cluster of three masters (``rediss+cluster://herald:…@node,node,node``).
Without the CA, or with a wrong password, an instance never gets ready and
says why.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoPermissionError

from herald_presence.server.web.keys import HUB

from .harness import HeraldServer, changed, settings, signal
from .processes import free_port
from .redis_cluster import RedisClusterServers
from .redis_server import TlsFiles, poll, redis_binary

PREFIX = "herald-tls"
PASSWORD = TlsFiles.password


class TlsRedis:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.files = TlsFiles.make(directory, PREFIX)
        self.ca = self.files.ca
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, password: str = PASSWORD) -> str:
        return f"rediss://{self.files.user_info(password)}@127.0.0.1:{self.port}/0"

    def start(self) -> TlsRedis:
        args = [redis_binary(), *self.files.server_args(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(self.directory), "--loglevel", "warning"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        poll(lambda: self.files.admin_client(self.port).ping(), 10, "redis-server answers over TLS")
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(5)
            self.process = None


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    server = TlsRedis(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture(params=["standalone", "cluster"])
def tls_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(``redis_url``, CA file) of a TLS-only Redis with the limited user: one
    server, or a Redis Cluster of three masters (``rediss+cluster://``)."""
    if request.param == "standalone":
        server = request.getfixturevalue("tls_redis")
        yield server.url(), server.ca
        return
    cluster = RedisClusterServers(replicas=0, tls=TlsFiles.make(tmp_path, PREFIX)).start()
    try:
        yield cluster.url, cluster.tls.ca
    finally:
        cluster.stop()


async def test_a_cluster_works_over_tls_as_a_user_limited_to_its_prefix(tls_url: tuple[str, Path]) -> None:
    url, ca = tls_url
    options = {"redis_url": url, "redis_ca_file": str(ca), "redis_prefix": PREFIX}
    a = await HeraldServer(settings(**options)).start()
    b = await HeraldServer(settings(**options)).start()
    try:
        agent = await b.agent("alice")
        await agent.subscribe_group()
        visitor = await a.visitor("v-tls", data={"page": "/tls"})
        await agent.wait_for(changed("online", "v-tls"))
        assert await agent.show_terms("v-tls") == 1  # across instances: a delivery and its reply over the bus
        await visitor.wait_for(signal("showterms"))
        await visitor.publish(page="/after")
        assert (await agent.wait_for(changed("data", "v-tls"))).state["connections"][0]["data"] == {"page": "/after"}
        code = await agent.lookup("v-tls")
        assert code["online"] is True
        await visitor.close()
        await agent.wait_for(changed("offline", "v-tls"), timeout=5)
    finally:
        await a.stop()
        await b.stop()

    # The user really is limited: nothing outside the prefix, no dangerous command.
    if url.startswith("rediss+cluster://"):  # a seed node's URL: the cluster client finds the others
        client = RedisCluster.from_url(url.replace("+cluster", "").split(",")[0], ssl_ca_certs=str(ca))
    else:
        client = aioredis.Redis.from_url(url, ssl_ca_certs=str(ca))
    try:
        assert await client.exists(f"{PREFIX}:instances")
        with pytest.raises(NoPermissionError):
            await client.get("someone-else:key")
        with pytest.raises(NoPermissionError):
            await client.publish("someone-else:channel", b"x")
        with pytest.raises(NoPermissionError):
            await client.flushall()
    finally:
        await client.aclose()


async def test_without_the_ca_or_with_a_wrong_password_an_instance_is_never_ready(
    tls_redis: TlsRedis, caplog: pytest.LogCaptureFixture
) -> None:
    for options, why in (
        ({"redis_url": tls_redis.url()}, "certificate verify failed"),  # the system's CAs do not know the test CA
        ({"redis_url": tls_redis.url("wrong-password"), "redis_ca_file": str(tls_redis.ca)}, "password"),
    ):
        caplog.clear()
        server = await HeraldServer(settings(redis_prefix=PREFIX, **options)).start()
        try:
            await asyncio.sleep(0.5)
            assert not server.app[HUB].ready, options
            said = [r.getMessage() for r in caplog.records if "not reachable yet" in r.getMessage()]
            assert said and why in said[0], said
        finally:
            await server.stop()
