"""Random websocket frames for fuzzing a live server, and what each one should get.

Everything is drawn from one seeded ``random.Random``, so a seed replays a
run frame for frame. ``Frames.frame()`` mixes valid messages with mutated,
mistyped, oversized, deeply nested and plain random ones; ``expect()`` says,
from the codec alone, how the server must treat a frame: close the
connection (too large), answer one ``error`` (refused by the codec) or
handle the message (decoded).
"""

from __future__ import annotations

import dataclasses
import random
import string
from collections.abc import Callable, Sequence
from typing import Any

import msgpack

from herald_presence.protocol import checks, codec
from herald_presence.protocol.errors import ErrorCode, ProtocolError
from herald_presence.protocol.messages import KEY_TYPES, MESSAGE_TYPES, PRESENCE_CHANGES, SESSION_EVENTS, Message

from .test_codec import EVENT_ALPHABET, ID_ALPHABET

Frame = bytes | str  # str: sent as a text frame

VISITOR_TYPES = ("ping", "pong", "presence", "signal", "start_session", "end_session", "refresh", "session_signal")
AGENT_TYPES = (
    "ping",
    "pong",
    "signal",
    "subscribe",
    "unsubscribe",
    "lookup",
    "wait_session",
    "join_session",
    "leave_session",
    "refresh",
    "session_signal",
)
TEXT_CHARS = string.printable + "\x00\x7f\u00e9\u4e2d\u2028\ufeff\U0001f600"
INTS = (0, 1, -1, 127, 128, 255, 256, 2**31, 2**53 - 1, 2**53, 2**63 - 1, -(2**63), 2**64 - 1)
FLOATS = (0.0, -0.0, 0.5, 1e308, float("inf"), float("-inf"), float("nan"))
# msgpack the Python packer will not write: negative extension types, bad UTF-8, reserved bytes.
RAW_SNIPPETS = (b"\xd4\xfe\x00", b"\xd6\xff\x00\x00\x00\x00", b"\xa2\xff\xfe", b"\xc1", b"\xdf\xff\xff\xff\xff")


@dataclasses.dataclass
class Expected:
    """How the server must treat a frame (per PROTOCOL.md §2 and §6)."""

    close: int | None = None  # the connection must close with this code
    error: ErrorCode | None = None  # the codec refuses it: one error frame with this code...
    request_id: int | None = None  # ...and this id
    message: Message | None = None  # it decodes: the server handles this message


def expect(frame: Frame, max_frame_bytes: int) -> Expected:
    if isinstance(frame, str):
        return Expected(error=ErrorCode.BAD_FRAME)
    if len(frame) > max_frame_bytes:
        return Expected(close=1009)
    try:
        return Expected(message=codec.decode(frame, max_frame_bytes))
    except ProtocolError as exc:
        return Expected(error=exc.code, request_id=exc.request_id)


class Frames:
    """Draws frames. ``names`` are identifiers worth hitting often (live
    visitors and agents), so that requests reach real state, not only misses."""

    KINDS = ("valid", "mutated", "wrong_fields", "junk", "random_bytes", "near_limit", "deep", "text_frame")
    WEIGHTS = (30, 20, 18, 10, 8, 8, 3, 3)

    def __init__(self, rng: random.Random, names: Sequence[str], max_frame_bytes: int) -> None:
        self.rng = rng
        self.names = list(names)
        self.max_frame_bytes = max_frame_bytes

    def frame(self, types: Sequence[str]) -> tuple[str, Frame]:
        """(kind, frame), mostly of ``types`` when it is a message at all."""
        kind = self.rng.choices(self.KINDS, self.WEIGHTS)[0]
        make: Callable[[Sequence[str]], Frame] = getattr(self, kind)
        return kind, make(types)

    # --- frames -------------------------------------------------------------------

    def valid(self, types: Sequence[str]) -> bytes:
        return codec.encode_map(self.message_map(types))

    def mutated(self, types: Sequence[str]) -> bytes:
        return self.mutate(self.valid(types))

    def wrong_fields(self, types: Sequence[str]) -> bytes:
        raw = self.message_map(types)
        fields = [name for name, _check, _required in MESSAGE_TYPES[raw["type"]].SPEC]
        for name in self.rng.sample([*fields, "type", "id"], self.rng.randint(1, 2)):
            if self.rng.random() < 0.25:
                raw.pop(name, None)
            else:
                raw[name] = self.junk_value()
        if self.rng.random() < 0.3:
            raw[self.text(8) or "x"] = self.junk_value()  # an unknown field: ignored, whatever it holds
        return self.pack(raw)

    def junk(self, types: Sequence[str]) -> bytes:
        """Any msgpack value, or a map of junk with a known type."""
        value = self.junk_value()
        if self.rng.random() < 0.5:
            value = {"type": self.rng.choice(types), "id": self.junk_value(), "x": value}
        return self.pack(value)

    def junk_value(self, depth: int = 0) -> Any:
        """Any msgpack value, map keys of any type included."""
        r = self.rng
        pick = r.randrange(11 if depth < 3 else 8)
        if pick == 0:
            return None
        if pick == 1:
            return r.random() < 0.5
        if pick == 2:
            return r.choice(INTS) if r.random() < 0.7 else r.randint(-(2**63), 2**64 - 1)
        if pick == 3:
            return r.choice(FLOATS) if r.random() < 0.5 else r.uniform(-1e6, 1e6)
        if pick == 4:
            return self.text(r.choice((0, 1, 8, 64)))
        if pick == 5:
            return r.randbytes(r.randrange(9))
        if pick == 6:
            return msgpack.ExtType(r.randrange(128), r.randbytes(r.choice((1, 2, 4, 8, 3))))
        if pick == 7:
            return msgpack.Timestamp(r.randrange(2**32), 0)
        if pick == 8:
            return [self.junk_value(depth=depth + 1) for _ in range(r.randrange(4))]
        keys = (lambda: self.text(4) or "k") if pick == 9 else (lambda: self.junk_value(depth=3))
        return {keys(): self.junk_value(depth=depth + 1) for _ in range(r.randrange(4))}

    def random_bytes(self, types: Sequence[str]) -> bytes:
        body = self.rng.randbytes(self.rng.choice((0, 1, 2, 5, 16, 64, 300)))
        if self.rng.random() < 0.3:  # a real map header, to get a little further in
            body = bytes([0x80 | self.rng.randrange(16)]) + body + self.rng.choice(RAW_SNIPPETS)
        return body

    def near_limit(self, types: Sequence[str]) -> bytes:
        """A field at or one past its limit, or a whole frame around the size limit."""
        r, raw = self.rng, self.message_map(types)
        edge = r.choice((0, 1))  # 0: at the limit (valid), 1: one past it
        choice = r.randrange(8)
        if choice == 0:
            raw["visitor"] = "v" * (checks.MAX_ID_CHARS + edge)
        elif choice == 1:
            raw["event"] = "e" * (checks.MAX_EVENT_CHARS + edge)
        elif choice == 2:
            raw["data"] = {f"k{i}": i for i in range(checks.MAX_DATA_FIELDS + edge)}
        elif choice == 3:
            raw["data"] = {"k" * (checks.MAX_KEY_CHARS + edge): "x" * (checks.MAX_VALUE_CHARS + edge)}
        elif choice == 4:
            raw["visitors"] = [f"v{i}" for i in range(checks.MAX_VISITORS_PER_REQUEST + edge)]
        elif choice == 5:
            raw["id"] = checks.MAX_REQUEST_ID + edge
        else:
            if raw["type"] == "session_signal":  # a member's may be larger: whether this one is, expect() cannot tell
                raw["type"] = "signal"
            return self.padded(raw, self.max_frame_bytes + r.choice((-1, 0, 0, 1, 1, 1000)))
        if choice == 1 and raw["type"] == "session_signal" and r.random() < 0.5:
            raw["payload"] = "p" * (checks.MAX_PAYLOAD_BYTES // 2)  # longer than any other string may be
        return self.pack(raw)

    def deep(self, types: Sequence[str]) -> bytes:
        depth = self.rng.choice((10, 100, 500, 1000, 5000))
        nest = self.rng.choice((b"\x91", b"\x81\xa1k"))  # [x] or {"k": x}
        inner = nest * depth + b"\xc0"
        if self.rng.random() < 0.5:
            return inner
        # {"type": <a type>, "x": <the nesting>}: the map header, then the type pair without its own header
        return b"\x82" + codec.encode_map({"type": self.rng.choice(types)})[1:] + b"\xa1x" + inner

    def text_frame(self, types: Sequence[str]) -> str:
        return self.rng.choice(('{"type": "ping"}', "ping", "")) if self.rng.random() < 0.5 else self.text()

    def text(self, max_chars: int = 64) -> str:
        return "".join(self.rng.choices(TEXT_CHARS, k=self.rng.randint(0, max_chars)))

    # --- helpers ------------------------------------------------------------------

    def mutate(self, frame: bytes) -> bytes:
        """Flip, insert or delete a few bytes, or cut the frame short."""
        r, out = self.rng, bytearray(frame)
        for _ in range(r.randint(1, 3)):
            op = r.choices(range(4), (5, 2, 2, 1))[0]
            at = r.randrange(len(out) + 1)
            if op == 0 and at < len(out):
                out[at] ^= (1 << r.randrange(8)) if r.random() < 0.5 else r.randrange(1, 256)
            elif op == 1:
                out[at:at] = r.randbytes(r.randint(1, 3))
            elif op == 2:
                del out[at : at + r.randint(1, 3)]
            else:
                del out[at:]
        return bytes(out)

    def pack(self, value: Any) -> bytes:
        # use_bin_type=False writes bytes as (possibly invalid UTF-8) str, like old packers.
        return msgpack.packb(value, use_bin_type=self.rng.random() < 0.8)

    def padded(self, raw: dict[str, Any], size: int) -> bytes:
        """``raw`` with a padding field that brings the frame to ``size`` bytes."""
        pad = max(0, size - len(codec.encode_map(raw)) - 8)
        for _ in range(3):  # the str header grows with the padding: settle it
            frame = codec.encode_map({**raw, "pad": "x" * pad})
            pad = max(0, pad + size - len(frame))
        return frame

    # --- valid messages -----------------------------------------------------------

    def message_map(self, types: Sequence[str]) -> dict[str, Any]:
        """A message map with every required and some optional fields, valid
        field by field (whether its sender may send it is another matter)."""
        r = self.rng
        cls = MESSAGE_TYPES[r.choice(types) if types and r.random() < 0.85 else r.choice(list(MESSAGE_TYPES))]
        raw: dict[str, Any] = {"type": cls.TYPE}
        for name, check, required in cls.SPEC:
            if required or r.random() < 0.5:
                raw[name] = self.field(cls.TYPE, name, check)
        return raw

    def field(self, type_name: str, name: str, check: Any) -> Any:
        r = self.rng
        by_check: dict[Any, Callable[[], Any]] = {
            checks.identifier: self.name,
            checks.event_name: lambda: self.word(EVENT_ALPHABET, checks.MAX_EVENT_CHARS),
            checks.request_id: lambda: r.choice((0, 1, r.randrange(1000), checks.MAX_REQUEST_ID)),
            checks.boolean: lambda: r.random() < 0.5,
            checks.non_negative_int: lambda: r.choice((0, 1, 2**64 - 1)),
            checks.number: lambda: r.choice((0, 2.5, 2**64 - 1)),
            checks.token: lambda: self.text(checks.MAX_TOKEN_CHARS) or "t",
            checks.text: self.text,
            checks.flat_map: self.flat_map,
            checks.visitor_state: self.visitor_state,
            checks.visitor_delta: self.visitor_delta,
            checks.payload: lambda: self.text(r.choice((0, 64, 2048))),
            checks.ice_servers: self.ice_servers,
        }
        if check in by_check:
            return by_check[check]()
        # one_of and list_of checks are closures: go by the field's name.
        choices = {
            "to": ("focused", "all"),
            "key_type": KEY_TYPES,
            "role": ("visitor", "agent"),
            "change": PRESENCE_CHANGES,
            "event": SESSION_EVENTS,
        }
        if name in choices:
            return r.choice(choices[name])
        if name == "versions":
            return r.sample((0, 1, 1, 2, 99), r.randint(0, 3))
        if name == "visitors" and type_name == "snapshot":
            return [self.visitor_state() for _ in range(r.randrange(3))]
        if name == "visitors":
            return [self.name() for _ in range(r.choice((0, 1, 3, 20)))]
        raise AssertionError(f"no value for {type_name}.{name}: teach Frames.field about it")

    def name(self) -> str:
        if self.names and self.rng.random() < 0.7:
            return self.rng.choice(self.names)
        return self.word(ID_ALPHABET, checks.MAX_ID_CHARS)

    def word(self, alphabet: str, max_chars: int) -> str:
        size = max_chars if self.rng.random() < 0.1 else self.rng.randint(1, 12)
        return "".join(self.rng.choices(alphabet, k=size))

    def scalar(self) -> Any:
        r = self.rng
        return r.choice((None, True, False, r.choice(INTS), r.choice(FLOATS), self.text(), self.text(2048)))

    def flat_map(self) -> dict[str, Any]:
        size = self.rng.choice((0, 1, 3, checks.MAX_DATA_FIELDS))
        return {(self.text(checks.MAX_KEY_CHARS) or "k"): self.scalar() for _ in range(size)}

    def visitor_state(self) -> dict[str, Any]:
        connection = {
            "connection": self.name(),
            "data": self.flat_map(),
            "visible": True,
            "focused": False,
            "since": 1.5,
        }
        return {"visitor": self.name(), "online": True, "version": 3, "connections": [connection]}

    def ice_servers(self) -> list[dict[str, Any]]:
        turn = {"urls": ["turn:turn.example:3478"], "username": "1767229200:c1", "credential": self.text(28) or "c"}
        return [{"urls": ["stun:stun.example:3478"]}, turn][: self.rng.randrange(3)]

    def visitor_delta(self) -> dict[str, Any]:
        changed = {"connection": self.name(), "data": self.flat_map(), "visible": self.rng.random() < 0.5}
        return {"visitor": self.name(), "version": 4, "base": 3, "changed": [changed], "removed": [], "focused": None}
