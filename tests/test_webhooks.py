"""Webhooks and the audit trail (PROTOCOL.md §13), against a real HTTP
receiver the tests start on loopback: every event type arrives signed and
verifiable; a receiver failing for a while gets every event once it
recovers (duplicates allowed, loss not); the events an instance was
delivering when it was SIGKILLed still arrive (Redis); batches and the
per-endpoint concurrency limit; dead letters; the SSRF guard; sessions'
timelines in the audit trail (memory, one Redis, a Redis Cluster: each event
stored with its change), and another group's key refused; in memory mode, a
graceful stop delivers what it holds within the drain."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from herald_presence.protocol import tokens
from herald_presence.protocol.client.visitor import VisitorClient
from herald_presence.server.config import EVENT_TYPES, ConfigError, load, public_address
from herald_presence.server.core.webhooks import GuardedResolver, RefusedAddress
from herald_presence.server.model import events as ev
from herald_presence.server.model.names import RedisNames, unpack

from .conftest import Start
from .harness import OTHER_SECRET, SECRET, HeraldServer, changed, sample, scrape, settings, signal
from .processes import HERALD, REPO, STOP_TIMEOUT, start_server
from .redis_server import RedisServer
from .topologies import backend_name  # noqa: F401  (memory, one Redis and a Redis Cluster)

HOOK_SECRET = "hook-secret-0123456789abcdef"
ADMIN_TOKEN = "admin-token-for-webhooks-0123"


class Receiver:
    """A customer's back end: records every POST, and answers 503 while told to fail."""

    def __init__(self, delay: float = 0.0) -> None:
        self.posts: list[tuple[dict[str, str], bytes]] = []
        self.failing_until = 0.0  # monotonic
        self.fail_always = False
        self.delay = delay
        self.attempts = 0
        self.in_flight = self.most_in_flight = 0
        self.arrived = asyncio.Event()
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.attempts += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.fail_always or time.monotonic() < self.failing_until:
                return web.Response(status=503)
            self.posts.append((dict(request.headers), body))
            self.arrived.set()
            return web.Response(status=204)
        finally:
            self.in_flight -= 1

    def events(self) -> list[dict[str, Any]]:
        return [event for _, body in self.posts for event in json.loads(body)["events"]]

    def ids(self) -> set[str]:
        return {event["id"] for event in self.events()}

    async def wait_for(self, check: Callable[[], bool], within: float, what: str) -> None:
        deadline = time.monotonic() + within
        while not check():
            if time.monotonic() > deadline:
                pytest.fail(f"not within {within}s: {what}; got {[e['type'] for e in self.events()]}")
            await asyncio.sleep(0.05)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    app = web.Application()
    app.router.add_post("/hook", found.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    found.url = f"http://127.0.0.1:{port}/hook"
    yield found
    await runner.cleanup()


def hook_settings(receiver: Receiver, **endpoint: Any) -> dict[str, Any]:
    """Settings with one endpoint of group acme on the receiver (loopback: allowed for the tests)."""
    hook = {"id": "crm", "url": receiver.url, "secret": HOOK_SECRET, **endpoint}
    return {
        "webhooks": json.dumps({"acme": [hook]}),
        "webhook_allow_private": "true",
        "webhook_retry_first": "0.05",
        "webhook_claim_after": "1",
    }


def documented_verification() -> Callable[[str, str, str, bytes], bool]:
    """The receiver's check as PROTOCOL.md §13.3 prints it, run as it is."""
    text = (REPO / "protocol" / "PROTOCOL.md").read_text()
    section = text[text.index("### 13.3 Verifying a webhook") : text.index("### 13.4")]
    (snippet,) = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    scope: dict[str, Any] = {}
    exec(snippet, scope)
    return scope["verified"]  # type: ignore[no-any-return]


def verified(secret: str, headers: dict[str, str], body: bytes, now: float | None = None) -> bool:
    """What PROTOCOL.md §13.3 tells a receiver to do, written out on its own."""
    timestamp = headers["Herald-Timestamp"]
    if abs((now or time.time()) - int(timestamp)) > 300:
        return False
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    given = [part.strip().removeprefix("v1=") for part in headers["Herald-Signature"].split(",")]
    return any(hmac.compare_digest(expected, candidate) for candidate in given)


async def audit(herald: HeraldServer, group: str = "acme", key: str | None = None, **query: str) -> Any:
    key = key or tokens.api_key(herald.secret(group), group)
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{herald.base_url}/v1/groups/{group}/events", params=query, headers={"Authorization": f"Bearer {key}"}
        ) as response,
    ):
        return response.status, await response.json()


async def every_event(herald: HeraldServer, **query: str) -> list[dict[str, Any]]:
    """The whole audit trail, page by page."""
    found: list[dict[str, Any]] = []
    cursor = ""
    while True:
        status, page = await audit(herald, since=cursor, limit="50", **query)
        assert status == 200, page
        found += page["events"]
        cursor = page["cursor"] or ""
        if not page["more"]:
            return found


async def one_click_flow(herald: HeraldServer, visitor_id: str = "cust-42") -> str:
    """Terms asked and answered, a session started, joined, left and ended: its ID."""
    agent = await herald.agent("alice")
    await agent.subscribe([visitor_id])
    await agent.wait_session(visitor_id)
    visitor = await herald.visitor(visitor_id)
    await agent.wait_for(changed("online", visitor_id))
    assert await agent.show_terms(visitor_id) == 1
    await visitor.wait_for(signal("showterms"))
    await visitor.terms("displayed")
    await visitor.terms("accepted")
    for _ in range(2):
        await agent.wait_for(signal("terms"))
    session = (await visitor.start_session("visitor")).session
    joined = await agent.join_session(key=visitor_id)
    await agent.leave_session(joined.session)
    await visitor.end_session()
    return session


# --- every event type, signed ---------------------------------------------------------


async def test_every_event_type_arrives_signed_and_verifiable(
    start_herald: Callable[..., Awaitable[HeraldServer]], receiver: Receiver
) -> None:
    herald = await start_herald(**hook_settings(receiver), code_ttl="1")
    session = await one_click_flow(herald)
    # A short code a visitor's agent joins by, and one nobody uses (it expires).
    agent = await herald.agent("bob")
    shown = await (await herald.visitor("v-code")).start_session("random")
    await agent.join_session(code=shown.key)
    await (await herald.visitor("v-unused")).start_session("random")
    visitor = await herald.visitor("v-declines")
    await agent.show_terms("v-declines")
    await visitor.terms("declined")
    await visitor.close()

    wanted = set(EVENT_TYPES)
    await receiver.wait_for(lambda: {e["type"] for e in receiver.events()} >= wanted, 15, "every event type")
    documented = documented_verification()
    for headers, body in receiver.posts:
        assert verified(HOOK_SECRET, headers, body), headers
        assert documented(HOOK_SECRET, headers["Herald-Timestamp"], headers["Herald-Signature"], body)
        assert not documented(HOOK_SECRET, headers["Herald-Timestamp"], headers["Herald-Signature"], body + b" ")
        assert not verified("another-secret-0123456789", headers, body)
        assert ev.verify(HOOK_SECRET, headers["Herald-Signature"], headers["Herald-Timestamp"], body)
        assert not verified(HOOK_SECRET, headers, body, now=time.time() + 600), "a replay outside 5 min is refused"
        assert headers["Content-Type"] == "application/json"
        for secret in (SECRET, OTHER_SECRET, HOOK_SECRET, shown.key):  # no secret, token or code in a payload
            assert secret.encode() not in body
    events = receiver.events()
    by_type = {e["type"]: e for e in events}
    assert by_type["terms.displayed"]["agent"] == "alice" and by_type["terms.displayed"]["visitor"] == "cust-42"
    assert by_type["terms.declined"]["agent"] == "bob"
    assert by_type["code.redeemed"]["by"] == "agent" and by_type["code.redeemed"]["agent"] == "bob"
    assert {e["session"] for e in events if e["type"] == "code.expired"} <= {
        e["session"] for e in events if e["type"] == "code.created" and e["visitor"] == "v-unused"
    }
    ended = [e for e in events if e["type"] == "session.ended" and e["session"] == session]
    assert ended and ended[0]["reason"] == "ended"
    for event in events:
        assert ev.parse_id(event["id"]) is not None and event["group"] == "acme" and event["time"] > 0
    # One visitor's events, in the order they happened, have rising IDs.
    mine = sorted((e for e in events if e.get("visitor") == "cust-42"), key=lambda e: ev.parse_id(e["id"]))
    kinds = [e["type"] for e in mine]
    assert kinds.index("visitor.online") < kinds.index("terms.requested") < kinds.index("terms.accepted")
    assert kinds.index("session.started") < kinds.index("session.joined") < kinds.index("session.ended")


async def test_an_endpoint_gets_only_the_types_it_asked_for(
    start_herald: Callable[..., Awaitable[HeraldServer]], receiver: Receiver
) -> None:
    herald = await start_herald(**hook_settings(receiver, events=["session.*", "terms.accepted"]))
    await one_click_flow(herald)
    await receiver.wait_for(lambda: "session.ended" in {e["type"] for e in receiver.events()}, 10, "session.ended")
    await asyncio.sleep(0.3)
    assert {e["type"] for e in receiver.events()} == {
        "session.started", "session.joined", "session.left", "session.ended", "terms.accepted",
    }  # fmt: skip


# --- failures, retries, dead letters -----------------------------------------------------


async def test_a_receiver_failing_for_a_while_gets_every_event_once_it_recovers(
    start_herald: Callable[..., Awaitable[HeraldServer]], receiver: Receiver
) -> None:
    herald = await start_herald(**hook_settings(receiver))
    before = await scrape(herald.base_url)
    receiver.failing_until = time.monotonic() + 1.5
    visitors = [await herald.visitor(f"v{i}", reconnect=False) for i in range(12)]
    for visitor in visitors[::2]:
        await visitor.close()  # offline after the grace period, while the receiver still fails
    deadline = time.monotonic() + 5
    while len(logged := await every_event(herald)) < 18:  # 12 online, 6 offline
        assert time.monotonic() < deadline, logged
        await asyncio.sleep(0.05)
    assert time.monotonic() < receiver.failing_until, "the receiver recovered before every event was logged"
    await receiver.wait_for(lambda: receiver.ids() >= {e["id"] for e in logged}, 20, "every logged event")
    await asyncio.sleep(0.3)
    assert receiver.ids() == {e["id"] for e in await every_event(herald)}, "nothing lost, nothing made up"
    copies = Counter(e["id"] for e in receiver.events())
    assert receiver.attempts > len(receiver.posts), "the receiver refused some POSTs"
    assert max(copies.values()) <= 2, copies  # at least once; a duplicate only where a retry crossed a success
    after = await scrape(herald.base_url)
    failed = sample(after, "herald_webhook_requests_total", endpoint="acme/crm", outcome="http_error") - sample(
        before, "herald_webhook_requests_total", endpoint="acme/crm", outcome="http_error"
    )
    delivered = sample(after, "herald_webhook_events_total", endpoint="acme/crm", outcome="delivered")
    assert failed >= 1 and delivered >= len(logged)
    assert sample(after, "herald_webhook_lag_seconds_count", endpoint="acme/crm") >= len(logged)


async def test_an_event_never_taken_is_dead_lettered_after_the_retry_window(
    start_herald: Callable[..., Awaitable[HeraldServer]], receiver: Receiver
) -> None:
    receiver.fail_always = True
    herald = await start_herald(**hook_settings(receiver), webhook_retry_for="0.5", admin_token=ADMIN_TOKEN)
    await herald.visitor("doomed-event")
    deadline = time.monotonic() + 10
    while True:
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                f"{herald.base_url}/v1/admin/groups/acme/webhooks/dead-letters",
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            ) as response,
        ):
            assert response.status == 200
            dead = (await response.json())["dead_letters"]
        if dead:
            break
        assert time.monotonic() < deadline, "no dead letter"
        await asyncio.sleep(0.1)
    (record,) = dead
    assert record["type"] == "visitor.online" and record["endpoint"] == "crm" and record["attempts"] >= 2
    assert record["error"] == "http_error:503" and record["event"]["visitor"] == "doomed-event"
    samples = await scrape(herald.base_url)
    assert sample(samples, "herald_webhook_events_total", endpoint="acme/crm", outcome="dead_lettered") >= 1


async def test_under_load_events_go_in_batches_within_the_endpoints_concurrency(receiver: Receiver) -> None:
    receiver.delay = 0.2
    herald = await HeraldServer(settings(**hook_settings(receiver, concurrency=2))).start()
    try:
        for i in range(40):
            await herald.visitor(f"v{i}")
        await receiver.wait_for(lambda: len(receiver.ids()) >= 40, 20, "40 events")
        assert receiver.most_in_flight <= 2
        sizes = [len(json.loads(body)["events"]) for _, body in receiver.posts]
        assert max(sizes) > 1, sizes  # the endpoint was slower than the events: they went together
        assert len(receiver.posts) < 40
    finally:
        await herald.stop()


# --- SSRF ------------------------------------------------------------------------------


def test_endpoints_on_loopback_or_private_addresses_are_refused_unless_allowed() -> None:
    for url in (
        "http://127.0.0.1:9/hook",
        "http://localhost/hook",
        "http://[::1]/hook",
        "http://10.1.2.3/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::ffff:192.168.0.1]/",
    ):
        hooks = json.dumps({"acme": [{"url": url, "secret": HOOK_SECRET}]})
        with pytest.raises(ConfigError, match="loopback or private"):
            load(env={}, flags={"groups": f"acme={SECRET}", "webhooks": hooks})
        allowed = load(env={}, flags={"groups": f"acme={SECRET}", "webhooks": hooks, "webhook_allow_private": "true"})
        assert allowed.groups["acme"].webhooks[0]["url"] == url
    for bad in ("ftp://example.com/", "http://user:pw@example.com/", "https:///nohost", "not a url"):
        with pytest.raises(ConfigError):
            load(
                env={},
                flags={
                    "groups": f"acme={SECRET}",
                    "webhooks": json.dumps({"acme": [{"url": bad, "secret": HOOK_SECRET}]}),
                },
            )
    assert not any(map(public_address, ("127.0.0.1", "10.0.0.1", "172.16.0.1", "192.168.1.1", "100.64.0.1", "0.0.0.0")))
    assert not any(map(public_address, ("::1", "fe80::1", "fc00::1", "::ffff:10.0.0.1", "2002:a00:1::1", "224.0.0.1")))
    assert all(map(public_address, ("93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946")))


async def test_a_name_that_resolves_to_loopback_is_refused_when_it_is_resolved(receiver: Receiver) -> None:
    with pytest.raises(RefusedAddress):
        await GuardedResolver(allow_private=False).resolve("localhost", 80, socket.AF_INET)
    assert await GuardedResolver(allow_private=True).resolve("localhost", 80, socket.AF_INET)
    # This machine's name: no address written in the URL, so the configuration takes it; it resolves to a
    # loopback or private address, so the POST is refused when it is resolved (as a rebinding name would be).
    name = socket.gethostname()
    addresses = {info[4][0] for info in socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)}
    if any(map(public_address, addresses)):
        pytest.skip(f"{name} resolves to a public address here: {addresses}")
    port = receiver.url.split(":")[2].split("/")[0]
    hooks = json.dumps({"acme": [{"id": "sneaky", "url": f"http://{name}:{port}/hook", "secret": HOOK_SECRET}]})
    herald = await HeraldServer(settings(webhooks=hooks, webhook_retry_first="0.05")).start()
    try:
        await herald.visitor("v1")
        deadline = time.monotonic() + 5
        while sample(await scrape(herald.base_url), "herald_webhook_requests_total", endpoint="acme/sneaky",
                     outcome="refused_address") < 1:  # fmt: skip
            assert time.monotonic() < deadline, "the POST was not refused"
            await asyncio.sleep(0.05)
        assert receiver.attempts == 0
    finally:
        await herald.stop()


async def test_the_admin_api_sets_endpoints_and_never_shows_a_secret(
    start_herald: Callable[..., Awaitable[HeraldServer]], receiver: Receiver
) -> None:
    herald = await start_herald(admin_token=ADMIN_TOKEN, webhook_allow_private="true")
    url = f"{herald.base_url}/v1/admin/groups/acme/webhooks"
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession(headers=auth) as http:
        hook = {"id": "ops", "url": receiver.url, "secret": HOOK_SECRET, "events": ["visitor.*"]}
        async with http.put(url, json={"endpoints": [hook]}) as response:
            assert response.status == 200
            shown = await response.json()
        assert shown == {
            "endpoints": [
                {"id": "ops", "url": receiver.url, "events": ["visitor.*"], "concurrency": None, "source": "admin",
                 "has_secret": True},
            ]
        }  # fmt: skip
        assert HOOK_SECRET not in json.dumps(shown)
        for bad in ({"endpoints": [{**hook, "secret": "short"}]}, {"endpoints": [{**hook, "events": ["nope"]}]}, {}):
            async with http.put(url, json=bad) as response:
                assert response.status == 400
    await herald.visitor("admin-set")
    await receiver.wait_for(lambda: "visitor.online" in {e["type"] for e in receiver.events()}, 10, "online")
    assert verified(HOOK_SECRET, *receiver.posts[0])


# --- the audit trail -------------------------------------------------------------------


async def test_the_one_click_flow_leaves_its_timeline_in_the_audit_trail(herald: HeraldServer) -> None:
    session = await one_click_flow(herald)
    status, answer = await audit(herald, session=session)
    assert status == 200 and answer["more"] is False
    timeline = [(e["type"], e.get("agent")) for e in answer["events"]]
    assert timeline == [
        ("terms.requested", "alice"),
        ("terms.displayed", "alice"),
        ("terms.accepted", "alice"),
        ("session.started", None),
        ("session.joined", "alice"),
        ("session.left", "alice"),
        ("session.ended", None),
    ]
    events = answer["events"]
    assert events[-1]["reason"] == "ended" and all(e["visitor"] == "cust-42" for e in events)
    assert [ev.parse_id(e["id"]) for e in events] == sorted(ev.parse_id(e["id"]) for e in events)
    assert events[1]["time"] <= events[2]["time"] <= events[3]["time"]

    # The same events, with the same IDs, filtered and paged.
    everything = await every_event(herald)
    assert {e["id"]: e for e in everything}.keys() >= {e["id"] for e in events}
    status, mine = await audit(herald, visitor="cust-42", type="visitor.*,terms.accepted")
    assert status == 200 and [e["type"] for e in mine["events"]] == ["visitor.online", "terms.accepted"]
    status, first = await audit(herald, limit="2")
    status, rest = await audit(herald, since=first["cursor"])
    assert [e["id"] for e in first["events"] + rest["events"]] == [e["id"] for e in everything]
    status, later = await audit(herald, since=events[2]["id"], session=session)
    assert [e["type"] for e in later["events"]] == [f"session.{e}" for e in ("started", "joined", "left", "ended")]
    status, since_then = await audit(herald, since=f"{time.time() - 3600:.3f}", type="session.ended")
    assert [e["id"] for e in since_then["events"]] == [events[-1]["id"]]
    status, nothing = await audit(herald, since=f"{time.time() + 3600:.3f}")
    assert nothing["events"] == [] and nothing["more"] is False
    for bad in ({"since": "yesterday"}, {"type": "nope"}, {"limit": "0"}, {"visitor": "a b"}):
        assert (await audit(herald, **bad))[0] == 400


async def test_code_sessions_leave_their_whole_timeline_in_the_audit_trail(
    start_herald: Callable[..., Awaitable[HeraldServer]],
) -> None:
    """A code an agent joins by, and one a consumer redeems: each session's events are stored
    with its changes, so its timeline has all of them, in order, the code used once."""
    herald = await start_herald(consumer_codes=("acme",))
    agent = await herald.agent("bob")
    visitor = await herald.visitor("v-code")
    shown = await visitor.start_session("random")
    joined = await agent.join_session(code=shown.key)
    await agent.leave_session(joined.session)
    await agent.join_session(session=joined.session)  # its code again: used already
    await visitor.end_session()
    status, answer = await audit(herald, session=shown.session)
    assert status == 200
    assert [(e["type"], e.get("by"), e.get("agent"), e.get("reason")) for e in answer["events"]] == [
        ("session.started", None, None, None),
        ("code.created", None, None, None),
        ("code.redeemed", "agent", "bob", None),
        ("session.joined", None, "bob", None),
        ("session.left", None, "bob", None),
        ("session.joined", None, "bob", None),
        ("session.ended", None, None, "ended"),
    ]
    assert {e["visitor"] for e in answer["events"]} == {"v-code"}

    async with aiohttp.ClientSession() as http:
        async with http.post(f"{herald.base_url}/v1/groups/acme/codes") as response:
            created = await response.json()
        for _ in range(2):  # redeemed once: the second is refused, and not recorded
            async with http.get(f"{herald.base_url}/v1/groups/acme/codes/{created['code']}") as response:
                pass
    status, answer = await audit(herald, session=created["session"])
    assert [(e["type"], e.get("by")) for e in answer["events"]] == [
        ("session.started", None),
        ("code.created", None),
        ("code.redeemed", "consumer"),
    ]


async def test_another_groups_key_gets_403_and_no_key_401(herald: HeraldServer) -> None:
    await one_click_flow(herald)
    status, answer = await audit(herald, key=tokens.api_key(OTHER_SECRET, "other"))
    assert status == 403 and answer["error"]["code"] == "forbidden"
    status, answer = await audit(herald, "other")
    assert status == 200 and answer["events"] == []  # its own trail: nothing of acme's
    async with aiohttp.ClientSession() as http, http.get(f"{herald.base_url}/v1/groups/acme/events") as response:
        assert response.status == 401
    status, _ = await audit(herald, key=tokens.visitor_token(SECRET, "acme", "cust-42"))
    assert status == 401


# --- an instance killed while delivering (Redis) -------------------------------------------


async def test_events_an_instance_was_delivering_arrive_after_it_is_killed(
    start_instance: Start, redis_server: RedisServer, prefix: str, tmp_path: Path, receiver: Receiver
) -> None:
    hooks = hook_settings(receiver)
    receiver.fail_always = True  # the doomed instance takes the events and keeps retrying them
    doomed = start_server(
        tmp_path,
        str(HERALD), "serve", "--group", f"acme={SECRET}", "--redis-url", redis_server.url,
        "--redis-prefix", prefix, "--instance-heartbeat", "0.25", "--instance-dead-after", "1.5",
        "--grace-period", "0.4",
        env={f"HERALD_{name.upper()}": value for name, value in hooks.items()},
    )  # fmt: skip
    clients: list[VisitorClient] = []
    try:
        for i in range(8):
            client = VisitorClient(doomed.base_url, "acme", f"v{i}", tokens.visitor_token(SECRET, "acme", f"v{i}"))
            client.reconnect = False
            clients.append(client)
            await client.connect()
        await receiver.wait_for(lambda: receiver.attempts >= 2, 10, "the doomed instance trying to deliver")
        survivor = await start_instance(**hooks)
        doomed.kill()
        killed_at = time.monotonic()
        receiver.fail_always = False
        online = {e["id"] for e in await every_event(survivor, type="visitor.online")}
        assert len(online) == 8
        await receiver.wait_for(lambda: receiver.ids() >= online, 15, "the killed instance's events")
        assert time.monotonic() - killed_at < 1 + 10
        # The survivor reaps the dead instance's visitors: their offline events arrive too.
        await receiver.wait_for(
            lambda: sum(e["type"] == "visitor.offline" for e in receiver.events()) >= 8, 15, "offline events"
        )
    finally:
        for client in clients:
            await client.close()
        doomed.stop()


# --- memory mode: a graceful stop delivers what it holds --------------------------------------


async def memory_server_with_events(tmp_path: Path, receiver: Receiver, drain_timeout: float) -> tuple[Any, set[str]]:
    """A ``herald serve`` process (memory backend) whose webhook fails, and the IDs of the six
    ``visitor.online`` events it recorded (the audit trail has them) and tried to deliver."""
    hooks = hook_settings(receiver, concurrency=1) | {"webhook_retry_first": "0.2"}
    argv = [str(HERALD), "serve", "--group", f"acme={SECRET}", "--grace-period", "30", "--drain-spread", "0.2",
            "--drain-timeout", str(drain_timeout)]  # fmt: skip
    env = {f"HERALD_{name.upper()}": value for name, value in hooks.items()}
    process = await asyncio.to_thread(start_server, tmp_path, *argv, env=env)
    visitors = [
        VisitorClient(process.base_url, "acme", f"v{i}", tokens.visitor_token(SECRET, "acme", f"v{i}"), reconnect=False)
        for i in range(6)
    ]
    try:
        for visitor in visitors:
            await visitor.connect()
        key = tokens.api_key(SECRET, "acme")
        deadline = time.monotonic() + 10
        while True:
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"{process.base_url}/v1/groups/acme/events", headers={"Authorization": f"Bearer {key}"}) as r,
            ):
                logged = {e["id"] for e in (await r.json())["events"]}
            if len(logged) == 6:
                break
            assert time.monotonic() < deadline, logged
            await asyncio.sleep(0.05)
        await receiver.wait_for(lambda: receiver.attempts >= 2, 10, "failed deliveries before the stop")
    except BaseException:
        process.stop()
        raise
    finally:
        for visitor in visitors:
            await visitor.close()
    return process, logged


async def test_memory_mode_delivers_what_it_holds_before_a_graceful_exit(tmp_path: Path, receiver: Receiver) -> None:
    """SIGTERM while the endpoint fails: the endpoint recovers within the drain, and every event
    recorded before the signal reaches it before the process exits."""
    receiver.fail_always = True
    process, logged = await memory_server_with_events(tmp_path, receiver, drain_timeout=10)
    try:
        assert not receiver.ids() & logged
        process.proc.terminate()  # SIGTERM
        started = time.monotonic()
        await asyncio.sleep(1.0)  # still failing a while into the drain
        assert process.proc.poll() is None, "exited with its events undelivered"
        receiver.fail_always = False
        code = await asyncio.to_thread(process.proc.wait, 10 + STOP_TIMEOUT)
        took = time.monotonic() - started
    finally:
        process.stop()
    assert code == 0, process.output()
    assert receiver.ids() >= logged, f"lost at exit: {logged - receiver.ids()}\n{process.output()}"
    assert took < 10 - 2, f"the drain waited on after every event was delivered ({took:.1f}s)"
    assert "undelivered at exit" not in process.stderr(), process.output()


async def test_memory_mode_logs_what_is_still_undelivered_at_the_drain_deadline(
    tmp_path: Path, receiver: Receiver
) -> None:
    receiver.fail_always = True  # never recovers
    process, logged = await memory_server_with_events(tmp_path, receiver, drain_timeout=4)
    try:
        process.proc.terminate()  # SIGTERM
        code = await asyncio.to_thread(process.proc.wait, 4 + STOP_TIMEOUT)
    finally:
        process.stop()
    assert code == 0, process.output()
    assert not receiver.ids() & logged
    found = re.search(r"webhooks: (\d+) events still undelivered at exit, lost with the process \((.*)\)",
                      process.stderr())  # fmt: skip
    assert found and found[1] == "6" and found[2] == "acme/crm: 6", process.output()


@pytest.mark.parametrize("where", ["same instance", "another instance"])
async def test_a_terms_request_is_in_the_log_before_its_visitor_can_see_it(
    redis_server: RedisServer, prefix: str, where: str
) -> None:
    """Redis takes no writes for a while (CLIENT PAUSE WRITE): an agent's
    showterms must not reach the visitor before its terms.requested is stored,
    so an instance killed at any moment never leaves a request delivered and
    not logged. On the visitor's own instance the append is awaited before
    the local delivery; through another instance's inbox it goes out ahead
    of the delivery's publish on the same connection."""
    if redis_server.process is None or redis_server.process.poll() is not None:
        redis_server.start()
    options = {"redis_url": redis_server.url, "redis_prefix": prefix}
    visitors = await HeraldServer(settings(**options)).start()
    agents = visitors if where == "same instance" else await HeraldServer(settings(**options)).start()
    admin = aioredis.Redis.from_url(redis_server.url)
    stream = RedisNames(prefix).events("acme")
    try:
        visitor = await visitors.visitor("v-asked")
        agent = await agents.agent("alice")
        await admin.execute_command("CLIENT", "PAUSE", "600", "WRITE")
        asked = asyncio.create_task(agent.show_terms("v-asked"))
        await visitor.wait_for(signal("showterms"), timeout=5)
        logged = [unpack(entry[b"e"])["type"] for _id, entry in await admin.xrange(stream)]
        assert "terms.requested" in logged, logged
        assert await asked == 1
    finally:
        await admin.execute_command("CLIENT", "UNPAUSE")
        await admin.aclose()
        await visitors.stop()
        if agents is not visitors:
            await agents.stop()
