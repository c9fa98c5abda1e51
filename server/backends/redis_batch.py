"""Hot-path Redis commands, sent together: one write and one read per batch.

Every ``PUBLISH`` of a signal, reply or event and every ``HGETALL`` of a
signal's target went out as its own command: a pooled connection taken and
given back, a socket write, a wake-up for its reply. On loopback the write
is the expensive part (the kernel runs the receiver's side in the writer's
system call), and it was most of an instance's CPU per round trip. Here a
command waits while the batch before it is in flight and then goes out with
every other command queued meanwhile, in one write: an idle instance sends
each alone at once; a busy one sends fewer, larger writes.

Commands leave in the order they were called (one batch in flight at a
time), which keeps the bus contract: publish order per publisher.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import msgpack
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import Connection
from redis.exceptions import AskError, ClusterDownError, NoScriptError, RedisError, ResponseError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError

from .base import BackendUnavailable
from .redis_socket import hiredis_pack_command, read_replies

Queued = tuple[str, tuple[Any, ...], "asyncio.Future[Any]"]
Command = tuple[str, tuple[Any, ...]]
PUBLISHES = ("PUBLISH", "SPUBLISH")  # merged when neighbours in a batch name one channel (``coalesced``)
# Answers a Redis Cluster gives when a slot is elsewhere or moving (MOVED is
# an AskError): passed to the caller as they are, to follow (redis_cluster.py).
REDIRECTS = (AskError, TryAgainError, ClusterDownError)
_SHAS: dict[str, str] = {}  # script -> its SHA1, for EVALSHA


class PoolLink:
    """Where a batcher's connection comes from: a client's pool (one Redis,
    or the master Sentinel names)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis

    async def acquire(self) -> Connection:
        return await self.redis.connection_pool.get_connection()

    async def release(self, connection: Connection) -> None:
        await self.redis.connection_pool.release(connection)

    async def parse(self, connection: Connection, command: str) -> Any:
        return await self.redis.parse_response(connection, command)


class NodeLink:
    """A Redis Cluster node's connections (``redis_cluster.py`` keeps one batcher per master)."""

    def __init__(self, node: ClusterNode) -> None:
        self.node = node

    async def acquire(self) -> Connection:
        return self.node.acquire_connection()

    async def release(self, connection: Connection) -> None:
        self.node.release(connection)

    async def parse(self, connection: Connection, command: str) -> Any:
        return await self.node.parse_response(connection, command)


class CommandBatcher:
    """Commands in Redis's own words (``call("HGETALL", key)``), sent in
    batches on one connection of the pool, held while it works: a batch is
    one write of every command and one read of every reply, with none of a
    pipeline object's per-batch set-up."""

    def __init__(self, redis: aioredis.Redis | PoolLink | NodeLink, name: str) -> None:
        self._link = PoolLink(redis) if isinstance(redis, aioredis.Redis) else redis
        self._name = name
        self._queue: list[Queued] = []
        self._sender: asyncio.Task[None] | None = None
        self._connection: Connection | None = None

    async def call(self, command: str, *args: Any) -> Any:
        """The command's reply (as redis-py's own call would give it), or
        ``BackendUnavailable``; ``NoScriptError`` for an EVALSHA of a script
        Redis does not know."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((command, args, future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send(), name=f"redis-batch-{self._name}")
        return await future

    async def script(self, script: str, keys: int, *args: Any) -> Any:
        """``EVALSHA`` of ``script`` (its text sent only when Redis lacks it)."""
        sha = self.sha(script)
        try:
            return await self.call("EVALSHA", sha, keys, *args)
        except NoScriptError:  # a fresh Redis (restarted, failed over): EVAL loads it
            return await self.call("EVAL", script, keys, *args)

    @staticmethod
    def sha(script: str) -> str:
        sha = _SHAS.get(script)
        if sha is None:
            sha = _SHAS[script] = hashlib.sha1(script.encode()).hexdigest()
        return sha

    async def _send(self) -> None:
        batch: list[Queued] = []
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                commands, callers = coalesced(batch)
                try:
                    replies = await self._execute(commands)
                except (RedisError, OSError) as exc:
                    _fail(batch, exc)
                else:
                    for futures, reply in zip(callers, replies, strict=True):
                        for future in futures:
                            _answer(future, reply)
                batch = []
        except BaseException as exc:  # cancelled at shutdown: nobody is left waiting
            _fail(batch + self._queue, exc)
            self._queue = []
            raise
        finally:
            self._sender = None

    async def _execute(self, commands: list[Command]) -> list[Any]:
        try:
            return await self._execute_on(self._connection or await self._link.acquire(), commands)
        except RedisConnectionError:
            # The connection died while idle (Redis restarted, a proxy timed
            # it out): nothing was executed on it; once more, on a new socket
            # (the pool's idle ones may be as dead).
            connection = await self._link.acquire()
            await connection.disconnect()
            return await self._execute_on(connection, commands)

    async def _execute_on(self, connection: Connection, commands: list[Command]) -> list[Any]:
        self._connection = connection
        try:
            await connection.send_packed_command(pack_commands(commands))
            replies = await read_replies(connection, commands)
            if replies is not None:
                return replies
            replies = []
            for command, _args in commands:
                try:
                    replies.append(await self._link.parse(connection, command))
                except ResponseError as exc:
                    replies.append(exc)
            return replies
        except BaseException:
            # Replies may be left unread on it: never reuse it.
            self._connection = None
            await connection.disconnect()
            await self._link.release(connection)
            raise

    async def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.wait([self._sender])
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await self._link.release(connection)


def pack_commands(commands: list[Command]) -> bytes:
    """The batch in Redis's wire format (RESP arrays of bulk strings).
    Arguments are what Herald sends: bytes, str, int and float (a command
    name with a space is two words); anything else (a bool, None) raises
    ``TypeError``. hiredis's packer (in C, with the ``fast`` extra) when it
    is installed: 1.1 against 3.0 µs for one of the hot path's scripts."""
    if hiredis_pack_command is None:
        return pack_commands_in_python(commands)
    return b"".join(hiredis_pack_command((*command.split(), *args)) for command, args in commands)


def pack_commands_in_python(commands: list[Command]) -> bytes:
    """``pack_commands`` without hiredis, in one pass: redis-py's own Python
    packer, per argument, cost 8 % of an instance's CPU under a connect storm
    (profiled)."""
    out: list[bytes] = []
    for command, args in commands:
        words = command.split() if " " in command else (command,)
        out.append(b"*%d\r\n" % (len(words) + len(args)))
        for arg in (*words, *args):
            if isinstance(arg, bytes):
                data = arg
            elif isinstance(arg, str):
                data = arg.encode()
            elif isinstance(arg, bool):
                raise TypeError("a bool is not a Redis argument")
            elif isinstance(arg, int):
                data = b"%d" % arg
            elif isinstance(arg, float):
                data = repr(arg).encode()
            elif isinstance(arg, memoryview):
                data = arg.tobytes()
            else:
                raise TypeError(f"not a Redis argument: {type(arg).__name__}")
            out += (b"$%d\r\n" % len(data), data, b"\r\n")
    return b"".join(out)


def coalesced(batch: list[Queued]) -> tuple[list[Command], list[list[asyncio.Future[Any]]]]:
    """The commands to send for ``batch``, and whose futures each one's
    reply answers. Publishes in a row to one channel become one publish of
    a batch of their messages (``pack_messages``), which the subscriber
    splits again (``unpack_messages``): its listener still gets each message
    as it was published, in order, while Redis and the subscriber's socket
    carry one. Only neighbours merge: the order across channels stays as
    called."""
    commands: list[Command] = []
    callers: list[list[asyncio.Future[Any]]] = []
    runs: dict[int, list[bytes]] = {}  # index in commands -> the messages of a merged publish
    for command, args, future in batch:
        last = len(commands) - 1
        if command in PUBLISHES and last >= 0 and commands[last][0] == command and commands[last][1][0] == args[0]:
            runs.setdefault(last, [commands[last][1][1]]).append(args[1])
            callers[last].append(future)
        else:
            commands.append((command, args))
            callers.append([future])
    for index, messages in runs.items():
        command, (channel, _first) = commands[index]
        commands[index] = (command, (channel, pack_messages(messages)))
    return commands, callers


BATCH_MARK = b"\xc1"  # a byte msgpack never uses: no message starts with it (the Bus contract)


def pack_messages(messages: list[bytes]) -> bytes:
    """One pub/sub payload for several messages of one channel."""
    return BATCH_MARK + msgpack.packb(messages, use_bin_type=True)


def unpack_messages(payload: bytes) -> list[bytes]:
    """The messages of a pub/sub payload, in publish order: one, or a batch's."""
    if payload[:1] != BATCH_MARK:
        return [payload]
    return list(msgpack.unpackb(payload[1:], raw=False, use_list=True))


def _answer(future: asyncio.Future[Any], reply: Any) -> None:
    if future.done():  # its caller gave up
        return
    if isinstance(reply, (NoScriptError, *REDIRECTS)):
        future.set_exception(reply)
    elif isinstance(reply, ResponseError):  # refused (out of memory, a read-only replica…)
        _fail([("", (), future)], reply)
    else:
        future.set_result(reply)


def _fail(batch: list[Queued], exc: BaseException) -> None:
    for _command, _args, future in batch:
        if not future.done():
            error = BackendUnavailable()
            error.__cause__ = exc
            future.set_exception(error)
