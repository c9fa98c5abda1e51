"""Herald's Python SDK: a visitor's and an agent's asyncio clients.

Needs only ``aiohttp`` and ``msgpack`` (``pip install herald-presence``);
the server's own dependencies are the ``server`` extra.
"""

from .agent import AgentClient, LoginRefused
from .base import Backoff, ClientClosed, Connected, Disconnected, Event, HeraldClient, Refused, SessionLost
from .visitor import VisitorClient

__all__ = [
    "AgentClient",
    "Backoff",
    "ClientClosed",
    "Connected",
    "Disconnected",
    "Event",
    "HeraldClient",
    "LoginRefused",
    "Refused",
    "SessionLost",
    "VisitorClient",
]
