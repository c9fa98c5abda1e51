"""Owned background work: every task is named, logged if it fails, and
cancelled when the instance closes; timers likewise. ``until_done`` retries
work that must not be lost to a passing fault."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

CLOSE_WITHIN = 5.0  # seconds cancelled tasks get to finish


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

    async def close(self, within: float = CLOSE_WITHIN) -> None:
        """Cancel every timer and task and wait for them, ``within`` seconds
        at most: a task that ignores its cancellation is named in the log and
        left behind rather than hanging the shutdown."""
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        _done, stuck = await asyncio.wait(tasks, timeout=within)
        if stuck:
            names = sorted(task.get_name() for task in stuck)
            log.error("tasks still running %.0fs after being cancelled: %s", within, names)


async def until_done(
    attempt: Callable[[], Awaitable[T]],
    name: str,
    retry_on: type[BaseException] | tuple[type[BaseException], ...] = Exception,
    first: float = 0.1,
    most: float = 2.0,
) -> T:
    """``attempt()``'s result, retried with doubling pauses (``first`` up to
    ``most`` seconds) for as long as it raises ``retry_on``: work that must
    happen (a grace period's end, registering again after a fault) still
    happens when the fault outlasts one try. Cancelled with its task."""
    delay = first
    while True:
        try:
            return await attempt()
        except retry_on as exc:
            log.warning("%s failed (%r); trying again in %.1fs", name, exc, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, most)
