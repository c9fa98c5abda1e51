"""Every name in shared state, and the envelopes carried on the bus.

One module, so that a key's or topic's shape is decided in one place and a
Redis Cluster hash tag (the group in braces) cannot be forgotten in another.

Bus topics route a message only to the instances that hold its recipients:

* ``v:{group}:{visitor}`` — one visitor's presence changes and signals, for
  instances with an agent watching that visitor;
* ``g:{group}`` — the same events, for instances with an agent watching the
  whole group;
* ``a:{group}:{agent}`` — signals a visitor addresses to one agent;
* ``k:{group}:{key}`` — a session key's lifecycle, for agents waiting for it;
* ``s:{group}:{session}`` — a session's lifecycle and its members'
  session signals (``SESSION_SIGNAL``), for agents in it;
* ``i:{instance}`` — an instance's inbox: deliveries to its visitor
  connections and their replies, focus changes, pushes (guest counts),
  closes (a consumer whose session ended, a visitor disconnected by its
  group's back end).

An agent's topic also carries ``REVOKE``: every instance holding a
connection of that agent closes it.

Envelopes are msgpack arrays whose first item names the kind; the client
frame inside is already encoded, so a receiving instance forwards the same
bytes to every local recipient.

Records (``RecordStore`` keys) name their group in braces too; ``RedisNames``
is the layout of the Redis backend's own keys and channels under a prefix.
"""

from __future__ import annotations

from typing import Any

import msgpack

# -- envelopes -----------------------------------------------------------------
PRESENCE = "p"  # [kind, group, visitor, version, frame or nil (agents hear nothing), route or nil (offline)]
EVENT = "s"  # [kind, group, visitor, frame, dedupe key or nil]: a visitor's signal, a session event
DELIVER = "d"  # [kind, key, reply_to, answer_by (unix s), [connection...], frame]
PUSH = "x"  # [kind, [connection...], frame]: to visitor connections, no reply
REPLY = "r"  # [kind, key, delivered]
FOCUS = "f"  # [kind, connection, focused]
CLOSE = "c"  # [kind, [connection...], close code, reason]: close visitor connections (a consumer's session ended)
REVOKE = "k"  # [kind, group, agent, not_before (unix s), reason]: on the agent's topic, close older logins
# On a session's topic: a member's session signal for the agents in it (all, or the one connection ``to``),
# the sender's own connection left out; each instance answers a REPLY with the count it reached.
SESSION_SIGNAL = "m"  # [kind, group, session, key, reply_to, answer_by (unix s), to or nil, sender, frame]


def pack(value: Any) -> bytes:
    """The one msgpack encoding of shared state: envelopes and stored records."""
    return msgpack.packb(value, use_bin_type=True)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, use_list=True)


def envelope(*items: Any) -> bytes:
    return pack(items)


# -- bus topics ------------------------------------------------------------------
VISITOR_TOPIC = "v:"  # prefix of visitor topics: agents watching one visitor
EVENT_LOG_TOPIC = "e:"  # prefix of a group's event log: durable, appended to, never a pub/sub channel
AGENT_TOPIC = "a:"  # prefix of agent topics: what is addressed to one agent by name
KEY_TOPIC = "k:"  # prefix of session key topics: agents waiting for a session


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


def event_log_topic(group: str) -> str:
    """The group's event log (webhooks and the audit trail) as a topic of a
    presence announcement: ``PresenceStore.mutate`` appends a message
    announced on it to the log, in the same atomic step as the change,
    instead of publishing it."""
    return f"e:{{{group}}}"


def event_log_group(topic: str) -> str | None:
    """The group of an event-log topic, else None."""
    if topic.startswith(EVENT_LOG_TOPIC) and topic.endswith("}"):
        return topic[3:-1]
    return None


def presence_topic_subject(topic: str) -> tuple[str | None, str | None]:
    """(group, visitor) of a visitor topic, else (None, None)."""
    if topic.startswith(VISITOR_TOPIC):
        group, _, visitor = topic[3:].partition("}:")
        return group, visitor
    return None, None


# -- records ---------------------------------------------------------------------
def session_key(group: str, session: str) -> str:
    return f"{{{group}}}:session:{session}"


def session_by_visitor(group: str, visitor: str) -> str:
    """The visitor's live session (at most one): claimed atomically by each
    start, and a one-click session's key (the visitor's ID) finds it too."""
    return f"{{{group}}}:visitor-session:{visitor}"


def code_key(group: str, code: str) -> str:
    return f"{{{group}}}:code:{code}"


def group_settings_key(group: str) -> str:
    return f"{{{group}}}:settings"


def webhooks_key(group: str) -> str:
    """The group's webhook endpoints set through the admin API."""
    return f"{{{group}}}:webhooks"


def revoked_login_key(login_session: str) -> str:
    return f"agent-session-revoked:{login_session}"


def refused_visitor(group: str, visitor: str) -> str:
    """A visitor its group's back end disconnected and refuses for a while
    (the value: until when, unix s; the record expires then)."""
    return f"{{{group}}}:refused:{visitor}"


def agent_not_before(group: str, agent: str) -> str:
    """The moment (unix s) before which every login of this agent is revoked;
    kept as long as a login cookie lives (``session_max_age``)."""
    return f"{{{group}}}:agent-not-before:{agent}"


def lookups_by_address(address: str) -> str:
    return f"rate:address:{address}"


def lookups_by_group(group: str) -> str:
    return f"{{{group}}}:rate:lookups"


def failed_credentials(kind: str, address: str) -> str:
    """Refused logins (``login``) or admin tokens (``admin``) of one client address."""
    return f"rate:failed-{kind}:{address}"


def lookups_by_agent(group: str, agent: str) -> str:
    """An agent's own short-code budget (``join_session {code}``), like an address's."""
    return f"{{{group}}}:rate:agent:{agent}"


# -- the Redis backend's layout ----------------------------------------------------
class RedisNames:
    """Keys and channels of the Redis backend, all under ``prefix``.

    * ``{group}:v:<visitor>`` hash: the visitor's record;
    * ``{group}:online`` set: visitor IDs with a record;
    * ``{group}:held:<visitor>`` hash: held signals;
    * ``instances`` sorted set: instance ID -> last heartbeat (unix ms);
    * ``{group}:inst:<id>:conns`` set: the (visitor, connection) pairs an
      instance registered in the group, and ``{group}:inst:<id>:away``:
      the group's visitors whose grace periods it runs. In the group's slot,
      so that a presence change writes them in the same step as the
      visitor's hash, even on a Redis Cluster;
    * ``inst:<id>:groups`` set: the groups where an instance has (or had)
      such sets, so that whoever reaps it finds them. Added to before the
      first write in a group's sets, never in the same step;
      ``reap:<id>``: the reaper's lock;
    * every bus topic is the channel ``<prefix>:<topic>``; ``probe:<id>`` is
      an instance's probe of its own subscription (on a Redis Cluster one
      per shard, ``probe:<id>:{<tag>}`` with a tag in a slot of that shard);
    * records are ``<prefix>:<record key>``.

    Every key and channel of one operation shares a slot: the group's hash
    tag, or a single key.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.instances = f"{prefix}:instances"

    def visitor(self, group: str, visitor: str) -> str:
        return f"{self.prefix}:{{{group}}}:v:{visitor}"

    def online(self, group: str) -> str:
        return f"{self.prefix}:{{{group}}}:online"

    def held(self, group: str, visitor: str) -> str:
        return f"{self.prefix}:{{{group}}}:held:{visitor}"

    def instance_connections(self, group: str, instance: str) -> str:
        return f"{self.prefix}:{{{group}}}:inst:{instance}:conns"

    def instance_away(self, group: str, instance: str) -> str:
        return f"{self.prefix}:{{{group}}}:inst:{instance}:away"

    def instance_groups(self, instance: str) -> str:
        return f"{self.prefix}:inst:{instance}:groups"

    def legacy_instance_sets(self, instance: str) -> tuple[str, str]:
        """An instance's (conns, away) sets before they were per group (a
        rolling upgrade may leave a dead old instance's behind, standalone
        Redis only): members (group, visitor, connection) and (group, visitor)."""
        return f"{self.prefix}:inst:{instance}:conns", f"{self.prefix}:inst:{instance}:away"

    def reap_lock(self, instance: str) -> str:
        return f"{self.prefix}:reap:{instance}"

    def record(self, key: str) -> str:
        return f"{self.prefix}:{key}"

    def events(self, group: str) -> str:
        return f"{self.prefix}:{{{group}}}:events"

    def session_events(self, group: str, session: str) -> str:
        return f"{self.prefix}:{{{group}}}:events:session:{session}"

    def pending_terms(self, group: str, visitor: str) -> str:
        return f"{self.prefix}:{{{group}}}:events:terms:{visitor}"

    def terms_asker(self, group: str, visitor: str) -> str:
        return f"{self.prefix}:{{{group}}}:events:asker:{visitor}"

    def event_timers(self, group: str) -> str:
        return f"{self.prefix}:{{{group}}}:events:timers"

    def event_timer_data(self, group: str) -> str:
        return f"{self.prefix}:{{{group}}}:events:timer-data"

    def dead_letters(self, group: str) -> str:
        return f"{self.prefix}:{{{group}}}:webhooks:dead"

    def channel(self, topic: str) -> bytes:
        return f"{self.prefix}:{topic}".encode()

    def topic(self, channel: bytes) -> str:
        return channel[len(self.prefix) + 1 :].decode()

    def probe(self, instance: str, tag: str | None = None) -> bytes:
        """An instance's probe channel; with ``tag``, the one in that hash tag's slot (a shard's)."""
        return self.channel(f"probe:{instance}" if tag is None else f"probe:{instance}:{{{tag}}}")
