"""msgpack <-> typed messages, with strict validation.

``decode`` never raises anything but ``ProtocolError`` on bad bytes: the
unpacker is bounded (sizes, no extension types, string map keys only) and
every msgpack failure is turned into ``bad_frame``. The one extension msgpack
decodes by itself, the timestamp (type -1), becomes a ``Timestamp`` that no
field check accepts: ``invalid`` in a known field, ignored in an unknown one
(unknown fields are ignored for forward compatibility).
"""

from __future__ import annotations

from typing import Any

import msgpack

from . import checks
from .errors import ErrorCode, ProtocolError
from .messages import MESSAGE_TYPES, Message

_MISSING = object()


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(ErrorCode.BAD_FRAME, f"msgpack extension type {code} is not allowed")


def unpack(frame: bytes, max_bytes: int = checks.MAX_FRAME_BYTES) -> dict[str, Any]:
    """Bytes -> one msgpack map with string keys, or ``ProtocolError``."""
    if len(frame) > max_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"frame is {len(frame)} bytes; the limit is {max_bytes}")
    try:
        value = msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            timestamp=0,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises many types on bad input; all mean the same
        raise ProtocolError(ErrorCode.BAD_FRAME, f"not a msgpack value ({type(exc).__name__})") from None
    if type(value) is not dict:
        raise ProtocolError(ErrorCode.BAD_FRAME, "a frame must be a msgpack map")
    for key in value:  # strict_map_key still lets binary keys through
        if type(key) is not str:
            raise ProtocolError(ErrorCode.BAD_FRAME, "map keys must be strings")
    return value


def from_map(raw: dict[str, Any]) -> Message:
    """A decoded map -> its message class, every field checked."""
    type_name = raw.get("type")
    request_id = raw.get("id")
    if type(request_id) is not int or not 0 <= request_id <= checks.MAX_REQUEST_ID:
        request_id = None
    cls = MESSAGE_TYPES.get(type_name) if type(type_name) is str else None
    if cls is None:
        shown = type_name if type(type_name) is str and len(type_name) <= 32 else "?"
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {shown!r}", request_id)
    kwargs: dict[str, Any] = {}
    try:
        for name, check, required in cls.SPEC:
            value = raw.get(name, _MISSING)
            if value is _MISSING or value is None:
                if required:
                    raise checks.invalid(name, "is required")
                continue
            kwargs[name] = check(value, name)
    except ProtocolError as exc:
        exc.request_id = request_id
        raise
    return cls(**kwargs)


def decode(frame: bytes, max_bytes: int = checks.MAX_FRAME_BYTES) -> Message:
    return from_map(unpack(frame, max_bytes))


def encode(message: Message) -> bytes:
    return msgpack.packb(message.to_wire(), use_bin_type=True)


def encode_map(raw: dict[str, Any]) -> bytes:
    """For callers that build a frame's map themselves (tests, fuzzers)."""
    return msgpack.packb(raw, use_bin_type=True)


_TYPE_KEY = b"\xa4type"


def frame_type(frame: bytes) -> str:
    """The ``type`` of a frame this codec encoded, without decoding it.

    ``encode`` writes ``type`` first, so a fixmap header, the fixstr key and
    a short fixstr value are all there is to read. Anything else (a frame
    built by hand) answers ``"other"``; the result names metrics only.
    """
    if len(frame) > 6 and 0x80 <= frame[0] <= 0x8F and frame[1:6] == _TYPE_KEY and 0xA0 <= frame[6] <= 0xBF:
        length = frame[6] - 0xA0
        return frame[7 : 7 + length].decode("ascii", "replace")
    return "other"
