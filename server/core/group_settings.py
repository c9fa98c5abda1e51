"""Per-group settings that operators change at run time.

They live in the backend, not in the process, so a change made through one
instance's admin API is what every instance reads next. Unset fields fall
back to the server's configuration.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from herald_presence.protocol.errors import ErrorCode, ProtocolError
from herald_presence.server.backends.base import RecordStore
from herald_presence.server.config import GroupConfig, Settings, check_ice_servers
from herald_presence.server.model.names import group_settings_key, pack, unpack
from herald_presence.server.model.records import GroupSettings

MIN_CODE_LENGTH, MAX_CODE_LENGTH = 4, 12


async def load(records: RecordStore, settings: Settings, group: str) -> GroupSettings:
    stored = await records.kv_get(group_settings_key(group))
    values = unpack(stored) if stored else {}
    return GroupSettings(
        code_length=values.get("code_length", settings.code_length),
        code_ttl=values.get("code_ttl", settings.code_ttl),
        allowed_origins=values.get("allowed_origins", []),
        allow_consumer_codes=values.get("allow_consumer_codes", _configured(settings, group).allow_consumer_codes),
        enforce_expiry=values.get("enforce_expiry", _configured(settings, group).enforce_expiry),
        # Set at run time (null: back to the TOML's), else the TOML's.
        ice_servers=_configured(settings, group).ice_servers
        if values.get("ice_servers") is None
        else values["ice_servers"],
    )


def _configured(settings: Settings, group: str) -> GroupConfig:
    return settings.groups.get(group) or GroupConfig(group, [])


async def consumer_codes_allowed(records: RecordStore, settings: Settings, group: str) -> bool:
    """Whether the group takes short codes from consumer pages (REST create
    and redeem, and the consumer's websocket): its TOML
    ``allow_consumer_codes``, unless the admin API set it at run time."""
    return (await load(records, settings, group)).allow_consumer_codes


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
    for flag in ("allow_consumer_codes", "enforce_expiry"):
        if type(changes.get(flag, False)) is not bool:
            raise ProtocolError(ErrorCode.INVALID, f"{flag} must be true or false")
    if changes.get("ice_servers") is not None:
        try:
            changes = {**changes, "ice_servers": check_ice_servers(changes["ice_servers"])}
        except ValueError as exc:
            raise ProtocolError(ErrorCode.INVALID, str(exc)) from None
    return changes


async def change(records: RecordStore, settings: Settings, group: str, changes: Any) -> GroupSettings:
    """Merge validated ``changes`` into the stored settings, atomically."""
    changes = _validated(changes)

    def merge(stored: bytes | None) -> bytes:
        values = unpack(stored) if stored else {}
        values.update(changes)
        return pack(values)

    await records.kv_update(group_settings_key(group), merge)
    return await load(records, settings, group)
