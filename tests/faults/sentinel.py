"""A Redis master, one replica and three Sentinels of the tests' own.

Everything listens on free loopback ports and keeps its files in a temp
dir; every process is stopped by its own PID. ``kill_master()`` is the
fault (SIGKILL: the master dies without a word) and ``wait_for_failover()``
waits until the Sentinels name the replica as the master. Under CI=true a
missing redis-server fails the run instead of skipping it.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from ..processes import free_port, stop_processes
from ..redis_server import loopback_client, poll, redis_binary

MASTER_NAME = "mymaster"
QUORUM = 2
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000
START_TIMEOUT = 10.0  # seconds for one redis-server to answer PING
SYNC_TIMEOUT = 30.0  # seconds for the replica's first full sync (a busy CI machine: 10 s was once too few)
DISCOVERY_TIMEOUT = 30.0  # seconds for the Sentinels to see the replica and each other
STOP_TIMEOUT = 5.0


class SentinelCluster:
    """Master, replica (``--replicaof``), three Sentinels monitoring ``mymaster``."""

    def __init__(self) -> None:
        self.binary = redis_binary()
        self.dir = Path(tempfile.mkdtemp(prefix="herald-sentinel-"))
        self.master_port, self.replica_port = free_port(), free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """The Sentinel form of Herald's ``redis_url``."""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}"

    def start(self) -> SentinelCluster:
        try:
            self._start_data_node("master", self.master_port)
            self._start_data_node("replica", self.replica_port, "--replicaof", "127.0.0.1", str(self.master_port))
            poll(self._replica_synced, SYNC_TIMEOUT, "the replica synced with the master")
            for index, port in enumerate(self.sentinel_ports):
                self._start_sentinel(index, port)
            poll(self._sentinels_see_everyone, DISCOVERY_TIMEOUT, "every Sentinel sees the replica and the others")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every process by its PID (SIGCONT first, in case a test froze one)."""
        stop_processes(self.processes.values(), STOP_TIMEOUT)
        shutil.rmtree(self.dir, ignore_errors=True)

    def kill_master(self) -> None:
        """SIGKILL the master: it dies without a word, its sockets reset."""
        process = self.processes["master"]
        process.kill()
        process.wait(STOP_TIMEOUT)

    def master_address(self, sentinel_port: int | None = None) -> tuple[str, int] | None:
        port = sentinel_port or self.sentinel_ports[0]
        address = loopback_client(port).execute_command("SENTINEL", "get-master-addr-by-name", MASTER_NAME)
        if not address:
            return None
        host, master_port = address
        return (host.decode() if isinstance(host, bytes) else str(host)), int(master_port)

    def wait_for_failover(self, within: float) -> float:
        """Wait until every Sentinel names the replica as the master; the seconds it took."""
        started = time.monotonic()

        def promoted() -> bool:
            return all(self.master_address(port) == ("127.0.0.1", self.replica_port) for port in self.sentinel_ports)

        def writable() -> bool:
            role = loopback_client(self.replica_port).execute_command("ROLE")
            return bool(role) and role[0] in (b"master", "master")

        poll(promoted, within, "the Sentinels promoted the replica")
        poll(writable, max(1.0, within - (time.monotonic() - started)), "the promoted replica acts as master")
        return time.monotonic() - started

    def log(self, name: str) -> str:
        path = self.dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # --- start-up

    def _spawn(self, name: str, args: list[str]) -> None:
        log = (self.dir / f"{name}.log").open("wb")
        with log:
            self.processes[name] = subprocess.Popen(
                [self.binary, *args], cwd=self.dir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

    def _start_data_node(self, name: str, port: int, *extra: str) -> None:
        args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--repl-diskless-sync-delay", "0"]  # a full sync starts at once (Redis 7 waits 5 s for more replicas)
        args += ["--dir", str(self.dir), "--dbfilename", f"{name}.rdb", "--protected-mode", "no"]
        self._spawn(name, [*args, "--loglevel", "warning", *extra])
        poll(
            lambda: self._alive(name) and loopback_client(port).ping(),
            START_TIMEOUT,
            f"redis {name} on :{port} answers",
        )

    def _start_sentinel(self, index: int, port: int) -> None:
        name = f"sentinel-{index}"
        config = self.dir / f"{name}.conf"  # Sentinel rewrites it: it must be its own and writable
        config.write_text(
            f"port {port}\n"
            "bind 127.0.0.1\n"
            f"dir {self.dir}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master_port} {QUORUM}\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
        )
        self._spawn(name, [str(config), "--sentinel"])
        poll(lambda: self._alive(name) and loopback_client(port).ping(), START_TIMEOUT, f"{name} on :{port} answers")

    def _alive(self, name: str) -> bool:
        process = self.processes[name]
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{self.log(name)[-2000:]}")
        return True

    def _replica_synced(self) -> bool:
        info = loopback_client(self.master_port).info("replication")
        replica = info.get("slave0")
        return isinstance(replica, dict) and replica.get("state") == "online"

    def _sentinels_see_everyone(self) -> bool:
        for port in self.sentinel_ports:
            client = loopback_client(port)
            replicas = client.execute_command("SENTINEL", "replicas", MASTER_NAME)
            sentinels = client.execute_command("SENTINEL", "sentinels", MASTER_NAME)
            if len(sentinels) < len(self.sentinel_ports) - 1:
                return False
            if not any(_flags(replica) and "s_down" not in _flags(replica) for replica in replicas):
                return False
        return True


def _flags(entry: Any) -> set[str]:
    """The ``flags`` of a SENTINEL replicas/sentinels entry (a flat name/value list)."""
    if isinstance(entry, dict):
        pairs = entry
    else:
        items = [item.decode() if isinstance(item, bytes) else str(item) for item in entry]
        pairs = dict(zip(items[::2], items[1::2], strict=False))
    raw = pairs.get("flags") or pairs.get(b"flags") or ""  # type: ignore[call-overload]
    raw = raw.decode() if isinstance(raw, bytes) else str(raw)
    return set(raw.split(",")) if raw else set()
