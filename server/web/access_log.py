"""An access log that never writes query strings.

Short codes travel as ``?appkey=``: a log line must not hand out the
capability it records. Tokens never travel in URLs at all (they are in the
first websocket frame or in JSON bodies), and cookies are never logged.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .http_common import client_address


class AccessLogger(AbstractAccessLogger):
    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        address = client_address(request) if isinstance(request, web.Request) else request.remote
        self.logger.info(
            '%s "%s %s" %s %.1fms',
            address,
            request.method,
            request.path,  # no query string
            response.status,
            time * 1000,
            extra={
                "http": {
                    "remote": address,
                    "method": request.method,
                    "path": request.path,
                    "status": response.status,
                    "ms": round(time * 1000, 1),
                }
            },
        )
