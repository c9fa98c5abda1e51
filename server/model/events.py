"""Events for the customer's back end: what webhooks deliver and the audit
trail returns (PROTOCOL.md §13).

An event is a flat dict: ``type``, ``group``, ``time`` (unix seconds, the
recording instance's clock, millisecond precision) and the fields of its
type (``visitor``, ``session``, ``agent``, ``connection``, ``reason``, …);
the log gives it its ``id`` when it is appended. IDs are Redis stream IDs,
``<ms>-<seq>`` (the memory backend makes the same shape): they rise in the
order events were appended to their group's log, so a receiver orders a
visitor's events by ``id`` (``parse_id``), whatever order they arrive in.

Never a secret or a token in an event: short codes are capabilities, so
code events name the session, never the digits.

Also here, pure: the webhook signature (HMAC-SHA256 over
``<timestamp>.<body>``), its verification as a receiver does it, and the
retry schedule. The event types and which addresses a webhook may reach are
the configuration's (``config.EVENT_TYPES``, ``config.public_address``): an
endpoint is checked against them when it is configured.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import re
import time
from typing import Any

from herald_presence.server.config import TERMS_ANSWERS

VISITOR_ONLINE = "visitor.online"
VISITOR_OFFLINE = "visitor.offline"
TERMS_REQUESTED = "terms.requested"
SESSION_STARTED = "session.started"
SESSION_JOINED = "session.joined"
SESSION_LEFT = "session.left"
SESSION_ENDED = "session.ended"
CODE_CREATED = "code.created"
CODE_REDEEMED = "code.redeemed"
CODE_EXPIRED = "code.expired"

# The visitor's answers to the terms dialog: its ``terms`` signal with ``{"status": <answer>}``.
TERMS_SIGNAL = "terms"
TERMS_REQUEST_SIGNAL = "showterms"

# How long who asked a visitor for the terms (and its answers not yet in a
# session) are kept to be attributed: to the answers, and to the session the
# visitor starts next.
TERMS_WINDOW = 3600.0
MAX_PENDING_TERMS = 50  # terms events of one visitor waiting for its next session
MAX_SESSION_EVENTS = 1000  # events indexed per session (joins and leaves are bounded by the session's life)

SIGNATURE_HEADER = "Herald-Signature"
TIMESTAMP_HEADER = "Herald-Timestamp"
SIGNATURE_VERSION = "v1"
REPLAY_TOLERANCE = 300  # seconds a receiver should accept a timestamp away from its clock

_ID = re.compile(r"^([0-9]{1,15})-([0-9]{1,15})$")


def new_event(event_type: str, group: str, **fields: Any) -> dict[str, Any]:
    """An event of ``event_type`` now; fields that are None are left out."""
    event = {"type": event_type, "group": group, "time": round(time.time(), 3)}
    event.update((name, value) for name, value in fields.items() if value is not None)
    return event


def terms_answer(status: Any) -> str | None:
    """The event type of a visitor's ``terms`` signal's status, or None for one that is no answer."""
    return f"terms.{status}" if status in TERMS_ANSWERS else None


def is_terms(event_type: str) -> bool:
    return event_type.startswith("terms.")


def terms_roles(event_type: str) -> tuple[bool, bool]:
    """(asks, answer) of an event appended as part of a change
    (``EventLog.append``'s flags): ``terms.requested`` names who asks its
    visitor; the visitor's own ``terms.*`` is an answer, attributed to who
    asked when it names no agent."""
    asks = event_type == TERMS_REQUESTED
    return asks, is_terms(event_type) and not asks


def parse_id(event_id: str) -> tuple[int, int] | None:
    """``(ms, seq)`` of an event ID, which orders IDs; None if it is not one."""
    match = _ID.match(event_id)
    return (int(match[1]), int(match[2])) if match else None


def with_id(event_id: str, event: dict[str, Any]) -> dict[str, Any]:
    return {"id": event_id, **event}


def wants(patterns: list[str], event_type: str) -> bool:
    """Whether an endpoint that asked for ``patterns`` (types, ``session.*``, ``*``) gets this type."""
    return any(p == "*" or p == event_type or (p.endswith(".*") and event_type.startswith(p[:-1])) for p in patterns)


def matches(event: dict[str, Any], visitor: str | None, session: str | None, types: list[str] | None) -> bool:
    """The audit trail's filters."""
    if visitor is not None and event.get("visitor") != visitor:
        return False
    if session is not None and event.get("session") != session:
        return False
    return types is None or wants(types, event["type"])


# -- signatures --------------------------------------------------------------------


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 of ``<timestamp>.<body>`` with the endpoint's secret."""
    return hmac.new(secret.encode(), b"%d." % timestamp + body, hashlib.sha256).hexdigest()


def signature_header(secret: str, timestamp: int, body: bytes) -> str:
    return f"{SIGNATURE_VERSION}={signature(secret, timestamp, body)}"


def verify(secret: str, header: str, timestamp: str, body: bytes, now: float | None = None) -> bool:
    """What a receiver does (PROTOCOL.md §13.3): the timestamp is digits within
    ``REPLAY_TOLERANCE`` of its clock, and one ``v1=`` signature of the header
    is the HMAC of ``<timestamp>.<body>``, compared in constant time."""
    if not timestamp.isascii() or not timestamp.isdigit():
        return False
    sent = int(timestamp)
    if abs((time.time() if now is None else now) - sent) > REPLAY_TOLERANCE:
        return False
    expected = signature(secret, sent, body)
    given = [part.strip()[3:] for part in header.split(",") if part.strip().startswith(f"{SIGNATURE_VERSION}=")]
    return any(hmac.compare_digest(expected, candidate) for candidate in given)


# -- retries -----------------------------------------------------------------------

RETRY_CAP = 300.0  # the longest pause between two attempts


def backoff(attempt: int, first: float, rng: random.Random | None = None) -> float:
    """The pause before retry ``attempt`` (1, 2, …): exponential from
    ``first``, capped, with full jitter (uniform from a tenth of it to all of
    it), so that endpoints coming back are not hit by every sender at once."""
    ceiling = min(RETRY_CAP, first * 2 ** min(attempt - 1, 30))
    return (rng or random).uniform(ceiling / 10, ceiling)


def index_plan(event: dict[str, Any]) -> tuple[str | None, bool, bool]:
    """How the log indexes ``event`` (``EventLog``): (the session it is
    listed under, whether the visitor's pending terms join that session
    first, whether it joins the visitor's pending terms)."""
    session, visitor, terms = event.get("session"), event.get("visitor"), is_terms(event["type"])
    takes = session is not None and visitor is not None and (terms or event["type"] == SESSION_STARTED)
    return session, takes, terms and session is None and visitor is not None
