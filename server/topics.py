"""Bus topic names and the envelopes carried on them.

Topics route a message only to the instances that hold its recipients:

* ``v:{group}:{visitor}`` — one visitor's presence changes and signals, for
  instances with an agent watching that visitor;
* ``g:{group}`` — the same events, for instances with an agent watching the
  whole group;
* ``a:{group}:{agent}`` — signals a visitor addresses to one agent;
* ``k:{group}:{key}`` — a session key's lifecycle, for agents waiting for it;
* ``s:{group}:{session}`` — a session's lifecycle, for agents in it;
* ``i:{instance}`` — an instance's inbox: deliveries to its visitor
  connections and their replies, focus changes, pushes (guest counts).

Groups sit in braces so that a Redis Cluster would keep a group's keys and
topics on one slot. Envelopes are msgpack arrays whose first item names the
kind; the client frame inside is already encoded, so a receiving instance
forwards the same bytes to every local recipient.
"""

from __future__ import annotations

from typing import Any

import msgpack

PRESENCE = "p"  # [kind, group, visitor, version, frame]
EVENT = "s"  # [kind, group, visitor, frame, dedupe key or nil]: a visitor's signal, a session event
DELIVER = "d"  # [kind, key, reply_to, [connection...], frame]
PUSH = "x"  # [kind, [connection...], frame]: to visitor connections, no reply
REPLY = "r"  # [kind, key, delivered]
FOCUS = "f"  # [kind, connection, focused]


def visitor_topic(group: str, visitor: str) -> str:
    return f"v:{{{group}}}:{visitor}"


def group_topic(group: str) -> str:
    return f"g:{{{group}}}"


def agent_topic(group: str, agent: str) -> str:
    return f"a:{{{group}}}:{agent}"


def key_topic(group: str, key: str) -> str:
    return f"k:{{{group}}}:{key}"


def session_topic(group: str, session: str) -> str:
    return f"s:{{{group}}}:{session}"


def inbox_topic(instance: str) -> str:
    return f"i:{instance}"


def pack(*items: Any) -> bytes:
    return msgpack.packb(items, use_bin_type=True)


def unpack(envelope: bytes) -> list[Any]:
    return msgpack.unpackb(envelope, raw=False, use_list=True)
