"""``python -m tests.bench.redis_cost [--quick]``: what Herald costs Redis,
on one redis-server and on a Redis Cluster, measured side by side.

For each topology, two Herald instances (A: visitors, B: agents) and the
benchmark's generators (``tests/bench/worker.py``), then, from Redis's own
``INFO`` summed over the masters (net of a baseline of idle upkeep:
heartbeats and probes):

* per visitor connect, disconnect, signal round trip (an agent's
  ``showterms``, acked, and the visitor's ``terms`` back) and presence
  update: commands by name, round trips (read events), bytes in and out
  (clients' traffic; a cluster's replication is counted apart), and Redis
  CPU;
* Redis memory per online visitor (``used_memory`` around N idle visitors,
  with the generators' small presence data: a URL and a title).

The cluster is three masters with a replica each on loopback
(``tests/redis_cluster.py``), named to Herald by ``redis+cluster://``. The
main benchmark (``python -m tests.bench``) runs this as its last part;
OPERATIONS.md's sizing section starts from these figures.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from herald_presence.server.config import Settings

from ..redis_cluster import RedisClusterServers
from ..redis_server import RedisServer
from .cluster import Cluster, Worker, cpu_seconds, visitor_costs

GRACE = Settings().grace_period
SIGNALS = "signal + answer"
OPS = ("connect", "disconnect", SIGNALS, "presence update")
IGNORED = frozenset({"info", "hello", "client|setinfo", "client|setname", "select", "cluster|slots", "cluster|info"})
PAIRS = 20  # visitor/agent pairs of the generator
TOTALS = ("reads", "in", "out", "repl_out", "cpu_us", "herald_us")


class ClusterAsServer:
    """A ``RedisClusterServers`` where the benchmark's ``Cluster`` expects a ``RedisServer``."""

    def __init__(self, servers: RedisClusterServers) -> None:
        self.servers = servers

    @property
    def url(self) -> str:
        return self.servers.url

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.servers.processes[self.servers.masters()[0]]

    def flushall(self) -> None:
        for port in self.servers.masters():
            with redis.Redis(host="127.0.0.1", port=port) as client:
                client.flushall()


@dataclass
class Cost:
    commands: Counter[str] = field(default_factory=Counter)
    totals: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        named = ", ".join(f"{name.upper()} {count:.1f}" for name, count in self.commands.most_common())
        t = self.totals
        repl = f", replication {t['repl_out']:.0f} B" if t["repl_out"] >= 1 else ""
        return (
            f"{sum(self.commands.values()):.1f} commands ({named or 'none'}) in {t['reads']:.1f} round trips; "
            f"{t['in']:.0f} B in, {t['out']:.0f} B out{repl}; {t['cpu_us']:.0f} µs Redis CPU, "
            f"{t['herald_us']:.0f} µs Herald CPU (A+B)"
        )


class NodesCounter:
    """What the masters did between two looks (``INFO all``, summed), net of a baseline rate."""

    def __init__(self, ports: list[int], pids: list[int]) -> None:
        self.clients = [redis.Redis(host="127.0.0.1", port=port) for port in ports]
        self.pids = pids  # Herald's instances: their CPU counts too
        self.baseline: tuple[Counter[str], dict[str, float]] = (Counter(), dict.fromkeys(TOTALS, 0.0))

    def look(self) -> tuple[float, Counter[str], dict[str, float]]:
        calls: Counter[str] = Counter()
        totals = dict.fromkeys(TOTALS, 0.0)
        for client in self.clients:
            info = client.info("all")
            calls.update({name[8:]: stats["calls"] for name, stats in info.items() if name.startswith("cmdstat_")})
            totals["reads"] += info["total_reads_processed"] - 1  # our INFO
            # Redis 7's totals include replication, counted apart here.
            totals["in"] += info["total_net_input_bytes"] - info.get("total_net_repl_input_bytes", 0)
            totals["out"] += info["total_net_output_bytes"] - info.get("total_net_repl_output_bytes", 0)
            totals["repl_out"] += info.get("total_net_repl_output_bytes", 0)
            totals["cpu_us"] += (info["used_cpu_user"] + info["used_cpu_sys"]) * 1e6
        totals["herald_us"] = sum(cpu_seconds(pid) for pid in self.pids) * 1e6
        return time.monotonic(), calls, totals

    def used_memory(self) -> int:
        return sum(int(client.info("memory")["used_memory"]) for client in self.clients)

    def since(self, start: tuple[float, Counter[str], dict[str, float]]) -> tuple[Counter[str], dict[str, float]]:
        now, calls, totals = self.look()
        seconds = now - start[0]
        rates, total_rates = self.baseline
        delta: Counter[str] = Counter()
        for name, count in calls.items():
            if name not in IGNORED:
                delta[name] = count - start[1].get(name, 0) - rates.get(name, 0.0) * seconds
        return delta, {k: totals[k] - start[2][k] - total_rates[k] * seconds for k in TOTALS}

    def measure_baseline(self, seconds: float) -> None:
        self.baseline = (Counter(), dict.fromkeys(TOTALS, 0.0))
        start = self.look()
        time.sleep(seconds)
        calls, totals = self.since(start)
        rates = Counter({k: v / seconds for k, v in calls.items()})
        self.baseline = (rates, {k: v / seconds for k, v in totals.items()})

    def close(self) -> None:
        for client in self.clients:
            client.close()


def per_op(delta: tuple[Counter[str], dict[str, float]], ops: int) -> Cost:
    calls, totals = delta
    return Cost(
        Counter({k: v / ops for k, v in calls.items() if abs(v / ops) >= 0.05}), {k: v / ops for k, v in totals.items()}
    )


def run_signals(generator: Worker, rate: float, seconds: float) -> int:
    generator.send({"cmd": "run", "rate": rate, "seconds": seconds, "start": time.time() + 0.3})
    return int(generator.answer()["sent"])


def measure(name: str, server: Any, ports: list[int], workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Per-op costs and memory per online visitor for Herald on ``server``."""
    cluster = Cluster(workdir, server)
    result: dict[str, Any] = {}
    n = args.ops
    counter: NodesCounter | None = None
    try:
        cluster.start()
        counter = NodesCounter(ports, [cluster.a.proc.pid, cluster.b.proc.pid])
        generator = cluster.worker("pairs", "--name", f"{name}-gen", "--count", str(PAIRS))
        generator.answer()
        helper = cluster.worker("idle", "--name", f"{name}-r")
        run_signals(generator, 200, 1.0)  # warm-up: connections made, scripts loaded
        counter.measure_baseline(args.baseline)
        result.update(visitor_costs(counter, helper, n, GRACE + 0.5, per_op))
        start = counter.look()
        sent = run_signals(generator, n, 1.0)
        result[SIGNALS] = per_op(counter.since(start), sent)
        start = counter.look()
        # 3 a second per visitor, under presence_rate (4): every update is stored, none merged.
        generator.send({"cmd": "presence", "count": n, "rate": 3 * PAIRS})
        generator.answer()
        result["presence update"] = per_op(counter.since(start), n)
        before = counter.used_memory()
        helper.send({"cmd": "visitors", "count": args.visitors, "prefix": "m", "concurrency": 50})
        helper.answer()
        time.sleep(1.0)
        result["memory"] = (counter.used_memory() - before) / args.visitors
        helper.send({"cmd": "close", "prefix": "m", "concurrency": 50})
        helper.answer()
    finally:
        if counter is not None:
            counter.close()
        cluster.stop()
    return result


def run(workdir: Path, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Both topologies, printed as they are measured; the figures by topology."""
    print(
        f"Redis cost per operation ({args.ops} of each, net of {args.baseline:g} s of idle upkeep; "
        "cluster: 3 masters + 3 replicas on loopback, summed over the masters):"
    )
    results: dict[str, dict[str, Any]] = {}
    standalone = RedisServer()
    standalone.start()
    try:
        results["standalone"] = measure("standalone", standalone, [standalone.port], workdir, args)
    finally:
        standalone.stop()
    servers = RedisClusterServers().start()
    try:
        results["cluster"] = measure("cluster", ClusterAsServer(servers), servers.masters(), workdir, args)
    finally:
        servers.stop()
    for op in OPS:
        print(f"  per {op}:")
        for topology, figures in results.items():
            print(f"    {topology:<10} {figures[op].describe()}")
    print(
        f"  Redis memory per online visitor ({args.visitors} idle visitors, one group, small presence data): "
        + "; ".join(f"{t} {f['memory']:.0f} B" for t, f in results.items())
        + " (a cluster's replicas hold as much again)"
    )
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ops", type=int, help="connects (etc.) counted; default 200, quick 100")
    parser.add_argument("--visitors", type=int, help="idle visitors weighed in Redis memory; default 5000, quick 1000")
    parser.add_argument("--baseline", type=float, help="seconds of idle upkeep measured; default 3, quick 1")


def defaults(args: argparse.Namespace) -> None:
    quick = getattr(args, "quick", False)
    args.ops = args.ops or (100 if quick else 200)
    args.visitors = args.visitors or (1000 if quick else 5000)
    args.baseline = args.baseline or (1.0 if quick else 3.0)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.redis_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer operations and visitors")
    add_arguments(parser)
    args = parser.parse_args()
    defaults(args)
    for binary in ("redis-server", "redis-cli"):
        if shutil.which(binary) is None:
            sys.exit(f"{binary} is not on PATH (apt-get install redis-server)")
    workdir = Path(tempfile.mkdtemp(prefix="herald-redis-cost-"))
    started = time.monotonic()
    run(workdir, args)
    print(f"(took {time.monotonic() - started:.0f} s; logs in {workdir})")


if __name__ == "__main__":
    main()
