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

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

from .base import BackendUnavailable

Queued = tuple[str, tuple[Any, ...], "asyncio.Future[Any]"]


class CommandBatcher:
    """Commands in Redis's own words (``call("HGETALL", key)``), sent in
    batches on one connection of the pool, held while it works: a batch is
    one write of every command and one read of every reply, with none of a
    pipeline object's per-batch set-up."""

    def __init__(self, redis: aioredis.Redis, name: str) -> None:
        self._redis = redis
        self._name = name
        self._queue: list[Queued] = []
        self._sender: asyncio.Task[None] | None = None
        self._connection: Connection | None = None
        self._shas: dict[str, str] = {}  # script -> its SHA1, for EVALSHA

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
        sha = self._shas.get(script)
        if sha is None:
            sha = self._shas[script] = hashlib.sha1(script.encode()).hexdigest()
        try:
            return await self.call("EVALSHA", sha, keys, *args)
        except NoScriptError:  # a fresh Redis (restarted, failed over): EVAL loads it
            return await self.call("EVAL", script, keys, *args)

    async def _send(self) -> None:
        batch: list[Queued] = []
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    replies = await self._execute(batch)
                except (RedisError, OSError) as exc:
                    _fail(batch, exc)
                else:
                    for (_command, _args, future), reply in zip(batch, replies, strict=True):
                        if future.done():  # its caller gave up
                            continue
                        if isinstance(reply, NoScriptError):
                            future.set_exception(reply)
                        elif isinstance(reply, ResponseError):  # refused (out of memory, a read-only replica…)
                            _fail([(_command, _args, future)], reply)
                        else:
                            future.set_result(reply)
                batch = []
        except BaseException as exc:  # cancelled at shutdown: nobody is left waiting
            _fail(batch + self._queue, exc)
            self._queue = []
            raise
        finally:
            self._sender = None

    async def _execute(self, batch: list[Queued]) -> list[Any]:
        try:
            return await self._execute_on(self._connection or await self._redis.connection_pool.get_connection(), batch)
        except RedisConnectionError:
            # The connection died while idle (Redis restarted, a proxy timed
            # it out): nothing was executed on it; once more, on a new socket
            # (the pool's idle ones may be as dead).
            connection = await self._redis.connection_pool.get_connection()
            await connection.disconnect()
            return await self._execute_on(connection, batch)

    async def _execute_on(self, connection: Connection, batch: list[Queued]) -> list[Any]:
        self._connection = connection
        try:
            await connection.send_packed_command(connection.pack_commands([(c, *a) for c, a, _f in batch]))
            replies: list[Any] = []
            for command, _args, _future in batch:
                try:
                    replies.append(await self._redis.parse_response(connection, command))
                except ResponseError as exc:
                    replies.append(exc)
            return replies
        except BaseException:
            # Replies may be left unread on it: never reuse it.
            self._connection = None
            await connection.disconnect()
            await self._redis.connection_pool.release(connection)
            raise

    async def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.wait([self._sender])
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await self._redis.connection_pool.release(connection)


def _fail(batch: list[Queued], exc: BaseException) -> None:
    for _command, _args, future in batch:
        if not future.done():
            error = BackendUnavailable()
            error.__cause__ = exc
            future.set_exception(error)
