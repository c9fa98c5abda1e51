"""msgpack <-> typed messages, with strict validation.

``decode`` never raises anything but ``ProtocolError`` on bad bytes: the
unpacker is bounded (sizes, no extension types, string map keys only) and
every msgpack failure is turned into ``bad_frame``. The one extension msgpack
decodes by itself, the timestamp (type -1), becomes a ``Timestamp`` that no
field check accepts: ``invalid`` in a known field, ignored in an unknown one
(unknown fields are ignored for forward compatibility).

A client's frame is decoded within ``CLIENT_BOUNDS`` (checks.py: every map,
array, string anywhere in the frame): msgpack checks each length as it reads
the header, so a frame over them costs nothing to refuse, and one within them
costs at most what a valid frame of its size can. Over them: ``invalid``,
with the frame's ``id`` when its top level has one. Frames from the server
(the SDKs decode those) are bounded by their size only: a snapshot may list
any number of visitors.
"""

from __future__ import annotations

import re
from typing import Any

import msgpack

from . import checks
from .errors import ErrorCode, ProtocolError
from .messages import MESSAGE_TYPES, Message

_MISSING = object()


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(ErrorCode.BAD_FRAME, f"msgpack extension type {code} is not allowed")


CLIENT_BOUNDS: dict[str, int] = {
    "max_map_len": checks.MAX_MAP_ENTRIES,
    "max_array_len": checks.MAX_ARRAY_ITEMS,
    "max_str_len": checks.MAX_STRING_BYTES,
    "max_bin_len": checks.MAX_STRING_BYTES,
    "max_ext_len": checks.MAX_EXT_BYTES,
}
_MAX_MAP, _MAX_ARRAY = checks.MAX_MAP_ENTRIES, checks.MAX_ARRAY_ITEMS
_MAX_STRING, _MAX_EXT = checks.MAX_STRING_BYTES, checks.MAX_EXT_BYTES
_OVER_BOUND = re.compile(r"(\d+) exceeds max_(map|array|str|bin|ext)_len")
_BOUND_BROKEN = {
    "map": f"a map has more than {checks.MAX_MAP_ENTRIES} entries",
    "array": f"an array has more than {checks.MAX_ARRAY_ITEMS} items",
    "str": f"a string is longer than {checks.MAX_STRING_BYTES} bytes",
    "bin": f"a binary is longer than {checks.MAX_STRING_BYTES} bytes",
}


def unpack(frame: bytes, max_bytes: int = checks.MAX_FRAME_BYTES, *, from_server: bool = False) -> dict[str, Any]:
    """Bytes -> one msgpack map with string keys, or ``ProtocolError``.
    A client's frame (the default) is decoded within ``CLIENT_BOUNDS``; a
    ``session_signal``'s strings may be as long as its payload."""
    if len(frame) > max_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"frame is {len(frame)} bytes; the limit is {max_bytes}")
    try:
        if from_server:
            value = msgpack.unpackb(frame, raw=False, strict_map_key=True, ext_hook=_refuse_ext, timestamp=0)
        else:  # the bounds spelt out: a ** of CLIENT_BOUNDS would cost more than the decoding of a small frame
            value = msgpack.unpackb(
                frame,
                raw=False,
                strict_map_key=True,
                ext_hook=_refuse_ext,
                timestamp=0,
                max_map_len=_MAX_MAP,
                max_array_len=_MAX_ARRAY,
                max_str_len=_MAX_STRING,
                max_bin_len=_MAX_STRING,
                max_ext_len=_MAX_EXT,
            )
    except ProtocolError:
        raise
    except ValueError as exc:
        over = _OVER_BOUND.search(str(exc))
        # A length the frame cannot hold (a map entry takes 2 bytes at least,
        # anything else 1) is a truncated value, not a big one.
        if over is None or int(over[1]) * (2 if over[2] == "map" else 1) > len(frame):
            raise ProtocolError(ErrorCode.BAD_FRAME, f"not a msgpack value ({type(exc).__name__})") from None
        if over[2] == "ext":  # longer than a timestamp: an extension type, refused as any other
            raise ProtocolError(ErrorCode.BAD_FRAME, "msgpack extension types are not allowed") from None
        long = _session_signal(frame) if over[2] == "str" else None
        if long is None:
            raise ProtocolError(ErrorCode.INVALID, f"frame: {_BOUND_BROKEN[over[2]]}", _request_id(frame)) from None
        value = long
    except Exception as exc:  # msgpack raises many types on bad input; all mean the same
        raise ProtocolError(ErrorCode.BAD_FRAME, f"not a msgpack value ({type(exc).__name__})") from None
    if type(value) is not dict:
        raise ProtocolError(ErrorCode.BAD_FRAME, "a frame must be a msgpack map")
    for key in value:  # strict_map_key still lets binary keys through
        if type(key) is not str:
            raise ProtocolError(ErrorCode.BAD_FRAME, "map keys must be strings")
    return value


def _session_signal(frame: bytes) -> dict[str, Any] | None:
    """A frame refused for a long string, read again with the payload's bound
    on strings: the map if it is a ``session_signal`` (the one message whose
    strings may be that long, PROTOCOL.md §11.9), else None. At most a second
    decoding of a frame of bounded size."""
    try:
        value = msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            timestamp=0,
            max_map_len=_MAX_MAP,
            max_array_len=_MAX_ARRAY,
            max_str_len=checks.MAX_PAYLOAD_STRING_BYTES,
            max_bin_len=_MAX_STRING,
            max_ext_len=_MAX_EXT,
        )
    except Exception:  # refused for its string all the same, or for anything else: the first answer stands
        return None
    return value if type(value) is dict and value.get("type") == "session_signal" else None


def _request_id(frame: bytes) -> int | None:
    """The ``id`` of a frame refused for its bounds, so that the refusal
    answers its request: the top-level keys are read one by one (within the
    bounds) and every other value is skipped, never built."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, ext_hook=_refuse_ext, timestamp=0, **CLIENT_BOUNDS)
    try:
        unpacker.feed(frame)
        entries = unpacker.read_map_header()
        for _ in range(min(entries, checks.MAX_MAP_ENTRIES)):
            if unpacker.unpack() == "id":
                value = unpacker.unpack()
                return value if type(value) is int and 0 <= value <= checks.MAX_REQUEST_ID else None
            unpacker.skip()
    except Exception:  # whatever is wrong with it, it has no id to answer
        return None
    return None


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


def decode(frame: bytes, max_bytes: int = checks.MAX_FRAME_BYTES, *, from_server: bool = False) -> Message:
    """A frame -> its message; ``from_server`` for the frames the SDKs read."""
    return from_map(unpack(frame, max_bytes, from_server=from_server))


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
