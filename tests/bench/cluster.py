"""The benchmark's processes: Redis, two instances (Herald's, or the
ceiling's: ``tests/bench/ceiling.py``), the generators; and what /proc,
/metrics and Redis's INFO say about them.

Servers are started the way the tests start them (``tests/processes.py``,
``tests/redis_server.py``): free loopback ports, output to files, each
stopped by its own PID, never by name.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis
from prometheus_client.parser import text_string_to_metric_families

from ..processes import REPO, HeraldProcess, clean_env, start_server
from ..redis_server import RedisServer
from .clients import GROUP, SECRET

# Limits that exist to stop abusive clients, raised so that the benchmark's
# few addresses and busy connections are not refused; everything else is
# the default an operator gets.
RAISED_LIMITS = {
    "--connections-per-address": "1000000",
    "--max-connections-per-address": "1000000",
    "--message-rate": "1000000",
    "--message-burst": "1000000",
    "--address-message-budget": "1000",  # every generator connects from 127.0.0.1
    "--visitor-signal-rate": "1000000",
    "--visitor-signal-burst": "1000000",
}
WORKER_TIMEOUT = 120.0  # seconds a generator may take to answer one command
T = TypeVar("T")
TICKS = os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """Resident memory of a process, KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / TICKS


def listen_overflows() -> int:
    """Connections the kernel dropped since boot because a listening socket's accept queue was full
    (the client's SYN is retried after 1 s, then 3 s…)."""
    header, values = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()[:2]]
    return int(dict(zip(header, values, strict=True)).get("ListenOverflows", 0))


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


@dataclass
class Steadiness:
    """How steadily this machine ran a fixed piece of work (``steadiness``)."""

    median_ms: float
    stalls: list[float]  # per stall: the time its pieces lost over the median, ms
    seconds: float

    def describe(self) -> str:
        if not self.stalls:
            return f"a {self.median_ms:.2f}-ms piece of work never took {STALL_FACTOR}x that in {self.seconds:g} s"
        return (
            f"{len(self.stalls)} stall{'s' if len(self.stalls) > 1 else ''} in {self.seconds:g} s "
            f"(one every {self.seconds / len(self.stalls):.1f} s), "
            f"each losing up to {max(self.stalls):.0f} ms of CPU (a {self.median_ms:.2f}-ms piece of work "
            f"taking {STALL_FACTOR}x that or more)"
        )


STALL_FACTOR = 5
STALL_GAP = 0.3  # seconds: slow pieces closer together than this are one stall


def steadiness(seconds: float = 5.0, piece: int = 20_000) -> Steadiness:
    """Time the same small piece of work, with a short sleep between, for
    ``seconds`` on the otherwise idle machine. On a virtual machine whose host
    takes its CPU away now and then, pieces take many times the median, in
    stalls: every process of a round trip meets them, and neither Herald's
    p99 nor the ceiling's can be shorter than they allow."""
    took: list[tuple[float, float]] = []  # (when, how long)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.perf_counter()
        total = 0
        for i in range(piece):
            total += i
        took.append((started, time.perf_counter() - started))
        time.sleep(0.003)
    median = sorted(length for _, length in took)[len(took) // 2]
    stalls: list[float] = []
    last = -math.inf
    for when, length in took:
        if length >= STALL_FACTOR * median:
            if when - last > STALL_GAP:
                stalls.append(0.0)
            stalls[-1] += (length - median) * 1000
            last = when
    return Steadiness(median * 1000, stalls, seconds)


class Worker:
    """A generator process (``tests/bench/worker.py``), one JSON line per command and per answer."""

    def __init__(self, workdir: Path, *argv: str) -> None:
        self.name = argv[2]
        self.stderr_path = workdir / f"worker-{argv[2]}.stderr"
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.bench.worker", *argv],
                cwd=REPO,
                env=clean_env(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, command: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def answer(self) -> dict[str, Any]:
        """The worker's next line (its stderr if it died instead)."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(WORKER_TIMEOUT)
            raise RuntimeError(f"generator exited with {self.proc.returncode}:\n{self.stderr_path.read_text()}")
        return dict(json.loads(line))

    def stop(self) -> None:
        """Ask it to close its connections and exit; kill this PID if it does not."""
        if self.proc.poll() is None:
            try:
                self.send({"cmd": "quit"})
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)


@dataclass
class Cluster:
    """Instance A (visitors) + instance B (agents) of ``kind`` (``herald`` or
    ``ceiling``) on a Redis of the caller's, and the generators."""

    workdir: Path
    redis: RedisServer
    kind: str = "herald"
    a: HeraldProcess = field(init=False)
    b: HeraldProcess = field(init=False)
    workers: list[Worker] = field(default_factory=list)

    def start(self, *server_flags: str) -> None:
        """A and B: Herald with the raised limits and ``server_flags``, or the ceiling."""
        if self.kind == "ceiling":
            ceiling = [sys.executable, "-m", "tests.bench.ceiling", "--redis-url", self.redis.url, "--instance"]
            self.a = start_server(self.workdir, *ceiling, "A")
            self.b = start_server(self.workdir, *ceiling, "B")
            return
        session_secret = "YmVuY2gtc2Vzc2lvbi1zZWNyZXQtMzItYnl0ZXMhISE="  # 32 bytes, the same on both
        argv = [
            sys.executable,
            "-m",
            "herald_presence.server",
            "serve",
            "--redis-url",
            self.redis.url,
            "--group",
            f"{GROUP}={SECRET}",
            "--session-secret",
            session_secret,
        ]
        for flag, value in RAISED_LIMITS.items():
            argv += [flag, value]
        argv += server_flags
        self.a = start_server(self.workdir, *argv)
        self.b = start_server(self.workdir, *argv)

    def worker(self, *argv: str) -> Worker:
        urls = ("--visitor-url", self.a.base_url, "--agent-url", self.b.base_url)
        worker = Worker(self.workdir, argv[0], argv[1], f"{self.kind}-{argv[2]}", *argv[3:], *urls)
        self.workers.append(worker)
        return worker

    def pids(self) -> dict[str, int]:
        """Every process of the benchmark by role (generators as gen1, gen2…, idle1…)."""
        assert self.redis.process is not None
        named = {"A": self.a.proc.pid, "B": self.b.proc.pid, "redis": self.redis.process.pid}
        for number, worker in enumerate(self.workers, 1):
            named[f"worker{number}"] = worker.pid
        return named

    def stop(self) -> None:
        """The generators, then A and B; Redis stays (its keys are flushed for the next cluster)."""
        for worker in self.workers:
            worker.stop()
        for server in (getattr(self, "a", None), getattr(self, "b", None)):
            if server is not None:
                server.stop()
        flushall = getattr(self.redis, "flushall", None)  # a cluster (redis_cost.py) flushes each master
        if flushall is not None:
            flushall()
        else:
            redis.Redis.from_url(self.redis.url).flushall()


class CpuMeter:
    """CPU each benchmark process used over an interval, and what the rest
    of the machine (other people's work) used meanwhile, in cores."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.started = time.monotonic()
        self.machine = machine_busy_seconds()
        self.own = {name: cpu_seconds(pid) for name, pid in pids.items()}

    def cores(self) -> dict[str, float]:
        elapsed = time.monotonic() - self.started
        used = {name: (cpu_seconds(pid) - self.own[name]) / elapsed for name, pid in self.pids.items()}
        used["others"] = max(0.0, (machine_busy_seconds() - self.machine) / elapsed - sum(used.values()))
        return used


def scrape(base_url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """An instance's /metrics: sample name -> labels -> value."""
    with urllib.request.urlopen(base_url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


class RedisCounter:
    """What Redis did between two looks (``INFO all``): calls per command and
    read events (one per batch of commands a client sent: its round trips),
    less a baseline rate of the instances' own upkeep (heartbeats, probes)."""

    IGNORED = frozenset({"info", "hello", "client|setinfo", "client|setname", "select"})  # our looks, new connections

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.baseline: tuple[Counter[str], float] = (Counter(), 0.0)

    def look(self) -> tuple[float, Counter[str], float]:
        info = self.client.info("all")
        calls = Counter({name[8:]: stats["calls"] for name, stats in info.items() if name.startswith("cmdstat_")})
        return time.monotonic(), calls, float(info["total_reads_processed"])

    def since(self, start: tuple[float, Counter[str], float]) -> tuple[Counter[str], float]:
        """Calls per command and read events since ``start`` (our own INFO not counted), net of the baseline."""
        now, calls, reads = self.look()
        seconds = now - start[0]
        rates, read_rate = self.baseline
        delta: Counter[str] = Counter()
        for name, count in calls.items():
            if name not in self.IGNORED:
                delta[name] = count - start[1].get(name, 0) - rates.get(name, 0.0) * seconds
        return delta, reads - start[2] - 1 - read_rate * seconds

    def measure_baseline(self, seconds: float) -> None:
        self.baseline = (Counter(), 0.0)
        start = self.look()
        time.sleep(seconds)
        calls, reads = self.since(start)
        self.baseline = (Counter({k: v / seconds for k, v in calls.items()}), reads / seconds)


def visitor_costs(counter: Any, helper: Worker, n: int, settle: float, per_op: Callable[[Any, int], T]) -> dict[str, T]:
    """What ``n`` visitor connects (one at a time, through ``helper``) and
    their disconnects cost, as ``per_op`` of ``counter``'s deltas (its
    ``look``/``since``); the disconnects counted ``settle`` s after the close
    (Herald announces them offline after its grace period)."""
    start = counter.look()
    helper.send({"cmd": "visitors", "count": n, "prefix": "r", "concurrency": 1})
    helper.answer()
    costs = {"connect": per_op(counter.since(start), n)}
    start = counter.look()
    helper.send({"cmd": "close", "prefix": "r", "concurrency": 1})
    helper.answer()
    time.sleep(settle)
    costs["disconnect"] = per_op(counter.since(start), n)
    return costs
