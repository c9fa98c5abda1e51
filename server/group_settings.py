"""Per-group settings that operators change at run time.

They live in the backend, not in the process, so a change made through one
instance's admin API is what every instance reads next. Unset fields fall
back to the server's configuration.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import msgpack

from protocol.errors import ErrorCode, ProtocolError

from .backend import Backend
from .config import Settings

MIN_CODE_LENGTH, MAX_CODE_LENGTH = 4, 12


@dataclass(slots=True)
class GroupSettings:
    code_length: int  # digits in a short code (Live Assist's "Short CID Length")
    code_ttl: float  # seconds an unclaimed short code lives
    allowed_origins: list[str] = field(default_factory=list)  # added to the configured ones

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _key(group: str) -> str:
    return f"{{{group}}}:settings"


async def load(backend: Backend, settings: Settings, group: str) -> GroupSettings:
    stored = await backend.kv_get(_key(group))
    values = msgpack.unpackb(stored, raw=False) if stored else {}
    return GroupSettings(
        code_length=values.get("code_length", settings.code_length),
        code_ttl=values.get("code_ttl", settings.code_ttl),
        allowed_origins=values.get("allowed_origins", []),
    )


def _validated(changes: Any) -> dict[str, Any]:
    if not isinstance(changes, dict) or not changes:
        raise ProtocolError(ErrorCode.INVALID, "expected a JSON object of settings to change")
    unknown = set(changes) - {f.name for f in dataclasses.fields(GroupSettings)}
    if unknown:
        raise ProtocolError(ErrorCode.INVALID, f"unknown settings: {', '.join(sorted(unknown))}")
    length = changes.get("code_length", MIN_CODE_LENGTH)
    if type(length) is not int or not MIN_CODE_LENGTH <= length <= MAX_CODE_LENGTH:
        raise ProtocolError(ErrorCode.INVALID, f"code_length must be {MIN_CODE_LENGTH}-{MAX_CODE_LENGTH}")
    ttl = changes.get("code_ttl", 60)
    if type(ttl) not in (int, float) or not 10 <= ttl <= 86400:
        raise ProtocolError(ErrorCode.INVALID, "code_ttl must be 10-86400 seconds")
    origins = changes.get("allowed_origins", [])
    if not isinstance(origins, list) or not all(isinstance(o, str) and o for o in origins) or len(origins) > 100:
        raise ProtocolError(ErrorCode.INVALID, "allowed_origins must be a list of origins")
    return changes


async def change(backend: Backend, settings: Settings, group: str, changes: Any) -> GroupSettings:
    """Merge validated ``changes`` into the stored settings, atomically."""
    changes = _validated(changes)

    def merge(stored: bytes | None) -> bytes:
        values = msgpack.unpackb(stored, raw=False) if stored else {}
        values.update(changes)
        return msgpack.packb(values)

    await backend.kv_update(_key(group), merge)
    return await load(backend, settings, group)
