"""Error values shared by server and clients.

Errors are data: a stable string ``code`` a client can switch on, and a
human-readable ``message`` it may show or log. Close codes tell a client
whether reconnecting can help: 4000-4499 mean "try again (with backoff)",
4500-4999 mean "do not reconnect until something changes" (a new token, a
newer client).
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class ErrorCode(StrEnum):
    # Frame-level problems: the frame was dropped, the connection lives on.
    BAD_FRAME = "bad_frame"  # not msgpack, not a map, or a text frame
    UNKNOWN_TYPE = "unknown_type"  # a map whose "type" we do not know
    INVALID = "invalid"  # a known type with wrong, missing or oversized fields
    TOO_LARGE = "too_large"  # a frame above the size limit
    # Handshake and authorisation.
    UNSUPPORTED_VERSION = "unsupported_version"
    HANDSHAKE_REQUIRED = "handshake_required"
    UNAUTHORIZED = "unauthorized"  # missing, forged or malformed credential
    TOKEN_EXPIRED = "token_expired"
    FORBIDDEN = "forbidden"  # authenticated, but not allowed (other group)
    REVOKED = "revoked"  # the group's back end disconnected this visitor or revoked this agent's logins
    # Delivery.
    VISITOR_OFFLINE = "visitor_offline"
    AGENT_OFFLINE = "agent_offline"
    MEMBER_OFFLINE = "member_offline"  # the session member a session signal named is not connected (or not in it)
    SIGNAL_EXPIRED = "signal_expired"  # held for a reconnecting visitor; it never came back
    DELIVERY_FAILED = "delivery_failed"  # the instance holding the visitor did not answer
    BACKEND_UNAVAILABLE = "backend_unavailable"
    DRAINING = "draining"  # the instance is shutting down: connect again (another instance answers)
    RATE_LIMITED = "rate_limited"
    LIMIT_EXCEEDED = "limit_exceeded"  # a size or count limit (connections per visitor, subscriptions, payload)
    OVERLOADED = "overloaded"  # the instance is past what it can serve in time: refused at once, retry shortly
    # Support sessions.
    SESSION_NOT_FOUND = "session_not_found"  # no live session for that key, code or session ID
    CODE_SPACE_EXHAUSTED = "code_space_exhausted"  # no free short code after retries; retry or lengthen codes
    INTERNAL = "internal"


class CloseCode(IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001  # server shutting down: reconnect, probably elsewhere
    PROTOCOL_ERROR = 1002  # a websocket-level violation, e.g. a compressed frame (never negotiated)
    MESSAGE_TOO_BIG = 1009  # frame above max_frame_bytes
    INTERNAL_ERROR = 1011  # the server failed while setting the connection up: reconnect
    # 4000-4499: reconnect with backoff.
    HANDSHAKE_TIMEOUT = 4000
    SLOW_CONSUMER = 4001
    RECONNECT = 4002  # asked to move (drain); reconnect after a jittered delay
    FLOODING = 4003  # kept sending far over its message rate
    TOO_MANY_CONNECTIONS = 4004  # the visitor already has its maximum of connections
    # 4500-4999: do not reconnect without a change.
    UNAUTHORIZED = 4500
    FORBIDDEN = 4501
    UNSUPPORTED_VERSION = 4502
    HANDSHAKE_FAILED = 4503
    SESSION_ENDED = 4504  # a consumer's support session ended: its session token opens nothing any more
    REVOKED = 4505  # the group's back end disconnected this visitor (maybe refusing it a while) or revoked the agent


def should_reconnect(close_code: int | None) -> bool:
    """Whether a client should reconnect after a close with this code."""
    if close_code is None:
        return True
    return not 4500 <= close_code <= 4999


class HeraldError(Exception):
    """Root of every error Herald raises on purpose."""


class ProtocolError(HeraldError):
    """A frame or request that breaks the protocol, carried as a value.

    ``request_id`` ties the error to the request that caused it when the
    frame was readable enough to find one.
    """

    def __init__(self, code: ErrorCode, message: str, request_id: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


class RequestFailed(HeraldError):
    """The server answered a client's request with an error frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
