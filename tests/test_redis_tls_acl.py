"""Redis over TLS, as an ACL user limited to Herald's keys and channels.

The test makes a CA and a server certificate with openssl, starts a
redis-server of its own that speaks TLS only (``--port 0 --tls-port``) and
knows one user, ``herald``, allowed the keys ``<prefix>:*`` and the
channels ``<prefix>:*`` and no dangerous command; the default user is off.
Two instances then connect with ``rediss://herald:…@127.0.0.1:<port>/0``
and ``redis_ca_file``, and work as a cluster. Without the CA, or with a
wrong password, an instance never gets ready and says why.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError

from herald_presence.server.web.keys import HUB

from .harness import HeraldServer, changed, settings, signal
from .processes import free_port
from .redis_server import redis_binary

PREFIX = "herald-tls"
PASSWORD = "tls-test-password-0123456789"


def openssl() -> str:
    binary = shutil.which("openssl")
    if binary is None:
        message = "openssl is not on PATH (apt-get install openssl)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return binary


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key): the server's for 127.0.0.1 and localhost."""
    ca_key, ca, key, csr, cert = (directory / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    extensions = directory / "server.ext"
    extensions.write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")

    def run(*args: str) -> None:
        subprocess.run([openssl(), *args], check=True, capture_output=True, timeout=30)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
        "-days", "2", "-subj", "/CN=herald test CA")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(cert), "-days", "2", "-extfile", str(extensions))  # fmt: skip
    return ca, cert, key


class TlsRedis:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca, self.cert, self.key = make_certificates(directory)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, password: str = PASSWORD) -> str:
        return f"rediss://herald:{password}@127.0.0.1:{self.port}/0"

    def start(self) -> TlsRedis:
        config = self.directory / "redis.conf"
        config.write_text(
            "\n".join(
                [
                    "port 0",
                    f"tls-port {self.port}",
                    "bind 127.0.0.1",
                    f"tls-cert-file {self.cert}",
                    f"tls-key-file {self.key}",
                    f"tls-ca-cert-file {self.ca}",
                    "tls-auth-clients no",  # the server proves itself; clients log in with a password
                    'save ""',
                    "appendonly no",
                    f"dir {self.directory}",
                    "loglevel warning",
                    "user default off",
                    f"user herald on >{PASSWORD} ~{PREFIX}:* &{PREFIX}:* +@all -@dangerous",
                ]
            )
            + "\n"
        )
        self.process = subprocess.Popen(
            [redis_binary(), str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        context = ssl.create_default_context(cafile=str(self.ca))
        while time.monotonic() < deadline:
            try:
                with (
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw,
                    context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
                ):
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64):  # NOAUTH: it answers over TLS
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server with TLS did not start")

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


async def test_a_cluster_works_over_tls_as_a_user_limited_to_its_prefix(tls_redis: TlsRedis) -> None:
    options = {"redis_url": tls_redis.url(), "redis_ca_file": str(tls_redis.ca), "redis_prefix": PREFIX}
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
    client = aioredis.Redis.from_url(tls_redis.url(), ssl_ca_certs=str(tls_redis.ca))
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
