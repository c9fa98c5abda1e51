"""Redis's replies read straight off a connection's socket, with hiredis.

redis-py reads one reply per call, through its retry, health-check and
timeout layers and its response callbacks: about 10 µs a reply, and at the
rates of the hot path 7-9 % of an instance's CPU for the bus's pub/sub
messages (two or three per round trip) and as much again for the replies to
the batcher's commands (profiled). With hiredis (the ``fast`` extra) both
are read here instead: one read of the socket, then every complete reply in
the bytes it brought, with no await between them. redis-py still makes the
connection (TLS, AUTH, Sentinel, RESP version) and sends the commands.

This is also where hiredis is imported: its packer, when installed, packs
the batcher's commands (``redis_batch.pack_commands``).

Without hiredis, or on a connection that is not a plain stream, the callers
keep redis-py's own reading (``read_messages`` falls back to ``listen``,
``reads_replies`` says no and redis-py reads the batch's replies). Either way a lost connection, a timeout or
a refusal raises redis-py's own errors.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

try:  # the fast extra's C parser and packer
    from hiredis import Reader
    from hiredis import pack_command as hiredis_pack_command
except ImportError:  # without it: redis-py reads, redis_batch packs in Python
    Reader = None
    hiredis_pack_command = None

READ_SIZE = 65536
# The commands whose reply, as hiredis parses it, is what redis-py gives
# (HGETALL once made a dict); any other in a batch and redis-py reads it.
AS_REDIS_PY = frozenset({"PUBLISH", "SPUBLISH", "EVALSHA", "EVAL", "GET", "EXISTS", "SADD", "HGETALL"})
OnMessage = Callable[[bytes, bytes, Any], None]


def _stream(connection: Any) -> asyncio.StreamReader | None:
    """The connection's socket as a stream, if it is one and hiredis is here to parse it."""
    stream = getattr(connection, "_reader", None)
    return stream if Reader is not None and isinstance(stream, asyncio.StreamReader) else None


def _parser() -> Any:
    """hiredis's parser, its errors redis-py's: a reply's ``ResponseError``, a garbled stream's ``InvalidResponse``."""
    return Reader(protocolError=InvalidResponse, replyError=ResponseError)


async def _more(stream: asyncio.StreamReader, reader: Any) -> None:
    data = await stream.read(READ_SIZE)
    if not data:
        raise RedisConnectionError("Redis closed the connection")
    reader.feed(data)


async def read_messages(pubsub: Any, on_message: OnMessage) -> None:
    """Hand each message of ``pubsub`` (subscribed already) to ``on_message``
    as ``(kind, channel, data)``, ``kind`` as Redis says it (``b"message"``,
    ``b"subscribe"``…), until its connection fails (raised) or the task is
    cancelled."""
    stream = _stream(pubsub.connection)
    if stream is None:
        async for message in pubsub.listen():
            on_message(message["type"].encode(), message["channel"], message["data"])
        return
    reader = _parser()
    while True:
        await _more(stream, reader)
        while (reply := reader.gets()) is not False:
            if isinstance(reply, ResponseError):  # a refused (un)subscribe: an ACL, a cluster redirect
                raise reply
            if len(reply) == 3:  # [kind, channel, data or count]
                on_message(*reply)


def reads_replies(connection: Any, commands: list[tuple[str, tuple[Any, ...]]]) -> bool:
    """Whether the replies to ``commands`` on ``connection`` are read here
    (hiredis, a plain stream, every command in ``AS_REDIS_PY``): only those
    are sent ahead of the replies before them (``redis_batch``)."""
    parse_error = getattr(getattr(connection, "_parser", None), "parse_error", None)
    return (
        _stream(connection) is not None
        and parse_error is not None
        and all(command in AS_REDIS_PY for command, _ in commands)
    )


def reply_parser() -> Any:
    """A parser for one connection's replies, kept while it lives: bytes of
    later replies that one read brought stay in it for the next call (None
    without hiredis: redis-py reads them)."""
    return None if Reader is None else _parser()


async def read_replies(connection: Any, commands: list[tuple[str, tuple[Any, ...]]], parser: Any) -> list[Any]:
    """The replies to ``commands``, sent on ``connection`` (one that
    ``reads_replies``; ``parser`` is its own, from ``reply_parser``, holding
    what one read brought beyond earlier replies), as redis-py would give
    them (an error reply as its exception, not raised; HGETALL as a dict),
    read within the connection's socket timeout."""
    stream = connection._reader
    parse_error = connection._parser.parse_error
    replies: list[Any] = []
    try:
        async with asyncio.timeout(connection.socket_timeout):
            for command, _args in commands:
                while (reply := parser.gets()) is False:
                    await _more(stream, parser)
                if isinstance(reply, ResponseError):  # NOSCRIPT, MOVED, OOM…: redis-py's class for it
                    reply = parse_error(str(reply))
                    if not isinstance(reply, ResponseError):  # "max number of clients reached": the connection's
                        raise reply
                elif command == "HGETALL" and isinstance(reply, list):
                    reply = dict(zip(reply[::2], reply[1::2], strict=True))
                replies.append(reply)
    except TimeoutError:
        raise RedisTimeoutError("Timeout reading from Redis") from None
    return replies
