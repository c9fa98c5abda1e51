"""The event log of the Redis backend: one Redis Stream per group.

``{group}:events`` holds the group's events (the field ``e``, msgpack; ``a``,
the agent the log found had asked for the terms). Every write is a Lua
script on keys of the group's hash tag (one slot of a Redis Cluster), run
through the backend's command batcher, so the hot path's appends (a
visitor's terms answer) share its one write per batch:

* a presence change's event is an ``XADD`` in the change's own script
  (``append_command``, in ``RedisBackend.mutate``): stored, announced and
  logged in one step, or none of them;
* other events (``append``) are one script: the ``XADD`` (trimmed by
  ``MINID`` to the group's retention on the way), the session's index, the
  visitor's pending terms and who asked it, together;
* every key has a TTL: the log and a session's index the retention (from
  the last append), pending terms and who asked ``TERMS_WINDOW``, timers
  their last due time and the dead letters the retention, so a group that
  goes quiet leaves nothing behind;
* delivery is the stream's consumer group ``webhooks``: ``XREADGROUP`` for
  new events, ``XCLAIM`` to renew what an instance works on, ``XAUTOCLAIM``
  for the events of an instance that stopped renewing them (it died),
  ``XACK`` when every endpoint had them;
* timers (a short code's expiry) are a sorted set by due time and a hash of
  their events; a due timer is leased to the instance that fires it (its
  due time moved a lease ahead), appended, then removed, so an instance
  dying in between leaves it to fire again elsewhere: at least once.

Names are ``model.names.RedisNames``'.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from herald_presence.server.model.events import (
    MAX_PENDING_TERMS,
    MAX_SESSION_EVENTS,
    TERMS_WINDOW,
    index_plan,
    parse_id,
)
from herald_presence.server.model.names import RedisNames, pack, unpack

from .base import BackendUnavailable, Event, EventLog

CONSUMER_GROUP = "webhooks"
MAX_DEAD_LETTERS = 1000
TIMER_LEASE = 30.0  # seconds a fired timer is an instance's to append before another may fire it
FIRE_AT_ONCE = 100
STALE_CONSUMER_MS = 24 * 3600 * 1000  # a consumer with nothing pending and idle this long is forgotten


class Runner(Protocol):
    """The backend's command batcher (one Redis, or per cluster master)."""

    async def call(self, command: str, *args: Any) -> Any: ...

    async def script(self, script: str, keys: int, *args: Any) -> Any: ...


# KEYS: stream, session's list, visitor's pending terms, visitor's asker.
# ARGV: event, MINID, flags (f: fill the agent from the asker, a: the event's
# agent asks, t: the pending terms join the session's list, s: list it under
# the session, p: add it to the pending terms), agent, window ms, list ttl ms,
# most pending terms, most events per session.
APPEND_SCRIPT = """#!lua
local flags = ARGV[3]
local function has(flag) return string.find(flags, flag, 1, true) ~= nil end
local asker = false
if has('f') then asker = redis.call('GET', KEYS[4]) end
if has('a') then redis.call('SET', KEYS[4], ARGV[4], 'PX', ARGV[5]) end
local id
if asker then
  id = redis.call('XADD', KEYS[1], 'MINID', '~', ARGV[2], '*', 'e', ARGV[1], 'a', asker)
else
  id = redis.call('XADD', KEYS[1], 'MINID', '~', ARGV[2], '*', 'e', ARGV[1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[6])
if has('t') then
  local pending = redis.call('LRANGE', KEYS[3], 0, -1)
  if #pending > 0 then redis.call('RPUSH', KEYS[2], unpack(pending)) end
  redis.call('DEL', KEYS[3])
end
if has('s') then
  redis.call('RPUSH', KEYS[2], id)
  redis.call('LTRIM', KEYS[2], -tonumber(ARGV[8]), -1)
  redis.call('PEXPIRE', KEYS[2], ARGV[6])
end
if has('p') then
  redis.call('RPUSH', KEYS[3], id)
  redis.call('LTRIM', KEYS[3], -tonumber(ARGV[7]), -1)
  redis.call('PEXPIRE', KEYS[3], ARGV[5])
end
return id
"""

READ_SCRIPT = """#!lua
return redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])
"""

SESSION_SCRIPT = """#!lua
local found = {}
for _, id in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  local entry = redis.call('XRANGE', KEYS[1], id, id)
  if #entry > 0 then found[#found + 1] = entry[1] end
end
return found
"""

# The consumer group is made on first use, from the oldest event kept (a group without a log yet: nothing to take).
TAKE_SCRIPT = """#!lua
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
local function take()
  return redis.pcall('XREADGROUP', 'GROUP', 'webhooks', ARGV[1], 'COUNT', ARGV[2], 'STREAMS', KEYS[1], '>')
end
local taken = take()
if type(taken) == 'table' and taken.err then
  if not string.find(taken.err, 'NOGROUP', 1, true) then return taken end
  redis.call('XGROUP', 'CREATE', KEYS[1], 'webhooks', '0')
  taken = take()
end
if not taken then return {} end
return taken[1][2]
"""

SKIP_SCRIPT = """#!lua
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local moved = redis.pcall('XGROUP', 'SETID', KEYS[1], 'webhooks', '$')
if type(moved) == 'table' and moved.err then
  if not string.find(moved.err, 'NOGROUP', 1, true) then return moved end
  redis.call('XGROUP', 'CREATE', KEYS[1], 'webhooks', '$')
end
return 1
"""

RECLAIM_SCRIPT = """#!lua
local claimed = redis.pcall('XAUTOCLAIM', KEYS[1], 'webhooks', ARGV[1], ARGV[2], ARGV[3], 'COUNT', ARGV[4])
if type(claimed) == 'table' and claimed.err then
  if string.find(claimed.err, 'NOGROUP', 1, true) then return {'0-0', {}} end
  return claimed
end
return {claimed[1], claimed[2]}
"""

KEEP_SCRIPT = """#!lua
local kept = redis.pcall('XCLAIM', KEYS[1], 'webhooks', ARGV[1], 0, unpack(ARGV, 2))
if type(kept) == 'table' and kept.err and not string.find(kept.err, 'NOGROUP', 1, true) then return kept end
return 0
"""

ACK_SCRIPT = """#!lua
local acked = redis.pcall('XACK', KEYS[1], 'webhooks', unpack(ARGV))
if type(acked) == 'table' and acked.err and not string.find(acked.err, 'NOGROUP', 1, true) then return acked end
return 0
"""

# KEYS: timers, their events. ARGV: key, due (ms), event.
SCHEDULE_SCRIPT = """#!lua
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
for i = 1, 2 do
  redis.call('PEXPIRE', KEYS[i], ARGV[4], 'NX')
  redis.call('PEXPIRE', KEYS[i], ARGV[4], 'GT')
end
return 1
"""

CANCEL_SCRIPT = """#!lua
redis.call('HDEL', KEYS[2], ARGV[1])
return redis.call('ZREM', KEYS[1], ARGV[1])
"""

# Lease the due timers to the caller: {key, due (ms), event} each.
LEASE_SCRIPT = """#!lua
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[3]))
local leased = {}
for i = 1, #due, 2 do
  local event = redis.call('HGET', KEYS[2], due[i])
  if event then
    redis.call('ZADD', KEYS[1], ARGV[2], due[i])
    leased[#leased + 1] = {due[i], ARGV[2], event}
  else
    redis.call('ZREM', KEYS[1], due[i])
  end
end
return leased
"""

# Remove a fired timer, unless it was scheduled again meanwhile (its due time is no longer the lease's).
FIRED_SCRIPT = """#!lua
if redis.call('ZSCORE', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
end
return 1
"""

DEAD_LETTER_SCRIPT = """#!lua
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'r', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return id
"""

DEAD_LETTERS_SCRIPT = """#!lua
return redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', ARGV[1])
"""

# Retention (exactly: appends trim roughly, by whole nodes of the stream) and length now;
# consumers long gone with nothing pending are forgotten.
TRIM_SCRIPT = """#!lua
redis.call('XTRIM', KEYS[1], 'MINID', ARGV[1])
redis.call('XTRIM', KEYS[1], 'MAXLEN', '~', ARGV[2])
local consumers = redis.pcall('XINFO', 'CONSUMERS', KEYS[1], 'webhooks')
if type(consumers) == 'table' and not consumers.err then
  for _, consumer in ipairs(consumers) do
    local fields = {}
    for i = 1, #consumer, 2 do fields[consumer[i]] = consumer[i + 1] end
    if fields['pending'] == 0 and fields['idle'] > tonumber(ARGV[3]) then
      redis.call('XGROUP', 'DELCONSUMER', KEYS[1], 'webhooks', fields['name'])
    end
  end
end
return 1
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entry(raw: Any) -> tuple[str, Event] | None:
    """``[id, [field, value, ...]]`` as (id, event); None for an entry the log no longer holds."""
    event_id, fields = raw[0], raw[1]
    if not fields:
        return None
    values = dict(zip(fields[::2], fields[1::2], strict=True))
    event = unpack(values[b"e"])
    asker = values.get(b"a")
    if asker and event.get("agent") is None:
        event["agent"] = asker.decode()
    return _text(event_id), event


def _entries(raw: Any) -> list[tuple[str, Event]]:
    return [entry for entry in map(_entry, raw or []) if entry is not None]


class RedisEventLog(EventLog):
    def __init__(self, runner: Runner, names: RedisNames) -> None:
        self._run = runner
        self.names = names
        self._reclaim_from: dict[str, str] = {}  # group -> where XAUTOCLAIM goes on next

    def _minid(self, group: str) -> bytes:
        return b"%d" % int((time.time() - self.retention(group)) * 1000)

    def _ttl_ms(self, group: str) -> int:
        return int(self.retention(group) * 1000)

    def append_commands(self, group: str, message: bytes) -> list[tuple[Any, ...]]:
        """The ``XADD`` of a presence change's event (``message``: the packed
        event) and the log's TTL, to run in the change's own script, each as
        (name, key, arguments...)."""
        key = self.names.events(group)
        return [
            ("XADD", key, "MINID", "~", self._minid(group), "*", "e", message),
            ("PEXPIRE", key, self._ttl_ms(group)),
        ]

    async def _script(self, script: str, keys: list[str], *args: Any) -> Any:
        try:
            return await self._run.script(script, len(keys), *keys, *args)
        except BackendUnavailable:
            raise
        except Exception as exc:  # a refusal (out of memory, a replica): not done
            raise BackendUnavailable() from exc

    async def append(self, group: str, event: Event, *, asks: bool = False, answer: bool = False) -> str:
        session, takes, pends = index_plan(event)
        visitor = event.get("visitor") or ""
        flags = "".join(
            flag
            for flag, on in (
                ("f", answer and event.get("agent") is None and visitor),
                ("a", asks and event.get("agent") is not None and visitor),
                ("t", takes),
                ("s", session is not None),
                ("p", pends),
            )
            if on
        )
        names = self.names
        keys = [
            names.events(group),
            names.session_events(group, session or ""),
            names.pending_terms(group, visitor),
            names.terms_asker(group, visitor),
        ]
        window_ms, list_ms = int(TERMS_WINDOW * 1000), self._ttl_ms(group)
        args = (pack(event), self._minid(group), flags, event.get("agent") or "", window_ms, list_ms)
        event_id = await self._script(APPEND_SCRIPT, keys, *args, MAX_PENDING_TERMS, MAX_SESSION_EVENTS)
        return _text(event_id)

    def _kept(self, group: str, entries: list[tuple[str, Event]]) -> list[tuple[str, Event]]:
        """Those within the retention: appends trim the stream roughly (by whole nodes)."""
        oldest = int(self._minid(group))
        return [(event_id, event) for event_id, event in entries if int(event_id.partition("-")[0]) >= oldest]

    async def read(self, group: str, after: str | None, count: int) -> list[tuple[str, Event]]:
        oldest = int(self._minid(group))
        key = parse_id(after) if after else None
        start = f"({after}" if key is not None and key >= (oldest, 0) else str(oldest)
        return self._kept(group, _entries(await self._script(READ_SCRIPT, [self.names.events(group)], start, count)))

    async def session_events(self, group: str, session: str) -> list[tuple[str, Event]]:
        keys = [self.names.events(group), self.names.session_events(group, session)]
        return self._kept(group, _entries(await self._script(SESSION_SCRIPT, keys)))

    async def take(self, group: str, consumer: str, count: int) -> list[tuple[str, Event]]:
        taken = await self._script(TAKE_SCRIPT, [self.names.events(group)], consumer, count)
        return await self._delivered(group, taken)

    async def _delivered(self, group: str, raw: Any) -> list[tuple[str, Event]]:
        """Entries a consumer got; those the log let go meanwhile are acknowledged."""
        gone = [_text(item[0]) for item in raw or [] if not item[1]]
        if gone:
            await self.ack(group, gone)
        return _entries(raw)

    async def skip(self, group: str) -> None:
        await self._script(SKIP_SCRIPT, [self.names.events(group)])

    async def reclaim(self, group: str, consumer: str, idle: float, count: int) -> list[tuple[str, Event]]:
        start = self._reclaim_from.get(group, "0-0")
        keys = [self.names.events(group)]
        answer = await self._script(RECLAIM_SCRIPT, keys, consumer, int(idle * 1000), start, count)
        self._reclaim_from[group] = _text(answer[0])  # "0-0": the whole table was seen, from the top next time
        return await self._delivered(group, answer[1])

    async def keep(self, group: str, consumer: str, ids: list[str]) -> None:
        if ids:
            await self._script(KEEP_SCRIPT, [self.names.events(group)], consumer, *ids, "JUSTID")

    async def ack(self, group: str, ids: list[str]) -> None:
        if ids:
            await self._script(ACK_SCRIPT, [self.names.events(group)], *ids)

    def _timer_keys(self, group: str) -> list[str]:
        return [self.names.event_timers(group), self.names.event_timer_data(group)]

    async def schedule(self, group: str, key: str, due: float, event: Event) -> None:
        lasts = int((max(0.0, due - time.time()) + TIMER_LEASE * 2) * 1000)  # the timers outlive their last one
        await self._script(SCHEDULE_SCRIPT, self._timer_keys(group), key, int(due * 1000), pack(event), lasts)

    async def cancel(self, group: str, key: str) -> bool:
        return bool(await self._script(CANCEL_SCRIPT, self._timer_keys(group), key))

    async def fire_due(self, group: str) -> int:
        now = time.time()
        lease = int((now + TIMER_LEASE) * 1000)
        leased = await self._script(LEASE_SCRIPT, self._timer_keys(group), int(now * 1000), lease, FIRE_AT_ONCE)
        for key, due, event in leased:
            await self.append(group, unpack(event))
            await self._script(FIRED_SCRIPT, self._timer_keys(group), key, due)
        return len(leased)

    async def dead_letter(self, group: str, record: Event) -> None:
        keys = [self.names.dead_letters(group)]
        await self._script(DEAD_LETTER_SCRIPT, keys, pack(record), MAX_DEAD_LETTERS, self._ttl_ms(group))

    async def dead_letters(self, group: str, count: int) -> list[Event]:
        raw = await self._script(DEAD_LETTERS_SCRIPT, [self.names.dead_letters(group)], count)
        return [unpack(dict(zip(fields[::2], fields[1::2], strict=True))[b"r"]) for _id, fields in raw]

    async def trim(self, group: str) -> None:
        await self._script(TRIM_SCRIPT, [self.names.events(group)], self._minid(group), self.max_len, STALE_CONSUMER_MS)
