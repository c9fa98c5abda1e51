"""A Redis Cluster of the tests' own: three masters with a replica each,
on free loopback ports, files in a temp dir.

``redis-server --cluster-enabled yes`` six times, then ``redis-cli
--cluster create … --cluster-replicas 1``. ``kill_master(index)`` is the
fault (SIGKILL: the master dies without a word) and ``wait_for_failover``
waits until its replica serves its slots; ``restart`` brings the killed node
back (it rejoins as a replica). Every process is stopped by its own PID.
Under CI=true a missing redis-server or redis-cli fails the run instead of
skipping it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from .processes import free_port, required_binary, stop_processes
from .redis_server import TlsFiles, loopback_client, poll, redis_binary

NODE_TIMEOUT_MS = 1000  # cluster-node-timeout: a master silent this long is failed over
START_TIMEOUT = 10.0
FORM_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0


def redis_cli_binary() -> str:
    return required_binary("redis-cli", "apt-get install redis-tools")


class RedisClusterServers:
    """Six nodes, three masters with one replica each; or, with ``tls``, three
    masters that speak TLS only (clients, the cluster bus, replication) and
    know the ACL user of ``tls``."""

    def __init__(self, replicas: int = 1, tls: TlsFiles | None = None) -> None:
        self.binary, self.cli = redis_binary(), redis_cli_binary()
        self.replicas_per_master, self.tls = replicas, tls
        self.dir = Path(tempfile.mkdtemp(prefix="herald-cluster-"))
        self.ports = [free_port() for _ in range(3 * (1 + replicas))]
        # Each node's cluster bus port, given (its default, port + 10000, may be taken or past 65535).
        self.bus_ports = {port: free_port() for port in self.ports}
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """Herald's ``redis_url`` for it: every node as a seed."""
        nodes = ",".join(f"127.0.0.1:{port}" for port in self.ports)
        return f"redis+cluster://{nodes}" if self.tls is None else f"rediss+cluster://{self.tls.user_info()}@{nodes}"

    def client(self, port: int) -> redis.Redis:
        """An administrator's client of one node."""
        return loopback_client(port) if self.tls is None else self.tls.admin_client(port)

    def start(self) -> RedisClusterServers:
        try:
            for port in self.ports:
                self._start_node(port)
            nodes = [f"127.0.0.1:{port}" for port in self.ports]
            replicas = ["--cluster-replicas", str(self.replicas_per_master), "--cluster-yes"]
            subprocess.run(
                [self.cli, *(self.tls.cli_args() if self.tls else []), "--cluster", "create", *nodes, *replicas],
                check=True,
                capture_output=True,
                timeout=FORM_TIMEOUT,
            )
            poll(self._formed, FORM_TIMEOUT, "every node sees the cluster ok, with three replicas in sync")
        except BaseException:
            self.stop()
            raise
        return self

    def _start_node(self, port: int) -> None:
        listen = ["--port", str(port)] if self.tls is None else self.tls.server_args(port, cluster=True)
        args = [
            self.binary, *listen, "--bind", "127.0.0.1", "--cluster-enabled", "yes",
            "--cluster-config-file", f"nodes-{port}.conf", "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
            "--cluster-port", str(self.bus_ports[port]),
            "--save", "", "--appendonly", "no", "--dir", str(self.dir), "--protected-mode", "no",
            "--loglevel", "warning", "--logfile", str(self.dir / f"{port}.log"),
        ]  # fmt: skip
        self.processes[port] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        poll(lambda: self.client(port).ping(), START_TIMEOUT, f"node :{port} answers PING")

    def _formed(self) -> bool:
        for port in self.live_ports():
            info = self.client(port).cluster("info")
            if info.get("cluster_state") != "ok" or int(info.get("cluster_known_nodes", 0)) != len(self.processes):
                return False
        masters = self.masters()
        return len(masters) == 3 and all(self.replica_in_sync(port) for port in self.replicas())

    def live_ports(self) -> list[int]:
        return [port for port, process in self.processes.items() if process.poll() is None]

    def _roles(self) -> dict[int, bytes]:
        roles = {}
        for port in self.live_ports():
            with self.client(port) as client:
                roles[port] = client.execute_command("ROLE")[0]
        return roles

    def masters(self) -> list[int]:
        return sorted(port for port, role in self._roles().items() if role == b"master")

    def replicas(self) -> list[int]:
        return sorted(port for port, role in self._roles().items() if role == b"slave")

    def replica_in_sync(self, port: int) -> bool:
        with self.client(port) as client:
            info = client.info("replication")
        return info.get("master_link_status") == "up"

    def master_of(self, key: str) -> int:
        """The port of the master serving ``key``'s slot."""
        with self.client(self.live_ports()[0]) as client:
            slot = client.cluster("keyslot", key)
            for start, end, master, *_replicas in client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return int(master[1])
        raise RuntimeError(f"no master serves {key!r}")

    def kill(self, port: int) -> None:
        """SIGKILL one node: it dies without a word."""
        process = self.processes[port]
        os.kill(process.pid, signal.SIGKILL)
        process.wait(STOP_TIMEOUT)

    def wait_for_failover(self, dead: int, within: float = 20.0) -> float:
        """Until every live node says the cluster is ok and no slot is the dead
        node's any more; the seconds it took."""
        started = time.monotonic()

        def promoted() -> bool:
            for port in self.live_ports():
                with self.client(port) as client:
                    if client.cluster("info").get("cluster_state") != "ok":
                        return False
                    for _start, _end, master, *_replicas in client.execute_command("CLUSTER", "SLOTS"):
                        if int(master[1]) == dead:
                            return False
            return True

        poll(promoted, within, f"a replica took over the slots of :{dead}")
        return time.monotonic() - started

    def restart(self, port: int) -> None:
        """Start a killed node again with its nodes file: it rejoins (as a replica)."""
        self._start_node(port)
        poll(lambda: self.replica_in_sync(port), FORM_TIMEOUT, f"node :{port} back as a replica in sync")

    def heal(self) -> None:
        """Every node running again and the cluster ok (after a test killed one)."""
        for port, process in list(self.processes.items()):
            if process.poll() is not None:
                self.restart(port)
        poll(self._formed, FORM_TIMEOUT, "the cluster whole again")

    def command_stats(self) -> dict[str, int]:
        """Calls per command, summed over the masters (``INFO commandstats``)."""
        totals: dict[str, int] = {}
        for port in self.masters():
            with self.client(port) as client:
                for name, stats in client.info("commandstats").items():
                    totals[name] = totals.get(name, 0) + int(stats["calls"])
        return totals

    def stop(self) -> None:
        stop_processes(self.processes.values(), STOP_TIMEOUT)
        self.processes.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
