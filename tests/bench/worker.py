"""A load generator process: ``python -m tests.bench.worker pairs|idle ...``.

The orchestrator (``tests/bench/__main__.py``) talks to it with one JSON
object per line: commands on stdin, results on stdout. Generators run in
processes of their own so that the servers' and the generator's CPU can be
told apart, and so that several can share the work when one is not enough.

``pairs``: visitor/agent pairs (visitor on instance A, agent on B watching
it) driven open-loop: the agents' ``showterms`` signals leave on a fixed
schedule whatever the answers do (a closed loop would slow down with the
server and hide its stalls, "coordinated omission"), and each round trip is
timed from the moment its signal was *scheduled* to the moment the agent
holds the visitor's ``terms`` answer.

``idle``: many connections that only answer pings, to weigh what an idle
connection costs a server; batches of visitors connected (at a chosen
concurrency: one at a time to count Redis commands, hundreds at once for a
reconnect storm) and closed on command; an agent watching the whole group
that tells when it has seen given visitors come online.

Both modes drive Herald and the ceiling (``tests/bench/ceiling.py``) alike:
the ceiling answers the same URLs with the same frames.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import sys
import time
from collections import Counter
from typing import Any

import aiohttp
import msgpack

from . import clients

SEND_TICK = 0.001  # seconds the sender sleeps at least between batches (those due are sent together)
DRAIN_SECONDS = 3.0  # after a step's last signal, how long answers may still come (the server's delivery_timeout)


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


async def commands() -> Any:
    """Commands from the orchestrator until it closes our stdin."""
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        yield json.loads(line)


class Pair:
    __slots__ = ("agent", "signals", "visitor", "visitor_id")

    def __init__(
        self,
        visitor_id: str,
        visitor: aiohttp.ClientWebSocketResponse,
        agent: aiohttp.ClientWebSocketResponse,
        ack: bool,
    ) -> None:
        self.visitor_id, self.visitor, self.agent = visitor_id, visitor, agent
        self.signals = clients.show_terms(visitor_id, ack)


class PairsLoad:
    """Pairs, their readers, and the open-loop schedule."""

    def __init__(self, name: str, count: int, ack: bool) -> None:
        self.name, self.count, self.ack = name, count, ack
        self.pairs: list[Pair] = []
        self.readers: list[asyncio.Task[None]] = []
        self.pending: dict[int, float] = {}  # sequence number -> scheduled send time (perf_counter)
        self.latencies: list[float] = []
        self.scheduled: list[float] = []  # each latency's scheduled send, seconds into its step
        self.t0 = 0.0  # the step's start (perf_counter)
        self.answered = asyncio.Event()  # set whenever nothing is pending any more
        self.next_seq = 1
        self.counts: Counter[str] = Counter()  # acks, errors by code, late answers
        self.terms = clients.terms_displayed(ack)

    async def connect(self, http: aiohttp.ClientSession, visitor_url: str, agent_url: str) -> None:
        async def one(i: int) -> Pair:
            visitor_id, agent_id = f"{self.name}-v{i}", f"{self.name}-a{i}"
            visitor = await clients.connect_visitor(http, visitor_url, visitor_id, {"url": "/billing"})
            cookie = await clients.login_agent(http, agent_url, agent_id)
            agent = await clients.connect_agent(http, agent_url, cookie, visitor_id)
            return Pair(visitor_id, visitor, agent, self.ack)

        self.pairs = await clients.bounded(range(self.count), one)
        for pair in self.pairs:
            self.readers.append(asyncio.create_task(self._agent_reader(pair.agent)))
            self.readers.append(asyncio.create_task(self._visitor_reader(pair.visitor)))

    def _count(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        self.counts[f"error:{frame.get('code')}" if kind == "error" else str(kind)] += 1

    async def _agent_reader(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        clock, pending, unpack = time.perf_counter, self.pending, msgpack.unpackb
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.BINARY:
                continue
            frame = unpack(msg.data)
            if frame.get("type") == "signal" and frame.get("event") == "terms":
                scheduled = pending.pop(frame["data"].get("n"), None)
                if scheduled is None:
                    self.counts["late"] += 1  # its step gave up on it already
                else:
                    self.latencies.append(clock() - scheduled)
                    self.scheduled.append(scheduled - self.t0)
                    if not pending:
                        self.answered.set()
            elif frame.get("type") == "error" and frame.get("code") == "overloaded":
                # Refused at once: answered, not lost (the overload phase counts these).
                self.counts["refused"] += 1
                if pending.pop(frame.get("id"), None) is not None and not pending:
                    self.answered.set()
            else:
                self._count(frame)

    async def _visitor_reader(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        unpack, terms = msgpack.unpackb, self.terms
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.BINARY:
                continue
            frame = unpack(msg.data)
            if frame.get("type") == "signal" and frame.get("event") == "showterms":
                await ws.send_bytes(terms.frame(frame["data"]["n"]))
            else:
                self._count(frame)

    async def run(self, rate: float, seconds: float, start_wall: float) -> dict[str, Any]:
        """Send ``rate`` signals per second for ``seconds`` from ``start_wall``
        (unix time, shared by every generator), round-robin over the pairs."""
        clock, pending, pairs = time.perf_counter, self.pending, self.pairs
        self.latencies, self.scheduled, self.counts = [], [], Counter()
        t0 = self.t0 = clock() + (start_wall - time.time())
        total, interval, base = max(1, round(rate * seconds)), 1.0 / rate, self.next_seq
        self.next_seq += total
        lags: list[float] = []
        gc.disable()  # the generator's own collections must not show up as server latency
        try:
            i = 0
            while i < total:
                now = clock()
                due = min(total, math.floor((now - t0) * rate) + 1)
                if due <= i:  # at least SEND_TICK: a wake-up per signal would cost more than its send
                    await asyncio.sleep(max(SEND_TICK, t0 + i * interval - now))
                    continue
                while i < due:
                    pair = pairs[i % len(pairs)]
                    scheduled = t0 + i * interval
                    pending[base + i] = scheduled
                    try:
                        await pair.agent.send_bytes(pair.signals.frame(base + i))
                    except ConnectionError:  # the server closed it (a resync, a slow consumer): counted lost
                        self.counts["closed"] += 1
                    lags.append(clock() - scheduled)
                    i += 1
                await asyncio.sleep(SEND_TICK)  # behind schedule or not, let the readers in (never spin)
            if pending:
                self.answered.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.answered.wait(), DRAIN_SECONDS)
        finally:
            gc.enable()
        missing = len(pending)
        pending.clear()
        lags.sort()
        gc.collect()
        return {
            "sent": total,
            "missing": missing,
            "latencies_us": [round(x * 1e6) for x in self.latencies],
            "scheduled_ms": [round(x * 1e3) for x in self.scheduled],
            "lag_p99_ms": lags[min(len(lags) - 1, int(len(lags) * 0.99))] * 1000,
            "lag_max_ms": lags[-1] * 1000,
            "counts": dict(self.counts),
        }

    async def presence(self, count: int, rate: float) -> dict[str, Any]:
        """``count`` presence updates (new data each) from the visitors in turn, ``rate`` a second."""
        started = time.perf_counter()
        for i in range(count):
            await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
            await self.pairs[i % len(self.pairs)].visitor.send_bytes(
                clients.pack({"type": "presence", "data": {"n": i}})
            )
        await asyncio.sleep(0.5)  # for the watchers' presence_changed
        return {"sent": count}

    async def close(self) -> None:
        await clients.bounded([ws for pair in self.pairs for ws in (pair.agent, pair.visitor)], lambda ws: ws.close())
        for task in self.readers:
            task.cancel()


async def _pairs(args: argparse.Namespace) -> None:
    async with clients.session() as http:
        load = PairsLoad(args.name, args.count, not args.no_acks)
        started = time.monotonic()
        await load.connect(http, args.visitor_url, args.agent_url)
        gc.collect()
        gc.freeze()  # the connections live to the end: keep them out of every later collection
        emit({"ready": True, "seconds": time.monotonic() - started})
        try:
            async for command in commands():
                if command["cmd"] == "run":
                    emit(await load.run(command["rate"], command["seconds"], command["start"]))
                elif command["cmd"] == "presence":
                    emit(await load.presence(command["count"], command["rate"]))
                elif command["cmd"] == "quit":
                    break
        finally:
            await load.close()


async def _hold(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Read (and so answer the server's pings) until the connection ends."""
    async for _msg in ws:
        pass


async def _watch_group(ws: aiohttp.ClientWebSocketResponse, seen: dict[str, float], heard: asyncio.Event) -> None:
    """Note when each visitor was first announced to this group-watching agent."""
    async for msg in ws:
        if msg.type is aiohttp.WSMsgType.BINARY:
            frame = msgpack.unpackb(msg.data)
            if frame.get("type") == "presence_changed":
                seen.setdefault(frame["state"]["visitor"], time.time())
                heard.set()


async def _until_seen(names: set[str], seen: dict[str, float], heard: asyncio.Event) -> None:
    while len(names & seen.keys()) < len(names):
        heard.clear()
        await heard.wait()


async def _idle(args: argparse.Namespace) -> None:
    async with clients.session() as http:
        batches: dict[str, list[aiohttp.ClientWebSocketResponse]] = {}  # by visitor-ID prefix; "a": agents
        holders: list[asyncio.Task[None]] = []
        seen: dict[str, float] = {}  # visitor -> unix time the group watcher heard of it
        heard = asyncio.Event()  # set when it hears of one more
        last_welcome = 0.0

        async def visitor(name: str) -> aiohttp.ClientWebSocketResponse:
            nonlocal last_welcome
            data = {"url": "/account/billing", "title": "Billing"}
            ws = await clients.connect_visitor(http, args.visitor_url, name, data)
            last_welcome = max(last_welcome, time.time())
            return ws

        async def agent(i: int) -> aiohttp.ClientWebSocketResponse:
            # Each agent watches one visitor, as an agent on a customer's CRM record does.
            cookie = await clients.login_agent(http, args.agent_url, f"{args.name}-a{i}")
            return await clients.connect_agent(http, args.agent_url, cookie, f"{args.name}-v{i}")

        async def group_watcher() -> aiohttp.ClientWebSocketResponse:
            cookie = await clients.login_agent(http, args.agent_url, f"{args.name}-watcher")
            ws = await clients.connect_agent(http, args.agent_url, cookie, None, group=True)
            holders.append(asyncio.create_task(_watch_group(ws, seen, heard)))
            return ws

        try:
            async for command in commands():
                cmd, started = command["cmd"], time.monotonic()
                if cmd == "quit":
                    break
                if cmd == "seen":  # wait until the watcher has heard of every visitor named
                    prefix, counts = command["prefix"], command["workers"]  # worker name -> visitors
                    names = {f"{worker}-{prefix}{i}" for worker, count in counts.items() for i in range(count)}
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(_until_seen(names, seen, heard), command["timeout"])
                    found = names & seen.keys()
                    emit({"seen": len(found), "last": max((seen[n] for n in found), default=0.0)})
                    continue
                if cmd == "close":
                    closing = batches.pop(command["prefix"], [])
                    await clients.bounded(closing, lambda ws: ws.close(), command.get("concurrency", 50))
                    emit({"done": True, "seconds": time.monotonic() - started})
                    continue
                if cmd == "visitors":
                    prefix, concurrency = command.get("prefix", "v"), command.get("concurrency", 50)
                    ids = [f"{args.name}-{prefix}{i}" for i in range(command["count"])]
                    last_welcome = 0.0
                    made = await clients.bounded(ids, visitor, concurrency)
                elif cmd == "agents":
                    prefix, made = "a", await clients.bounded(range(command["count"]), agent)
                else:  # "watch"
                    prefix, made = "watch", [await group_watcher()]
                batches.setdefault(prefix, []).extend(made)
                holders += [asyncio.create_task(_hold(ws)) for ws in made if prefix != "watch"]
                emit({"done": True, "seconds": time.monotonic() - started, "last": last_welcome})
        finally:
            for made in batches.values():
                await clients.bounded(made, lambda ws: ws.close())
            for task in holders:
                task.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.worker")
    parser.add_argument("mode", choices=["pairs", "idle"])
    parser.add_argument("--name", required=True, help="prefix of this worker's visitor and agent IDs")
    parser.add_argument("--count", type=int, default=0, help="pairs to connect (pairs mode)")
    parser.add_argument("--no-acks", action="store_true", help="signals without a request id: no ack frames")
    parser.add_argument("--visitor-url", required=True, help="instance A, where visitors connect")
    parser.add_argument("--agent-url", required=True, help="instance B, where agents connect")
    args = parser.parse_args()
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(_pairs(args) if args.mode == "pairs" else _idle(args))


if __name__ == "__main__":
    main()
