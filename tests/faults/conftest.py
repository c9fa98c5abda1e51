"""Fixtures and judges for the cluster fault tests.

A cluster here is three ``herald serve`` processes on one Redis (each may
reach it through its own ``TcpProxy``), with the timings below, started
fresh for each test so that Redis or an instance can be frozen (SIGSTOP),
killed or cut off. What the tests then judge, as the issue "Presence stays
true through Redis stalls, failovers and slow instances" states it:

- **ghosts**: visitors shown online although none of their connections is
  alive, later than one grace period (plus a few heartbeats) after the fault
  ended (or after they closed, if later);
- **lost**: visitors with a live connection shown offline, on any
  instance's view (an agent connected to that instance, subscribed to the
  group) or in shared state (the REST lookup), once the fault has ended and
  the cluster has had a few heartbeats;
- **signals answered wrongly**: an agent's answer disagrees with what the
  visitor received (acked as delivered but never received; answered with
  an error, ``delivery_failed``, ``signal_expired``, ``visitor_offline`` or
  any other, but received), and signals never answered at all.

Every wait is bounded; every process is stopped by its own PID.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import os
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec

import aiohttp
import pytest

from herald_presence.protocol import tokens
from herald_presence.protocol.client.agent import AgentClient
from herald_presence.protocol.client.base import Backoff, Connected, Disconnected
from herald_presence.protocol.client.visitor import VisitorClient
from herald_presence.protocol.errors import RequestFailed
from herald_presence.protocol.messages import PresenceChanged, Signal

from ..harness import SECRET
from ..processes import HERALD, HeraldProcess, start_server
from ..redis_server import RedisServer
from .sentinel import SentinelCluster
from .tcp_proxy import TcpProxy

GROUP = "acme"
P = ParamSpec("P")

# --- the cluster's timings (flags of every instance) --------------------------
HEARTBEAT = 0.5  # --instance-heartbeat
DEAD_AFTER = 3.0  # --instance-dead-after
GRACE = 1.0  # --grace-period
DELIVERY_TIMEOUT = 1.5  # --delivery-timeout
SIGNAL_HOLD = 4.0  # --signal-hold

# --- what "after the fault" means -----------------------------------------------
SETTLE = 6 * HEARTBEAT  # "a few heartbeats": from then on a live visitor must be online everywhere
GHOST_AFTER = GRACE + 4 * HEARTBEAT  # "one grace period + a little": then a closed visitor is offline everywhere
WATCH = 4.0  # seconds the verdict keeps watching once both deadlines passed: late reaps and flaps show here
CONNECTED_FOR = 2 * HEARTBEAT  # a (re)connection younger than this may not be registered yet
SAMPLE_EVERY = 0.1  # seconds between two looks at every instance's view
SHARED_EVERY = 0.3  # seconds between two reads of shared state (REST)
# An agent's signal unanswered after this is silence: each send is answered within signal_hold
# (held) or delivery_timeout, and the SDK sends one signal up to 3 times (PROTOCOL.md 5.6).
ANSWER_WITHIN = 3 * (SIGNAL_HOLD + DELIVERY_TIMEOUT)
NO_ANSWER = ("silence", "disconnected")  # outcomes that are no answer: the agent cannot know what happened

# Clients reconnect quickly, so that what is judged is the server, not the SDK's backoff.
FAST_BACKOFF = Backoff(initial=0.1, factor=2.0, cap=1.0)
CONNECT_WITHIN = 15.0  # seconds for one client to connect (a join may wait for a stalled Redis)
CLOSE_WITHIN = 5.0  # seconds for one client to close
HTTP_TIMEOUT = 1.0  # seconds for one REST or /readyz request (a frozen instance never answers)


def bounded(seconds: float) -> Callable[[Callable[P, Awaitable[None]]], Callable[P, Awaitable[None]]]:
    """Run an async test within ``seconds``, below pytest-timeout's hard limit, so
    that a stuck test still fails through its fixtures' teardown (thawing and
    stopping every process it started) rather than by pytest-timeout ending
    the whole run with processes left behind."""

    def wrap(test: Callable[P, Awaitable[None]]) -> Callable[P, Awaitable[None]]:
        @functools.wraps(test)
        async def run(*args: P.args, **kwargs: P.kwargs) -> None:
            started = time.monotonic()
            try:
                async with asyncio.timeout(seconds):
                    await test(*args, **kwargs)
            except TimeoutError as exc:
                if time.monotonic() - started >= seconds:
                    raise AssertionError(f"{test.__name__} did not finish within its {seconds}s budget") from exc
                raise

        return run

    return wrap


def herald_argv(redis_url: str, prefix: str, session_secret: str) -> list[str]:
    """``herald serve`` for one instance of the cluster (``start_server`` adds the port)."""
    return [
        str(HERALD), "serve",
        "--redis-url", redis_url, "--redis-prefix", prefix,
        # "=": a url-safe base64 secret may start with "-", which argparse would take for an option.
        "--group", f"{GROUP}={SECRET}", f"--session-secret={session_secret}",
        "--instance-heartbeat", str(HEARTBEAT), "--instance-dead-after", str(DEAD_AFTER),
        "--grace-period", str(GRACE), "--delivery-timeout", str(DELIVERY_TIMEOUT), "--signal-hold", str(SIGNAL_HOLD),
        "--connections-per-address", "100000", "--message-rate", "100000", "--message-burst", "100000",
        "--max-connections-per-address", "100000",
    ]  # fmt: skip


def continue_process(pid: int) -> None:
    """SIGCONT a process this test may have frozen (no harm if it was not)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


# --- the cluster ------------------------------------------------------------------


class Cluster:
    """Three (or n) ``herald serve`` processes of one cluster."""

    def __init__(self, workdir: Path, redis_urls: list[str]) -> None:
        self.workdir, self.redis_urls = workdir, redis_urls
        self.prefix = f"f{uuid.uuid4().hex[:10]}"
        self.session_secret = base64.urlsafe_b64encode(os.urandom(32)).decode()
        self.instances: list[HeraldProcess] = []
        self.started_at = 0.0

    async def start(self) -> Cluster:
        argvs = [herald_argv(url, self.prefix, self.session_secret) for url in self.redis_urls]
        started = await asyncio.gather(
            *(asyncio.to_thread(start_server, self.workdir, *argv) for argv in argvs), return_exceptions=True
        )
        self.instances = [s for s in started if isinstance(s, HeraldProcess)]
        for outcome in started:
            if isinstance(outcome, BaseException):
                self.stop()
                raise outcome
        self.started_at = time.monotonic()
        return self

    def url(self, index: int) -> str:
        return self.instances[index].base_url

    def __len__(self) -> int:
        return len(self.instances)

    def freeze(self, index: int) -> None:
        """SIGSTOP the instance: alive, its sockets open, doing nothing (a long GC pause, a starved VM)."""
        os.kill(self.instances[index].proc.pid, signal.SIGSTOP)

    def thaw(self, index: int) -> None:
        continue_process(self.instances[index].proc.pid)

    def stop(self) -> None:
        for instance in self.instances:
            continue_process(instance.proc.pid)
            instance.stop()

    def stderr(self, index: int) -> str:
        return self.instances[index].stderr_path.read_text(errors="replace")

    def instance_id(self, index: int) -> str:
        found = re.search(r"instance (\w+) ready", self.stderr(index))
        return found.group(1) if found else "?"

    def explain(self, records: int = 20) -> str:
        """The servers' own words: each instance's last warnings and errors (errors with their tracebacks)."""
        parts = []
        for index in range(len(self.instances)):
            noteworthy = noteworthy_records(self.stderr(index))
            parts.append(
                f"--- instance {index} ({self.instance_id(index)}, :{self.instances[index].port}) stderr, "
                f"last {min(records, len(noteworthy))} of {len(noteworthy)} warnings/errors:\n"
                + "\n".join(noteworthy[-records:])
            )
        return "\n".join(parts)


LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[,.]\d+ (\w+) ")
TRACEBACK_LINES = 12  # the last lines of an error's traceback kept in a report


def noteworthy_records(text: str) -> list[str]:
    """Warning and error records of a server's log; an error keeps the end of its traceback."""
    records: list[list[str]] = []
    for line in text.splitlines():
        if found := LOG_RECORD.match(line):
            records.append([line] if found.group(1) in ("WARNING", "ERROR", "CRITICAL") else [])
        elif records and records[-1]:
            records[-1].append(line)
    kept = []
    for record in filter(None, records):
        head, tail = record[0], record[1:]
        if len(tail) > TRACEBACK_LINES:
            tail = [f"  ... {len(tail) - TRACEBACK_LINES} traceback lines ...", *tail[-TRACEBACK_LINES:]]
        kept.append("\n".join([head, *tail]))
    return kept


# --- what the test sees ------------------------------------------------------------


@dataclass
class Interval:
    start: float
    end: float | None = None


@dataclass
class VisitorTrack:
    """One visitor ID as the test knows it: its clients and what they went through."""

    visitor: str
    clients: list[VisitorClient] = field(default_factory=list)
    intervals: list[Interval] = field(default_factory=list)  # when one of its clients was connected
    closed_at: float | None = None  # when the test closed its last client (None: it is meant to be live)
    signals: list[tuple[float, Signal]] = field(default_factory=list)
    server_closes: list[tuple[float, int | None]] = field(default_factory=list)  # disconnects the test did not ask for
    instance: int = 0  # the instance its latest client is (or was last) pointed at

    def live_at(self, moment: float) -> bool:
        """A connection of it was up at ``moment`` and had been for CONNECTED_FOR."""
        return self.closed_at is None and any(
            i.start <= moment - CONNECTED_FOR and (i.end is None or i.end >= moment) for i in self.intervals
        )

    def gone_at(self, moment: float, fault_end: float) -> bool:
        """No connection of it alive, and long enough that it must be offline everywhere."""
        return self.closed_at is not None and moment >= max(self.closed_at, fault_end) + GHOST_AFTER

    def received(self, match: Callable[[Signal], bool]) -> list[float]:
        return [at for at, event in self.signals if match(event)]


Sightings = dict[str, dict[str, list[float]]]  # visitor -> where -> when (seconds after the fault's end)


@dataclass
class Verdict:
    """What ``Audit.verify`` saw after a fault."""

    fault_end: float
    ghosts: Sightings = field(default_factory=dict)
    lost: Sightings = field(default_factory=dict)
    unverifiable: list[str] = field(default_factory=list)
    converged_after: float | None = None  # seconds after the fault's end when every look was right

    @property
    def clean(self) -> bool:
        return not self.ghosts and not self.lost and not self.unverifiable

    def saw(self, kind: Sightings, visitor: str, where: str, moment: float) -> None:
        kind.setdefault(visitor, {}).setdefault(where, []).append(moment - self.fault_end)

    def report(self) -> str:
        def listing(found: Sightings) -> str:
            return "; ".join(
                f"{visitor}: "
                + ", ".join(
                    f"{where} x{len(times)} (+{min(times):.1f}s..+{max(times):.1f}s)"
                    for where, times in sorted(places.items())
                )
                for visitor, places in sorted(found.items())
            )

        lines = [
            f"ghosts: {len(self.ghosts)} [{listing(self.ghosts)}]",
            f"lost: {len(self.lost)} [{listing(self.lost)}]",
        ]
        if self.unverifiable:
            lines.append(f"could not look: {self.unverifiable}")
        converged = "never" if self.converged_after is None else f"{self.converged_after:.2f}s after the fault ended"
        lines.append(f"every view and shared state right since: {converged}")
        return "\n".join(lines)


@dataclass
class SignalRecord:
    n: int
    visitor: str
    event: str
    sent_at: float
    answered_at: float | None = None
    outcome: int | str | None = None  # delivered count, error code, "disconnected", "silence"

    def matches(self, received: Signal) -> bool:
        """``received`` is this signal (a probe carries its number; showterms carries nothing)."""
        return received.event == self.event and (self.event == "showterms" or (received.data or {}).get("n") == self.n)


class Audit:
    """The test's eyes: one agent per instance watching the whole group (that
    instance's view), the REST lookup (shared state), the visitors' clients
    with what each received, and the answers to the agents' signals."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT))
        self.api_key = tokens.api_key(SECRET, GROUP)
        self.views: list[AgentClient] = []
        self.view_events: list[list[tuple[float, PresenceChanged]]] = []
        self.view_closes: list[list[tuple[float, int | None]]] = []
        self.tracks: dict[str, VisitorTrack] = {}
        self.agents: list[AgentClient] = []
        self.signals: list[SignalRecord] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._next_signal = 0
        # Set by a test to act as a load balancer: a visitor the server
        # disconnects goes back to its instance if that one is ready, else
        # to the next ready one (what a balancer's health check would do).
        self.balancer: Readiness | None = None

    # --- views

    async def open_views(self) -> None:
        """One agent on each instance, subscribed to the group."""
        for index in range(len(self.cluster)):
            agent = self.agent(index, f"view-{index}")
            events: list[tuple[float, PresenceChanged]] = []
            closes: list[tuple[float, int | None]] = []
            self.views.append(agent)
            self.view_events.append(events)
            self.view_closes.append(closes)
            async with asyncio.timeout(CONNECT_WITHIN):
                await agent.connect()
                await agent.subscribe_group()
            self._spawn(self._collect_view(agent, events, closes))

    def agent(self, index: int, name: str) -> AgentClient:
        key = tokens.agent_key(SECRET, GROUP, name)
        client = AgentClient(self.cluster.url(index), GROUP, name, key, backoff=FAST_BACKOFF)
        self.agents.append(client)
        return client

    async def _collect_view(
        self, agent: AgentClient, into: list[tuple[float, PresenceChanged]], closes: list[tuple[float, int | None]]
    ) -> None:
        async for event in agent.events():
            if isinstance(event, PresenceChanged):
                into.append((time.monotonic(), event))
            elif isinstance(event, Disconnected):
                closes.append((time.monotonic(), event.code))

    def view_online(self, index: int, visitor: str) -> bool | None:
        """Whether instance ``index``'s view shows the visitor online; None while its agent is not connected."""
        agent = self.views[index]
        if not agent.connected:
            return None
        state = agent.visitors.get(visitor)
        return bool(state and state.get("online"))

    async def shared_online(self, visitor: str, index: int = 0) -> bool | None:
        """The visitor's ``online`` in shared state, read through instance ``index``; None if unanswered."""
        url = f"{self.cluster.url(index)}/v1/groups/{GROUP}/visitors/{visitor}"
        try:
            async with self.http.get(url, headers={"Authorization": f"Bearer {self.api_key}"}) as response:
                if response.status != 200:
                    return None
                return bool((await response.json())["online"])
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError, KeyError):
            return None

    # --- visitors

    async def connect(self, visitor: str, index: int) -> VisitorClient:
        """Connect (another) client of ``visitor`` to instance ``index``; it reconnects by itself."""
        track = self.tracks.setdefault(visitor, VisitorTrack(visitor))
        token = tokens.visitor_token(SECRET, GROUP, visitor)
        client = VisitorClient(self.cluster.url(index), GROUP, visitor, token, backoff=FAST_BACKOFF)
        track.clients.append(client)
        track.closed_at, track.instance = None, index
        # Collect from before the connect, so that the first Connected is seen.
        self._spawn(self._collect_visitor(client, track))
        async with asyncio.timeout(CONNECT_WITHIN):
            await client.connect()
        return client

    def connect_later(self, visitor: str, index: int) -> asyncio.Task[VisitorClient]:
        """``connect`` in the background (during a fault it may wait for a stalled Redis)."""
        task = asyncio.create_task(self.connect(visitor, index))
        self._tasks.add(task)
        return task

    async def close(self, visitor: str) -> None:
        """Close every client of ``visitor``: from now on none of its connections is alive."""
        track = self.tracks[visitor]
        clients = [c for c in track.clients]
        track.closed_at = time.monotonic()  # no reconnect counts from here on
        async with asyncio.timeout(CLOSE_WITHIN):
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        track.closed_at = time.monotonic()

    async def _collect_visitor(self, client: VisitorClient, track: VisitorTrack) -> None:
        current: Interval | None = None
        async for event in client.events():
            now = time.monotonic()
            if isinstance(event, Connected):
                current = Interval(now)
                track.intervals.append(current)
            elif isinstance(event, Disconnected):
                if current is not None:
                    current.end = now
                    current = None
                if track.closed_at is None:
                    track.server_closes.append((now, event.code))
                    if event.reconnecting:
                        self._rebalance(client, track)
            elif isinstance(event, Signal):
                track.signals.append((now, event))
        if current is not None:
            current.end = time.monotonic()

    def _rebalance(self, client: VisitorClient, track: VisitorTrack) -> None:
        if self.balancer is None or self.balancer.last(track.instance) == 200:
            return
        count = len(self.cluster)
        for step in range(1, count):
            index = (track.instance + step) % count
            if self.balancer.last(index) == 200:
                client.base_url, track.instance = self.cluster.url(index), index
                return

    def live(self) -> list[str]:
        return sorted(v for v, t in self.tracks.items() if t.closed_at is None)

    def closed(self) -> list[str]:
        return sorted(v for v, t in self.tracks.items() if t.closed_at is not None)

    async def wait_settled(self, within: float = 15.0) -> None:
        """Before a fault: every live visitor online on every view and in shared state."""
        deadline = time.monotonic() + within
        while True:
            missing = [
                f"{v} on view {i}"
                for v in self.live()
                for i in range(len(self.views))
                if self.view_online(i, v) is not True
            ]
            if not missing:
                shared = await asyncio.gather(*(self.shared_online(v) for v in self.live()))
                missing = [f"{v} in shared state" for v, online in zip(self.live(), shared, strict=True) if not online]
            if not missing:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"before the fault, not settled within {within}s: {missing[:10]}\n{self.cluster.explain()}")
            await asyncio.sleep(0.1)

    # --- after the fault

    async def verify(self, fault_end: float, extra: float = WATCH) -> Verdict:
        """Watch every view and shared state from the fault's end until both
        deadlines (SETTLE, GHOST_AFTER) have passed and ``extra`` seconds more,
        and count ghosts and lost visitors (see the module docstring)."""
        verdict = Verdict(fault_end)
        lost_from, until = fault_end + SETTLE, fault_end + max(SETTLE, GHOST_AFTER) + extra
        looked = [False] * len(self.views)
        shared_looked = False
        last_shared = 0.0
        right_since: float | None = None
        turn = 0

        while (now := time.monotonic()) < until:
            wrong = False
            for index in range(len(self.views)):
                for visitor, track in self.tracks.items():
                    online = self.view_online(index, visitor)
                    if online is None:
                        wrong = True
                        continue
                    if now >= lost_from:
                        looked[index] = True
                    if track.live_at(now) and not online:
                        wrong = True
                        if now >= lost_from:
                            verdict.saw(verdict.lost, visitor, f"view {index}", now)
                    elif track.gone_at(now, fault_end) and online:
                        wrong = True
                        verdict.saw(verdict.ghosts, visitor, f"view {index}", now)
                    elif track.closed_at is not None and online:
                        wrong = True  # not a ghost yet, but not right either
            if now - last_shared >= SHARED_EVERY:
                last_shared, turn = now, turn + 1
                visitors = sorted(self.tracks)
                index = turn % len(self.cluster)
                states = await asyncio.gather(*(self.shared_online(v, index) for v in visitors))
                now = time.monotonic()
                for visitor, online in zip(visitors, states, strict=True):
                    track = self.tracks[visitor]
                    if online is None:
                        wrong = True
                        continue
                    if now >= lost_from:
                        shared_looked = True
                    if track.live_at(now) and not online:
                        wrong = True
                        if now >= lost_from:
                            verdict.saw(verdict.lost, visitor, "shared state", now)
                    elif track.gone_at(now, fault_end) and online:
                        wrong = True
                        verdict.saw(verdict.ghosts, visitor, "shared state", now)
                    elif track.closed_at is not None and online:
                        wrong = True
            if wrong:
                right_since = None
            elif right_since is None:
                right_since = now
            await asyncio.sleep(SAMPLE_EVERY)

        # The views' event logs catch flaps shorter than a sample.
        for index, events in enumerate(self.view_events):
            for at, event in events:
                visitor = event.state["visitor"]
                track = self.tracks.get(visitor)
                if track is None or at < fault_end:
                    continue
                if at >= lost_from and not event.state["online"] and track.live_at(at):
                    verdict.saw(verdict.lost, visitor, f"view {index} event {event.change}", at)
                if event.state["online"] and track.gone_at(at, fault_end):
                    verdict.saw(verdict.ghosts, visitor, f"view {index} event {event.change}", at)
        verdict.unverifiable += [f"view {i} (its agent never connected)" for i, ok in enumerate(looked) if not ok]
        if not shared_looked:
            verdict.unverifiable.append("shared state (REST never answered)")
        if right_since is not None:
            verdict.converged_after = right_since - fault_end
        return verdict

    def visitor_report(self) -> str:
        """Disconnects the test did not ask for: the server closed or lost these visitors."""
        closes = {v: [f"{c}" for _, c in t.server_closes] for v, t in self.tracks.items() if t.server_closes}
        views = {i: [c for _, c in closes_] for i, closes_ in enumerate(self.view_closes) if closes_}
        return f"visitor connections the server closed: {closes or 'none'}; view agents' disconnects: {views or 'none'}"

    # --- signals

    async def send_signal(self, agent: AgentClient, visitor: str, event: str = "probe") -> SignalRecord:
        """One signal, its answer recorded (count, error code, ``disconnected`` or ``silence``)."""
        self._next_signal += 1
        record = SignalRecord(self._next_signal, visitor, event, time.monotonic())
        self.signals.append(record)
        try:
            async with asyncio.timeout(ANSWER_WITHIN):
                if event == "showterms":
                    record.outcome = await agent.show_terms(visitor)
                else:
                    record.outcome = await agent.signal(visitor, event, {"n": record.n})
        except TimeoutError:
            record.outcome = "silence"
        except RequestFailed as exc:
            record.outcome = exc.code
        record.answered_at = time.monotonic()
        return record

    def judge_signals(self) -> tuple[list[str], list[str]]:
        """(answered wrongly, never answered) among the signals sent."""
        wrong, unanswered = [], []
        for record in self.signals:
            track = self.tracks.get(record.visitor)
            got = track.received(record.matches) if track is not None else []
            since_start = record.sent_at - self.cluster.started_at
            what = f"#{record.n} to {record.visitor}, sent {since_start:.2f}s after the cluster was up"
            outcome = record.outcome
            if isinstance(outcome, int) and outcome >= 1 and not got:
                wrong.append(f"{what}: acked delivered={outcome}, never received")
            elif isinstance(outcome, str) and outcome not in NO_ANSWER and got:
                answered = record.answered_at or 0.0
                wrong.append(
                    f"{what}: answered {outcome} after {answered - record.sent_at:.2f}s, "
                    f"yet received {got[0] - record.sent_at:.2f}s after sending"
                )
            elif outcome in NO_ANSWER or outcome is None:
                unanswered.append(f"{what}: {outcome or 'no answer yet'}")
        return wrong, unanswered

    def signal_tally(self) -> dict[str, int]:
        tally: dict[str, int] = {}
        for record in self.signals:
            outcome = record.outcome
            key = ("delivered" if outcome >= 1 else "delivered=0") if isinstance(outcome, int) else str(outcome)
            tally[key] = tally.get(key, 0) + 1
        return tally

    # --- plumbing

    def _spawn(self, coroutine: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close_all(self) -> None:
        clients: list[Any] = [*self.agents, *(c for t in self.tracks.values() for c in t.clients)]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_WITHIN):
                await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.http.close()


class Readiness:
    """Polls every instance's /readyz in the background: (when, status) per instance."""

    def __init__(self, cluster: Cluster, every: float = 0.2) -> None:
        self.cluster, self.every = cluster, every
        self.seen: list[list[tuple[float, int | str]]] = [[] for _ in range(len(cluster))]
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Readiness:
        self._task = asyncio.create_task(self._poll())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def status(self, session: aiohttp.ClientSession, index: int) -> int | str:
        try:
            async with session.get(self.cluster.url(index) + "/readyz") as response:
                return response.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return type(exc).__name__

    async def _poll(self) -> None:
        timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                statuses = await asyncio.gather(*(self.status(session, i) for i in range(len(self.cluster))))
                now = time.monotonic()
                for index, status in enumerate(statuses):
                    self.seen[index].append((now, status))
                await asyncio.sleep(self.every)

    def saw(self, index: int, status: int, start: float, end: float) -> bool:
        return any(s == status and start <= at <= end for at, s in self.seen[index])

    def last(self, index: int) -> int | str | None:
        return self.seen[index][-1][1] if self.seen[index] else None

    def summary(self, origin: float) -> str:
        """Each instance's status changes, in seconds from ``origin``."""
        parts = []
        for index, seen in enumerate(self.seen):
            changes, previous = [], None
            for at, status in seen:
                if status != previous:
                    changes.append(f"{at - origin:+.1f}s {status}")
                    previous = status
            parts.append(f"instance {index}: {', '.join(changes) or 'never polled'}")
        return "; ".join(parts)


def shared_problems(
    fault: str,
    connects: list[object],
    verdict: Verdict,
    readiness: Readiness,
    unready: list[int],
    during: tuple[float, float],
) -> list[str]:
    """What every fault test requires: clients could connect during the
    ``fault``, no ghost and nobody lost (``verdict``), /readyz answered 503
    on the ``unready`` instances ``during`` the fault, and 200 everywhere at
    the end."""
    problems = []
    failed = [repr(c) for c in connects if isinstance(c, BaseException)]
    if failed:
        problems.append(f"clients that could not connect during the {fault}: {failed}")
    if not verdict.clean:
        problems.append(verdict.report())
    never = [i for i in unready if not readiness.saw(i, 503, *during)]
    if never:
        problems.append(f"/readyz never answered 503 during the {fault} on instances {never}")
    not_ready_after = [i for i in range(len(readiness.seen)) if readiness.last(i) != 200]
    if not_ready_after:
        problems.append(f"/readyz not 200 at the end on instances {not_ready_after}")
    return problems


FAILOVER_STAYING = 4  # visitors per instance that stay through a failover
FAILOVER_SIGNAL_EVERY = 0.05  # seconds between the agent's signals
FAILOVER_WITHIN = 20.0  # seconds for a replica to take over


async def assert_failover_loses_nothing(
    cluster: Cluster,
    audit: Audit,
    kill: Callable[[], None],
    wait_for_failover: Callable[[], float],
    story: Callable[[float], str],
) -> None:
    """A Redis master killed (``kill``) under three instances with visitors
    staying and leaving and an agent signalling them all along, until a
    replica takes over (``wait_for_failover``: its seconds): no visitor lost,
    no ghost, every signal answered, /readyz 503 during the gap and 200
    after. ``story(seconds)`` tells what happened, for the report."""
    await audit.open_views()
    await asyncio.gather(
        *(audit.connect(f"stay-{i}-{k}", i) for i in range(3) for k in range(FAILOVER_STAYING)),
        *(audit.connect(f"leave-{i}", i) for i in range(3)),
    )
    await audit.wait_settled()
    agent = audit.agent(0, "alice")
    async with asyncio.timeout(15):
        await agent.connect()
    targets = [v for v in audit.live() if v.startswith("stay-")]
    stop = asyncio.Event()
    sending: list[asyncio.Task[SignalRecord]] = []

    async def keep_signalling() -> None:
        for n in range(2000):
            if stop.is_set():
                return
            sending.append(asyncio.create_task(audit.send_signal(agent, targets[n % len(targets)])))
            await asyncio.sleep(FAILOVER_SIGNAL_EVERY)

    signaller = asyncio.create_task(keep_signalling())
    await asyncio.sleep(1.0)  # signals flow before the fault
    readiness = Readiness(cluster, every=0.1).start()

    kill()
    killed_at = time.monotonic()
    # During the gap: visitors leave and arrive.
    await asyncio.sleep(0.3)
    await asyncio.gather(*(audit.close(f"leave-{i}") for i in range(3)))
    arrivals = [audit.connect_later(f"new-{i}", i) for i in range(3)]
    took = await asyncio.to_thread(wait_for_failover)
    promoted_at = time.monotonic()

    await asyncio.sleep(SETTLE)  # signals keep flowing after the promotion
    stop.set()
    await signaller
    async with asyncio.timeout(30):
        await asyncio.gather(*sending)
    connects = await asyncio.gather(*arrivals, return_exceptions=True)
    verdict = await audit.verify(promoted_at)
    await readiness.stop()

    wrong, unanswered = audit.judge_signals()
    told = f"{story(took)}; {len(audit.signals)} signals: {audit.signal_tally()}"
    print(f"\n{told}\n{verdict.report()}\nreadyz: {readiness.summary(killed_at)}\n{audit.visitor_report()}")
    problems = shared_problems("failover", connects, verdict, readiness, [0, 1, 2], (killed_at, promoted_at + SETTLE))
    if wrong:
        problems.append(f"{len(wrong)} signals answered wrongly: {wrong[:10]}")
    if unanswered:
        problems.append(f"{len(unanswered)} signals never answered: {unanswered[:10]}")
    assert not problems, (
        told
        + "\n"
        + "\n".join(problems)
        + f"\nreadyz (from the kill): {readiness.summary(killed_at)}\n{audit.visitor_report()}\n{cluster.explain()}"
    )


# --- fixtures -----------------------------------------------------------------------


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    """A Redis of this test's own, to freeze, cut off or stop."""
    server = RedisServer()
    server.start()
    yield server
    if server.process is not None:
        continue_process(server.process.pid)
    server.stop()


@pytest.fixture
def sentinels() -> Iterator[SentinelCluster]:
    cluster = SentinelCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture
def make_proxy() -> Iterator[Callable[[int], TcpProxy]]:
    """Start a ``TcpProxy`` to a loopback port; all stop afterwards."""
    proxies: list[TcpProxy] = []

    def make(target_port: int) -> TcpProxy:
        proxy = TcpProxy(target_port).start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()


@pytest.fixture
async def start_cluster(tmp_path: Path) -> AsyncIterator[Callable[[list[str]], Awaitable[Cluster]]]:
    """Start a cluster, one instance per Redis URL given; stopped afterwards (thawed first)."""
    clusters: list[Cluster] = []

    async def start(redis_urls: list[str]) -> Cluster:
        cluster = Cluster(tmp_path, redis_urls)
        clusters.append(cluster)
        return await cluster.start()

    yield start
    for cluster in clusters:
        await asyncio.to_thread(cluster.stop)


@pytest.fixture
async def audit_of() -> AsyncIterator[Callable[[Cluster], Audit]]:
    """An ``Audit`` of a cluster; its clients close afterwards."""
    audits: list[Audit] = []

    def make(cluster: Cluster) -> Audit:
        audit = Audit(cluster)
        audits.append(audit)
        return audit

    yield make
    for audit in audits:
        await audit.close_all()
