"""A Herald cluster on loopback in one command: a private Redis, N instances
and HAProxy in front, for demos and for tests that drive rolling restarts.

    .venv/bin/python deploy/local/cluster.py --instances 3 [--port 8080]

It prints the load balancer's URL and every instance's URL and PID, and stops
everything it started (by PID, nothing else) on Ctrl-C or SIGTERM. Tests use
``LocalCluster`` directly. Only the standard library is imported here, so the
tool runs under any Python 3.11; the instances run under ``--python`` (by
default this interpreter), which needs Herald's dependencies.

Why HAProxy and not a Python proxy: the point is to rehearse what production
does, with the same health checks on /readyz, retries and redispatch that
``deploy/haproxy.cfg`` uses, so a test that passes here says something about
the real thing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

REPO = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"
START_TIMEOUT = 20.0  # seconds for a process to come up (2 cores, several processes starting at once)
KILL_WAIT = 5.0  # seconds to wait for a SIGKILLed or SIGTERMed helper (Redis, HAProxy) to go
INSTALL_HAPROXY = "apt-get update && apt-get install -y haproxy"


class ClusterError(RuntimeError):
    """Something the cluster needs is missing or did not come up; the message says what to do."""


def free_port() -> int:
    """A loopback port nobody listens on right now (the kernel's pick, so parallel runs do not collide)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def find_binary(name: str, install: str) -> str:
    """The binary's path on PATH (or in /usr/sbin, which a non-root PATH may lack), or a clear error."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise ClusterError(f"{name} is not installed (not on PATH); install it with: {install}")
    return found


def http_status(url: str, timeout: float = 1.0) -> int | None:
    """The HTTP status of a GET, or None when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


def session_secret() -> str:
    """A fresh cookie key: one per cluster, shared by its instances so a login on one works on all."""
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


@dataclasses.dataclass(slots=True)
class Process:
    """A child started here; only this PID is ever signalled."""

    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def spawn(self, env: Mapping[str, str] | None = None) -> None:
        # Output goes to a file: a pipe nobody reads would stall the child once full.
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                self.argv, cwd=REPO, env=dict(env) if env is not None else None,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def wait_exit(self, within: float) -> int | None:
        """The exit code once the process is gone, or None if it still runs after ``within`` seconds."""
        popen = self.popen
        assert popen is not None

        def wait() -> int | None:
            try:
                return popen.wait(within)
            except subprocess.TimeoutExpired:
                return None

        return await asyncio.to_thread(wait)

    async def signal_and_wait(self, signum: int, within: float) -> int | None:
        """Send ``signum`` to this PID (if it still runs) and wait up to ``within`` seconds for its exit code."""
        if self.popen is None or self.popen.poll() is not None:
            return self.popen.returncode if self.popen else None
        self.popen.send_signal(signum)
        return await self.wait_exit(within)

    async def stop(self, within: float) -> None:
        """SIGTERM, then SIGKILL if it is still there after ``within`` seconds."""
        if await self.signal_and_wait(signal.SIGTERM, within) is None:
            await self.signal_and_wait(signal.SIGKILL, KILL_WAIT)


@dataclasses.dataclass(slots=True)
class Instance:
    """One Herald instance of the cluster: fixed port, changing process."""

    index: int
    port: int
    process: Process

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def server_name(self) -> str:
        """Its name in HAProxy's config and stats."""
        return f"herald{self.index}"


@dataclasses.dataclass(frozen=True, slots=True)
class Stopped:
    """How an instance went: its exit code and the seconds from the signal to its exit."""

    code: int | None
    seconds: float


class LocalCluster:
    """Redis, ``instances`` Herald processes and HAProxy, all on loopback ports.

    ``groups`` maps group IDs to secrets; ``settings`` are extra Herald settings
    passed as ``HERALD_<NAME>`` (the environment, not flags, so a setting this
    checkout does not know yet is ignored rather than fatal). Use it as
    ``async with LocalCluster(3) as cluster:`` or call ``start()``/``stop()``.
    """

    def __init__(
        self,
        instances: int = 3,
        *,
        lb_port: int | None = None,
        groups: Mapping[str, str] | None = None,
        settings: Mapping[str, object] | None = None,
        python: str | None = None,
        redis_url: str | None = None,
        workdir: Path | None = None,
        drain_timeout: float = 20.0,
    ) -> None:
        if instances < 1:
            raise ValueError("a cluster needs at least one instance")
        self.haproxy_binary = find_binary("haproxy", INSTALL_HAPROXY)
        self.redis_binary = None if redis_url else find_binary("redis-server", "apt-get install -y redis-server")
        self.python = python or sys.executable
        self.groups = dict(groups or {"demo": secrets.token_urlsafe(24)})
        self.settings = {str(k): str(v) for k, v in (settings or {}).items()}
        self.drain_timeout = drain_timeout
        self.session_secret = session_secret()
        self.redis_prefix = f"local{uuid.uuid4().hex[:8]}"  # a shared Redis never mixes two clusters
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="herald-cluster-"))
        self.lb_port = lb_port or free_port()
        self.redis_port = free_port()
        self.redis_url = redis_url or f"redis://{LOOPBACK}:{self.redis_port}/0"
        self.stats_socket = self.workdir / "haproxy.sock"
        self.haproxy_config = self.workdir / "haproxy.cfg"
        self.instances = [self._instance(i, free_port()) for i in range(instances)]
        self.redis: Process | None = None
        if redis_url is None:
            assert self.redis_binary is not None
            argv = [self.redis_binary, "--port", str(self.redis_port), "--bind", LOOPBACK, "--save", "",
                    "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "no"]  # fmt: skip
            self.redis = Process("redis", argv, self.workdir / "redis.log")
        haproxy_argv = [self.haproxy_binary, "-db", "-f", str(self.haproxy_config)]
        self.haproxy = Process("haproxy", haproxy_argv, self.workdir / "haproxy.log")

    # --- what callers read -------------------------------------------------

    @property
    def lb_url(self) -> str:
        return f"http://{LOOPBACK}:{self.lb_port}"

    def log(self, index: int) -> str:
        """The output of instance ``index`` so far (all its runs)."""
        return self.instances[index].process.log_path.read_text(errors="replace")

    # --- life cycle ----------------------------------------------------------

    async def __aenter__(self) -> LocalCluster:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Redis, then the instances (ready on /readyz), then HAProxy with all of them in rotation.
        Anything started is stopped again if a later step fails."""
        try:
            if self.redis is not None:
                self.redis.spawn()
                await self._wait_port(self.redis, self.redis_port)
            for instance in self.instances:
                self._spawn(instance)
            await asyncio.gather(*(self.wait_ready(i) for i in range(len(self.instances))))
            self.haproxy_config.write_text(self.render_haproxy_config())
            self.haproxy.spawn()
            await self._wait_port(self.haproxy, self.lb_port)
            await asyncio.gather(*(self.wait_in_rotation(i) for i in range(len(self.instances))))
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop everything this cluster started, by PID: instances (drained), HAProxy, Redis."""
        await asyncio.gather(*(i.process.stop(self.drain_timeout + KILL_WAIT) for i in self.instances))
        await self.haproxy.stop(KILL_WAIT)
        if self.redis is not None:
            await self.redis.stop(KILL_WAIT)
        if self._own_workdir and os.environ.get("HERALD_KEEP_CLUSTER_LOGS") is None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    async def terminate(self, index: int) -> Stopped:
        """SIGTERM instance ``index`` (as Kubernetes does) and wait for it to exit, up to
        ``drain_timeout`` plus a margin; SIGKILL after that, as the kubelet would."""
        process = self.instances[index].process
        started = time.monotonic()
        code = await process.signal_and_wait(signal.SIGTERM, self.drain_timeout + KILL_WAIT)
        if code is None:
            code = await process.signal_and_wait(signal.SIGKILL, KILL_WAIT)
        return Stopped(code, time.monotonic() - started)

    async def kill(self, index: int) -> Stopped:
        """SIGKILL instance ``index``: it dies without a word, as in an OOM kill."""
        started = time.monotonic()
        code = await self.instances[index].process.signal_and_wait(signal.SIGKILL, KILL_WAIT)
        return Stopped(code, time.monotonic() - started)

    async def start_instance(self, index: int, wait: bool = True) -> Instance:
        """Start instance ``index`` again on its port; with ``wait``, until HAProxy has it in rotation."""
        instance = self.instances[index]
        if instance.process.running:
            raise ClusterError(f"instance {index} is still running (pid {instance.pid})")
        self._spawn(instance)
        if wait:
            await self.wait_ready(index)
            if self.haproxy.running:
                await self.wait_in_rotation(index)
        return instance

    async def wait_ready(self, index: int, within: float = START_TIMEOUT) -> None:
        """Until instance ``index`` answers 200 on /readyz (its Redis is reachable)."""
        instance = self.instances[index]
        deadline = time.monotonic() + within
        while await asyncio.to_thread(http_status, instance.url + "/readyz") != 200:
            self._check_alive(instance.process)
            if time.monotonic() > deadline:
                raise ClusterError(f"instance {index} not ready within {within}s\n{instance.process.log_tail()}")
            await asyncio.sleep(0.05)

    async def wait_in_rotation(self, index: int, up: bool = True, within: float = START_TIMEOUT) -> float:
        """Until HAProxy's health checks have instance ``index`` UP (or, with ``up=False``, out
        of rotation); the seconds it took."""
        name = self.instances[index].server_name
        started = time.monotonic()
        while (await asyncio.to_thread(self.server_states)).get(name, "").startswith("UP") != up:
            self._check_alive(self.haproxy)
            if time.monotonic() - started > within:
                raise ClusterError(f"{name} not {'UP' if up else 'DOWN'} in HAProxy within {within}s")
            await asyncio.sleep(0.05)
        return time.monotonic() - started

    def server_states(self) -> dict[str, str]:
        """HAProxy's view of each instance ("UP", "DOWN", "UP 1/2"...)."""
        return {name: row.get("status", "") for name, row in self.lb_stats().items()}

    def lb_sessions(self) -> dict[str, int]:
        """Connections HAProxy holds open to each instance now (a websocket counts while it lives)."""
        return {name: int(row.get("scur") or 0) for name, row in self.lb_stats().items()}

    def lb_stats(self) -> dict[str, dict[str, str]]:
        """HAProxy's ``show stat`` row of each instance, read from its admin socket; empty if it is not up."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(1.0)
                sock.connect(str(self.stats_socket))
                sock.sendall(b"show stat\n")
                chunks = []
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
        except OSError:
            return {}
        lines = b"".join(chunks).decode(errors="replace").splitlines()
        if not lines:
            return {}
        columns = lines[0].lstrip("# ").split(",")
        rows = {}
        for line in lines[1:]:
            row = dict(zip(columns, line.split(","), strict=False))
            if row.get("pxname") == "herald" and row.get("svname", "").startswith("herald"):
                rows[row["svname"]] = row
        return rows

    # --- HAProxy ---------------------------------------------------------------

    def render_haproxy_config(self) -> str:
        """The production config's choices (deploy/haproxy.cfg) with loopback ports and faster checks."""
        servers = "\n".join(f"    server {i.server_name} {LOOPBACK}:{i.port} check" for i in self.instances)
        return f"""\
global
    maxconn 4096
    stats socket {self.stats_socket} mode 600 level admin

defaults
    mode http
    log stdout format raw local0
    option httplog
    option dontlognull
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    # A websocket is a tunnel after its upgrade: it may stay quiet between pings.
    timeout tunnel 1h
    timeout client-fin 5s
    timeout http-request 10s
    # A connection refused by a dead instance is retried on another one.
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response
    # Herald trusts this proxy's X-Forwarded-For (HERALD_TRUSTED_PROXIES below).
    option forwardfor

frontend herald_lb
    bind {LOOPBACK}:{self.lb_port}
    default_backend herald

backend herald
    balance leastconn
    # /readyz turns 503 while an instance drains or has lost Redis: it leaves rotation.
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 500ms fastinter 250ms downinter 500ms fall 1 rise 2
{servers}
"""

    # --- internals -------------------------------------------------------------

    def _instance(self, index: int, port: int) -> Instance:
        argv = [self.python, "-m", "herald_presence.server", "serve", "--host", LOOPBACK, "--port", str(port),
                "--redis-url", self.redis_url, "--redis-prefix", self.redis_prefix]  # fmt: skip
        for group, secret in self.groups.items():
            argv += ["--group", f"{group}={secret}"]
        return Instance(index, port, Process(f"herald{index}", argv, self.workdir / f"herald{index}.log"))

    def _spawn(self, instance: Instance) -> None:
        # The caller's HERALD_* settings must not leak into the cluster: it is configured here only.
        env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
        env["HERALD_SESSION_SECRET"] = self.session_secret
        env["HERALD_DRAIN_TIMEOUT"] = str(self.drain_timeout)
        env["HERALD_TRUSTED_PROXIES"] = LOOPBACK  # HAProxy: per-address limits count the clients behind it
        env.update({f"HERALD_{name.upper()}": value for name, value in self.settings.items()})
        instance.process.spawn(env)

    @staticmethod
    def _check_alive(process: Process) -> None:
        if process.popen is not None and process.popen.poll() is not None:
            raise ClusterError(
                f"{process.name} exited with {process.popen.returncode}: {' '.join(process.argv)}\n{process.log_tail()}"
            )

    async def _wait_port(self, process: Process, port: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            self._check_alive(process)
            try:
                with socket.create_connection((LOOPBACK, port), timeout=0.2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise ClusterError(f"{process.name} did not listen on {port}\n{process.log_tail()}") from None
                await asyncio.sleep(0.02)


# --- the command ----------------------------------------------------------------


def _parse_settings(pairs: list[str]) -> dict[str, str]:
    found = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair!r}: expected name=value")
        found[name.replace("-", "_")] = value
    return found


async def _serve(cluster: LocalCluster) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    started = time.monotonic()
    try:
        await cluster.start()
        print(f"load balancer: {cluster.lb_url}   (up in {time.monotonic() - started:.1f}s)")
        print(f"redis:         {cluster.redis_url} prefix {cluster.redis_prefix}"
              + (f" (pid {cluster.redis.pid})" if cluster.redis else ""))  # fmt: skip
        for instance in cluster.instances:
            print(f"instance {instance.index}:    {instance.url}  pid {instance.pid}")
        for group, secret in cluster.groups.items():
            print(f"group:         {group}  secret {secret}")
        print(f"logs:          {cluster.workdir}\nCtrl-C or SIGTERM stops everything.", flush=True)
        await stop.wait()
    finally:
        print("stopping...", flush=True)
        await cluster.stop()


def default_python() -> str:
    """The README's virtualenv when there is one: ``python3 deploy/local/cluster.py`` then just works."""
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Redis, N Herald instances and HAProxy on loopback.")
    parser.add_argument("--instances", type=int, default=3, help="how many Herald instances (default 3)")
    parser.add_argument("--port", type=int, default=None, help="the load balancer's port (default: a free one)")
    parser.add_argument("--group", action="append", default=[], metavar="ID=SECRET",
                        help="a group (repeatable; default: a demo group with a random secret)")  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="any Herald setting, e.g. --set grace_period=2 (repeatable)")  # fmt: skip
    parser.add_argument("--redis-url", help="use this Redis instead of starting a private one")
    parser.add_argument("--drain-timeout", type=float, default=20.0, help="seconds an instance may drain")
    parser.add_argument(
        "--python", help="interpreter with Herald's dependencies (default: the repository's .venv, else this one)"
    )
    args = parser.parse_args(argv)
    groups = dict(pair.split("=", 1) for pair in args.group if "=" in pair) or None
    try:
        cluster = LocalCluster(
            args.instances, lb_port=args.port, groups=groups, settings=_parse_settings(args.set),
            python=args.python or default_python(), redis_url=args.redis_url, drain_timeout=args.drain_timeout,
        )  # fmt: skip
        asyncio.run(_serve(cluster))
    except ClusterError as exc:
        sys.exit(f"cluster: {exc}")
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.flush()


if __name__ == "__main__":
    main()
