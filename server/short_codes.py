"""Short codes: the digits a visitor reads out to an agent.

A code is a capability (it lets someone into a support session), so it is
drawn from the OS CSPRNG, claimed with an atomic set-if-absent (unique
across the cluster while it lives), expires unclaimed after the group's
``code_ttl``, and is released when its session ends. Guessing is bounded by
rate limits on look-ups (see ``ratelimit``).
"""

from __future__ import annotations

import secrets

from protocol.errors import ErrorCode, ProtocolError

from .backend import Backend

ATTEMPTS = 24  # collisions retried before the code space counts as full


def code_key(group: str, code: str) -> str:
    return f"{{{group}}}:code:{code}"


def random_code(length: int) -> str:
    return f"{secrets.randbelow(10**length):0{length}d}"


async def allocate(backend: Backend, group: str, session: str, length: int, ttl: float) -> str:
    """A fresh code pointing at ``session``, or ``code_space_exhausted``."""
    for _ in range(ATTEMPTS):
        code = random_code(length)
        if await backend.kv_set(code_key(group, code), session.encode(), ttl=ttl, only_if_absent=True):
            return code
    why = f"no free {length}-digit code after {ATTEMPTS} tries; try again or lengthen codes"
    raise ProtocolError(ErrorCode.CODE_SPACE_EXHAUSTED, why)


async def resolve(backend: Backend, group: str, code: str) -> str | None:
    """The session a live code points at."""
    if not code.isdigit():
        return None
    session = await backend.kv_get(code_key(group, code))
    return session.decode() if session else None
