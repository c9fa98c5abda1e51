"""Owned background work: every task is named, logged if it fails, and
cancelled when the instance closes; timers likewise."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)


class TaskSupervisor:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timers: set[asyncio.TimerHandle] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run owned background work; its failure is logged, never lost."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def later(self, delay: float, coro_factory: Callable[[], Coroutine[Any, Any, Any]], name: str) -> None:
        """``spawn(coro_factory())`` after ``delay`` seconds."""

        def fire() -> None:
            self._timers.discard(handle)
            self.spawn(coro_factory(), name)

        handle = asyncio.get_running_loop().call_later(delay, fire)
        self._timers.add(handle)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    async def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
