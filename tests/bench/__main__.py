"""``python -m tests.bench [--quick]``: measure Herald against ARCHITECTURE.md's targets.

One redis-server, instance A (visitors), instance B (agents), generator
processes, all on this machine. It prints, as it goes:

1. the machine's context (cores, Python, uvloop, load from others);
2. memory per idle connection: RSS of A before and after N idle visitors,
   of B before and after N idle agents (each watching one of them), which
   then stay connected for the rest of the run, as a real server's would;
3. round-trip latency at 2,000/s (repeated): an agent's ``showterms`` out,
   the visitor's ``terms`` back, timed at the agent from the scheduled send;
4. a ramp of rates up to the first whose p99 exceeds 50 ms;
5. the servers' own view from /metrics, to cross-check the generators.

Every phase is bounded in count and time; the default run takes a few
minutes, ``--quick`` about half a minute.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cluster import RAISED_LIMITS, Cluster, CpuMeter, Worker, loadavg, rss_kib, scrape

IDLE_PER_WORKER = 4500  # visitors (and as many agents) per idle process: 9,000 sockets, under the 20,000 open files
SETTLE_SECONDS = 2.0  # after connecting idle clients, before reading RSS
DEFAULT_RATES = "1000,1500,2000,2500,3000,4000,6000,8000,10000,12000,14000,16000,20000"
TARGETS = {"rate": 10_400, "p99_at_2000_ms": 5.0, "kib_per_idle": 13.0}


@dataclass
class Step:
    rate: float
    seconds: float
    sent: int
    missing: int
    latencies_ms: list[float]  # sorted
    lag_p99_ms: float
    counts: Counter[str]
    cores: dict[str, float]
    load: str

    def percentile(self, q: float) -> float:
        """Nearest rank over every signal sent; an unanswered one counts as infinitely slow."""
        rank = max(0, math.ceil(q * self.sent) - 1)
        return self.latencies_ms[rank] if rank < len(self.latencies_ms) else math.inf

    @property
    def worst_ms(self) -> float:
        return math.inf if self.missing else self.latencies_ms[-1] if self.latencies_ms else math.inf


def ms(value: float) -> str:
    return "lost" if math.isinf(value) else f"{value:.2f}" if value < 10 else f"{value:.1f}"


def context(args: argparse.Namespace) -> None:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()
    versions = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in ("aiohttp", "redis", "msgpack"))
    uvloop = "on" if importlib.util.find_spec("uvloop") else "off (pip install -e '.[fast]')"
    hiredis = "on" if importlib.util.find_spec("hiredis") else "off"  # redis-py parses replies in C with it
    print(f"Herald benchmark, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(f"  machine: {os.cpu_count()} cores ({model}), Linux {platform.release()}")
    print(
        f"  Python {platform.python_version()}, uvloop {uvloop} (servers and generators), hiredis {hiredis}, "
        f"{versions}, "
        f"redis-server {redis_version[2].removeprefix('v=') if len(redis_version) > 2 else '?'}"
    )
    print(f"  load average before the run: {loadavg()} (1, 5, 15 min; other work on this machine counts too)")
    acks = "no acks" if args.no_acks else "signals acked, as the SDK asks"
    keepalive = f"keepalive {args.keepalive:g} s" if args.keepalive else "default keepalive (25 s)"
    print(
        f"  setup: redis-server + herald A (visitors) + herald B (agents) + {args.generators} generator "
        f"process(es) with {args.pairs} visitor/agent pairs ({acks}), all on these cores; {keepalive}; raised: "
        + " ".join(f"{flag} {value}" for flag, value in RAISED_LIMITS.items())
    )
    print()


def run_step(cluster: Cluster, generators: list[Worker], rate: float, seconds: float) -> Step:
    """One open-loop step shared by the generators; CPU is read over the sending window only."""
    start = time.time() + 0.3
    for generator in generators:
        generator.send({"cmd": "run", "rate": rate / len(generators), "seconds": seconds, "start": start})
    time.sleep(max(0.0, start - time.time()))
    meter = CpuMeter(cluster.pids())
    time.sleep(seconds)
    cores, load = meter.cores(), loadavg()
    answers = [generator.answer() for generator in generators]
    latencies = sorted(us / 1000 for answer in answers for us in answer["latencies_us"])
    counts: Counter[str] = Counter()
    for answer in answers:
        counts.update(answer["counts"])
    return Step(
        rate=rate,
        seconds=seconds,
        sent=sum(a["sent"] for a in answers),
        missing=sum(a["missing"] for a in answers),
        latencies_ms=latencies,
        lag_p99_ms=max(a["lag_p99_ms"] for a in answers),
        counts=counts,
        cores=cores,
        load=load,
    )


STEP_HEADER = (
    f"{'rate/s':>7} {'sent':>7} {'lost':>5} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
    f"{'gen lag p99':>11}  CPU cores: herald A / B / redis / generators / others  herald CPU µs/rt  load avg"
)


def print_step(step: Step, label: str = "") -> None:
    cores = step.cores
    generators = sum(v for k, v in cores.items() if k.startswith("worker"))
    errors = {k: v for k, v in step.counts.items() if k.startswith("error") or k in ("late", "closed")}
    per_trip = (cores["herald A"] + cores["herald B"]) / step.rate * 1e6  # both instances' CPU for one round trip
    print(
        f"{step.rate:>7.0f} {step.sent:>7} {step.missing:>5} {ms(step.percentile(0.5)):>7} "
        f"{ms(step.percentile(0.99)):>7} {ms(step.worst_ms):>7} {step.lag_p99_ms:>9.1f}ms  "
        f"{cores['herald A']:.2f} / {cores['herald B']:.2f} / {cores['redis']:.2f} / {generators:.2f} / "
        f"{cores['others']:.2f}  {per_trip:>15.0f}  {step.load}{'  ' + label if label else ''}"
        f"{'  ' + str(errors) if errors else ''}",
        flush=True,
    )


def measure_memory(cluster: Cluster, idle: int) -> dict[str, Any]:
    """RSS of A around N idle visitors, of B around N idle agents; they stay connected."""
    workers = [cluster.worker("idle", "--name", f"idle{n}") for n in range(math.ceil(idle / IDLE_PER_WORKER))]
    shares = [min(IDLE_PER_WORKER, idle - n * IDLE_PER_WORKER) for n in range(len(workers))]
    result: dict[str, Any] = {"count": idle}
    for role, server in (("visitors", cluster.a), ("agents", cluster.b)):
        before = rss_kib(server.proc.pid)
        started = time.monotonic()
        for worker, share in zip(workers, shares, strict=True):
            worker.send({"cmd": role, "count": share})
        for worker in workers:
            worker.answer()
        took = time.monotonic() - started
        time.sleep(SETTLE_SECONDS)
        after = rss_kib(server.proc.pid)
        result[role] = {"before": before, "after": after, "per_conn": (after - before) / idle, "seconds": took}
        print(
            f"  {idle} idle {role} on herald {'A' if role == 'visitors' else 'B'}: RSS {before / 1024:.1f} MiB -> "
            f"{after / 1024:.1f} MiB = {(after - before) / idle:.1f} KiB per connection "
            f"(connected in {took:.1f} s, load {loadavg()})",
            flush=True,
        )
    return result


def histogram_quantile(buckets: dict[float, float], q: float) -> float:
    """The upper bound of the bucket holding quantile q (Prometheus buckets are cumulative)."""
    total = buckets.get(math.inf, 0.0)
    for bound in sorted(buckets):
        if buckets[bound] >= q * total:
            return bound
    return math.inf


def server_view(cluster: Cluster, generated: int) -> None:
    """What the instances counted over the whole run, against what the generators sent."""
    a, b = scrape(cluster.a.base_url), scrape(cluster.b.base_url)
    buckets = b["herald_signal_delivery_seconds_bucket"].items()
    delivered = {float(dict(key)["le"]): value for key, value in buckets if dict(key)["outcome"] == "delivered"}
    count = b["herald_signal_delivery_seconds_count"].get((("outcome", "delivered"),), 0.0)
    total = b["herald_signal_delivery_seconds_sum"].get((("outcome", "delivered"),), 0.0)
    errors = b["herald_signal_delivery_seconds_count"].get((("outcome", "error"),), 0.0)
    print(
        f"  herald B herald_signal_delivery_seconds{{outcome=delivered}}: {count:.0f} signals, mean "
        f"{1000 * total / max(count, 1):.2f} ms, p50 <= {1000 * histogram_quantile(delivered, 0.5):g} ms, "
        f"p99 <= {1000 * histogram_quantile(delivered, 0.99):g} ms (bucket bounds; outcome=error: {errors:.0f})"
    )

    def messages(samples: dict[str, Any], kind: str, role: str, message: str) -> float:
        return float(samples[f"herald_messages_{kind}_total"].get((("role", role), ("type", message)), 0.0))

    print(
        f"  herald_messages_*: B received {messages(b, 'received', 'agent', 'signal'):.0f} agent signals "
        f"(generators sent {generated}), A sent {messages(a, 'sent', 'visitor', 'signal'):.0f} to visitors, "
        f"A received {messages(a, 'received', 'visitor', 'signal'):.0f} visitor answers, B sent "
        f"{messages(b, 'sent', 'agent', 'signal'):.0f} of them and {messages(b, 'sent', 'agent', 'ack'):.0f} acks "
        f"to agents"
    )
    dropped = sum(b.get("herald_slow_consumer_disconnects_total", {}).values()) + sum(
        a.get("herald_slow_consumer_disconnects_total", {}).values()
    )
    print(f"  slow-consumer disconnects: {dropped:.0f}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~30 s smoke run: fewer idle clients, short steps")
    parser.add_argument("--pairs", type=int, default=100, help="visitor/agent pairs that carry the load")
    parser.add_argument("--generators", type=int, default=2, help="processes sharing the pairs and the rate")
    parser.add_argument("--idle", type=int, help="idle visitors (and as many idle agents); default 5000, quick 500")
    parser.add_argument("--repeats", type=int, help="runs at 2,000/s; default 3, quick 1")
    parser.add_argument("--seconds", type=float, help="seconds of one run at 2,000/s; default 10, quick 4")
    parser.add_argument("--step-seconds", type=float, help="seconds of one ramp step; default 5, quick 2")
    parser.add_argument("--rates", help="ramp rates, comma-separated (default 1000,1500,...,20000)")
    parser.add_argument(
        "--no-acks", action="store_true", help="signals without request IDs, so no ack frames (the SDK always asks)"
    )
    parser.add_argument(
        "--keepalive",
        type=float,
        help="the servers' ping interval (default theirs, 25 s); idle clients that connected together are pinged "
        "together, so their pings come in bursts during the measurements",
    )
    parser.add_argument("--p99-limit", type=float, default=50.0, help="ms; the ramp stops at the first rate above")
    args = parser.parse_args()
    quick = args.quick
    args.idle = args.idle if args.idle is not None else 500 if quick else 5000
    args.repeats = args.repeats or (1 if quick else 3)
    args.seconds = args.seconds or (4.0 if quick else 10.0)
    args.step_seconds = args.step_seconds or (2.0 if quick else 5.0)
    default_rates = "1000,2000,3000,6000,10000,14000" if quick else DEFAULT_RATES
    args.rates = [float(r) for r in (args.rates or default_rates).split(",")]
    if args.pairs % args.generators:
        parser.error("--pairs must split evenly over --generators")
    return args


def main() -> None:
    args = parse_args()
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not on PATH (apt-get install redis-server)")
    context(args)
    workdir = Path(tempfile.mkdtemp(prefix="herald-bench-"))
    cluster = Cluster(workdir)
    try:
        cluster.start(*(["--keepalive", str(args.keepalive)] if args.keepalive else []))
        per_generator = args.pairs // args.generators
        flags = ["--no-acks"] if args.no_acks else []
        generators = [
            cluster.worker("pairs", "--name", f"gen{n}", "--count", str(per_generator), *flags)
            for n in range(args.generators)
        ]
        for generator in generators:
            generator.answer()
        print(STEP_HEADER)
        warm_up = run_step(cluster, generators, 1000, 2.0)
        print_step(warm_up, "warm-up, not counted")
        print()
        memory = measure_memory(cluster, args.idle) if args.idle else None
        print(
            f"\nRound trips at 2,000/s ({args.repeats} x {args.seconds:g} s, {args.idle} idle visitors and "
            f"{args.idle} idle agents connected):"
        )
        print(STEP_HEADER)
        at_2000 = []
        for _ in range(args.repeats):
            at_2000.append(run_step(cluster, generators, 2000, args.seconds))
            print_step(at_2000[-1])
        print(f"\nRamp ({args.step_seconds:g} s per rate, until p99 > {args.p99_limit:g} ms):")
        print(STEP_HEADER)
        best: Step | None = None
        ramp: list[Step] = []
        for rate in args.rates:
            step = run_step(cluster, generators, rate, args.step_seconds)
            ramp.append(step)
            passed = step.percentile(0.99) <= args.p99_limit
            print_step(step, "" if passed else f"p99 over {args.p99_limit:g} ms: stop")
            if not passed:
                break
            best = step
        generated = sum(s.sent for s in [warm_up, *at_2000, *ramp])
        print("\nServer-side view (/metrics over the whole run):")
        server_view(cluster, generated)
        summary(args, memory, at_2000, best)
    finally:
        cluster.stop()
        print(f"\nserver and generator logs: {workdir}")


def summary(args: argparse.Namespace, memory: dict[str, Any] | None, at_2000: list[Step], best: Step | None) -> None:
    p99s = [s.percentile(0.99) for s in at_2000]
    print("\nSummary against ARCHITECTURE.md's targets:")
    rate, best_p99 = (best.rate, ms(best.percentile(0.99))) if best else (0, "-")
    print(
        f"  highest rate with p99 <= {args.p99_limit:g} ms: {rate:.0f}/s (p99 {best_p99} ms)   "
        f"target >= {TARGETS['rate']:,}/s: {'met' if rate >= TARGETS['rate'] else 'NOT met'}"
    )
    under = sum(p < TARGETS["p99_at_2000_ms"] for p in p99s)
    verdict = "met" if under == len(p99s) else f"met in {under} of {len(p99s)} runs" if under else "NOT met"
    limit = TARGETS["p99_at_2000_ms"]
    print(f"  p99 at 2,000/s: {', '.join(ms(p) for p in p99s)} ms   target < {limit:g} ms: {verdict}")
    if memory:
        visitor, agent = memory["visitors"]["per_conn"], memory["agents"]["per_conn"]
        print(
            f"  memory per idle connection: visitor {visitor:.1f} KiB, agent {agent:.1f} KiB   target <= "
            f"{TARGETS['kib_per_idle']:g} KiB: "
            f"{'met' if max(visitor, agent) <= TARGETS['kib_per_idle'] else 'NOT met'}"
        )


if __name__ == "__main__":
    main()
