"""Short codes: the digits a visitor reads out to an agent.

A code is a capability (it lets someone into a support session), so it is
drawn from the OS CSPRNG, claimed with an atomic set-if-absent (unique
across the cluster while it lives), expires unclaimed after the group's
``code_ttl``, and is released when its session ends. Guessing is bounded by
rate limits on look-ups (``limit_lookups``).
"""

from __future__ import annotations

import secrets

from herald_presence.protocol.errors import ErrorCode, ProtocolError
from herald_presence.server.backends.base import RecordStore
from herald_presence.server.config import Settings
from herald_presence.server.model.limits import check_lookups
from herald_presence.server.model.names import code_key, lookups_by_address, lookups_by_agent, lookups_by_group

ATTEMPTS = 24  # collisions retried before the code space counts as full
LOOKUP_WINDOW = 60.0  # seconds: look-up budgets are per minute


def random_code(length: int) -> str:
    return f"{secrets.randbelow(10**length):0{length}d}"


async def allocate(records: RecordStore, group: str, session: str, length: int, ttl: float) -> str:
    """A fresh code pointing at ``session``, or ``code_space_exhausted``."""
    for _ in range(ATTEMPTS):
        code = random_code(length)
        if await records.kv_set(code_key(group, code), session.encode(), ttl=ttl, only_if_absent=True):
            return code
    why = f"no free {length}-digit code after {ATTEMPTS} tries; try again or lengthen codes"
    raise ProtocolError(ErrorCode.CODE_SPACE_EXHAUSTED, why)


async def resolve(records: RecordStore, group: str, code: str) -> str | None:
    """The session a live code points at."""
    if not code.isdigit():
        return None
    session = await records.kv_get(code_key(group, code))
    return session.decode() if session else None


async def limit_lookups(records: RecordStore, settings: Settings, group: str, address: str) -> None:
    """Count a short-code look-up over REST against its address's and its
    group's budgets (cluster-wide); ``rate_limited`` over either."""
    await _limit(records, settings, group, lookups_by_address(address))


async def limit_agent_lookups(records: RecordStore, settings: Settings, group: str, agent: str) -> None:
    """Count an agent's ``join_session {code}`` against the agent's own budget
    (the size of an address's) and its group's: an agent connection is no
    way around the guessing limits."""
    await _limit(records, settings, group, lookups_by_agent(group, agent))


async def _limit(records: RecordStore, settings: Settings, group: str, own: str) -> None:
    """Only a look-up within its own budget counts against the group's:
    one address (or agent) spends at most its own share of the group's."""
    per_own = await records.kv_count(own, LOOKUP_WINDOW)
    check_lookups(per_own, None, settings)
    per_group = await records.kv_count(lookups_by_group(group), LOOKUP_WINDOW)
    check_lookups(per_own, per_group, settings)
