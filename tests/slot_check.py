"""Every Redis operation of the tests' own process touches one slot.

A Redis Cluster refuses a multi-key command, a transaction or a script whose
keys are in several slots (CROSSSLOT), but only when they land on the
cluster: on one redis-server the same code works. So the whole suite runs
with this check (``tests/conftest.py``, autouse): every command redis-py
packs, on any connection, is looked at, and what would be refused is
recorded and fails the test that sent it, on a standalone Redis too:

* a command with several keys (``DEL``, ``EXISTS``, ``WATCH``, ``SINTER`` …),
* the keys a script declares (``EVAL``/``EVALSHA``; ``#!lua`` makes the
  cluster itself refuse an undeclared key of another slot inside it),
* a transaction: the keys ``WATCH``ed on the connection and those of every
  command between ``MULTI`` and ``EXEC``.

Herald's servers in other processes (the fault tests) run on the real
cluster, which checks them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot

# Commands without keys, or whose arguments are not keys (pub/sub channels
# outside a cluster, connection set-up, introspection).
NO_KEYS = {
    "PUBLISH", "SUBSCRIBE", "UNSUBSCRIBE", "PSUBSCRIBE", "PUNSUBSCRIBE", "PING", "ECHO", "CLIENT", "INFO", "HELLO",
    "AUTH", "SELECT", "CLUSTER", "COMMAND", "READONLY", "READWRITE", "ASKING", "SCRIPT", "TIME", "ROLE", "CONFIG",
    "ACL", "DBSIZE", "FLUSHALL", "FLUSHDB", "MULTI", "EXEC", "DISCARD", "UNWATCH", "QUIT", "RESET", "DEBUG",
    "MEMORY", "SLOWLOG", "LATENCY", "WAIT", "KEYS", "SCAN", "RANDOMKEY", "SHUTDOWN", "SAVE", "BGSAVE", "MONITOR",
    "LASTSAVE", "SWAPDB", "FUNCTION", "FCALL", "FCALL_RO", "OBJECT",
}  # fmt: skip
# Commands all of whose arguments are keys.
ALL_KEYS = {
    "DEL", "UNLINK", "EXISTS", "TOUCH", "MGET", "WATCH", "SINTER", "SUNION", "SDIFF", "PFCOUNT", "SSUBSCRIBE",
    "SUNSUBSCRIBE",
}  # fmt: skip
# Commands whose first two arguments are keys.
TWO_KEYS = {"RENAME", "RENAMENX", "SMOVE", "LMOVE", "RPOPLPUSH", "COPY", "SINTERSTORE", "SUNIONSTORE", "SDIFFSTORE"}

violations: list[str] = []
_state: dict[int, tuple[set[int], list[Any] | None]] = {}  # id(connection) -> (watched slots, MULTI's keys)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def keys_of(args: tuple[Any, ...]) -> list[Any]:
    """The keys of one command, as the cluster hashes them."""
    words = _text(args[0]).upper().split()
    name, rest = words[0], [*words[1:], *args[1:]]
    if name in NO_KEYS or not rest:
        return []
    if name in ("EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO"):
        return list(rest[2 : 2 + int(rest[1])])
    if name in ALL_KEYS:
        return list(rest)
    if name in TWO_KEYS:
        return list(rest[:2])
    return [rest[0]]


def slot(key: Any) -> int:
    return int(key_slot(key if isinstance(key, bytes) else str(key).encode()))


def _check(connection: AbstractConnection, args: tuple[Any, ...]) -> None:
    name = _text(args[0]).upper().split()[0]
    watched, multi = _state.get(id(connection), (set(), None))
    keys = keys_of(args)
    if len({slot(k) for k in keys}) > 1:
        violations.append(f"{name} over several slots: {[_text(k) for k in keys]}")
    if name == "WATCH":
        watched = watched | {slot(k) for k in keys}
    elif name == "MULTI":
        multi = []
    elif name in ("EXEC", "DISCARD"):
        slots = watched | {slot(k) for k in multi or []}
        if name == "EXEC" and len(slots) > 1:
            violations.append(f"a transaction over several slots: watched and {[_text(k) for k in multi or []]}")
        watched, multi = set(), None
    elif name == "UNWATCH":
        watched = set()
    elif multi is not None:
        multi.extend(keys)
    if watched or multi is not None:
        _state[id(connection)] = (watched, multi)
    else:
        _state.pop(id(connection), None)


def installed() -> Iterator[None]:
    """Check every command packed while this runs (a generator for a fixture)."""
    original = AbstractConnection.pack_command

    def pack_command(self: AbstractConnection, *args: Any) -> Any:
        try:
            _check(self, args)
        except Exception as exc:  # a command the table above does not know the shape of
            violations.append(f"could not check {args[:3]!r}: {exc!r}")
        return original(self, *args)

    AbstractConnection.pack_command = pack_command  # type: ignore[method-assign]
    try:
        yield
    finally:
        AbstractConnection.pack_command = original  # type: ignore[method-assign]


def take() -> list[str]:
    """The violations recorded so far, forgotten."""
    found = list(violations)
    violations.clear()
    return found
