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
from herald_presence.server.model.names import code_key, lookups_by_address, lookups_by_group

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
    """Count a short-code look-up against its address's and its group's
    budgets (cluster-wide); ``rate_limited`` over either."""
    per_address = await records.kv_count(lookups_by_address(address), LOOKUP_WINDOW)
    per_group = await records.kv_count(lookups_by_group(group), LOOKUP_WINDOW)
    check_lookups(per_address, per_group, settings)
