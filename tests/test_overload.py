"""Past what it can serve in time, an instance refuses agents' new signals
at once with ``overloaded`` (its event loop running late, or too many
deliveries waiting for another instance's reply) and serves them again as
soon as the excess is gone."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from herald_presence.protocol import RequestFailed, tokens
from herald_presence.protocol.errors import ErrorCode
from herald_presence.server.core.load import TARGET_SHARE, TICK, Load

from .conftest import Start
from .harness import SECRET, HeraldServer, changed, sample, scrape, settings, signal
from .processes import HERALD, start_server
from .redis_server import RedisServer


async def overloaded_hits(instance: HeraldServer) -> float:
    return sample(await scrape(instance.base_url), "herald_limit_hits_total", limit="overloaded")


async def test_a_late_event_loop_refuses_new_signals_then_serves_again(start_herald) -> None:  # type: ignore[no-untyped-def]
    herald: HeraldServer = await start_herald(overload_lag=0.05)
    agent = await herald.agent("alice")
    await agent.subscribe(["v1"])
    visitor = await herald.visitor("v1")
    assert await agent.show_terms("v1") == 1
    before = await overloaded_hits(herald)

    async def hog(seconds: float) -> None:
        """Work that holds the event loop 80 ms at a time."""
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            time.sleep(0.08)  # noqa: ASYNC251 - blocking the loop is the point: work it cannot keep up with
            await asyncio.sleep(0.001)

    hogging = asyncio.create_task(hog(2.0))
    await asyncio.sleep(1.0)  # a sustained lag, not a hiccup
    with pytest.raises(RequestFailed) as refused:
        await agent.signal("v1", "showterms", retries=0)
    assert refused.value.code == ErrorCode.OVERLOADED
    # The back end's REST signal is refused the same way, as a documented 503 (never a 500).
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{herald.base_url}/v1/groups/acme/visitors/v1/signals",
            json={"event": "showterms"},
            headers={"Authorization": f"Bearer {tokens.api_key(SECRET, 'acme')}"},
        ) as response,
    ):
        assert (response.status, (await response.json())["error"]["code"]) == (503, "overloaded")
    await hogging
    started = time.monotonic()
    while True:  # back within a second or so of the hog stopping
        try:
            assert await agent.show_terms("v1", retries=0) == 1
            break
        except RequestFailed as exc:
            assert exc.code == ErrorCode.OVERLOADED and time.monotonic() - started < 2.0
            await asyncio.sleep(0.05)
    await visitor.wait_for(signal("showterms"))
    assert await overloaded_hits(herald) >= before + 1


async def test_deliveries_waiting_for_a_frozen_instance_are_capped(
    start_instance: Start, redis_server: RedisServer, prefix: str, tmp_path: Path
) -> None:
    frozen = start_server(
        tmp_path,
        str(HERALD), "serve", "--group", f"acme={SECRET}", "--redis-url", redis_server.url, "--redis-prefix", prefix,
    )  # fmt: skip
    try:
        b = await start_instance(max_signals_in_flight=2, delivery_timeout=2)
        agent = await b.agent("alice")
        await agent.subscribe(["v1"])
        visitor = await b.visitor("v1", connect=False, reconnect=False)
        visitor.base_url = frozen.base_url
        await visitor.connect()
        await agent.wait_for(changed("online", "v1"))
        frozen.pause()
        waiting = [asyncio.create_task(agent.signal("v1", f"s{n}", retries=0)) for n in range(2)]
        await asyncio.sleep(0.3)
        with pytest.raises(RequestFailed) as refused:
            await agent.signal("v1", "one-too-many", retries=0)
        assert refused.value.code == ErrorCode.OVERLOADED
        for task in waiting:  # the two in flight are answered as ever: delivery_failed
            with pytest.raises(RequestFailed) as failed:
                await task
            assert failed.value.code == ErrorCode.DELIVERY_FAILED
        frozen.resume()
        await asyncio.sleep(0.5)
        assert await agent.signal("v1", "after", retries=0) == 1  # nothing waits any more: accepted
    finally:
        frozen.resume()
        frozen.stop()


def test_one_stall_of_the_deliveries_in_flight_refuses_nothing() -> None:
    """Deliveries through another instance at 600/s, 2 ms each. One stall
    (a process descheduled for 40 ms) holds up those in flight meanwhile:
    every delivery of four check-ins takes 42 ms, and nothing is refused for
    it (a moving average of every delivery refused 2-3 % of signals at
    600/s on a busy 2-core machine)."""
    load = Load(settings(overload_lag=0.05))
    for tick in range(100):
        for _ in range(6):
            load.delivery_took(0.042 if 50 <= tick < 54 else 0.002)
        load.check_in(0.0)
        assert not load.refused_share and not any(load.refuse() for _ in range(6)), tick


def test_deliveries_that_wait_a_little_refuse_nothing() -> None:
    """Near what the instances serve, every delivery waits a few ms (8 here:
    the target is 5, refusing starts past 10); the accepted are answered well
    in time, so nothing is refused for it."""
    load = Load(settings(overload_lag=0.05))
    for tick in range(200):
        for _ in range(50):
            load.delivery_took(0.008)
        load.check_in(0.0)
        assert not any(load.refuse() for _ in range(50)), tick


def test_a_lasting_excess_is_refused_and_no_more() -> None:
    """Agents send 1.5x what the deliveries can take, and keep sending when
    refused (a queue model: each check-in serves what it can, the rest waits).
    Within a second a third is refused, evenly, and the queue stays short; when
    the excess stops, nothing is refused within half a second."""
    load = Load(settings(overload_lag=0.05))
    serves, backlog = 100, 0.0  # signals a check-in serves; signals waiting
    refused: list[int] = []
    for tick in range(300):
        offered = 150 if tick < 200 else 50
        accepted = sum(not load.refuse() for _ in range(offered))
        refused.append(offered - accepted)
        backlog = max(0.0, backlog + accepted - serves)
        load.delivery_took(0.002 + backlog / serves * TICK)  # the fastest: queued behind the backlog
        load.check_in(0.0)
        if 100 <= tick < 200:  # a standing queue no longer than twice the target
            assert backlog / serves * TICK < 2 * 0.05 * TARGET_SHARE, (tick, backlog)
    assert 0.28 < sum(refused[100:200]) / 15_000 < 0.38
    assert max(refused[100:200]) - min(refused[100:200]) < 40  # spread out, not all or nothing
    assert not any(refused[250:])


def test_deliveries_held_up_by_a_stall_refuse_for_a_moment_only() -> None:
    """Redis frozen for 3 s: nothing comes back meanwhile, then every delivery
    held up arrives at once, each having taken seconds. Fresh deliveries are
    quick again: at most one check-in's signals are refused for it."""
    load = Load(settings(overload_lag=0.05))
    load.in_flight = 100
    for _ in range(300):
        load.check_in(0.0)
    assert not load.refused_share
    for _ in range(100):
        load.delivery_took(3.0)
    load.check_in(0.0)
    load.in_flight = 0
    refused = [sum(load.refuse() for _ in range(10))]
    for _ in range(100):
        for _ in range(10):
            load.delivery_took(0.002)
        load.check_in(0.0)
        refused.append(sum(load.refuse() for _ in range(10)))
    assert sum(refused) <= 10, refused
