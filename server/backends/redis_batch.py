"""Hot-path Redis commands, sent together: one pipeline per batch.

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
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .base import BackendUnavailable

Queued = tuple[str, tuple[Any, ...], "asyncio.Future[Any]"]


class CommandBatcher:
    def __init__(self, redis: aioredis.Redis, name: str) -> None:
        self._redis = redis
        self._name = name
        self._queue: list[Queued] = []
        self._sender: asyncio.Task[None] | None = None

    async def call(self, command: str, *args: Any) -> Any:
        """``redis.<command>(*args)``'s result, or ``BackendUnavailable``."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((command, args, future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send(), name=f"redis-batch-{self._name}")
        return await future

    async def _send(self) -> None:
        batch: list[Queued] = []
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    results = await self._execute(batch)
                except (RedisError, OSError) as exc:
                    _fail(batch, exc)
                else:
                    for (_command, _args, future), result in zip(batch, results, strict=True):
                        if not future.done():  # its caller may have given up
                            future.set_result(result)
                batch = []
        except BaseException as exc:  # cancelled at shutdown: nobody is left waiting
            _fail(batch + self._queue, exc)
            self._queue = []
            raise
        finally:
            self._sender = None

    async def _execute(self, batch: list[Queued]) -> list[Any]:
        if len(batch) == 1:  # a pipeline costs more than a lone command
            command, args, _future = batch[0]
            return [await getattr(self._redis, command)(*args)]
        async with self._redis.pipeline(transaction=False) as pipe:
            for command, args, _future in batch:
                getattr(pipe, command)(*args)
            return list(await pipe.execute())

    async def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.wait([self._sender])


def _fail(batch: list[Queued], exc: BaseException) -> None:
    for _command, _args, future in batch:
        if not future.done():
            error = BackendUnavailable()
            error.__cause__ = exc
            future.set_exception(error)
