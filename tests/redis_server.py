"""A private redis-server for the tests, on a free loopback port.

Tests may stop, restart and CLIENT KILL it; it never touches the machine's
own Redis. Under CI=true a missing redis-server fails the run instead of
skipping the Redis tests.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from .processes import free_port, required_binary


def redis_binary() -> str:
    return required_binary("redis-server", "apt-get install redis-server")


def openssl() -> str:
    return required_binary("openssl", "apt-get install openssl")


@dataclass(frozen=True)
class TlsFiles:
    """A CA and a server certificate for 127.0.0.1 made with openssl, and the
    ACL users of a TLS-only redis-server: ``herald``, allowed only the keys
    and channels under ``prefix`` and no dangerous command, and the default
    user (the tests' administrator) with a password."""

    ca: Path
    cert: Path
    key: Path
    prefix: str
    password: str = "tls-test-password-0123456789"
    admin_password: str = "tls-test-admin-0123456789"

    @classmethod
    def make(cls, directory: Path, prefix: str) -> TlsFiles:
        names = ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem", "server.ext")
        ca_key, ca, key, csr, cert, extensions = (directory / name for name in names)
        extensions.write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")

        def run(*args: str) -> None:
            subprocess.run([openssl(), *args], check=True, capture_output=True, timeout=30)

        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
            "-days", "2", "-subj", "/CN=herald test CA")  # fmt: skip
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
        run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
            "-out", str(cert), "-days", "2", "-extfile", str(extensions))  # fmt: skip
        return cls(ca, cert, key, prefix)

    def user_info(self, password: str | None = None) -> str:
        return f"herald:{self.password if password is None else password}"

    def server_args(self, port: int, *, cluster: bool = False) -> list[str]:
        """redis-server arguments: TLS only on ``port`` (the cluster bus and
        replication too, for a cluster node), and the two users."""
        args = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(self.cert),
                "--tls-key-file", str(self.key), "--tls-ca-cert-file", str(self.ca),
                "--tls-auth-clients", "no"]  # fmt: skip  # the server proves itself; clients log in with a password
        if cluster:
            args += ["--tls-cluster", "yes", "--tls-replication", "yes", "--masterauth", self.admin_password]
        # One argument per word: redis-server joins the words after an option into its line.
        admin = ["--user", "default", "on", f">{self.admin_password}", "~*", "&*", "+@all"]
        herald = ["--user", "herald", "on", f">{self.password}", f"~{self.prefix}:*", f"&{self.prefix}:*",
                  "+@all", "-@dangerous"]  # fmt: skip
        return [*args, *admin, *herald]

    def cli_args(self) -> list[str]:
        """redis-cli arguments to reach such a server as the administrator."""
        return ["--tls", "--cacert", str(self.ca), "-a", self.admin_password, "--no-auth-warning"]

    def admin_client(self, port: int) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=port, password=self.admin_password, ssl=True, ssl_ca_certs=str(self.ca),
            socket_timeout=1.0, socket_connect_timeout=1.0,
        )  # fmt: skip


def loopback_client(port: int) -> redis.Redis:
    """A short-timeout client of the redis-server on this loopback port."""
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0, socket_connect_timeout=1.0)


def poll(check: Callable[[], Any], within: float, what: str) -> Any:
    """Call ``check`` every 50 ms until it returns something truthy (Redis errors count as no)."""
    deadline = time.monotonic() + within
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if value := check():
                return value
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.05)
    raise RuntimeError(f"not within {within}s: {what} (last error: {last!r})")


class RedisServer:
    def __init__(self) -> None:
        self.binary = redis_binary()
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="herald-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", self.dir, "--protected-mode", "no", "--loglevel", "warning"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
            self.process = None

    def command(self, *args: str) -> bytes:
        """One raw command over a fresh socket (works while Herald holds its own)."""
        parts = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            parts.append(f"${len(arg.encode())}\r\n{arg}\r\n".encode())
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            sock.sendall(b"".join(parts))
            return sock.recv(65536)
