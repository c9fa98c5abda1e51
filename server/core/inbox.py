"""Messages for one instance: handled at once when it is this instance,
published to its inbox topic otherwise. The kinds (``model.names``) are
dispatched in one table, filled by the hub."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from herald_presence.server.backends.base import Bus
from herald_presence.server.model.names import envelope, inbox_topic


class Inbox:
    def __init__(self, bus: Bus, instance: str) -> None:
        self._bus = bus
        self.instance = instance
        self._handlers: dict[str, Callable[..., None]] = {}

    def on(self, kind: str, handler: Callable[..., None]) -> None:
        self._handlers[kind] = handler

    async def send(self, instance: str, kind: str, *items: Any) -> None:
        if instance == self.instance:
            self._handlers[kind](*items)
        else:
            await self._bus.publish(inbox_topic(instance), envelope(kind, *items))

    def dispatch(self, item: list[Any]) -> None:
        """An envelope (``[kind, ...]``) that arrived on this instance's inbox topic."""
        self._handlers[item[0]](*item[1:])
