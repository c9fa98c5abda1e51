"""The event log of the Redis backend: one Redis Stream per group.

``{group}:events`` holds the group's events (the field ``e``, msgpack; ``a``,
the agent the log found had asked for the terms). Every write is a Lua
script on keys of the group's hash tag (one slot of a Redis Cluster), run
through the backend's command batcher, so the hot path's appends (a
visitor's terms answer) share its one write per batch:

* a presence change's event is an ``XADD`` in the change's own script
  (``append_commands``, in ``RedisBackend.mutate``): stored, announced and
  logged in one step, or none of them;
* the events of a record's change (a session started, joined, left or
  ended, a code made or used, with the timers of its end and its code's
  expiry) and of a visitor's terms answer (with its publish) are the
  change's ``LogWrite``, written by the change's own script
  (``LOG_WRITE``, arguments from ``write_args``, in ``RedisBackend``);
* other events (``append``) are one script: the ``XADD`` (trimmed by
  ``MINID`` to the group's retention on the way), the session's index, the
  visitor's pending terms and who asked it, together (``LOG_LIB``, which
  the change scripts share);
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
    terms_roles,
)
from herald_presence.server.model.names import RedisNames, pack, unpack

from .base import BackendUnavailable, Event, EventLog, LogWrite

CONSUMER_GROUP = "webhooks"
MAX_DEAD_LETTERS = 1000
TIMER_LEASE = 30.0  # seconds a fired timer is an instance's to append before another may fire it
FIRE_AT_ONCE = 100
STALE_CONSUMER_MS = 24 * 3600 * 1000  # a consumer with nothing pending and idle this long is forgotten


class Runner(Protocol):
    """The backend's command batcher (one Redis, or per cluster master)."""

    async def call(self, command: str, *args: Any) -> Any: ...

    async def script(self, script: str, keys: int, *args: Any) -> Any: ...


# The log's writes as Lua functions, for its own scripts and for those of a
# change that logs in its own step (a record's write, a publish: ``LOG_WRITE``).
# ``P``: the group's parameters {MINID, list ttl ms, terms window ms, most
# pending terms, most events per session}.
#
# append_event: the XADD and the indexes. flags: f fill the agent from the
# asker, a the event's agent asks, t the pending terms join the session's
# list, s list it under the session, p add it to the pending terms.
LOG_LIB = """
local function append_event(stream, list, pending, asker, event, flags, agent, P)
  local function has(flag) return string.find(flags, flag, 1, true) ~= nil end
  local asked = false
  if has('f') then asked = redis.call('GET', asker) end
  if has('a') then redis.call('SET', asker, agent, 'PX', P[3]) end
  local id
  if asked then
    id = redis.call('XADD', stream, 'MINID', '~', P[1], '*', 'e', event, 'a', asked)
  else
    id = redis.call('XADD', stream, 'MINID', '~', P[1], '*', 'e', event)
  end
  redis.call('PEXPIRE', stream, P[2])
  if has('t') then
    local waiting = redis.call('LRANGE', pending, 0, -1)
    if #waiting > 0 then redis.call('RPUSH', list, unpack(waiting)) end
    redis.call('DEL', pending)
  end
  if has('s') then
    redis.call('RPUSH', list, id)
    redis.call('LTRIM', list, -tonumber(P[5]), -1)
    redis.call('PEXPIRE', list, P[2])
  end
  if has('p') then
    redis.call('RPUSH', pending, id)
    redis.call('LTRIM', pending, -tonumber(P[4]), -1)
    redis.call('PEXPIRE', pending, P[3])
  end
  return id
end

local function schedule_timer(timers, data, key, due, event, lasts)
  redis.call('ZADD', timers, due, key)
  redis.call('HSET', data, key, event)
  for _, name in ipairs({timers, data}) do
    redis.call('PEXPIRE', name, lasts, 'NX')
    redis.call('PEXPIRE', name, lasts, 'GT')
  end
end

local function cancel_timer(timers, data, key)
  redis.call('HDEL', data, key)
  return redis.call('ZREM', timers, key)
end
"""

# A change's LogWrite (base.py), from KEYS[k] and ARGV[a] on (``RedisEventLog.write_args``).
# KEYS: stream, timers, their events, then a session's list, pending terms and asker per event
# claimed or appended. ARGV: P (5 values), then each part as its count and its items: timers
# cancelled (key), claims (timer, event, flags, agent), appends (event, flags, agent), timers
# set (key, due ms, event, lasts ms). Answers which claims found their timer (1 or 0 each).
LOG_WRITE = """
local function write_log(k, a)
  local P = {ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]}
  local stream, timers, data, e, i = KEYS[k], KEYS[k + 1], KEYS[k + 2], k + 3, a + 6
  for _ = 1, tonumber(ARGV[a + 5]) do
    cancel_timer(timers, data, ARGV[i])
    i = i + 1
  end
  local claimed = {}
  local count = tonumber(ARGV[i])
  i = i + 1
  for c = 1, count do
    claimed[c] = cancel_timer(timers, data, ARGV[i])
    if claimed[c] == 1 then
      append_event(stream, KEYS[e], KEYS[e + 1], KEYS[e + 2], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], P)
    end
    e, i = e + 3, i + 4
  end
  count = tonumber(ARGV[i])
  i = i + 1
  for _ = 1, count do
    append_event(stream, KEYS[e], KEYS[e + 1], KEYS[e + 2], ARGV[i], ARGV[i + 1], ARGV[i + 2], P)
    e, i = e + 3, i + 3
  end
  count = tonumber(ARGV[i])
  i = i + 1
  for _ = 1, count do
    schedule_timer(timers, data, ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3])
    i = i + 4
  end
  return claimed
end
"""

# KEYS: stream, session's list, visitor's pending terms, visitor's asker.
# ARGV: event, flags, agent, then P.
APPEND_SCRIPT = (
    "#!lua\n"
    + LOG_LIB
    + """
return append_event(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3], {unpack(ARGV, 4, 8)})
"""
)

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

# KEYS: timers, their events. ARGV: key, due (ms), event, lasts (ms).
SCHEDULE_SCRIPT = (
    "#!lua\n"
    + LOG_LIB
    + """
schedule_timer(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
return 1
"""
)

CANCEL_SCRIPT = "#!lua\n" + LOG_LIB + "\nreturn cancel_timer(KEYS[1], KEYS[2], ARGV[1])\n"

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


def _timer_lasts(due: float) -> int:
    """Milliseconds the timers' keys live: past their last due time and its lease."""
    return int((max(0.0, due - time.time()) + TIMER_LEASE * 2) * 1000)


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

    def _parameters(self, group: str) -> list[Any]:
        """``P`` of the log's Lua functions (``LOG_LIB``)."""
        return [
            self._minid(group),
            self._ttl_ms(group),
            int(TERMS_WINDOW * 1000),
            MAX_PENDING_TERMS,
            MAX_SESSION_EVENTS,
        ]

    def _indexing(self, group: str, event: Event, asks: bool, answer: bool) -> tuple[list[str], list[Any]]:
        """An append's keys (its session's list, its visitor's pending terms
        and asker) and arguments (the event, its flags, its agent)."""
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
            names.session_events(group, session or ""),
            names.pending_terms(group, visitor),
            names.terms_asker(group, visitor),
        ]
        return keys, [pack(event), flags, event.get("agent") or ""]

    async def append(self, group: str, event: Event, *, asks: bool = False, answer: bool = False) -> str:
        keys, args = self._indexing(group, event, asks, answer)
        event_id = await self._script(APPEND_SCRIPT, [self.names.events(group), *keys], *args, *self._parameters(group))
        return _text(event_id)

    def write_args(self, write: LogWrite) -> tuple[list[str], list[Any]]:
        """The KEYS and ARGV of ``LOG_WRITE``'s ``write_log`` for a change's
        ``write``, to follow the change's own in its script."""
        group = write.group
        keys = [self.names.events(group), *self._timer_keys(group)]
        args: list[Any] = [*self._parameters(group), len(write.cancel), *write.cancel, len(write.claim)]
        for timer, event in write.claim:
            indexing, indexed = self._indexing(group, event, *terms_roles(event["type"]))
            keys += indexing
            args += [timer, *indexed]
        args.append(len(write.append))
        for event in write.append:
            indexing, indexed = self._indexing(group, event, *terms_roles(event["type"]))
            keys += indexing
            args += indexed
        args.append(len(write.schedule))
        for timer, due, event in write.schedule:
            args += [timer, int(due * 1000), pack(event), _timer_lasts(due)]
        return keys, args

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
        due_ms, lasts = int(due * 1000), _timer_lasts(due)
        await self._script(SCHEDULE_SCRIPT, self._timer_keys(group), key, due_ms, pack(event), lasts)

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
