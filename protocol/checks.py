"""Field validators and the limits they enforce.

Each check takes a decoded value and returns it (possibly normalised) or
raises ``ProtocolError(INVALID)``. They are plain functions so that decoding
a frame costs one call per field and nothing else.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from .errors import ErrorCode, ProtocolError

Check = Callable[[Any, str], Any]

MAX_FRAME_BYTES = 64 * 1024
MAX_ID_CHARS = 128
MAX_EVENT_CHARS = 64
MAX_KEY_CHARS = 64
MAX_VALUE_CHARS = 2048
MAX_DATA_FIELDS = 32
MAX_TOKEN_CHARS = 2048  # a v1 token is ~54; a JWT signed with an RSA-4096 key ~1000
MAX_VISITORS_PER_REQUEST = 1000
MAX_REQUEST_ID = 2**53 - 1  # fits a JavaScript number exactly
MAX_PAYLOAD_BYTES = 64 * 1024  # a session signal's payload in UTF-8: a WebRTC offer or answer (SDP) in one message
MAX_ICE_SERVERS = 8  # STUN/TURN servers handed to a session member
MAX_ICE_URLS = 8  # URLs of one of them

# Bounds on every container and string in a client's frame, known field or
# not, enforced by the msgpack decoder as it reads each header, before it
# builds anything (codec.unpack): what a frame may make the server allocate
# and walk. Each is the largest thing a valid frame needs.
MAX_MAP_ENTRIES = 64  # a frame's own fields (a dozen at most today, room for more) and flat maps (32)
MAX_ARRAY_ITEMS = MAX_VISITORS_PER_REQUEST  # the longest list: a subscribe's visitor IDs
MAX_STRING_BYTES = 4 * MAX_VALUE_CHARS  # the longest string, in UTF-8; binaries (never valid) alike
# A ``session_signal`` alone may carry longer strings: its payload (codec.unpack). Beyond what a payload
# may hold, so that one a little over it is answered ``invalid`` by its field check; the frame's size
# (``max_session_frame_bytes``) bounds it first.
MAX_PAYLOAD_STRING_BYTES = 4 * MAX_PAYLOAD_BYTES
MAX_EXT_BYTES = 12  # the largest msgpack timestamp; other extension types are refused anyway

_ID_RE = re.compile(rf"[A-Za-z0-9._:@+\-]{{1,{MAX_ID_CHARS}}}")
_EVENT_RE = re.compile(rf"[A-Za-z0-9._:\-]{{1,{MAX_EVENT_CHARS}}}")


def invalid(field: str, why: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID, f"{field}: {why}")


def identifier(value: Any, field: str) -> str:
    """Group, visitor, agent and connection IDs: short, printable, no spaces."""
    if type(value) is not str or _ID_RE.fullmatch(value) is None:
        raise invalid(field, f"must be 1-{MAX_ID_CHARS} characters of A-Z a-z 0-9 . _ : @ + -")
    return value


def event_name(value: Any, field: str) -> str:
    if type(value) is not str or _EVENT_RE.fullmatch(value) is None:
        raise invalid(field, f"must be 1-{MAX_EVENT_CHARS} characters of A-Z a-z 0-9 . _ : -")
    return value


def request_id(value: Any, field: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_REQUEST_ID:
        raise invalid(field, f"must be an integer from 0 to {MAX_REQUEST_ID}")
    return value


def boolean(value: Any, field: str) -> bool:
    if type(value) is not bool:
        raise invalid(field, "must be a boolean")
    return value


def non_negative_int(value: Any, field: str) -> int:
    if type(value) is not int or value < 0:
        raise invalid(field, "must be a non-negative integer")
    return value


def number(value: Any, field: str) -> float | int:
    if type(value) not in (int, float) or (type(value) is float and not math.isfinite(value)):
        raise invalid(field, "must be a finite number")
    return value


def token(value: Any, field: str) -> str:
    if type(value) is not str or not 0 < len(value) <= MAX_TOKEN_CHARS:
        raise invalid(field, f"must be a string of 1-{MAX_TOKEN_CHARS} characters")
    return value


def text(value: Any, field: str) -> str:
    if type(value) is not str or len(value) > MAX_VALUE_CHARS:
        raise invalid(field, f"must be a string of at most {MAX_VALUE_CHARS} characters")
    return value


def payload(value: Any, field: str) -> str:
    """A session signal's payload: a string of at most ``MAX_PAYLOAD_BYTES`` in UTF-8 (an SDP)."""
    if (
        type(value) is not str
        or len(value) > MAX_PAYLOAD_BYTES
        or (not value.isascii() and len(value.encode("utf-8", "surrogatepass")) > MAX_PAYLOAD_BYTES)
    ):
        raise invalid(field, f"must be a string of at most {MAX_PAYLOAD_BYTES} bytes in UTF-8")
    return value


def ice_servers(value: Any, field: str) -> list[dict[str, Any]]:
    """STUN/TURN servers as the server hands them to a session member (the
    shape of WebRTC's ``RTCIceServer``): ``urls``, and for a TURN server the
    short-lived ``username`` and ``credential`` made for this member."""
    if type(value) is not list or len(value) > MAX_ICE_SERVERS:
        raise invalid(field, f"must be a list of at most {MAX_ICE_SERVERS} servers")
    for i, server in enumerate(value):
        name = f"{field}[{i}]"
        if type(server) is not dict:
            raise invalid(name, "must be a map")
        urls = server.get("urls")
        if type(urls) is not list or not 0 < len(urls) <= MAX_ICE_URLS:
            raise invalid(f"{name}.urls", f"must be a list of 1-{MAX_ICE_URLS} URLs")
        for j, url in enumerate(urls):
            text(url, f"{name}.urls[{j}]")
        for key in ("username", "credential"):
            if server.get(key) is not None:
                text(server[key], f"{name}.{key}")
    return value


_SCALARS = (str, int, float, bool, type(None))


def flat_map(value: Any, field: str) -> dict[str, Any]:
    """A map of short string keys to scalars: what presence data and signal
    payloads are. Nested values are refused so that a map's size is bounded
    by its field count and it can be merged field by field."""
    if type(value) is not dict:
        raise invalid(field, "must be a map")
    if len(value) > MAX_DATA_FIELDS:
        raise invalid(field, f"has more than {MAX_DATA_FIELDS} fields")
    for key, item in value.items():
        if type(key) is not str or not 0 < len(key) <= MAX_KEY_CHARS:
            raise invalid(field, f"keys must be strings of 1-{MAX_KEY_CHARS} characters")
        kind = type(item)
        if kind not in _SCALARS:
            raise invalid(f"{field}.{key}", "must be a string, number, boolean or nil")
        if kind is str and len(item) > MAX_VALUE_CHARS:
            raise invalid(f"{field}.{key}", f"is longer than {MAX_VALUE_CHARS} characters")
        if kind is int and not -(2**63) <= item < 2**64:
            raise invalid(f"{field}.{key}", "is out of range")
        if kind is float and not math.isfinite(item):  # NaN and infinities have no JSON (the REST API)
            raise invalid(f"{field}.{key}", "must be a finite number")
    return value


def one_of(*choices: str) -> Check:
    allowed = frozenset(choices)

    def check(value: Any, field: str) -> str:
        if type(value) is not str or value not in allowed:
            raise invalid(field, f"must be one of {', '.join(sorted(allowed))}")
        return value

    return check


def list_of(item_check: Check, max_items: int = MAX_VISITORS_PER_REQUEST) -> Check:
    def check(value: Any, field: str) -> list[Any]:
        if type(value) is not list or len(value) > max_items:
            raise invalid(field, f"must be a list of at most {max_items} items")
        return [item_check(item, f"{field}[{i}]") for i, item in enumerate(value)]

    return check


def _record(value: Any, field: str, spec: dict[str, Check]) -> dict[str, Any]:
    if type(value) is not dict:
        raise invalid(field, "must be a map")
    for key, check in spec.items():
        if key not in value:
            raise invalid(f"{field}.{key}", "is required")
        check(value[key], f"{field}.{key}")
    return value


_CONNECTION_STATE: dict[str, Check] = {
    "connection": identifier,
    "data": flat_map,
    "visible": boolean,
    "focused": boolean,
    "since": number,
}


def connection_state(value: Any, field: str) -> dict[str, Any]:
    return _record(value, field, _CONNECTION_STATE)


MAX_CONNECTIONS_LISTED = MAX_DATA_FIELDS * 32  # connections in one visitor state or delta

_VISITOR_STATE: dict[str, Check] = {
    "visitor": identifier,
    "online": boolean,
    "version": non_negative_int,
    "connections": list_of(connection_state, MAX_CONNECTIONS_LISTED),
}


def visitor_state(value: Any, field: str) -> dict[str, Any]:
    """A visitor's state as the server sends it (clients decode these)."""
    return _record(value, field, _VISITOR_STATE)


def connection_delta(value: Any, field: str) -> dict[str, Any]:
    _record(value, field, {"connection": identifier})
    for key, check in _CONNECTION_DELTA.items():
        if key in value:
            check(value[key], f"{field}.{key}")
    return value


_CONNECTION_DELTA: dict[str, Check] = {"data": flat_map, "visible": boolean, "since": number}


def optional_identifier(value: Any, field: str) -> str | None:
    return None if value is None else identifier(value, field)


_VISITOR_DELTA: dict[str, Check] = {
    "visitor": identifier,
    "version": non_negative_int,
    "base": non_negative_int,
    "changed": list_of(connection_delta, MAX_CONNECTIONS_LISTED),
    "removed": list_of(identifier, MAX_CONNECTIONS_LISTED),
    "focused": optional_identifier,
}


def visitor_delta(value: Any, field: str) -> dict[str, Any]:
    """What changed in a visitor's state, as the server sends it."""
    return _record(value, field, _VISITOR_DELTA)
