"""An access log that never writes a capability and cannot be forged.

Short codes travel as ``?appkey=`` and, on the native routes, as a path
segment (``/v1/groups/acme/codes/097317``): a log line must not hand out the
capability it records, so query strings are never written and a route's
``code`` segment is written as ``<code>``. The path is written as it came,
percent-encoded, so a ``%0A`` in it cannot start a forged log line. Tokens
never travel in URLs at all (they are in the first websocket frame or in
JSON bodies), and cookies are never logged.

A websocket upgrade (101) is a DEBUG line, as the rest of a connection's
life is: at INFO a reconnect storm would write a line per client (writing
it was an eighth of a connect's CPU, profiled), and the connections are
counted in ``/metrics`` anyway.
"""

from __future__ import annotations

import logging
from typing import TypeGuard

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .http_common import client_address

REDACTED = ("code",)  # route segments that are capabilities


def _routed(request: web.BaseRequest) -> TypeGuard[web.Request]:
    """Whether the request reached the application. One aiohttp could not
    parse (answered 400 by the server itself) is a ``web.Request`` too, but
    with no route and no app, whose ``match_info`` and ``app`` raise."""
    return isinstance(request, web.Request) and getattr(request, "_match_info", None) is not None


def logged_path(request: web.BaseRequest) -> str:
    """The request's path as it came (still percent-encoded, no query), its
    capability segments replaced."""
    path = request.rel_url.raw_path
    match_info = request.match_info if _routed(request) else None
    for name in REDACTED:
        value = match_info.get(name) if match_info is not None else None
        if value:
            path = path.replace(f"/{value}", f"/<{name}>")
    return path


class AccessLogger(AbstractAccessLogger):
    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        address = client_address(request) if _routed(request) else request.remote
        path = logged_path(request)
        level = logging.DEBUG if response.status == 101 else logging.INFO
        if not self.logger.isEnabledFor(level):
            return
        self.logger.log(
            level,
            '%s "%s %s" %s %.1fms',
            address,
            request.method,
            path,
            response.status,
            time * 1000,
            extra={
                "http": {
                    "remote": address,
                    "method": request.method,
                    "path": path,
                    "status": response.status,
                    "ms": round(time * 1000, 1),
                }
            },
        )
