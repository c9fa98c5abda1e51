"""``python -m tests.bench.floods``: a bystander's round trips while one address floods Herald.

Four floods, each against one instance (memory backend) with the operator's
default limits:

- ``frames``: 20 connections each send a 58 KiB msgpack map of ~5,900 small
  unknown fields 45 times a second (under the 50/s frame rate): well-formed,
  and costly to decode;
- ``pings``: 10 connections send websocket PING control frames as fast as
  they can;
- ``signals``: 20 visitor connections each send 45 signals a second (1.3 KiB
  of data, with a request ID) addressed to one agent, the bystanders' first,
  which never watched them: under the frame and byte budgets;
- ``presence``: one visitor with 10 tabs (its connection limit), each
  sending 15 presence updates a second of 4 KiB data (under the byte budget),
  while 5 agents watch the group: reported with the bytes those watchers
  received per byte the tabs sent.

Each phase (``quiet`` first, the bystander alone) runs for a bounded time,
against a fresh instance.
An attacker that is closed connects again, within the per-address connection
limit like any client. Bystanders on another loopback address (127.0.0.2,
its own per-address budget), 4 visitor/agent pairs taking turns, meanwhile
do ``showterms`` / ``terms`` round trips at 20/s, open loop, each timed from
its scheduled send.
Per phase it prints the bystander's p50/p99/max and its p99 as a ratio to
the quiet phase's (the criterion: at most 5 times), the server's CPU, what
the attackers sent and how they were answered, and the limits hit (/metrics).
Processes: the server, one bystander and one attacker process per phase
(and one for the group watchers), each of this module (``bystander``,
``attack``, ``watchers`` modes print one JSON line); the attacker runs at the
lowest priority (nice 19), as its CPU would be elsewhere in a real attack.
``python -m tests.bench`` runs these phases too, after its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import msgpack

from herald_presence.protocol import tokens

from ..processes import REPO, clean_env, start_server
from . import clients
from .cluster import CpuMeter, loadavg, scrape

BYSTANDER_RATE = 20.0  # round trips per second, all pairs together
BYSTANDER_PAIRS = 4  # 5 a second each: a visitor may send an agent 10 signals a second
BYSTANDER_ADDRESS = "127.0.0.2"
DRAIN_SECONDS = 3.0  # answers may still come this long after the last send
RECONNECT_PAUSE = 0.25  # an attacker refused (429) or closed waits this long before connecting again
PHASE_TIMEOUT = 60.0  # seconds beyond its own length a worker may take
ATTACKS = {
    # kind: (connections, frames per second per connection; 0: as fast as it can)
    "frames": (20, 45.0),
    "pings": (10, 0.0),
    "signals": (20, 45.0),
    "presence": (10, 15.0),
}
FLOOD_TARGET = "bystander-agent-0"  # the agent the signal flood addresses
PRESENCE_VISITOR = "flood-tabs"  # the presence flood's visitor: one ID, all its tabs
WATCHERS = 5  # agents watching the group during the presence flood
CRITERION = 5.0  # a flood's bystander p99 may be at most this many times the quiet one


def costly_frame() -> bytes:
    """~58 KiB: a ``ping`` with ~5,900 small fields nobody knows (ignored, but decoded)."""
    return msgpack.packb({"type": "ping", **{f"f{i:07d}": i % 100 for i in range(5900)}})


def flood_frame(kind: str, n: int) -> bytes:
    """The ``n``-th frame of a ``signals`` or ``presence`` flood."""
    if kind == "signals":  # ~1.3 KiB of data, acked: 45/s stays under the frame and byte budgets
        data = {"x": f"{n:08d}" + "x" * 1292}
        return clients.pack({"type": "signal", "event": "flood", "agent": FLOOD_TARGET, "id": n, "data": data})
    # 4,011 bytes of data (max_presence_bytes is 4,096), new values each time so that every update is announced
    return clients.pack({"type": "presence", "data": {"a": f"{n:08d}" + "a" * 1992, "b": f"{n:08d}" + "b" * 1992}})


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


# --- the bystander -----------------------------------------------------------------------


async def _bystander(url: str, start: float, seconds: float) -> dict[str, Any]:
    """BYSTANDER_PAIRS visitor/agent pairs taking turns: each pair's visitor
    answers at most a few times a second (under the per-visitor signal budget)."""
    connector = aiohttp.TCPConnector(local_addr=(BYSTANDER_ADDRESS, 0), limit=0)
    async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as http:
        pending: dict[int, float] = {}
        latencies: list[float] = []
        counts: Counter[str] = Counter()
        answered = asyncio.Event()  # set whenever nothing is pending
        terms = clients.terms_displayed()

        async def visitor_reader(visitor: aiohttp.ClientWebSocketResponse) -> None:
            async for msg in visitor:
                frame = msgpack.unpackb(msg.data) if msg.type is aiohttp.WSMsgType.BINARY else {}
                if frame.get("type") == "signal" and frame.get("event") == "showterms":
                    await visitor.send_bytes(terms.frame(frame["data"]["n"]))

        async def agent_reader(agent: aiohttp.ClientWebSocketResponse) -> None:
            async for msg in agent:
                frame = msgpack.unpackb(msg.data) if msg.type is aiohttp.WSMsgType.BINARY else {}
                if frame.get("type") == "signal" and frame.get("event") == "terms":
                    scheduled = pending.pop(frame["data"]["n"], None)
                    if scheduled is not None:
                        latencies.append(time.perf_counter() - scheduled)
                        if not pending:
                            answered.set()
                elif frame.get("type") == "error":
                    counts[f"error:{frame.get('code')}"] += 1

        pairs: list[tuple[aiohttp.ClientWebSocketResponse, aiohttp.ClientWebSocketResponse, Any]] = []
        readers: list[asyncio.Task[None]] = []
        for n in range(BYSTANDER_PAIRS):
            visitor_id = f"bystander-{n}-{time.monotonic_ns()}"
            visitor = await clients.connect_visitor(http, url, visitor_id)
            cookie = await clients.login_agent(http, url, f"bystander-agent-{n}")
            agent = await clients.connect_agent(http, url, cookie, visitor_id)
            pairs.append((visitor, agent, clients.show_terms(visitor_id)))
            readers += [asyncio.create_task(visitor_reader(visitor)), asyncio.create_task(agent_reader(agent))]
        await asyncio.sleep(max(0.0, start - time.time()))
        t0, total = time.perf_counter(), round(BYSTANDER_RATE * seconds)
        for n in range(total):
            scheduled = t0 + n / BYSTANDER_RATE
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            pending[n] = scheduled
            _visitor, agent, signals = pairs[n % len(pairs)]
            await agent.send_bytes(signals.frame(n))
        if pending:
            answered.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(answered.wait(), DRAIN_SECONDS)
        for task in readers:
            task.cancel()
        for visitor, agent, _signals in pairs:
            await visitor.close()
            await agent.close()
        return {"sent": total, "missing": len(pending), "latencies_ms": sorted(x * 1000 for x in latencies), **counts}


# --- the attackers -----------------------------------------------------------------------


class Attacker:
    """One attacking connection, connecting again whenever it is closed, until the deadline."""

    def __init__(self, url: str, kind: str, number: int, rate: float, deadline: float, counts: Counter[str]) -> None:
        self.url, self.kind, self.number, self.rate, self.deadline = url, kind, number, rate, deadline
        self.counts = counts
        self.frame = costly_frame() if kind == "frames" else b""

    async def run(self, http: aiohttp.ClientSession) -> None:
        connection = 0
        while time.monotonic() < self.deadline:
            connection += 1
            visitor = PRESENCE_VISITOR if self.kind == "presence" else f"flood-{self.number}-{connection}"
            try:
                ws = await self._connect(http, visitor)
            except aiohttp.WSServerHandshakeError as exc:
                self.counts[f"upgrade refused {exc.status}"] += 1
                await asyncio.sleep(RECONNECT_PAUSE)
                continue
            except (aiohttp.ClientError, OSError, RuntimeError) as exc:
                self.counts[f"connect failed {type(exc).__name__}"] += 1
                await asyncio.sleep(RECONNECT_PAUSE)
                continue
            self.counts["connections"] += 1
            reader = asyncio.create_task(self._read(ws))
            with contextlib.suppress(ConnectionError, RuntimeError, aiohttp.ClientError):
                await self._send(ws, reader)
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(reader, 2.0)
            if not ws.closed:
                await ws.close()
            if ws.close_code is not None and time.monotonic() < self.deadline:
                self.counts[f"closed {ws.close_code}"] += 1

    async def _connect(self, http: aiohttp.ClientSession, visitor: str) -> aiohttp.ClientWebSocketResponse:
        """A visitor past its welcome; pings and pongs reach ``_read`` (autoping off)."""
        ws = await http.ws_connect(self.url + "/v1/visitor", autoping=False, max_msg_size=0)
        token = tokens.visitor_token(clients.SECRET, clients.GROUP, visitor)
        await ws.send_bytes(
            clients.pack({"type": "hello", "versions": [1], "group": clients.GROUP, "visitor": visitor, "token": token})
        )
        msg = await ws.receive(timeout=clients.CONNECT_TIMEOUT)
        if msg.type is not aiohttp.WSMsgType.BINARY or msgpack.unpackb(msg.data).get("type") != "welcome":
            await ws.close()
            raise RuntimeError(f"handshake refused: {msg.type.name}")
        return ws

    async def _send(self, ws: aiohttp.ClientWebSocketResponse, reader: asyncio.Task[None]) -> None:
        sent, started = 0, time.monotonic()
        while not reader.done() and (now := time.monotonic()) < self.deadline:
            if self.kind == "pings":
                await ws.ping()
                sent += 1
                if sent % 64 == 0:
                    await asyncio.sleep(0)  # let the reader in
            else:
                due = started + sent / self.rate
                if due > now:
                    await asyncio.sleep(due - now)
                    continue
                frame = self.frame or flood_frame(self.kind, self.number * 1_000_000 + sent)
                await ws.send_bytes(frame)
                self.counts["bytes sent"] += len(frame)
                sent += 1
            self.counts[self.kind + " sent"] += 1

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.PONG:
                self.counts["websocket pongs"] += 1
            elif msg.type is aiohttp.WSMsgType.PING:
                await ws.pong(msg.data)  # the server's keepalive
            elif msg.type is aiohttp.WSMsgType.BINARY:
                frame = msgpack.unpackb(msg.data)
                kind = frame.get("type")
                self.counts[f"error:{frame.get('code')}" if kind == "error" else f"{kind} frames"] += 1
            else:
                return


async def _watchers(url: str, start: float, seconds: float) -> dict[str, Any]:
    """WATCHERS agents watching the group, reading everything as it comes, until the phase ends."""
    counts: Counter[str] = Counter()
    async with clients.session() as http:
        sockets = []
        for n in range(WATCHERS):
            cookie = await clients.login_agent(http, url, f"flood-watcher-{n}")
            sockets.append(await clients.connect_agent(http, url, cookie, None, group=True))

        async def read(ws: aiohttp.ClientWebSocketResponse) -> None:
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.BINARY:
                    counts["bytes received"] += len(msg.data)
                    counts["frames"] += 1
            counts[f"closed {ws.close_code}"] += 1

        readers = [asyncio.create_task(read(ws)) for ws in sockets]
        await asyncio.sleep(max(0.0, start + seconds + 1.0 - time.time()))  # and a second for the queues
        for ws in sockets:
            await ws.close()
        await asyncio.gather(*readers, return_exceptions=True)
    counts.pop("closed 1000", None)
    return dict(counts)


async def _attack(url: str, kind: str, start: float, seconds: float) -> dict[str, Any]:
    count, rate = ATTACKS[kind]
    counts: Counter[str] = Counter()
    await asyncio.sleep(max(0.0, start - time.time()))
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as http:
        attackers = [Attacker(url, kind, n, rate, deadline, counts) for n in range(count)]
        await asyncio.gather(*(attacker.run(http) for attacker in attackers))
    return dict(counts)


# --- the orchestrator --------------------------------------------------------------------


def worker(*argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.bench.floods", *argv],
        cwd=REPO,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )


def result_of(process: subprocess.Popen[str], seconds: float) -> dict[str, Any]:
    out, _ = process.communicate(timeout=seconds + PHASE_TIMEOUT)
    lines = out.strip().splitlines()
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"a worker exited with {process.returncode}")
    return dict(json.loads(lines[-1]))


def percentile(values: list[float], sent: int, q: float) -> float:
    """Nearest rank over every round trip sent; an unanswered one counts as infinitely slow."""
    rank = max(0, math.ceil(q * sent) - 1)
    return values[rank] if rank < len(values) else math.inf


def limit_hits(url: str) -> dict[str, float]:
    samples = scrape(url).get("herald_limit_hits_total", {})
    return {dict(labels)["limit"]: value for labels, value in samples.items()}


def phase(url: str, pid: int, kind: str, seconds: float, quiet_p99: float | None) -> dict[str, Any]:
    """One phase against a fresh instance: what the bystander measured, and the attack's figures."""
    start = time.time() + 1.0  # time to connect the bystander (and the attackers' first connections)
    hits_before = limit_hits(url)
    timing = ("--url", url, "--start", str(start), "--seconds", str(seconds))
    bystander = worker("bystander", *timing)
    watchers = worker("watchers", *timing) if kind == "presence" else None
    attack = worker("attack", kind, *timing) if kind else None
    time.sleep(max(0.0, start - time.time()))
    meter = CpuMeter({"herald": pid})
    time.sleep(seconds)
    cpu = meter.cores()["herald"]
    answer = result_of(bystander, seconds)
    attacked = result_of(attack, seconds) if attack else {}
    watched = result_of(watchers, seconds) if watchers else {}
    hits = {k: v - hits_before.get(k, 0.0) for k, v in limit_hits(url).items() if v != hits_before.get(k, 0.0)}
    latencies, sent = answer.pop("latencies_ms"), answer["sent"]
    p50, p99 = percentile(latencies, sent, 0.5), percentile(latencies, sent, 0.99)
    worst = latencies[-1] if latencies and not answer["missing"] else math.inf
    ratio = "" if quiet_p99 is None else f"  p99 / quiet {p99 / quiet_p99:5.1f}x"
    print(
        f"{kind or 'quiet':>8}  bystander p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  max {worst:7.1f} ms  "
        f"lost {answer['missing']}/{sent}{ratio}  herald CPU {cpu:4.2f} cores  load {loadavg()}",
        flush=True,
    )
    result = {"kind": kind or "quiet", "p50": p50, "p99": p99, "lost": answer["missing"], "cpu": cpu}
    if kind:
        print(f"          attackers: {dict(sorted(attacked.items()))}")
        if watchers:
            out, into = watched.get("bytes received", 0), attacked.get("bytes sent", 0)
            result["amplification"] = out / max(1, into)
            print(
                f"          {WATCHERS} group watchers: {dict(sorted(watched.items()))}; bytes out / bytes in: "
                f"{out:,} / {into:,} = {out / max(1, into):.1f}"
            )
        print(f"          herald_limit_hits_total during the phase: {hits or 'none'}", flush=True)
    return result


def run_phases(seconds: float, kinds: list[str]) -> list[dict[str, Any]]:
    """``quiet``, then each flood in ``kinds``, each against a fresh instance; their results."""
    workdir = Path(tempfile.mkdtemp(prefix="herald-floods-"))
    argv = [sys.executable, "-m", "herald_presence.server", "serve", "--group", f"{clients.GROUP}={clients.SECRET}"]
    print(f"Floods against one instance with default limits, {seconds:g} s each (load {loadavg()}):")
    results: list[dict[str, Any]] = []
    for kind in ["", *kinds]:
        server = start_server(workdir, *argv)  # a fresh one per phase: no phase spends another's budgets
        try:
            results.append(phase(server.base_url, server.proc.pid, kind, seconds, results[0]["p99"] if kind else None))
        finally:
            server.stop()
    print(f"server logs: {workdir}")
    return results


def summary_lines(results: list[dict[str, Any]]) -> list[str]:
    """One line per flood: its bystander p99 against the quiet one's, against CRITERION."""
    quiet = results[0]["p99"]
    lines = []
    for result in results[1:]:
        ratio = result["p99"] / quiet
        extra = f"; bytes out / in {result['amplification']:.1f}" if "amplification" in result else ""
        lines.append(
            f"{result['kind'] + ' flood':<15} p99 {result['p99']:6.1f} ms vs quiet {quiet:5.1f} ms = {ratio:5.1f}x"
            f"{extra}  (target <= {CRITERION:g}x)  {'PASS' if ratio <= CRITERION else 'MISS'}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.floods", description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", default="run", choices=["run", "bystander", "attack", "watchers"])
    parser.add_argument("kind", nargs="?", choices=sorted(ATTACKS))
    parser.add_argument("--url")
    parser.add_argument("--start", type=float, default=0.0)
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each phase (default 8)")
    parser.add_argument("--floods", default=",".join(ATTACKS), help="phases after the quiet one, comma-separated")
    args = parser.parse_args()
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    if args.mode == "bystander":
        emit(asyncio.run(_bystander(args.url, args.start, args.seconds)))
    elif args.mode == "watchers":
        emit(asyncio.run(_watchers(args.url, args.start, args.seconds)))
    elif args.mode == "attack":
        os.nice(19)  # a real attacker's CPU is not on the server's machine: on this one, it yields to the rest
        emit(asyncio.run(_attack(args.url, args.kind, args.start, args.seconds)))
    else:
        kinds = [k for k in args.floods.split(",") if k]
        unknown = set(kinds) - set(ATTACKS)
        if unknown:
            sys.exit(f"unknown floods: {sorted(unknown)}")
        results = run_phases(args.seconds, kinds)
        print("\n".join(["", "Bystander p99 under each flood, as a ratio to quiet:", *summary_lines(results)]))


if __name__ == "__main__":
    main()
