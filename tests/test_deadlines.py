"""The one-timer wheel behind credential expiry and keepalive: never early,
at most one slice late, and an item taken out is never called."""

from __future__ import annotations

import asyncio
import itertools
import time

from herald_presence.server.core.deadlines import Deadlines

SLICE = 0.05


async def test_items_are_due_in_order_never_early_and_at_most_a_slice_late() -> None:
    called: list[tuple[str, float]] = []
    wheel: Deadlines[str] = Deadlines(SLICE, time.monotonic, lambda item: called.append((item, time.monotonic())))
    start = time.monotonic()
    due = {"c": start + 0.30, "a": start + 0.10, "b": start + 0.20}
    for item, when in due.items():
        wheel.add(item, when)
    await asyncio.sleep(0.5)
    assert [item for item, _ in called] == ["a", "b", "c"]
    for item, at in called:
        assert due[item] <= at < due[item] + SLICE + 0.1  # one slice, and a busy machine's scheduling
    wheel.close()


async def test_an_item_taken_out_is_never_called_and_one_filed_again_is_called_once() -> None:
    called: list[str] = []
    wheel: Deadlines[str] = Deadlines(SLICE, time.monotonic, called.append)
    now = time.monotonic()
    gone = wheel.add("gone", now + 0.1)
    wheel.add("kept", now + 0.1)
    moved = wheel.add("moved", now + 0.1)
    wheel.remove("gone", gone)
    wheel.remove("moved", moved)
    wheel.add("moved", now + 0.25)
    await asyncio.sleep(0.45)
    assert called == ["kept", "moved"]
    wheel.close()


async def test_an_item_filed_again_from_its_own_call_comes_back_later() -> None:
    times: list[float] = []

    def again(item: str) -> None:
        times.append(time.monotonic())
        if len(times) < 3:
            wheel.add(item, time.monotonic() + 0.1)

    wheel: Deadlines[str] = Deadlines(SLICE, time.monotonic, again)
    wheel.add("ticking", time.monotonic() + 0.1)
    await asyncio.sleep(0.6)
    assert len(times) == 3
    assert all(later - earlier >= 0.1 for earlier, later in itertools.pairwise(times))
    wheel.close()
