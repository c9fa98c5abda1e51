"""Reading a pub/sub connection: every message one socket read brought, at once.

redis-py's ``PubSub.listen`` reads one reply per call, through its retry,
health-check and timeout layers, and builds a dict for it: at the rates of
the hot path that cost 7-9 % of an instance's CPU (profiled: each round trip
brings two or three pub/sub messages). With hiredis (the ``fast`` extra) the
connection's socket is read here instead: one read, then every complete
reply in the bytes it brought, handed on without an await between them.
redis-py still makes the connection (TLS, AUTH, Sentinel, RESP version)
and sends the (un)subscribe commands, which read nothing.

Without hiredis, or on a connection that is not a plain stream, it falls back
to ``PubSub.listen``. Either way the caller gets ``(kind, channel, data)``
with ``kind`` as Redis says it (``b"message"``, ``b"subscribe"``, ...), and a
connection lost or refused raises a redis-py error, as ``listen`` does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

try:  # the fast extra's C parser
    from hiredis import Reader
except ImportError:  # without it: PubSub.listen
    Reader = None

READ_SIZE = 65536
OnMessage = Callable[[bytes, bytes, Any], None]


async def read_messages(pubsub: Any, on_message: OnMessage) -> None:
    """Hand each message of ``pubsub`` (subscribed already) to ``on_message``
    until its connection fails (raised) or the task is cancelled."""
    stream = getattr(pubsub.connection, "_reader", None)
    if Reader is None or not isinstance(stream, asyncio.StreamReader):
        async for message in pubsub.listen():
            on_message(message["type"].encode(), message["channel"], message["data"])
        return
    reader = Reader(replyError=ResponseError)
    while True:
        data = await stream.read(READ_SIZE)
        if not data:
            raise RedisConnectionError("Redis closed the pub/sub connection")
        reader.feed(data)
        while (reply := reader.gets()) is not False:
            if isinstance(reply, ResponseError):  # a refused (un)subscribe: an ACL, a cluster redirect
                raise reply
            if len(reply) == 3:  # [kind, channel, data or count]
                on_message(*reply)
