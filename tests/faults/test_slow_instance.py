"""A slow instance: the instance holding a visitor is frozen (SIGSTOP, as a
long GC pause or a starved VM would) for longer than ``delivery_timeout``
while an agent on another instance asks the visitor's page to show the
terms. The agent's instance cannot wait for ever and answers; then the
frozen instance resumes (SIGCONT) with the delivery still in its socket.

Whatever the answer was, it must be what happened: ``ack`` delivered >= 1
only if the visitor got the signal; ``delivery_failed`` (or any other
failure) only if the visitor never gets it, watched for a few seconds after
the resume. And the visitor, connected throughout, is online again
everywhere once the instance is back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from ..redis_server import RedisServer
from .conftest import ANSWER_WITHIN, DEAD_AFTER, DELIVERY_TIMEOUT, Audit, Cluster, bounded

pytestmark = pytest.mark.timeout(60)

FREEZE = DELIVERY_TIMEOUT + 1.5
WATCH_AFTER_RESUME = 4.0  # seconds (at least) the visitor is watched for a late delivery


@bounded(45)
async def test_a_frozen_visitor_instance_past_delivery_timeout_answers_what_the_visitor_got(
    redis: RedisServer, start_cluster: Callable[[list[str]], Awaitable[Cluster]], audit_of: Callable[[Cluster], Audit]
) -> None:
    cluster = await start_cluster([redis.url] * 3)
    audit = audit_of(cluster)
    await audit.open_views()
    slow, other = 0, 1
    await audit.connect("slow-visitor", slow)
    await audit.connect("bystander", 2)
    agent = audit.agent(other, "alice")
    async with asyncio.timeout(15):
        await agent.connect()
    await audit.wait_settled()
    # The path works before the fault.
    before = await audit.send_signal(agent, "slow-visitor", "showterms")
    assert before.outcome == 1, f"before the freeze show_terms answered {before.outcome}\n{cluster.explain()}"
    for _ in range(50):
        if audit.tracks["slow-visitor"].received(lambda s: s.event == "showterms"):
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail(f"before the freeze, an acked showterms did not arrive within 2.5s\n{cluster.explain()}")
    audit.signals.clear()
    audit.tracks["slow-visitor"].signals.clear()

    cluster.freeze(slow)
    frozen_at = time.monotonic()
    try:
        answer = asyncio.create_task(audit.send_signal(agent, "slow-visitor", "showterms"))
        await asyncio.sleep(max(0.0, frozen_at + FREEZE - time.monotonic()))
    finally:
        cluster.thaw(slow)
    resumed_at = time.monotonic()
    # The answer may come before or after the resume; ANSWER_WITHIN bounds it.
    async with asyncio.timeout(ANSWER_WITHIN + 1):
        record = await answer
    # Connected throughout: online again everywhere once the instance is back. Watching
    # presence also keeps watching the visitor for a late showterms (WATCH_AFTER_RESUME and more).
    verdict = await audit.verify(resumed_at)
    await asyncio.sleep(max(0.0, resumed_at + WATCH_AFTER_RESUME - time.monotonic()))  # verify took longer already

    got = audit.tracks["slow-visitor"].received(lambda s: s.event == "showterms")
    answered_after = (record.answered_at or resumed_at) - frozen_at
    story = (
        f"instance {slow} frozen {resumed_at - frozen_at:.2f}s (delivery_timeout {DELIVERY_TIMEOUT}s, "
        f"dead_after {DEAD_AFTER}s); the agent on instance {other} was answered {record.outcome!r} "
        f"{answered_after:.2f}s after the freeze began; the visitor received showterms "
        + (f"{len(got)}x, first {got[0] - frozen_at:.2f}s after the freeze began" if got else "never")
        + f" (watched until {time.monotonic() - frozen_at:.1f}s)"
    )
    print(f"\n{story}\n{verdict.report()}\n{audit.visitor_report()}")
    wrong, unanswered = audit.judge_signals()
    problems = [*wrong, *unanswered]
    if not verdict.clean:
        problems.append(verdict.report())
    assert not problems, story + "\n" + "\n".join(problems) + f"\n{audit.visitor_report()}\n{cluster.explain()}"
