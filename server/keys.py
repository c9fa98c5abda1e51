"""Typed keys for what the application holds."""

from __future__ import annotations

from aiohttp import web

from .config import Settings
from .hub import Hub

SETTINGS = web.AppKey("settings", Settings)
HUB = web.AppKey("hub", Hub)
