"""Webhooks: each group's events POSTed to its endpoints, at least once.

Every instance is a consumer of every configured group's log
(``EventLog``): it takes new events, hands each to the group's endpoints
that want its type, and acknowledges it once each of them had it (or it was
dead-lettered). What an instance has taken stays pending in the log and is
renewed while it works on it; an instance that dies stops renewing, and
after ``webhook_claim_after`` another instance takes its events over and
delivers them again (at least once: a receiver may get an event twice, and
uses its ``id`` to see it). In memory mode the log is an in-process queue:
at a graceful stop (SIGTERM) the drain gives what it holds until the drain's
deadline to go out (``flush``), and logs and counts what is still
undelivered then, which dies with the process.

Per endpoint and instance: a queue and at most ``concurrency`` POSTs in
flight; a POST carries what waits, up to ``webhook_batch`` events (one when
the endpoint keeps up). A failed POST (not 2xx, a timeout, a refused
address) is retried with exponential backoff and jitter
(``model.events.backoff``) until ``webhook_retry_for`` after each event; an
event still undelivered then is dead-lettered (``EventLog.dead_letter``).
Each POST is signed (``model.events.signature_header``) over its timestamp
and body. Redirects are not followed, and unless ``webhook_allow_private``
every address a URL resolves to must be public (``config.public_address``,
checked at connection time: no DNS rebinding).

Endpoints come from the group's configuration (TOML, ``webhooks``) and the
admin API (stored in the backend: ``endpoints``, ``change_endpoints``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from herald_presence.protocol.errors import ErrorCode, ProtocolError
from herald_presence.server import __version__, metrics
from herald_presence.server.backends.base import BackendUnavailable, Event, EventLog, RecordStore
from herald_presence.server.config import MAX_WEBHOOKS, Settings, check_webhooks, public_address
from herald_presence.server.model import events as ev
from herald_presence.server.model.names import pack, unpack, webhooks_key
from herald_presence.server.tasks import TaskSupervisor

log = logging.getLogger(__name__)

POLL_FIRST, POLL_MOST = 0.05, 1.0  # seconds between looks at the logs: doubling while nothing comes
TAKE_AT_ONCE = 100
MAX_HELD = 5000  # events of one group an instance holds undelivered before it takes no more of them
ENDPOINTS_FRESH = 2.0  # seconds a group's endpoints are cached
FIRE_EVERY = 1.0  # seconds between looks for due timers (a code's expiry, a session's end)
TRIM_EVERY = 60.0
QUIET_LOGS = 30.0  # seconds between two log lines of one endpoint's failures
FLUSH_POLL = 0.05  # seconds between looks at what is left to deliver, at a graceful stop


# -- endpoints ------------------------------------------------------------------------


async def endpoints(records: RecordStore, settings: Settings, group: str) -> list[dict[str, Any]]:
    """The group's endpoints: its configured ones (``source: config``), then
    those set through the admin API (``source: admin``)."""
    configured = settings.groups.get(group)
    found = [{**e, "source": "config"} for e in (configured.webhooks if configured else [])]
    stored = await records.kv_get(webhooks_key(group))
    return found + [{**e, "source": "admin"} for e in (unpack(stored) if stored else [])]


def shown(endpoint: dict[str, Any]) -> dict[str, Any]:
    """An endpoint for the admin API: never its secret, only that it has one."""
    return {key: value for key, value in endpoint.items() if key != "secret"} | {"has_secret": bool(endpoint["secret"])}


async def change_endpoints(records: RecordStore, settings: Settings, group: str, body: Any) -> list[dict[str, Any]]:
    """Replace the group's run-time endpoints with ``body["endpoints"]``
    (``[]`` removes them); the configured ones stay. ``invalid`` says what is wrong."""
    if not isinstance(body, dict) or set(body) != {"endpoints"}:
        raise ProtocolError(ErrorCode.INVALID, 'expected {"endpoints": [{"url", "secret", "events"?, "id"?}, ...]}')
    configured = settings.groups[group].webhooks
    try:
        given = check_webhooks(body["endpoints"], settings.webhook_allow_private)
    except ValueError as exc:
        raise ProtocolError(ErrorCode.INVALID, str(exc)) from None
    taken = {e["id"] for e in configured} & {e["id"] for e in given}
    if taken:
        raise ProtocolError(ErrorCode.INVALID, f"ids {sorted(taken)} are the configured endpoints'")
    if len(configured) + len(given) > MAX_WEBHOOKS:
        raise ProtocolError(ErrorCode.INVALID, f"a group has at most {MAX_WEBHOOKS} endpoints in all")
    if given:
        await records.kv_set(webhooks_key(group), pack(given))
    else:
        await records.kv_delete(webhooks_key(group))
    return await endpoints(records, settings, group)


# -- where a POST may go ---------------------------------------------------------------


class RefusedAddress(OSError):
    """A webhook URL resolved to no address it may reach (SSRF guard)."""


class GuardedResolver(AbstractResolver):
    """The system's resolver, keeping only public addresses (unless private
    ones are allowed): the connection goes to an address checked here, so a
    name that resolves differently later (DNS rebinding) gains nothing."""

    def __init__(self, allow_private: bool) -> None:
        self._resolver = DefaultResolver()
        self._allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._resolver.resolve(host, port, family)
        if self._allow_private:
            return found
        public = [result for result in found if public_address(result["host"])]
        if not public:
            raise RefusedAddress(f"{host} resolves to no public address (webhook_allow_private is off)")
        return public

    async def close(self) -> None:
        await self._resolver.close()


def refused_literal(url: str, allow_private: bool) -> bool:
    """A URL whose host is an address written out (aiohttp asks no resolver
    for those) that is not public, when private ones are not allowed."""
    host = URL(url).host or ""
    try:
        literal = socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host.strip("[]")) is not None
    except OSError:
        literal = False
    return literal and not allow_private and not public_address(host.strip("[]"))


# -- delivery --------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class Held:
    """An event in this instance's hands until every endpoint due it is done."""

    group: str
    id: str
    event: Event
    waiting: int  # endpoints not done with it yet


class Sender:
    """One endpoint's queue, and its workers (``concurrency`` at most)."""

    def __init__(self, endpoint: dict[str, Any], group: str) -> None:
        self.endpoint = endpoint
        self.label = f"{group}/{endpoint['id']}"
        self.queue: deque[Held] = deque()
        self.workers = 0
        self.removed = False
        self.quiet_until = 0.0  # its next failure is logged after this (monotonic)
        self.pending = metrics.WEBHOOK_PENDING.labels(endpoint=self.label)
        self.owed = 0  # events queued or in flight for it: what ``pending`` shows


class Webhooks:
    def __init__(
        self, settings: Settings, log_: EventLog, records: RecordStore, tasks: TaskSupervisor, consumer: str
    ) -> None:
        self.settings = settings
        self._log = log_
        self._records = records
        self._tasks = tasks
        self.consumer = consumer
        self._held: dict[str, dict[str, Held]] = {group: {} for group in settings.groups}
        self._acks: dict[str, list[str]] = {}
        self._acking: asyncio.Task[None] | None = None
        self._senders: dict[tuple[str, str], Sender] = {}
        self._endpoints: dict[str, tuple[float, list[dict[str, Any]]]] = {}  # group -> fresh until, endpoints
        self._http: aiohttp.ClientSession | None = None

    # -- the consumer loop -------------------------------------------------------------
    async def run(self) -> None:
        """Take, dispatch, renew, take over, fire timers, trim: until cancelled."""
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self.settings.webhook_allow_private), limit=0)
        timeout = aiohttp.ClientTimeout(total=self.settings.webhook_timeout)
        self._http = aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False)
        claim_after = self.settings.webhook_claim_after
        due = {"keep": 0.0, "reclaim": 0.0, "fire": 0.0, "trim": 0.0}
        pause = POLL_FIRST
        try:
            while True:
                busy = False
                for group in self.settings.groups:
                    busy |= await self._guarded(self._take(group), group, "taking")
                now = time.monotonic()
                for step, every, work in (
                    ("keep", claim_after / 3, self._keep),
                    ("reclaim", claim_after / 2, self._reclaim),
                    ("fire", FIRE_EVERY, self._log.fire_due),
                    ("trim", TRIM_EVERY, self._log.trim),
                ):
                    if now >= due[step]:
                        due[step] = now + every
                        for group in self.settings.groups:
                            busy |= bool(await self._guarded(work(group), group, step))
                if busy:
                    pause = POLL_FIRST
                else:  # a quiet cluster costs Redis little: each instance looks less often
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, POLL_MOST)
        finally:
            await self._http.close()

    async def _guarded(self, work: Any, group: str, what: str) -> Any:
        """One step for one group; a fault is logged (the backend away: quietly) and the loop goes on."""
        try:
            return await work
        except BackendUnavailable:
            return False
        except Exception:
            log.exception("webhooks: %s for group %s failed", what, group)
            return False

    async def _take(self, group: str) -> bool:
        if len(self._held[group]) >= MAX_HELD:
            return False
        if not await self.endpoints(group):
            # Nothing to deliver: the events are the audit trail's only, and an endpoint set
            # later gets those recorded from then on (within ENDPOINTS_FRESH), not the backlog.
            await self._log.skip(group)
            return False
        taken = await self._log.take(group, self.consumer, TAKE_AT_ONCE)
        await self._dispatch(group, taken)
        return bool(taken)

    async def _keep(self, group: str) -> bool:
        await self._log.keep(group, self.consumer, list(self._held[group]))
        return False

    async def _reclaim(self, group: str) -> bool:
        if len(self._held[group]) >= MAX_HELD:
            return False
        claimed = await self._log.reclaim(group, self.consumer, self.settings.webhook_claim_after, TAKE_AT_ONCE)
        if claimed:
            log.info("webhooks: took over %d undelivered events of group %s", len(claimed), group)
        await self._dispatch(group, claimed)
        return False

    def forget(self, group: str) -> None:
        """The group's endpoints changed (admin API): read them again now (other instances: within
        ``ENDPOINTS_FRESH``)."""
        self._endpoints.pop(group, None)

    async def endpoints(self, group: str) -> list[dict[str, Any]]:
        cached = self._endpoints.get(group)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        found = await endpoints(self._records, self.settings, group)
        self._endpoints[group] = (time.monotonic() + ENDPOINTS_FRESH, found)
        current = {e["id"]: e for e in found}
        for (sender_group, endpoint_id), sender in list(self._senders.items()):
            if sender_group == group:
                if endpoint_id in current:
                    sender.endpoint = current[endpoint_id]  # a new URL, secret or concurrency applies from now
                else:
                    sender.removed = True
        return found

    async def _dispatch(self, group: str, entries: list[tuple[str, Event]]) -> None:
        if not entries:
            return
        found = await self.endpoints(group)
        held = self._held[group]
        for event_id, event in entries:
            if event_id in held:  # taken over from ourselves: in hand already
                continue
            wanted = [e for e in found if ev.wants(e["events"], event["type"])]
            if not wanted:
                self._ack(group, event_id)
                continue
            item = held[event_id] = Held(group, event_id, event, len(wanted))
            for endpoint in wanted:
                self._queue(self._sender(group, endpoint), item)

    def _sender(self, group: str, endpoint: dict[str, Any]) -> Sender:
        sender = self._senders.get((group, endpoint["id"]))
        if sender is None or sender.removed:
            sender = self._senders[group, endpoint["id"]] = Sender(endpoint, group)
        return sender

    def _queue(self, sender: Sender, item: Held) -> None:
        sender.queue.append(item)
        sender.pending.inc()
        sender.owed += 1
        concurrency = sender.endpoint.get("concurrency") or self.settings.webhook_concurrency
        while sender.workers < concurrency and sender.workers < len(sender.queue):
            sender.workers += 1
            self._tasks.spawn(self._work(sender), f"webhook-{sender.label}")

    async def _work(self, sender: Sender) -> None:
        try:
            while sender.queue:
                size = min(len(sender.queue), self.settings.webhook_batch)
                await self._deliver(sender, [sender.queue.popleft() for _ in range(size)])
        finally:
            sender.workers -= 1

    async def _deliver(self, sender: Sender, batch: list[Held]) -> None:
        """POST ``batch`` until it is taken, retrying each event until
        ``webhook_retry_for`` after it happened; then it is dead-lettered."""
        attempt = 0
        while batch:
            if sender.removed:  # the endpoint was removed: nothing more for it
                for item in batch:
                    self._done(sender, item)
                return
            outcome = await self._post(sender, batch)
            if outcome == "ok":
                now = time.time()
                lag = metrics.WEBHOOK_LAG.labels(endpoint=sender.label)
                delivered = metrics.WEBHOOK_EVENTS.labels(endpoint=sender.label, outcome="delivered")
                for item in batch:
                    lag.observe(max(0.0, now - item.event["time"]))
                    delivered.inc()
                    self._done(sender, item)
                return
            attempt += 1
            self._failed(sender, outcome, attempt)
            now = time.time()
            late = [item for item in batch if now - item.event["time"] >= self.settings.webhook_retry_for]
            for item in late:
                await self._dead_letter(sender, item, outcome, attempt)
            batch = [item for item in batch if item not in late]
            if batch:
                await asyncio.sleep(ev.backoff(attempt, self.settings.webhook_retry_first))

    async def _post(self, sender: Sender, batch: list[Held]) -> str:
        endpoint, http = sender.endpoint, self._http
        assert http is not None
        body = json.dumps({"events": [ev.with_id(item.id, item.event) for item in batch]}, separators=(",", ":"))
        data = body.encode()
        sent = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"herald-webhooks/{__version__}",
            ev.TIMESTAMP_HEADER: str(sent),
            ev.SIGNATURE_HEADER: ev.signature_header(endpoint["secret"], sent, data),
        }
        try:
            if refused_literal(endpoint["url"], self.settings.webhook_allow_private):
                raise RefusedAddress(f"{endpoint['url']}: not a public address")
            async with http.post(endpoint["url"], data=data, headers=headers, allow_redirects=False) as response:
                outcome = "ok" if 200 <= response.status < 300 else f"http_error:{response.status}"
        except RefusedAddress:
            outcome = "refused_address"
        except aiohttp.ClientConnectorError as exc:
            outcome = "refused_address" if isinstance(exc.os_error, RefusedAddress) else "network_error"
        except TimeoutError:
            outcome = "timeout"
        except (aiohttp.ClientError, OSError, ValueError):
            outcome = "network_error"
        metrics.WEBHOOK_REQUESTS.labels(endpoint=sender.label, outcome=outcome.partition(":")[0]).inc()
        return outcome

    def _failed(self, sender: Sender, outcome: str, attempt: int) -> None:
        if time.monotonic() >= sender.quiet_until:
            sender.quiet_until = time.monotonic() + QUIET_LOGS
            log.warning("webhook %s: %s (attempt %d); retrying with backoff", sender.label, outcome, attempt)

    async def _dead_letter(self, sender: Sender, item: Held, outcome: str, attempts: int) -> None:
        record = {
            "id": item.id,
            "type": item.event["type"],
            "endpoint": sender.endpoint["id"],
            "error": outcome,
            "attempts": attempts,
            "dead_at": round(time.time(), 3),
            "event": ev.with_id(item.id, item.event),
        }
        try:
            await self._log.dead_letter(item.group, record)
        except BackendUnavailable:
            log.error("webhook %s: event %s dead-lettered but the record could not be stored", sender.label, item.id)
        metrics.WEBHOOK_EVENTS.labels(endpoint=sender.label, outcome="dead_lettered").inc()
        log.error("webhook %s: event %s (%s) dead-lettered after %d attempts: %s", sender.label, item.id,
                  item.event["type"], attempts, outcome)  # fmt: skip
        self._done(sender, item)

    def _done(self, sender: Sender, item: Held) -> None:
        sender.pending.dec()
        sender.owed -= 1
        item.waiting -= 1
        if item.waiting == 0:
            self._held[item.group].pop(item.id, None)
            self._ack(item.group, item.id)

    # -- a graceful stop (memory mode) ---------------------------------------------------
    async def flush(self, deadline: float) -> int:
        """Deliver what the log holds until every endpoint had it or
        ``deadline`` (monotonic) comes, while the consumer loop goes on; then
        log loudly (and count, ``outcome="abandoned"``) what is still
        undelivered. For a log that dies with the process (the memory
        backend's): a durable log's events are delivered by another instance.
        The number of events left undelivered."""
        while time.monotonic() < deadline:
            took = False
            for group in self.settings.groups:
                took |= bool(await self._guarded(self._take(group), group, "taking"))
            if not took and not any(self._held.values()):
                return 0
            await asyncio.sleep(min(FLUSH_POLL, max(0.0, deadline - time.monotonic())))
        return await self._abandon()

    async def _abandon(self) -> int:
        """Count and log what is undelivered now, taken or not."""
        owed = {sender.label: sender.owed for sender in self._senders.values() if sender.owed and not sender.removed}
        events = sum(len(held) for held in self._held.values())
        for group in self.settings.groups:
            try:
                found = await self.endpoints(group)
                while found and (taken := await self._log.take(group, self.consumer, TAKE_AT_ONCE)):
                    for _event_id, event in taken:
                        wanted = [e for e in found if ev.wants(e["events"], event["type"])]
                        events += bool(wanted)
                        for endpoint in wanted:
                            label = f"{group}/{endpoint['id']}"
                            owed[label] = owed.get(label, 0) + 1
            except BackendUnavailable:
                continue
        for label, count in owed.items():
            metrics.WEBHOOK_EVENTS.labels(endpoint=label, outcome="abandoned").inc(count)
        if events:
            by_endpoint = ", ".join(f"{label}: {count}" for label, count in sorted(owed.items()))
            log.error("webhooks: %d events still undelivered at exit, lost with the process (%s)", events, by_endpoint)
        return events

    # -- acknowledgements -----------------------------------------------------------------
    def _ack(self, group: str, event_id: str) -> None:
        self._acks.setdefault(group, []).append(event_id)
        if self._acking is None or self._acking.done():
            self._acking = self._tasks.spawn(self._flush_acks(), "webhook-acks")

    async def _flush_acks(self) -> None:
        """Acknowledge what is done, in batches; kept for a retry while the backend is away
        (an event not acknowledged is delivered again after a take-over: at least once)."""
        delay = 0.1
        while self._acks:
            acks, self._acks = self._acks, {}
            for group, ids in acks.items():
                try:
                    await self._log.ack(group, ids)
                except BackendUnavailable:
                    self._acks.setdefault(group, []).extend(ids)
            if self._acks:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
