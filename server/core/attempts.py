"""Refused credentials per client address: an address whose logins or admin
tokens keep being refused is stopped for the rest of the minute, cluster-wide,
before its next guess is even checked."""

from __future__ import annotations

import logging

from herald_presence.server.backends.base import BackendUnavailable, RecordStore
from herald_presence.server.config import Settings
from herald_presence.server.model.limits import check_failed_credentials
from herald_presence.server.model.names import failed_credentials

log = logging.getLogger(__name__)

WINDOW = 60.0  # seconds


async def refuse_if_over(records: RecordStore, settings: Settings, kind: str, address: str) -> None:
    """``rate_limited`` if this address's refused credentials of ``kind`` this
    minute reached the limit. With the backend away nothing is counted, so
    nothing is refused for it (the outage must not lock agents out)."""
    try:
        failed = await records.kv_get(failed_credentials(kind, address))
    except BackendUnavailable:
        return
    check_failed_credentials(int(failed or b"0"), settings)


async def count_refusal(records: RecordStore, kind: str, address: str) -> None:
    try:
        await records.kv_count(failed_credentials(kind, address), WINDOW)
    except BackendUnavailable:
        log.warning("backend unavailable: a refused %s from %s is not counted", kind, address)
