"""Agents are told what changed; what they build from it is the visitor's
state. Any sequence of presence operations, applied by the rules the
backends use, announces deltas that ``apply_delta`` turns into exactly the
state the server holds, and whole states where no delta can be applied."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from herald_presence.protocol import codec
from herald_presence.protocol.errors import ErrorCode, ProtocolError
from herald_presence.protocol.messages import PresenceChanged, VisitorState
from herald_presence.protocol.presence import apply_delta
from herald_presence.server.model import presence_rules
from herald_presence.server.model.records import ConnectionRecord, VisitorRecord, offline_state

CONNECTIONS = [f"c{n}" for n in range(4)]
values = st.one_of(st.none(), st.integers(0, 3), st.sampled_from(["a", "b"]))
data = st.dictionaries(st.sampled_from(["k1", "k2", "k3"]), values, max_size=3)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("join"), st.sampled_from(CONNECTIONS), data, st.booleans()),
        st.tuples(st.just("update"), st.sampled_from(CONNECTIONS), data, st.one_of(st.none(), st.booleans())),
        st.tuples(st.just("leave"), st.sampled_from(CONNECTIONS)),
        st.tuples(st.just("expire")),
        st.tuples(st.just("rejoin"), st.sampled_from(CONNECTIONS), data, st.booleans()),
    ),
    max_size=40,
)


def comparable(state: VisitorState) -> tuple[Any, ...]:
    connections = sorted(
        (c["connection"], sorted(c["data"].items()), c["visible"], c["focused"], c["since"])
        for c in state["connections"]
    )
    return state["visitor"], state["online"], state["version"], connections


def apply(record: VisitorRecord, operation: tuple[Any, ...]) -> Any:
    kind, *args = operation
    if kind == "join":
        if args[0] in record.connections:
            return None
        clean = {k: v for k, v in args[1].items() if v is not None}
        return presence_rules.join(record, ConnectionRecord(args[0], "i1", clean, args[2], 1.0))
    if kind == "update":
        return presence_rules.update(record, args[0], args[1] or None, args[2])
    if kind == "leave":
        return presence_rules.leave(record, args[0])
    if kind == "expire":
        return presence_rules.expire_away(record, None)
    held = record.connections.get(args[0])
    if held is None:
        return None
    clean = {k: v for k, v in args[1].items() if v is not None}
    return presence_rules.rejoin(record, ConnectionRecord(args[0], "i1", clean, args[2], held.since))


@settings(max_examples=300, deadline=None)
@given(operations)
def test_an_agent_that_applies_every_announcement_holds_the_servers_state(ops: list[tuple[Any, ...]]) -> None:
    record = VisitorRecord("acme", "v1", 0)
    held: VisitorState = offline_state("v1")
    for operation in ops:
        change = apply(record, operation)
        if change is None or change.change is None:
            continue
        delta = change.delta()
        if delta is not None:
            frame = PresenceChanged(change=change.change, delta=delta)
        else:
            state = record.state() if record.online else offline_state("v1", change.version)
            frame = PresenceChanged(change=change.change, state=state)
        frame = codec.decode(codec.encode(frame), from_server=True)  # as the agent reads it
        if frame.delta is not None:
            after = apply_delta(held, frame.delta)
            assert after is not None, (held, frame.delta)  # no announced change is ever missed
            held = after
        else:
            assert frame.state is not None
            held = frame.state
        truth = record.state() if record.online else offline_state("v1", record.version)
        assert comparable(held) == comparable(truth)


def test_a_delta_for_another_version_is_not_applied() -> None:
    state: VisitorState = {"visitor": "v1", "online": True, "version": 5, "connections": []}
    delta = {"visitor": "v1", "version": 7, "base": 6, "changed": [], "removed": [], "focused": None}
    assert apply_delta(state, delta) is None  # type: ignore[arg-type]
    assert apply_delta(None, delta) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("both", [False, True], ids=["neither", "both"])
def test_presence_changed_has_a_state_or_a_delta(both: bool) -> None:
    raw: dict[str, Any] = {"type": "presence_changed", "change": "data"}
    if both:
        raw["state"] = offline_state("v1")
        raw["delta"] = {"visitor": "v1", "version": 2, "base": 1, "changed": [], "removed": [], "focused": None}
    with pytest.raises(ProtocolError) as info:
        codec.decode(codec.encode_map(raw), from_server=True)
    assert info.value.code == ErrorCode.INVALID
