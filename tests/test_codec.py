"""The msgpack codec: exact bytes, round trips, rejections and fuzzing.

``codec.decode`` is the first thing every byte from the network goes
through, so it has one promise above all others: it returns a ``Message``
or raises ``ProtocolError`` with the right ``ErrorCode``, and nothing else.
"""

from __future__ import annotations

import math
import os
import string
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from herald_presence.protocol import codec
from herald_presence.protocol.checks import (
    MAX_ARRAY_ITEMS,
    MAX_DATA_FIELDS,
    MAX_EVENT_CHARS,
    MAX_FRAME_BYTES,
    MAX_ID_CHARS,
    MAX_KEY_CHARS,
    MAX_MAP_ENTRIES,
    MAX_PAYLOAD_BYTES,
    MAX_REQUEST_ID,
    MAX_STRING_BYTES,
    MAX_TOKEN_CHARS,
    MAX_VALUE_CHARS,
    MAX_VISITORS_PER_REQUEST,
)
from herald_presence.protocol.errors import ErrorCode, ProtocolError
from herald_presence.protocol.messages import (
    KEY_TYPES,
    MESSAGE_TYPES,
    PRESENCE_CHANGES,
    SESSION_EVENTS,
    Ack,
    EndSession,
    Error,
    Focus,
    GuestCount,
    Hello,
    JoinSession,
    LeaveSession,
    Lookup,
    Message,
    Ping,
    Pong,
    Presence,
    PresenceChanged,
    Refresh,
    SessionConnected,
    SessionEvent,
    SessionJoined,
    SessionSignal,
    Signal,
    Snapshot,
    StartSession,
    Subscribe,
    Unsubscribe,
    VisitorInfo,
    WaitSession,
    Welcome,
)

# Bounded in CI; for a long run: HERALD_FUZZ_EXAMPLES=100000 .venv/bin/python -m pytest tests/test_codec.py
FUZZ_EXAMPLES = int(os.environ.get("HERALD_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUND_TRIP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- helpers -----------------------------------------------------------------


def refused(frame: bytes, max_bytes: int = MAX_FRAME_BYTES) -> ProtocolError:
    """The error ``decode`` raises for ``frame`` (fails the test if it decodes)."""
    with pytest.raises(ProtocolError) as info:
        codec.decode(frame, max_bytes)
    return info.value


def refused_map(raw: dict[Any, Any]) -> ProtocolError:
    return refused(msgpack.packb(raw, use_bin_type=True))


def decoded_map(raw: dict[Any, Any]) -> Message:
    return codec.decode(msgpack.packb(raw, use_bin_type=True))


def assert_decodes_or_refuses(frame: bytes) -> None:
    """The codec's contract for arbitrary input: a message or a ProtocolError.

    A frame that decodes must also survive being re-encoded: the message it
    produced is one the codec can write and read back to the same bytes.
    """
    try:
        message = codec.decode(frame)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        assert exc.request_id is None or (type(exc.request_id) is int and 0 <= exc.request_id <= MAX_REQUEST_ID)
        return
    assert isinstance(message, Message)
    assert type(message) is MESSAGE_TYPES[message.TYPE]
    again = codec.encode(message)
    assert codec.encode(codec.decode(again, max_bytes=len(again))) == again


# --- strategies --------------------------------------------------------------

ID_ALPHABET = string.ascii_letters + string.digits + "._:@+-"
EVENT_ALPHABET = string.ascii_letters + string.digits + "._:-"

ids = st.text(ID_ALPHABET, min_size=1, max_size=MAX_ID_CHARS)
events = st.text(EVENT_ALPHABET, min_size=1, max_size=MAX_EVENT_CHARS)
request_ids = st.integers(0, MAX_REQUEST_ID)
uints = st.integers(0, 2**64 - 1)  # msgpack's whole unsigned range
ints = st.integers(-(2**63), 2**64 - 1)  # everything msgpack can carry
floats = st.floats(allow_nan=False, allow_infinity=False)  # NaN and infinities are refused (no JSON for them)
texts = st.text(max_size=MAX_VALUE_CHARS)
tokens = st.text(min_size=1, max_size=MAX_TOKEN_CHARS)
scalars = st.none() | st.booleans() | ints | floats | texts
flat_maps = st.dictionaries(st.text(min_size=1, max_size=MAX_KEY_CHARS), scalars, max_size=MAX_DATA_FIELDS)
key_types = st.sampled_from(KEY_TYPES)

connection_states = st.fixed_dictionaries(
    {
        "connection": ids,
        "data": flat_maps,
        "visible": st.booleans(),
        "focused": st.booleans(),
        "since": st.floats(0, 4e9),
    }
)
visitor_states = st.fixed_dictionaries(
    {
        "visitor": ids,
        "online": st.booleans(),
        "version": st.integers(0, MAX_REQUEST_ID),
        "connections": st.lists(connection_states, max_size=3),
    }
)


def optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


ice_servers = st.lists(
    st.fixed_dictionaries(
        {"urls": st.lists(texts, min_size=1, max_size=3)}, optional={"username": texts, "credential": texts}
    ),
    max_size=3,
)
payloads = st.text(max_size=300) | st.sampled_from(["", "v=0\r\n" + "a" * 2 * MAX_STRING_BYTES])


MESSAGE_STRATEGIES: dict[type[Message], st.SearchStrategy[Message]] = {
    Ping: st.builds(Ping),
    Pong: st.builds(Pong),
    Signal: st.builds(
        Signal,
        event=events,
        data=optional(flat_maps),
        id=optional(request_ids),
        visitor=optional(ids),
        agent=optional(ids),
        to=optional(st.sampled_from(["focused", "all"])),
        connection=optional(ids),
    ),
    Hello: st.builds(
        Hello,
        versions=st.lists(uints, max_size=16),
        group=optional(ids),
        visitor=optional(ids),
        token=optional(tokens),
        session_token=optional(tokens),
        data=optional(flat_maps),
        visible=optional(st.booleans()),
    ),
    Presence: st.builds(Presence, data=optional(flat_maps), visible=optional(st.booleans())),
    Subscribe: st.builds(
        Subscribe, id=request_ids, visitors=optional(st.lists(ids, max_size=20)), group=optional(st.booleans())
    ),
    Unsubscribe: st.builds(
        Unsubscribe, id=request_ids, visitors=optional(st.lists(ids, max_size=20)), group=optional(st.booleans())
    ),
    Lookup: st.builds(Lookup, id=request_ids, visitor=ids),
    Welcome: st.builds(
        Welcome,
        protocol=uints,
        connection=ids,
        role=st.sampled_from(["visitor", "agent"]),
        group=ids,
        keepalive=ints | floats,
        visitor=optional(ids),
        agent=optional(ids),
        focused=optional(st.booleans()),
        server=optional(texts),
        expires=optional(ints | floats),
    ),
    Ack: st.builds(Ack, id=request_ids, delivered=optional(uints), expires=optional(ints | floats)),
    Refresh: st.builds(Refresh, id=request_ids, token=tokens),
    Error: st.builds(
        Error,
        code=st.sampled_from([code.value for code in ErrorCode]) | texts,
        message=texts,
        id=optional(request_ids),
    ),
    Snapshot: st.builds(
        Snapshot, id=request_ids, visitors=st.lists(visitor_states, max_size=3), group=optional(st.booleans())
    ),
    VisitorInfo: st.builds(VisitorInfo, id=request_ids, state=visitor_states),
    PresenceChanged: st.builds(PresenceChanged, change=st.sampled_from(PRESENCE_CHANGES), state=visitor_states),
    Focus: st.builds(Focus, focused=st.booleans()),
    StartSession: st.builds(StartSession, id=request_ids, key_type=key_types),
    SessionConnected: st.builds(
        SessionConnected,
        session=ids,
        key=ids,
        key_type=key_types,
        show_key=st.booleans(),
        guests=uints,
        id=optional(request_ids),
        ice_servers=optional(ice_servers),
    ),
    EndSession: st.builds(EndSession, id=request_ids),
    WaitSession: st.builds(WaitSession, id=request_ids, key=ids),
    # Any mix of key/code/session: "exactly one" is the server's rule, not the codec's.
    JoinSession: st.builds(JoinSession, id=request_ids, key=optional(ids), code=optional(ids), session=optional(ids)),
    SessionJoined: st.builds(
        SessionJoined,
        id=request_ids,
        session=ids,
        key=ids,
        visitor=ids,
        guests=uints,
        ice_servers=optional(ice_servers),
    ),
    SessionSignal: st.builds(
        SessionSignal,
        session=ids,
        event=events,
        payload=optional(payloads),
        data=optional(flat_maps),
        id=optional(request_ids),
        to=optional(ids),
        sid=optional(ids),
        connection=optional(ids),
        agent=optional(ids),
        visitor=optional(ids),
    ),
    LeaveSession: st.builds(LeaveSession, id=request_ids, session=ids),
    GuestCount: st.builds(GuestCount, session=ids, guests=uints),
    SessionEvent: st.builds(
        SessionEvent,
        event=st.sampled_from(SESSION_EVENTS),
        session=ids,
        key=ids,
        visitor=ids,
        key_type=key_types,
        reason=optional(texts),
    ),
}
any_message = st.one_of(list(MESSAGE_STRATEGIES.values()))

# Keys msgpack can pack from Python; the codec must refuse or tolerate each.
wild_keys = st.text(max_size=8) | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=8) | st.booleans() | st.none()
wild_scalars = st.none() | st.booleans() | ints | st.floats() | st.text(max_size=40) | st.binary(max_size=40)


def msgpack_values(keys: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Arbitrary msgpack-able trees whose map keys come from ``keys``."""
    return st.recursive(
        wild_scalars,
        lambda children: st.lists(children, max_size=5) | st.dictionaries(keys, children, max_size=5),
        max_leaves=20,
    )


wild_values = msgpack_values(wild_keys)
string_keyed_values = msgpack_values(st.text(max_size=8))


@st.composite
def near_valid_maps(draw: st.DrawFn) -> dict[Any, Any]:
    """A valid message's map with a few fields dropped or replaced by junk, so
    that the fuzzing reaches every field check, not just the unpacker."""
    message = draw(any_message)
    raw: dict[Any, Any] = message.to_wire()
    spec = {name: check for name, check, _required in type(message).SPEC}
    for name in draw(st.lists(st.sampled_from([*spec, "type", "id"]), max_size=3)):
        if draw(st.booleans()):
            raw.pop(name, None)
            continue
        # Mostly string keys, so that junk gets past the unpacker to the checks.
        raw[name] = draw(string_keyed_values | wild_values)
    raw.update(draw(st.dictionaries(st.text(max_size=8), string_keyed_values, max_size=2)))
    return raw


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    """A valid frame with a few bytes flipped, inserted or deleted."""
    frame = bytearray(codec.encode(draw(any_message)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete"]))
        if kind == "insert":
            frame.insert(draw(st.integers(0, len(frame))), draw(st.integers(0, 255)))
        elif frame:
            at = draw(st.integers(0, len(frame) - 1))
            if kind == "flip":
                frame[at] ^= draw(st.integers(1, 255))
            else:
                del frame[at]
    return bytes(frame)


# --- byte fixtures -------------------------------------------------------------

# Read by hand: 81 = fixmap(1); a4 "type"; a4 "ping".
PING_HEX = "81 a4 74797065 a4 70696e67"

# 84 = fixmap(4), keys in field order with unset fields left out:
# a4 "type" a6 "signal" | a5 "event" a9 "showterms" | a2 "id" 07 | a7 "visitor" a4 "v-42"
SIGNAL_HEX = (
    "84 a4 74797065 a6 7369676e616c a5 6576656e74 a9 73686f777465726d73 a2 6964 07 a7 76697369746f72 a4 762d3432"
)
SIGNAL = Signal(event="showterms", visitor="v-42", id=7)

# 87 = fixmap(7): "type" "hello" | a8 "versions" 91 01 (= [1]) | a5 "group" a4 "acme"
# | a7 "visitor" a4 "v-42" | a5 "token" b7 (fixstr 23) "1767225600.c2lnbmF0dXJl"
# | a4 "data" 82 (fixmap 2) {a4 "page": a9 "/checkout", a4 "cart": 03} | a7 "visible" c3 (true)
HELLO_HEX = (
    "87 a4 74797065 a5 68656c6c6f"
    " a8 76657273696f6e73 91 01"
    " a5 67726f7570 a4 61636d65"
    " a7 76697369746f72 a4 762d3432"
    " a5 746f6b656e b7 313736373232353630302e63326c6e626d463064584a6c"
    " a4 64617461 82 a4 70616765 a9 2f636865636b6f7574 a4 63617274 03"
    " a7 76697369626c65 c3"
)
HELLO = Hello(
    versions=[1],
    group="acme",
    visitor="v-42",
    token="1767225600.c2lnbmF0dXJl",
    data={"page": "/checkout", "cart": 3},
    visible=True,
)

# The two session frames PROTOCOL.md shows (§11.8): 83 = fixmap(3): "type" ad "start_session"
# | a2 "id" 03 | a8 "key_type" a6 "random"
START_SESSION_HEX = "83 a4 74797065 ad 73746172745f73657373696f6e a2 6964 03 a8 6b65795f74797065 a6 72616e646f6d"
START_SESSION = StartSession(id=3, key_type="random")

# 87 = fixmap(7): "type" b1 "session_connected" | a7 "session" b1 "s4f1c9a07e2b6d835" | a3 "key" a6 "482913"
# | a8 "key_type" a6 "random" | a8 "show_key" c3 (true) | a6 "guests" 00 | a2 "id" 03 (last: optional)
SESSION_CONNECTED_HEX = (
    "87 a4 74797065 b1 73657373696f6e5f636f6e6e6563746564"
    " a7 73657373696f6e b1 7334663163396130376532623664383335"
    " a3 6b6579 a6 343832393133"
    " a8 6b65795f74797065 a6 72616e646f6d"
    " a8 73686f775f6b6579 c3"
    " a6 677565737473 00"
    " a2 6964 03"
)
SESSION_CONNECTED = SessionConnected(
    session="s4f1c9a07e2b6d835", key="482913", key_type="random", show_key=True, guests=0, id=3
)

FIXTURES = [
    pytest.param(Ping(), PING_HEX, id="ping"),
    pytest.param(SIGNAL, SIGNAL_HEX, id="agent-signal"),
    pytest.param(HELLO, HELLO_HEX, id="visitor-hello"),
    pytest.param(START_SESSION, START_SESSION_HEX, id="start-session"),
    pytest.param(SESSION_CONNECTED, SESSION_CONNECTED_HEX, id="session-connected"),
]


@pytest.mark.parametrize(("message", "hex_frame"), FIXTURES)
def test_message_encodes_to_its_frozen_bytes(message: Message, hex_frame: str) -> None:
    assert codec.encode(message) == bytes.fromhex(hex_frame)


@pytest.mark.parametrize(("message", "hex_frame"), FIXTURES)
def test_frozen_bytes_decode_to_their_message(message: Message, hex_frame: str) -> None:
    decoded = codec.decode(bytes.fromhex(hex_frame))
    assert type(decoded) is type(message)
    assert decoded == message


def test_unset_optional_fields_are_left_out_of_the_frame() -> None:
    assert codec.encode(Signal(event="e")) == msgpack.packb({"type": "signal", "event": "e"})


def test_field_order_on_the_wire_does_not_matter() -> None:
    shuffled = {"visitor": "v-42", "id": 7, "event": "showterms", "type": "signal"}
    assert decoded_map(shuffled) == SIGNAL


# --- round trips -----------------------------------------------------------------


def test_every_message_type_has_a_strategy() -> None:
    assert set(MESSAGE_STRATEGIES) == set(MESSAGE_TYPES.values())


@pytest.mark.parametrize("cls", list(MESSAGE_TYPES.values()), ids=list(MESSAGE_TYPES))
@ROUND_TRIP
@given(data=st.data())
def test_every_message_type_survives_a_round_trip(cls: type[Message], data: st.DataObject) -> None:
    message = data.draw(MESSAGE_STRATEGIES[cls])
    frame = codec.encode(message)
    assume(len(frame) <= MAX_FRAME_BYTES)  # valid fields can add up to more than a frame
    decoded = codec.decode(frame)
    assert type(decoded) is cls
    assert decoded == message


# --- forward compatibility ---------------------------------------------------------


def test_unknown_fields_are_ignored() -> None:
    raw = {"type": "ping", "future": 1, "nested": {"deep": [1, {"x": None}]}, "blob": b"\x00\x01"}
    assert decoded_map(raw) == Ping()
    signal = {**SIGNAL.to_wire(), "priority": "high", "trace": {"span": 12}}
    assert decoded_map(signal) == SIGNAL


@FUZZ
@given(message=any_message, extra=st.dictionaries(st.text(max_size=12), string_keyed_values, max_size=4))
def test_any_message_with_extra_fields_decodes_to_the_same_message(message: Message, extra: dict[str, Any]) -> None:
    known = {name for name, _check, _required in type(message).SPEC} | {"type"}
    raw = {**message.to_wire(), **{key: value for key, value in extra.items() if key not in known}}
    frame = codec.encode_map(raw)
    assume(len(frame) <= MAX_FRAME_BYTES)
    assert codec.decode(frame) == message


def test_nil_for_an_optional_field_means_absent() -> None:
    raw = {"type": "signal", "event": "e", "data": None, "id": None, "visitor": None, "to": None, "agent": None}
    assert decoded_map(raw) == Signal(event="e")
    assert decoded_map({"type": "hello", "versions": [1], "token": None, "visible": None}) == Hello(versions=[1])


# --- bad frames ----------------------------------------------------------------------


def test_a_byte_that_is_not_msgpack_is_a_bad_frame() -> None:
    assert refused(b"\xc1").code == ErrorCode.BAD_FRAME


def test_an_empty_frame_is_a_bad_frame() -> None:
    assert refused(b"").code == ErrorCode.BAD_FRAME


def test_truncated_msgpack_is_a_bad_frame() -> None:
    frame = bytes.fromhex(HELLO_HEX)
    for end in range(len(frame)):
        error = refused(frame[:end])
        assert error.code == ErrorCode.BAD_FRAME, f"prefix of {end} bytes"
        assert error.request_id is None


@pytest.mark.parametrize("trailer", [b"\xc0", b"\x00", bytes.fromhex(PING_HEX)], ids=["nil", "zero", "second-frame"])
def test_trailing_bytes_after_the_map_are_a_bad_frame(trailer: bytes) -> None:
    assert refused(bytes.fromhex(PING_HEX) + trailer).code == ErrorCode.BAD_FRAME


@pytest.mark.parametrize(
    "value",
    [["ping"], [], 1, -1, "ping", None, True, 1.5, b"ping"],
    ids=["array", "empty-array", "int", "negative-int", "str", "nil", "bool", "float", "bin"],
)
def test_a_frame_that_is_not_a_map_is_a_bad_frame(value: Any) -> None:
    assert refused(msgpack.packb(value, use_bin_type=True)).code == ErrorCode.BAD_FRAME


def test_invalid_utf8_in_a_string_is_a_bad_frame() -> None:
    frame = b"\x81\xa4type\xa4pi\xffg"
    assert refused(frame).code == ErrorCode.BAD_FRAME


@pytest.mark.parametrize(
    "raw",
    [
        {"type": "ping", 1: "one"},
        {1: "ping"},
        {"type": "ping", 1.5: "x"},
        {"type": "ping", None: "x"},
        {"type": "ping", "extra": {7: "seven"}},
        {"type": "signal", "event": "e", "data": {7: "seven"}},
    ],
    ids=["int-key", "only-int-key", "float-key", "nil-key", "int-key-nested", "int-key-in-data"],
)
def test_a_map_with_non_string_keys_is_a_bad_frame(raw: dict[Any, Any]) -> None:
    # The unpacker refuses them (strict_map_key) at every depth, before any field check.
    assert refused_map(raw).code == ErrorCode.BAD_FRAME


@pytest.mark.parametrize(
    "raw",
    [{"type": "ping", b"x": 1}, {b"type": "ping"}],
    ids=["bin-key-beside-type", "bin-type-key"],
)
def test_a_map_with_binary_keys_is_a_bad_frame(raw: dict[Any, Any]) -> None:
    assert refused_map(raw).code == ErrorCode.BAD_FRAME


# --- extension types ---------------------------------------------------------------

TIMESTAMP = msgpack.Timestamp(1_700_000_000, 0)  # packs as ext type -1


@pytest.mark.parametrize(
    "value",
    [
        msgpack.ExtType(5, b"ab"),
        {"type": "ping", "x": msgpack.ExtType(5, b"ab")},
        {"type": "ping", "x": [1, {"y": msgpack.ExtType(0, b"")}]},
        {"type": "signal", "event": "e", "data": {"k": msgpack.ExtType(127, b"\x00")}},
    ],
    ids=["top-level", "map-value", "nested-deeper", "in-data"],
)
def test_extension_types_are_a_bad_frame(value: Any) -> None:
    assert refused(msgpack.packb(value, use_bin_type=True)).code == ErrorCode.BAD_FRAME


@pytest.mark.parametrize(
    "frame",
    [
        b"\xd4\xfe\x00",  # fixext 1, type -2
        b"\x82\xa4type\xa4nope\xa2id\xd5\x80\x01\x02",  # {"type": "nope", "id": fixext 2, type -128}
    ],
    ids=["top-level", "as-request-id"],
)
def test_negative_extension_types_are_a_bad_frame(frame: bytes) -> None:
    assert refused(frame).code == ErrorCode.BAD_FRAME


def test_a_timestamp_at_top_level_is_a_bad_frame() -> None:
    frame = msgpack.packb(TIMESTAMP)
    assert frame[:2] == b"\xd6\xff"  # fixext 4, type -1
    assert refused(frame).code == ErrorCode.BAD_FRAME


@pytest.mark.parametrize("hex_frame", ["d4ff00", "c703ff000000"], ids=["fixext1", "ext8-len3"])
def test_a_malformed_timestamp_is_a_bad_frame(hex_frame: str) -> None:
    assert refused(bytes.fromhex(hex_frame)).code == ErrorCode.BAD_FRAME


@pytest.mark.parametrize(
    "raw",
    [
        {"type": "presence", "visible": TIMESTAMP},
        {"type": "signal", "event": "e", "data": {"at": TIMESTAMP}},
        {"type": "snapshot", "id": 1, "visitors": [{"since": TIMESTAMP}]},
    ],
    ids=["as-field", "in-data", "in-visitor-state"],
)
def test_a_timestamp_in_a_known_field_is_invalid(raw: dict[str, Any]) -> None:
    # msgpack decodes ext -1 itself (ext_hook never sees it); no field check accepts the result.
    assert refused_map(raw).code == ErrorCode.INVALID


def test_a_timestamp_in_an_unknown_field_is_ignored_like_any_unknown_field() -> None:
    assert codec.decode(msgpack.packb({"type": "ping", "x": TIMESTAMP})) == Ping()


# --- depth and size ------------------------------------------------------------------


def test_deep_nesting_is_a_bad_frame() -> None:
    assert refused(b"\x91" * 5000).code == ErrorCode.BAD_FRAME
    assert refused(b"\x81\xa1k" * 5000 + b"\xc0").code == ErrorCode.BAD_FRAME


def test_deep_nesting_inside_a_field_is_a_bad_frame() -> None:
    frame = b"\x82\xa4type\xa4ping\xa1x" + b"\x91" * 5000 + b"\xc0"
    assert refused(frame).code == ErrorCode.BAD_FRAME


def test_moderate_nesting_inside_an_unknown_field_is_fine() -> None:
    frame = b"\x82\xa4type\xa4ping\xa1x" + b"\x91" * 100 + b"\xc0"
    assert codec.decode(frame) == Ping()


def _ping_of_size(size: int) -> bytes:
    """A ping padded to ``size`` bytes with unknown string fields, each within the string bound."""
    raw: dict[str, Any] = {"type": "ping"}
    raw |= {f"pad{i}": "x" * MAX_STRING_BYTES for i in range((size - 1024) // (MAX_STRING_BYTES + 16))}
    base = len(codec.encode_map({**raw, "last": ""}))
    frame = codec.encode_map({**raw, "last": "x" * (size - base - 2)})  # str16 header: 2 more bytes
    assert len(frame) == size
    return frame


# --- bounds on every map, array and string of a client's frame (checked before building) ---------


def _ping_with(**fields: Any) -> bytes:
    return msgpack.packb({"type": "ping", **fields}, use_bin_type=True)


def test_the_bounds_fit_every_frame_a_client_may_send() -> None:
    assert MAX_ARRAY_ITEMS >= MAX_VISITORS_PER_REQUEST and MAX_MAP_ENTRIES >= 2 * MAX_DATA_FIELDS
    assert 4 * max(MAX_VALUE_CHARS, MAX_TOKEN_CHARS, MAX_ID_CHARS) <= MAX_STRING_BYTES  # UTF-8: 4 bytes a char
    longest = "\U0001f600" * MAX_VALUE_CHARS  # 4 bytes each in UTF-8
    assert decoded_map({"type": "presence", "data": {"k": longest}}) == Presence(data={"k": longest})
    visitors = [f"v{i}" for i in range(MAX_VISITORS_PER_REQUEST)]
    assert decoded_map({"type": "subscribe", "id": 1, "visitors": visitors}) == Subscribe(id=1, visitors=visitors)


def test_containers_and_strings_at_the_bounds_are_accepted_even_in_unknown_fields() -> None:
    fields = {f"k{i}": None for i in range(MAX_MAP_ENTRIES - 4)}
    frame = _ping_with(
        many=[None] * MAX_ARRAY_ITEMS,
        map={f"k{i}": 1 for i in range(MAX_MAP_ENTRIES)},
        text="x" * MAX_STRING_BYTES,
        **fields,
    )
    assert codec.decode(frame) == Ping()


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({f"f{i:07d}": i % 100 for i in range(5900)}, "a map has more than"),  # the CPU finding: ~58 KiB
        ({"x": {f"k{i}": 1 for i in range(MAX_MAP_ENTRIES + 1)}}, "a map has more than"),
        ({"x": [None] * (MAX_ARRAY_ITEMS + 1)}, "an array has more than"),
        ({"x": [[None] * (MAX_ARRAY_ITEMS + 1)]}, "an array has more than"),
        ({"x": "x" * (MAX_STRING_BYTES + 1)}, "a string is longer than"),
        ({"x": b"x" * (MAX_STRING_BYTES + 1)}, "a binary is longer than"),
    ],
    ids=["5900-unknown-fields", "nested-map", "array", "nested-array", "string", "binary"],
)
def test_a_frame_over_a_bound_is_invalid_and_keeps_its_request_id(fields: dict[str, Any], why: str) -> None:
    error = refused(msgpack.packb({"type": "signal", "id": 42, "event": "e", **fields}, use_bin_type=True))
    assert error.code == ErrorCode.INVALID and error.message.startswith("frame: " + why), error
    assert error.request_id == 42
    error = refused(msgpack.packb({**fields, "type": "signal", "event": "e"}, use_bin_type=True))
    assert error.code == ErrorCode.INVALID and error.request_id is None


def test_a_session_signal_payload_may_be_longer_than_any_other_string() -> None:
    """An SDP offer in one message (PROTOCOL.md §11.9): up to 64 KiB of UTF-8,
    in a frame a session's member may send over max_frame_bytes."""
    sdp = "v=0\r\n" + "é" * ((MAX_PAYLOAD_BYTES - 5) // 2) + "x"
    assert len(sdp.encode()) == MAX_PAYLOAD_BYTES
    frame = codec.encode(SessionSignal(session="s1", event="offer", payload=sdp, id=5))
    assert codec.decode(frame, len(frame)) == SessionSignal(session="s1", event="offer", payload=sdp, id=5)
    over = msgpack.packb({"type": "session_signal", "id": 6, "session": "s1", "event": "o", "payload": sdp + "x"})
    error = refused(over, len(over))
    assert (error.code, error.request_id, error.message.split(":")[0]) == (ErrorCode.INVALID, 6, "payload")
    # No other message may carry a string that long, in a known field or not.
    error = refused_map({"type": "signal", "id": 7, "event": "e", "payload": "x" * (MAX_STRING_BYTES + 1)})
    assert error.code == ErrorCode.INVALID and error.message.startswith("frame: a string is longer than")


def test_a_subscribe_over_the_visitor_limit_is_answered_with_its_id() -> None:
    error = refused_map({"type": "subscribe", "id": 7, "visitors": ["v"] * (MAX_VISITORS_PER_REQUEST + 1)})
    assert (error.code, error.request_id) == (ErrorCode.INVALID, 7)


def test_a_long_extension_is_a_bad_frame() -> None:
    assert refused(_ping_with(x=msgpack.ExtType(1, b"x" * 13))).code == ErrorCode.BAD_FRAME
    assert codec.decode(_ping_with(x=msgpack.Timestamp(1, 2))) == Ping()  # 12 bytes, ignored when unknown


def test_frames_from_the_server_are_bounded_by_their_size_only() -> None:
    state = {"visitor": "v", "online": False, "version": 0, "connections": []}
    snapshot = Snapshot(id=1, visitors=[{**state, "visitor": f"v{i}"} for i in range(MAX_ARRAY_ITEMS + 1)])
    frame = codec.encode(snapshot)
    assert codec.decode(frame, len(frame), from_server=True) == snapshot
    assert refused(frame, len(frame)).code == ErrorCode.INVALID


def test_a_frame_over_the_size_limit_is_too_large() -> None:
    assert refused(_ping_of_size(MAX_FRAME_BYTES + 1)).code == ErrorCode.TOO_LARGE


def test_size_is_checked_before_parsing() -> None:
    assert refused(b"\xc1" * (MAX_FRAME_BYTES + 1)).code == ErrorCode.TOO_LARGE


def test_a_frame_at_the_size_limit_is_accepted() -> None:
    assert codec.decode(_ping_of_size(MAX_FRAME_BYTES)) == Ping()


def test_the_size_limit_can_be_lowered() -> None:
    frame = bytes.fromhex(SIGNAL_HEX)
    assert codec.decode(frame, max_bytes=len(frame)) == SIGNAL
    assert refused(frame, max_bytes=len(frame) - 1).code == ErrorCode.TOO_LARGE


# --- type ----------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [{}, {"event": "e"}, {"type": None}], ids=["empty", "no-type", "nil-type"])
def test_a_map_without_a_type_is_an_unknown_type(raw: dict[str, Any]) -> None:
    assert refused_map(raw).code == ErrorCode.UNKNOWN_TYPE


@pytest.mark.parametrize(
    "type_value",
    [1, True, 1.5, b"ping", ["ping"], {"ping": 1}],
    ids=["int", "bool", "float", "bin", "array", "map"],
)
def test_a_type_that_is_not_a_string_is_an_unknown_type(type_value: Any) -> None:
    assert refused_map({"type": type_value}).code == ErrorCode.UNKNOWN_TYPE


@pytest.mark.parametrize("type_name", ["nope", "Ping", "ping ", "", "__init__", "x" * 1000])
def test_an_unknown_type_is_an_unknown_type(type_name: str) -> None:
    error = refused_map({"type": type_name})
    assert error.code == ErrorCode.UNKNOWN_TYPE
    assert error.request_id is None
    assert len(error.message) < 100  # a long type name is not echoed back


@pytest.mark.parametrize("request_id", [0, 42, MAX_REQUEST_ID])
def test_an_unknown_type_carries_a_valid_request_id(request_id: int) -> None:
    assert refused_map({"type": "nope", "id": request_id}).request_id == request_id
    assert refused_map({"id": request_id}).request_id == request_id


@pytest.mark.parametrize(
    "request_id",
    [-1, MAX_REQUEST_ID + 1, 2**64 - 1, 42.0, True, "42", [42], None],
    ids=["negative", "too-big", "uint64-max", "float", "bool", "str", "array", "nil"],
)
def test_an_unknown_type_drops_an_invalid_request_id(request_id: Any) -> None:
    error = refused_map({"type": "nope", "id": request_id})
    assert error.code == ErrorCode.UNKNOWN_TYPE
    assert error.request_id is None


# --- invalid fields --------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        {"type": "signal"},
        {"type": "signal", "event": None},
        {"type": "hello"},
        {"type": "subscribe"},
        {"type": "lookup", "id": 1},
        {"type": "focus"},
        {"type": "ack"},
        {"type": "error", "code": "x"},
        {"type": "presence_changed", "change": "online"},
        {"type": "welcome", "protocol": 1, "connection": "c", "role": "agent", "group": "g"},
    ],
    ids=[
        "signal-event",
        "signal-event-nil",
        "hello-versions",
        "subscribe-id",
        "lookup-visitor",
        "focus-focused",
        "ack-id",
        "error-message",
        "presence_changed-state",
        "welcome-keepalive",
    ],
)
def test_a_missing_required_field_is_invalid(raw: dict[str, Any]) -> None:
    assert refused_map(raw).code == ErrorCode.INVALID


def test_an_invalid_field_carries_the_request_id() -> None:
    error = refused_map({"type": "lookup", "id": 9})
    assert (error.code, error.request_id) == (ErrorCode.INVALID, 9)
    error = refused_map({"type": "signal", "event": "bad event", "id": 10})
    assert (error.code, error.request_id) == (ErrorCode.INVALID, 10)


@pytest.mark.parametrize(
    "visitor",
    ["v 42", "x" * (MAX_ID_CHARS + 1), 42, "", "vé", "v\n", "v/42", b"v-42", ["v-42"], True],
    ids=["space", "too-long", "int", "empty", "non-ascii", "newline", "slash", "bin", "array", "bool"],
)
def test_a_bad_identifier_is_invalid(visitor: Any) -> None:
    assert refused_map({"type": "lookup", "id": 1, "visitor": visitor}).code == ErrorCode.INVALID
    assert refused_map({"type": "signal", "event": "e", "visitor": visitor}).code == ErrorCode.INVALID


def test_identifiers_accept_their_whole_alphabet_up_to_the_limit() -> None:
    for visitor in ("a" * MAX_ID_CHARS, ID_ALPHABET):
        assert decoded_map({"type": "lookup", "id": 1, "visitor": visitor}) == Lookup(id=1, visitor=visitor)


@pytest.mark.parametrize(
    "event",
    ["e" * (MAX_EVENT_CHARS + 1), "show terms", "a@b", "a+b", "", 7, None],
    ids=["too-long", "space", "at-sign", "plus", "empty", "int", "nil"],
)
def test_a_bad_event_name_is_invalid(event: Any) -> None:
    assert refused_map({"type": "signal", "event": event}).code == ErrorCode.INVALID


def test_an_event_name_at_the_limit_is_accepted() -> None:
    event = "e" * MAX_EVENT_CHARS
    assert decoded_map({"type": "signal", "event": event}) == Signal(event=event)


@pytest.mark.parametrize(
    "request_id",
    [-1, 7.0, 0.5, True, False, MAX_REQUEST_ID + 1, 2**64 - 1, "7", [7]],
    ids=["negative", "float", "fraction", "true", "false", "too-big", "uint64-max", "str", "array"],
)
def test_a_bad_request_id_is_invalid(request_id: Any) -> None:
    for raw in ({"type": "signal", "event": "e", "id": request_id}, {"type": "subscribe", "id": request_id}):
        error = refused_map(raw)
        assert error.code == ErrorCode.INVALID
        assert error.request_id is None


@pytest.mark.parametrize("request_id", [0, MAX_REQUEST_ID])
def test_request_ids_at_the_limits_are_accepted(request_id: int) -> None:
    assert decoded_map({"type": "subscribe", "id": request_id}) == Subscribe(id=request_id)


@pytest.mark.parametrize(
    "data",
    [
        {"nested": {"a": 1}},
        {"list": [1, 2]},
        {"bin": b"\x00"},
        {f"k{i}": i for i in range(MAX_DATA_FIELDS + 1)},
        {"k" * (MAX_KEY_CHARS + 1): 1},
        {"": 1},
        {"v": "x" * (MAX_VALUE_CHARS + 1)},
        {b"k": 1},
        [["k", 1]],
        "k=1",
    ],
    ids=[
        "nested-map",
        "nested-list",
        "bin-value",
        "too-many-fields",
        "long-key",
        "empty-key",
        "long-value",
        "bin-key",
        "not-a-map",
        "string",
    ],
)
def test_a_bad_flat_map_is_invalid(data: Any) -> None:
    assert refused_map({"type": "signal", "event": "e", "data": data}).code == ErrorCode.INVALID
    assert refused_map({"type": "presence", "data": data}).code == ErrorCode.INVALID


def test_a_flat_map_at_every_limit_is_accepted() -> None:
    data: dict[str, Any] = {f"k{i}": i for i in range(MAX_DATA_FIELDS - 5)}
    data |= {
        "k" * MAX_KEY_CHARS: "v" * MAX_VALUE_CHARS,
        "removed": None,
        "min": -(2**63),
        "max": 2**64 - 1,
        "float": 0.25,
    }
    assert len(data) == MAX_DATA_FIELDS
    assert decoded_map({"type": "presence", "data": data}) == Presence(data=data)


@pytest.mark.parametrize("value", [1, 0, "true", 1.0, [True]], ids=["one", "zero", "str", "float", "array"])
def test_a_boolean_given_anything_else_is_invalid(value: Any) -> None:
    assert refused_map({"type": "presence", "visible": value}).code == ErrorCode.INVALID
    assert refused_map({"type": "focus", "focused": value}).code == ErrorCode.INVALID
    assert refused_map({"type": "subscribe", "id": 1, "group": value}).code == ErrorCode.INVALID


@pytest.mark.parametrize("to", ["everyone", "Focused", "", 1, True, b"all"], ids=str)
def test_a_to_other_than_focused_or_all_is_invalid(to: Any) -> None:
    assert refused_map({"type": "signal", "event": "e", "visitor": "v", "to": to}).code == ErrorCode.INVALID


@pytest.mark.parametrize(
    "raw",
    [
        {"type": "signal", "event": "e", "to": []},
        {"type": "signal", "event": "e", "to": {"all": True}},
        {"type": "welcome", "protocol": 1, "connection": "c", "role": ["agent"], "group": "g", "keepalive": 5},
        {"type": "presence_changed", "change": {}, "state": {}},
    ],
    ids=["signal-to-array", "signal-to-map", "welcome-role", "presence_changed-change"],
)
def test_one_of_fields_refuse_lists_and_maps(raw: dict[str, Any]) -> None:
    assert refused_map(raw).code == ErrorCode.INVALID


@pytest.mark.parametrize(
    "raw",
    [
        {"type": "hello", "versions": list(range(17))},
        {"type": "hello", "versions": [-1]},
        {"type": "hello", "versions": [True]},
        {"type": "hello", "versions": 1},
        {"type": "hello", "versions": [1], "token": ""},
        {"type": "hello", "versions": [1], "token": "t" * (MAX_TOKEN_CHARS + 1)},
        {"type": "subscribe", "id": 1, "visitors": ["v"] * 1001},
        {"type": "subscribe", "id": 1, "visitors": ["ok", "not ok"]},
        {"type": "subscribe", "id": 1, "visitors": "v"},
        {"type": "error", "code": 1, "message": "m"},
        {"type": "error", "code": "c", "message": "m" * (MAX_VALUE_CHARS + 1)},
        {"type": "welcome", "protocol": 1, "connection": "c", "role": "agent", "group": "g", "keepalive": "5"},
        {"type": "welcome", "protocol": 1, "connection": "c", "role": "agent", "group": "g", "keepalive": True},
        {"type": "welcome", "protocol": -1, "connection": "c", "role": "agent", "group": "g", "keepalive": 5},
        {"type": "welcome", "protocol": 1, "connection": "c", "role": "admin", "group": "g", "keepalive": 5},
        {"type": "ack", "id": 1, "delivered": -1},
        {"type": "presence_changed", "change": "gone", "state": {}},
    ],
    ids=[
        "hello-too-many-versions",
        "hello-negative-version",
        "hello-bool-version",
        "hello-versions-not-list",
        "hello-empty-token",
        "hello-long-token",
        "subscribe-too-many-visitors",
        "subscribe-bad-visitor",
        "subscribe-visitors-not-list",
        "error-code-int",
        "error-message-too-long",
        "welcome-keepalive-str",
        "welcome-keepalive-bool",
        "welcome-negative-protocol",
        "welcome-unknown-role",
        "ack-negative-delivered",
        "presence_changed-unknown-change",
    ],
)
def test_other_bad_fields_are_invalid(raw: dict[str, Any]) -> None:
    assert refused_map(raw).code == ErrorCode.INVALID


# --- never anything but ProtocolError -----------------------------------------------------


@FUZZ
@given(frame=st.binary(max_size=2048))
def test_arbitrary_bytes_decode_or_raise_a_protocol_error(frame: bytes) -> None:
    assert_decodes_or_refuses(frame)


@FUZZ
@given(value=wild_values | st.dictionaries(wild_keys, wild_values, max_size=6), bin_type=st.booleans())
def test_arbitrary_msgpack_values_decode_or_raise_a_protocol_error(value: Any, bin_type: bool) -> None:
    # use_bin_type=False packs bytes as (possibly invalid UTF-8) strings, like old clients.
    assert_decodes_or_refuses(msgpack.packb(value, use_bin_type=bin_type))


@FUZZ
@given(raw=near_valid_maps())
def test_near_valid_maps_decode_or_raise_a_protocol_error(raw: dict[Any, Any]) -> None:
    assert_decodes_or_refuses(codec.encode_map(raw))


@FUZZ
@given(frame=mutated_frames())
def test_mutated_frames_decode_or_raise_a_protocol_error(frame: bytes) -> None:
    assert_decodes_or_refuses(frame)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_number_in_presence_data_is_invalid(value: float) -> None:
    """Presence data reaches the REST API as JSON, which has no NaN or Infinity."""
    frame = codec.encode_map({"type": "presence", "data": {"x": value}})
    with pytest.raises(ProtocolError) as refused:
        codec.decode(frame)
    assert refused.value.code == ErrorCode.INVALID
