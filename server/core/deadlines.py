"""Many deadlines, one timer: items filed by the slice of time they fall due in.

A timer per connection (an asyncio ``TimerHandle`` and its callback) weighs
~0.5 KiB of every idle connection. Credential expiry and keepalive each keep
one wheel per instance instead: slices of ``resolution`` seconds, a set of
items per slice, a heap of the slices and one timer for the earliest. An
item is called at most one slice after its time, never before it. ``add``
answers the item's slice, which its owner keeps to take it out again.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T", bound=Hashable)


class Deadlines(Generic[T]):
    def __init__(self, resolution: float, clock: Callable[[], float], due: Callable[[T], None]) -> None:
        self._resolution = resolution
        self._clock = clock  # the time ``add`` is given in (time.time, time.monotonic)
        self._due = due
        self._slices: dict[int, set[T]] = {}
        self._heap: list[int] = []  # the keys of _slices (and some slices emptied since)
        self._timer: asyncio.TimerHandle | None = None

    def add(self, item: T, when: float) -> int:
        """``due(item)`` once ``clock()`` reaches ``when``; the slice it is filed in."""
        slice_ = math.ceil(when / self._resolution)
        items = self._slices.get(slice_)
        if items is None:
            items = self._slices[slice_] = set()
            if len(self._heap) > 2 * len(self._slices) + 64:  # mostly emptied slices: start afresh
                self._heap = list(self._slices)
                heapq.heapify(self._heap)
            else:
                heapq.heappush(self._heap, slice_)
            if self._heap[0] == slice_:
                self._wait_for_earliest()
        items.add(item)
        return slice_

    def remove(self, item: T, slice_: int | None) -> None:
        """Nothing is due for ``item`` (filed in ``slice_``, if anywhere) any more."""
        items = None if slice_ is None else self._slices.get(slice_)
        if slice_ is not None and items is not None:
            items.discard(item)
            if not items:
                del self._slices[slice_]

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _wait_for_earliest(self) -> None:
        self.close()
        delay = max(0.0, self._heap[0] * self._resolution - self._clock())
        self._timer = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = self._clock()
        while self._heap and self._heap[0] * self._resolution <= now:
            for item in self._slices.pop(heapq.heappop(self._heap), ()):
                self._due(item)  # which may file it again, in a later slice
        if self._heap:
            self._wait_for_earliest()
