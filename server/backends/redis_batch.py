"""Hot-path Redis commands, sent together: one write and one read per batch.

Every ``PUBLISH`` of a signal, reply or event and every ``HGETALL`` of a
signal's target went out as its own command: a pooled connection taken and
given back, a socket write, a wake-up for its reply. On loopback the write
is the expensive part (the kernel runs the receiver's side in the writer's
system call), and it was most of an instance's CPU per round trip. Here the
commands called in one turn of the event loop go out together, in one
write, on one connection, without waiting for the replies to earlier
batches (a reader task hands those out in order): an idle instance sends
each alone at once; a busy one sends one write per turn. Waiting for each
batch's replies before the next (as this did before) left a command
queued behind a whole round trip, most of it this instance's own event
loop coming round to read: at 1,950 round trips a second on the
benchmark's two-core machine the batchers had a batch in flight 80-94 % of
the time and a command took 4-38 ms (p50) to be answered; sent ahead,
1-2 ms, for the same CPU.

Commands leave in the order they were called (one connection, written in
turn), which keeps the bus contract: publish order per publisher.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import deque
from dataclasses import dataclass
from typing import Any

import msgpack
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import Connection
from redis.exceptions import AskError, ClusterDownError, NoScriptError, RedisError, ResponseError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError

from .base import BackendUnavailable
from .redis_socket import hiredis_pack_command, read_replies, reads_replies, reply_parser

Queued = tuple[str, tuple[Any, ...], "asyncio.Future[Any]"]
Command = tuple[str, tuple[Any, ...]]
PUBLISHES = ("PUBLISH", "SPUBLISH")  # merged when neighbours in a batch name one channel (``coalesced``)
# Answers a Redis Cluster gives when a slot is elsewhere or moving (MOVED is
# an AskError): passed to the caller as they are, to follow (redis_cluster.py).
REDIRECTS = (AskError, TryAgainError, ClusterDownError)
_SHAS: dict[str, str] = {}  # script -> its SHA1, for EVALSHA
MAX_SENT = 8  # batches written ahead on one connection, their replies not read yet


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


@dataclass(slots=True)
class _Sent:
    """A batch written on the held connection, its replies not read yet."""

    batch: list[Queued]
    commands: list[Command]
    callers: list[list[asyncio.Future[Any]]]
    first: bool  # written with nothing else in flight: if the socket proves dead, nothing on it ran


class CommandBatcher:
    """Commands in Redis's own words (``call("HGETALL", key)``), sent in
    batches on one connection of the pool, held while it works: a batch is
    one write of every command queued since the last, with none of a
    pipeline object's per-batch set-up.

    A batch whose replies are read here (hiredis: ``reads_replies``) is
    written at once, while earlier ones still wait for their replies (up to
    ``MAX_SENT`` of them), and a reader task hands the replies out in order:
    a command waits one turn of the event loop, not a batch's round trip.
    Any other batch waits until nothing is in flight, then goes alone."""

    def __init__(self, redis: aioredis.Redis | PoolLink | NodeLink, name: str) -> None:
        self._link = PoolLink(redis) if isinstance(redis, aioredis.Redis) else redis
        self._name = name
        self._queue: list[Queued] = []
        self._sender: asyncio.Task[None] | None = None
        self._connection: Connection | None = None
        self._parser: Any = None  # hiredis's parser of the held connection's replies
        self._sent: deque[_Sent] = deque()
        self._reader: asyncio.Task[None] | None = None
        self._broken: BaseException | None = None  # what the reader met: the held connection is done
        self._progress = asyncio.Event()  # a batch answered, or the connection broken
        self._fresh_socket = False  # the next connection is a new socket (the last one died while idle)
        self._retrying = False  # the queue starts with batches sent once already, on a socket that died

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
            while self._queue or self._broken is not None:
                if self._broken is not None:
                    await self._recover()
                    continue
                if len(self._sent) >= MAX_SENT:
                    await self._next_progress()
                    continue
                batch, self._queue = self._queue, []
                commands, callers = coalesced(batch)
                first, self._retrying = not self._sent and not self._retrying, False
                try:
                    connection = await self._held()
                    if reads_replies(connection, commands):
                        await self._send_ahead(connection, _Sent(batch, commands, callers, first))
                        batch = []
                        continue
                    while self._sent and self._broken is None:  # alone: redis-py reads its replies
                        await self._next_progress()
                    if self._broken is not None:
                        self._queue, batch = batch + self._queue, []
                        continue
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

    async def _held(self) -> Connection:
        """The connection batches go out on (taken from the pool when none is
        held, the scripts loaded on it)."""
        if self._connection is None:
            fresh = self._fresh_socket
            try:
                await self._take()
            except RedisConnectionError:
                if fresh:
                    raise
                # An idle socket of the pool died (Redis restarted, a proxy
                # timed it out): once more, on a new one.
                self._fresh_socket = True
                await self._take()
        assert self._connection is not None
        return self._connection

    async def _take(self) -> None:
        connection = await self._link.acquire()
        if self._fresh_socket:  # the pool's idle sockets may be as dead as the last one
            self._fresh_socket = False
            await connection.disconnect()
        self._connection, self._parser = connection, reply_parser()
        try:
            await self._load_scripts(connection)
        except BaseException:
            await self._drop()
            raise

    async def _load_scripts(self, connection: Connection) -> None:
        """The scripts this process has run, loaded on a new connection
        before its first batch: a Redis that restarted or failed over has
        none, and an ``EVALSHA`` answered ``NOSCRIPT`` goes once more as an
        ``EVAL`` behind the calls sent ahead after it, out of turn."""
        scripts = list(_SHAS)
        if not scripts:
            return
        await connection.send_packed_command(pack_commands([("SCRIPT LOAD", (script,)) for script in scripts]))
        for _script in scripts:
            with contextlib.suppress(ResponseError):  # refused (an ACL): its first EVALSHA loads it as before
                await self._link.parse(connection, "SCRIPT LOAD")

    async def _send_ahead(self, connection: Connection, sent: _Sent) -> None:
        """Write a batch whose replies the reader task reads, in order."""
        self._sent.append(sent)
        try:
            await connection.send_packed_command(pack_commands(sent.commands))
        except (RedisError, OSError) as exc:
            self._broken = self._broken or exc
            return
        if self._reader is None and self._broken is None:
            self._reader = asyncio.create_task(self._read(connection), name=f"redis-replies-{self._name}")

    async def _read(self, connection: Connection) -> None:
        """The replies of the batches sent ahead, in order, to their callers."""
        try:
            while self._sent and self._broken is None:
                sent = self._sent[0]
                replies = await read_replies(connection, sent.commands, self._parser)
                self._sent.popleft()
                for futures, reply in zip(sent.callers, replies, strict=True):
                    for future in futures:
                        _answer(future, reply)
                self._progress.set()
        except Exception as exc:  # a lost or stalled connection, or a reply that makes no sense: done with it
            self._broken = self._broken or exc
            self._progress.set()
            if self._sender is None:  # nothing queued: the sender still answers those in flight
                self._sender = asyncio.create_task(self._send(), name=f"redis-batch-{self._name}")
        finally:
            self._reader = None

    async def _next_progress(self) -> None:
        self._progress.clear()
        await self._progress.wait()

    async def _recover(self) -> None:
        """The held connection broke with batches in flight: drop it; the
        batches go once more on a new socket, in order and ahead of the
        queue, if it died while idle (nothing on it ran, as ``_execute``
        assumes), else their callers hear ``BackendUnavailable``."""
        exc, self._broken = self._broken, None
        assert exc is not None
        sent, self._sent = list(self._sent), deque()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.wait([self._reader])
        await self._drop()
        if sent and sent[0].first and isinstance(exc, RedisConnectionError):
            self._fresh_socket = self._retrying = True
            self._queue = [queued for each in sent for queued in each.batch] + self._queue
            return
        for each in sent:
            _fail(each.batch, exc)

    async def _drop(self, close: bool = True) -> None:
        """Give the held connection back to the pool, closed first if
        replies may be left unread on it."""
        connection, self._connection, self._parser = self._connection, None, None
        if connection is not None:
            if close:
                await connection.disconnect()
            await self._link.release(connection)

    async def _execute(self, commands: list[Command]) -> list[Any]:
        try:
            return await self._execute_on(await self._held(), commands)
        except RedisConnectionError:
            # The connection died while idle (Redis restarted, a proxy timed
            # it out): nothing was executed on it; once more, on a new socket
            # (the pool's idle ones may be as dead).
            self._fresh_socket = True
            return await self._execute_on(await self._held(), commands)

    async def _execute_on(self, connection: Connection, commands: list[Command]) -> list[Any]:
        try:
            await connection.send_packed_command(pack_commands(commands))
            replies: list[Any] = []  # read by redis-py: the batches hiredis reads were sent ahead
            for command, _args in commands:
                try:
                    replies.append(await self._link.parse(connection, command))
                except ResponseError as exc:
                    replies.append(exc)
            return replies
        except BaseException:
            await self._drop()  # replies may be left unread on it: never reused
            raise

    async def close(self) -> None:
        for task in (self._sender, self._reader):
            if task is not None:
                task.cancel()
                await asyncio.wait([task])
        unanswered, self._sent = self._sent, deque()
        for each in unanswered:
            _fail(each.batch, asyncio.CancelledError())
        await self._drop(close=bool(unanswered))


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
