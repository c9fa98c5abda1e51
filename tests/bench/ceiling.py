"""The benchmark's ceiling: Herald's measured round trip with no features, as its own process.

``python -m tests.bench.ceiling --port P --redis-url U --instance NAME``: aiohttp + redis.asyncio, the
generators' URLs and msgpack frames, no checks, limits, versions, grace or keepalive. Connect: HSET +
SADD, PUBLISH to the group's channel (for group watchers). Signal: HGET of the visitor's instance,
PUBLISH to its inbox; it delivers and confirms to the sender's inbox, whence the ``ack``. Answers go
to the inboxes of instances with a watcher. Redis commands queued in a loop turn (or while a pipeline
is in flight) leave in one pipeline. Benchmark code only: not part of the package.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import resource
import time
from collections import defaultdict
from typing import Any

import msgpack
import redis.asyncio as aioredis
from aiohttp import WSMsgType, web

BACKLOG = 1024  # the accept queue Herald listens with (server/web/listener.py): storms compare the servers

pack, unpack, Socket = msgpack.packb, msgpack.unpackb, web.WebSocketResponse


async def deliver(ws: Socket, frame: bytes) -> None:
    with contextlib.suppress(ConnectionError, RuntimeError):
        await ws.send_bytes(frame)


def frames(ws: Socket) -> Any:  # the socket's msgpack maps (anything else as an empty map)
    return ({} if msg.type is not WSMsgType.BINARY else unpack(msg.data) async for msg in ws)


class Relay:
    def __init__(self, name: str, redis_url: str) -> None:
        self.name, self.redis = name, aioredis.Redis.from_url(redis_url)
        self.pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        self.queue: list[tuple[str, tuple[Any, ...], asyncio.Future[Any]]] = []
        self.sender: asyncio.Task[None] | None = None
        self.visitors: dict[str, Socket] = {}
        self.watchers: defaultdict[str, set[Socket]] = defaultdict(set)  # visitor (or "group:<g>") -> local agents
        self.remote: defaultdict[str, set[str]] = defaultdict(set)  # visitor -> instances watching it
        self.acks: dict[int, tuple[Socket, int]] = {}  # token -> agent, request id
        self.ids = itertools.count(1)

    def call(self, command: str, *args: Any) -> asyncio.Future[Any]:
        future = asyncio.get_running_loop().create_future()
        self.queue.append((command, args, future))
        self.sender = self.sender or asyncio.create_task(self.send())
        return future

    async def send(self) -> None:
        try:
            while self.queue:
                batch, self.queue = self.queue, []
                if len(batch) == 1:  # a pipeline costs more than a lone command
                    results = [await getattr(self.redis, batch[0][0])(*batch[0][1])]
                else:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for command, args, _ in batch:
                            getattr(pipe, command)(*args)
                        results = await pipe.execute()
                for (_, _, future), result in zip(batch, results, strict=True):
                    future.set_result(result)
        finally:
            self.sender = None

    async def listen(self) -> None:
        async for message in self.pubsub.listen():
            kind, key, *rest = unpack(message["data"])
            if kind == "s":  # a signal for a visitor here: [s, visitor, frame, reply to, token]
                ws = self.visitors.get(key)
                if ws is not None:
                    await deliver(ws, rest[0])
                if rest[2] is not None:
                    self.call("publish", "inbox:" + rest[1], pack(["a", rest[2], int(ws is not None)]))
            elif kind == "a" and key in self.acks:  # a delivery confirmed: [a, token, delivered]
                agent, request = self.acks.pop(key)
                reply = {"type": "ack", "id": request, "delivered": 1} if rest[0] else None
                await deliver(agent, pack(reply or {"type": "error", "code": "visitor_offline", "id": request}))
            elif kind == "w":  # [w, visitor, instance]: an agent there watches this visitor
                self.remote[key].add(rest[0])
            else:  # [v, visitor, frame]: a visitor's signal; [o, "group:<g>", frame]: a visitor online
                for ws in list(self.watchers.get(key, ())):
                    await deliver(ws, rest[0])

    async def visitor(self, request: web.Request) -> Socket:
        ws = Socket(compress=False)
        await ws.prepare(request)
        hello = unpack((await ws.receive()).data)
        group, visitor, connection = hello["group"], hello["visitor"], f"c{next(self.ids):016x}"
        key, online, since = f"v:{group}:{visitor}", f"online:{group}", time.time()
        self.visitors[visitor] = ws
        self.call("hset", key, "i", self.name)
        self.call("sadd", online, visitor)
        state = {"connection": connection, "data": hello.get("data") or {}, "visible": True, "since": since}
        state = {"visitor": visitor, "online": True, "version": 1, "connections": [state]}
        change = pack({"type": "presence_changed", "change": "online", "state": state})
        await self.call("publish", f"group:{group}", pack(["o", f"group:{group}", change]))
        welcome = {"type": "welcome", "protocol": 1, "connection": connection, "role": "visitor", "group": group}
        await ws.send_bytes(pack({**welcome, "keepalive": 25.0, "visitor": visitor, "focused": True}))
        try:
            async for frame in frames(ws):
                if frame.get("type") == "signal":
                    if frame.get("id") is not None:
                        await ws.send_bytes(pack({"type": "ack", "id": frame["id"]}))
                    fields = {"event": frame["event"], "data": frame.get("data") or {}, "visitor": visitor}
                    out = pack({"type": "signal", **fields, "connection": connection})
                    for agent in list(self.watchers.get(visitor, ())):
                        await deliver(agent, out)
                    for instance in self.remote.get(visitor, ()):
                        self.call("publish", "inbox:" + instance, pack(["v", visitor, out]))
        finally:
            if self.visitors.get(visitor) is ws:
                del self.visitors[visitor]
            self.call("delete", key)
            self.call("srem", online, visitor)
        return ws

    async def login(self, request: web.Request) -> web.Response:
        body = await request.json()
        response = web.json_response({"group": body["group"], "agent": body["agent"], "expires": 2**31})
        response.set_cookie("HERALD_SESSION", f"{body['group']}.{body['agent']}")
        return response

    async def agent(self, request: web.Request) -> Socket:
        group, _, agent = request.cookies["HERALD_SESSION"].partition(".")
        ws, watched = Socket(compress=False), []
        await ws.prepare(request)
        await ws.receive()  # hello
        welcome = {"type": "welcome", "protocol": 1, "connection": f"c{next(self.ids):016x}", "role": "agent"}
        await ws.send_bytes(pack({**welcome, "group": group, "keepalive": 25.0, "agent": agent}))
        try:
            async for frame in frames(ws):
                kind, request_id = frame.get("type"), frame.get("id")
                if kind == "signal":
                    instance = await self.call("hget", f"v:{group}:{frame['visitor']}", "i")
                    if instance is None:
                        await ws.send_bytes(pack({"type": "error", "code": "visitor_offline", "id": request_id}))
                        continue
                    token = None if request_id is None else next(self.ids)
                    if token is not None:
                        self.acks[token] = (ws, request_id)
                    out = pack({"type": "signal", "event": frame["event"], "data": frame.get("data") or {}})
                    self.call("publish", b"inbox:" + instance, pack(["s", frame["visitor"], out, self.name, token]))
                elif kind == "subscribe" and frame.get("group"):  # no snapshot of who is online: no feature
                    if not self.watchers.get(f"group:{group}"):
                        await self.pubsub.subscribe(f"group:{group}")
                    watched.append(f"group:{group}")
                    self.watchers[f"group:{group}"].add(ws)
                    await ws.send_bytes(pack({"type": "snapshot", "id": request_id, "visitors": [], "group": True}))
                elif kind == "subscribe":
                    where = await asyncio.gather(*(self.call("hget", f"v:{group}:{v}", "i") for v in frame["visitors"]))
                    states = []
                    for visitor, instance in zip(frame["visitors"], where, strict=True):
                        watched.append(visitor)
                        self.watchers[visitor].add(ws)
                        if instance is not None and instance.decode() != self.name:
                            self.call("publish", b"inbox:" + instance, pack(["w", visitor, self.name]))
                        states.append({"visitor": visitor, "online": instance is not None, "version": 0})
                    await ws.send_bytes(pack({"type": "snapshot", "id": request_id, "visitors": states}))
        finally:
            for key in watched:
                self.watchers[key].discard(ws)
        return ws


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.ceiling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--instance", required=True, help="this instance's name (its inbox channel)")
    args = parser.parse_args()
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()

    async def app() -> web.Application:
        relay, application = Relay(args.instance, args.redis_url), web.Application()
        await relay.pubsub.subscribe("inbox:" + args.instance)
        application["listener"] = asyncio.create_task(relay.listen())
        application.router.add_get("/healthz", lambda _: web.json_response({"status": "ok"}))
        application.router.add_get("/v1/visitor", relay.visitor)
        application.router.add_get("/v1/agent", relay.agent)
        application.router.add_post("/v1/agent/login", relay.login)
        return application

    web.run_app(app(), host="127.0.0.1", port=args.port, print=None, access_log=None, backlog=BACKLOG)


if __name__ == "__main__":
    main()
