"""A partition between one instance and Redis: instance C reaches Redis
through a TCP proxy that is cut (a black hole: no FIN, no RST, nothing
answered) for longer than ``instance_dead_after``, while A and B keep their
link. Its visitors stay connected to C the whole time.

The rest of the cluster cannot tell a cut-off instance from a dead one, so
A's and B's agents must see C's visitors go offline within ``dead_after``
plus a couple of heartbeats (no ghost for ever). When the link returns,
presence converges: every visitor still connected is online everywhere
(on C's view too, which missed everything meanwhile), every visitor that
left is offline; no ghost, nobody lost. C's visitors may stay on C and be
registered again, or be moved by the server to another instance.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from ..redis_server import RedisServer
from .conftest import DEAD_AFTER, HEARTBEAT, Audit, Cluster, Readiness, bounded, shared_problems
from .tcp_proxy import TcpProxy

pytestmark = pytest.mark.timeout(60)

REPORTED_WITHIN = DEAD_AFTER + 2 * HEARTBEAT + 1.0  # C's visitors offline on A's and B's views by then
CUT = REPORTED_WITHIN + 1.0  # longer than dead_after, and long enough to see the report
CUT_OFF = 2  # the instance behind the proxy
STAYING = 4  # visitors per instance


@bounded(45)
async def test_an_instance_cut_off_from_redis_is_reported_offline_and_converges_when_the_link_returns(
    redis: RedisServer,
    make_proxy: Callable[[int], TcpProxy],
    start_cluster: Callable[[list[str]], Awaitable[Cluster]],
    audit_of: Callable[[Cluster], Audit],
) -> None:
    proxy = make_proxy(redis.port)
    cluster = await start_cluster([redis.url, redis.url, f"redis://127.0.0.1:{proxy.port}/0"])
    audit = audit_of(cluster)
    await audit.open_views()
    await asyncio.gather(
        *(audit.connect(f"stay-{i}-{k}", i) for i in range(3) for k in range(STAYING)),
        *(audit.connect(f"leave-{i}", i) for i in range(3)),
    )
    await audit.wait_settled()
    readiness = Readiness(cluster).start()
    audit.balancer = readiness  # a visitor C lets go of goes to a ready instance, as through a balancer
    on_c = [v for v in audit.live() if audit.tracks[v].instance == CUT_OFF]
    seen_before = [len(events) for events in audit.view_events]

    proxy.cut()
    cut_at = time.monotonic()
    try:
        # Meanwhile visitors leave (on C and on A) and arrive (on C and on A).
        await asyncio.sleep(0.5)
        await asyncio.gather(audit.close(f"leave-{CUT_OFF}"), audit.close("leave-0"))
        arrivals = [audit.connect_later(f"new-{CUT_OFF}", CUT_OFF), audit.connect_later("new-0", 0)]
        await asyncio.sleep(max(0.0, cut_at + CUT - time.monotonic()))
    finally:
        proxy.heal()
    healed_at = time.monotonic()

    # What A's and B's agents were told during the cut.
    reported: dict[str, dict[int, float | None]] = {}
    for visitor in on_c:
        reported[visitor] = {}
        for index in (i for i in range(3) if i != CUT_OFF):
            offline = [
                at - cut_at
                for at, event in audit.view_events[index][seen_before[index] :]
                if event.state["visitor"] == visitor and not event.state["online"] and at <= healed_at
            ]
            reported[visitor][index] = min(offline) if offline else None
    moved = [v for v in on_c if audit.tracks[v].instance != CUT_OFF]
    late = {
        visitor: {f"view {i}": (None if t is None else round(t, 2)) for i, t in by_view.items()}
        for visitor, by_view in reported.items()
        if visitor not in moved and any(t is None or t > REPORTED_WITHIN for t in by_view.values())
    }

    connects = await asyncio.gather(*arrivals, return_exceptions=True)
    verdict = await audit.verify(healed_at)
    await readiness.stop()

    times = sorted(t for by_view in reported.values() for t in by_view.values() if t is not None)
    story = (
        f"C (instance {CUT_OFF}) cut off from Redis for {healed_at - cut_at:.2f}s (dead_after {DEAD_AFTER}s); "
        f"its {len(on_c)} visitors reported offline on A's and B's views "
        + (f"{times[0]:.2f}s..{times[-1]:.2f}s after the cut" if times else "never")
        + f" (bound {REPORTED_WITHIN}s); moved off C by the server: {moved or 'none'}; "
        f"proxy: {proxy.accepted} connections accepted"
    )
    print(f"\n{story}\n{verdict.report()}\nreadyz: {readiness.summary(cut_at)}\n{audit.visitor_report()}")
    problems = shared_problems("cut", connects, verdict, readiness, [CUT_OFF], (cut_at, healed_at + 0.5))
    if late:
        problems.append(f"C's visitors not reported offline by A and B within {REPORTED_WITHIN}s of the cut: {late}")
    assert not problems, (
        story
        + "\n"
        + "\n".join(problems)
        + f"\nreadyz (from the cut): {readiness.summary(cut_at)}\n{audit.visitor_report()}\n{cluster.explain()}"
    )
