"""Where client sockets come in: a budget of open connections decided at
accept, and a deadline for requests that never finish.

aiohttp on its own accepts every socket and, while nothing arrives, keeps it
for its ``keepalive_timeout`` (3,630 s by default); the per-address limit of
the websocket upgrade (``connections_per_address``) never sees a socket that
sends no request. So one address could hold thousands of silent or half-sent
sockets until the process ran out of file descriptors and every other client
was refused, with nothing logged. Here, for every accepted socket:

- **It is counted before a byte is read** (``limits.OpenConnections``): at
  most ``max_connections_per_address`` open at once from one client address,
  and ``max_connections`` in all (by default the open-file limit less
  ``RESERVED_FDS``). Over either, the socket is closed at once, unread (the
  client sees its connection closed or reset), the refusal is counted in ``herald_limit_hits_total{limit}``
  and logged: the first at once, then one summary line per ``LOG_EVERY``
  seconds at most, whatever the flood.
- **A request must arrive in time**: its headers within ``request_timeout`` of
  connecting or of the previous answer on the connection (aiohttp's keep-alive
  timer, which closes a connection that sends nothing, or half a request, or
  stays idle between requests), and then a body read by ``read_body`` within
  ``request_timeout`` of its headers (HTTP 408).
- **A trusted proxy is not a client.** Behind a load balancer the TCP peer is
  the balancer: a peer in ``trusted_proxies`` is not counted per address (its
  clients are, by X-Forwarded-For, at the upgrade), only toward
  ``max_connections``; and its idle connections keep aiohttp's long keep-alive
  (``PROXY_KEEPALIVE``), longer than any balancer's idle pool, so that the
  balancer closes them first (a backend that closes first races the
  balancer's reuse of the connection into 502s). Slow clients are the
  balancer's to time out (HAProxy ``timeout http-request``).

Established websockets are untouched: the keep-alive timer acts only while a
connection waits for a request, and a websocket is one long request whose
liveness is its own ping (``keepalive``).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import math
import resource
from collections.abc import Callable
from typing import Any

from aiohttp import web

from herald_presence.server.config import Settings, trusted_networks
from herald_presence.server.model.limits import OpenConnections

from .http_common import SERVER_HEADER

log = logging.getLogger(__name__)

RESERVED_FDS = 256  # kept from max_connections=0 for the rest: Redis, logs, sockets accepted only to be refused
# Connections the kernel queues for accept. A reconnect storm waits here
# rather than in SYN retries (each a second or more): a storm of 5,000 at
# once, 1,000 in flight, took 2.0 s with 1,024 and 3.3-8.2 s with 128 (the
# benchmark, where 128 dropped ~3,000 SYNs). uvloop accepts what is queued
# in one go whatever this is; the kernel caps it at net.core.somaxconn.
BACKLOG = 1024
PROXY_KEEPALIVE = 3630.0  # seconds a trusted proxy's idle connection stays open (aiohttp's default)
LOG_EVERY = 10.0  # seconds between two log lines about refused connections
MAX_LOGGED_ADDRESSES = 1000  # addresses remembered for one summary line; the rest are only counted
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def open_file_limit() -> int:
    """This process's soft limit on open files."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_budget(settings: Settings, file_limit: int | None = None) -> int:
    """Connections one instance may hold open: ``max_connections``, never more
    than the open-file limit leaves after ``RESERVED_FDS``; 0 means all of that."""
    file_limit = open_file_limit() if file_limit is None else file_limit
    room = max(1, file_limit - RESERVED_FDS)
    if settings.max_connections == 0:
        return room
    if settings.max_connections > room:
        log.warning(
            "max_connections %d is more than the open-file limit (%d, less %d kept for the rest) allows:"
            " taking at most %d; raise the limit (ulimit -n, LimitNOFILE) to take more",
            settings.max_connections,
            file_limit,
            RESERVED_FDS,
            room,
        )
        return room
    return settings.max_connections


def counted_address(peername: Any, trusted: tuple[Network, ...]) -> str | None:
    """What an accepted connection counts against: its peer's address, an IPv6
    peer's /64 (one host commonly has a whole /64 to pick addresses from), or
    None for a trusted proxy (not counted per address)."""
    host = peername[0] if isinstance(peername, tuple) and peername else None
    if not isinstance(host, str):
        return "unknown"  # the peer is gone already; the socket closes at once
    if not trusted and ":" not in host:
        return host  # IPv4 with no proxy to look for: the common case, no parsing
    return _classify(host, trusted)


@functools.lru_cache(maxsize=4096)
def _classify(host: str, trusted: tuple[Network, ...]) -> str | None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack socket's IPv4 client
    if any(ip in network for network in trusted):
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        return f"{ipaddress.IPv6Address(int(ip) >> 64 << 64)}/64"
    return str(ip)


class RefusalLog:
    """Refused connections, logged without flooding the log: the first one at
    once, then at most one summary per ``LOG_EVERY`` seconds while they go on."""

    def __init__(self, budget: OpenConnections, file_limit: int) -> None:
        self.budget, self.file_limit = budget, file_limit
        self._by_limit: dict[str, int] = {}
        self._by_address: dict[str, int] = {}
        self._timer: asyncio.TimerHandle | None = None

    def refused(self, limit: str, address: str | None) -> None:
        if self._timer is None:  # the first refusal in a while: say what is going on
            self._timer = asyncio.get_running_loop().call_later(LOG_EVERY, self._summarise)
            if limit == "max_connections":
                log.warning(
                    "refusing new connections: %d open, the most this instance takes (max_connections; open-file"
                    " limit %d); add instances or raise the open-file limit. More refusals are summarised every %gs",
                    self.budget.open,
                    self.file_limit,
                    LOG_EVERY,
                )
            else:
                log.warning(
                    "refusing new connections from %s: it holds %d open (max_connections_per_address)."
                    " More refusals are summarised every %gs",
                    address,
                    self.budget.per_address,
                    LOG_EVERY,
                )
            return
        self._by_limit[limit] = self._by_limit.get(limit, 0) + 1
        if address is not None and (address in self._by_address or len(self._by_address) < MAX_LOGGED_ADDRESSES):
            self._by_address[address] = self._by_address.get(address, 0) + 1

    def _summarise(self) -> None:
        if not self._by_limit:
            self._timer = None  # quiet for a whole period: the next refusal is logged at once
            return
        top = sorted(self._by_address.items(), key=lambda item: -item[1])[:3]
        log.warning(
            "refused %d more connections in the last %gs (%s); most from %s; %d open",
            sum(self._by_limit.values()),
            LOG_EVERY,
            ", ".join(f"{limit}: {n}" for limit, n in sorted(self._by_limit.items())),
            ", ".join(f"{address} ({n})" for address, n in top) or "-",
            self.budget.open,
        )
        self._by_limit.clear()
        self._by_address.clear()
        self._timer = asyncio.get_running_loop().call_later(LOG_EVERY, self._summarise)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class HeraldRunner(web.AppRunner):
    """aiohttp's runner with ``request_timeout`` as its keep-alive timeout; it
    keeps the arguments every connection's request handler is made with (the
    app's own ``handler_args`` are not used: Herald sets none)."""

    def __init__(
        self, app: web.Application, settings: Settings, *, shutdown_timeout: float, **handler_args: Any
    ) -> None:
        # aiohttp rounds every timeout over 5 s up to a whole second: its
        # timers for many connections then fall due on one loop turn a
        # second (with 10,000 idle websockets on aiohttp's heartbeat that
        # turn stalled the loop ~30 ms every second, measured). Never
        # rounded, they stay spread.
        handler_args.setdefault("timeout_ceil_threshold", math.inf)
        super().__init__(
            app, shutdown_timeout=shutdown_timeout, keepalive_timeout=settings.request_timeout, **handler_args
        )
        self.settings = settings
        self.handler_args = handler_args


class _Handler(web.RequestHandler):
    """aiohttp's request handler, which gives its place in the budget back when
    its connection closes, and names the server in the answers it makes itself
    (to a request it cannot parse: the application never sees those)."""

    __slots__ = ("_budget", "_counted_as")

    def handle_error(
        self, request: Any, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        response = super().handle_error(request, status, exc, message)
        response.headers["Server"] = SERVER_HEADER
        return response

    def connection_lost(self, exc: BaseException | None) -> None:
        budget, self._budget = self._budget, None
        if budget is not None:
            budget.release(self._counted_as)
        super().connection_lost(exc)


def hand_over_budget(handler: web.RequestHandler) -> Callable[[], None] | None:
    """A socket that leaves aiohttp (a websocket, web/websocket.py) takes
    its place in the budget with it: what to call once it closes."""
    if not isinstance(handler, _Handler) or handler._budget is None:
        return None  # served by a plain aiohttp runner (tests): nothing counted
    budget, handler._budget = handler._budget, None
    return functools.partial(budget.release, handler._counted_as)


class _Gate(asyncio.Protocol):
    """What the listening socket makes for each accepted connection: it admits
    the connection or closes it, and hands an admitted one to a request handler."""

    __slots__ = ("_site",)

    def __init__(self, site: HeraldSite) -> None:
        self._site = site

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._site.admit(transport)  # type: ignore[arg-type]


class HeraldSite(web.BaseSite):
    """A TCP listener like aiohttp's ``TCPSite``, whose accepted sockets go
    through the connection budget first (module docstring)."""

    __slots__ = ("_budget", "_host", "_port", "_refusals", "_reuse_port", "_trusted")

    def __init__(self, runner: HeraldRunner, host: str, port: int, *, reuse_port: bool = False) -> None:
        super().__init__(runner, backlog=BACKLOG)
        self._host, self._port, self._reuse_port = host, port, reuse_port
        self._trusted = trusted_networks(runner.settings.trusted_proxies)
        self._budget: OpenConnections | None = None
        self._refusals: RefusalLog | None = None

    @property
    def runner(self) -> HeraldRunner:
        assert isinstance(self._runner, HeraldRunner)
        return self._runner

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self.port}"

    @property
    def port(self) -> int:
        """The port listened on (the one the system picked when asked for 0)."""
        sockets = getattr(self._server, "sockets", None)
        return int(sockets[0].getsockname()[1]) if sockets else self._port

    @property
    def budget(self) -> OpenConnections | None:
        return self._budget

    async def start(self) -> None:
        await super().start()
        settings = self.runner.settings
        file_limit = open_file_limit()
        self._budget = OpenConnections(settings.max_connections_per_address, connection_budget(settings, file_limit))
        self._refusals = RefusalLog(self._budget, file_limit)
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Gate(self), self._host, self._port, backlog=BACKLOG, reuse_port=self._reuse_port or None
        )
        log.info(
            "accepting at most %d connections (open-file limit %d), %d per client address; requests within %gs",
            self._budget.total,
            file_limit,
            self._budget.per_address,
            settings.request_timeout,
        )

    async def stop(self) -> None:
        if self._refusals is not None:
            self._refusals.close()
        await super().stop()

    def admit(self, transport: asyncio.Transport) -> None:
        """An accepted socket: refused and closed at once, or handed to a request handler."""
        assert self._budget is not None and self._refusals is not None
        address = counted_address(transport.get_extra_info("peername"), self._trusted)
        refused = self._budget.admit(address)
        if refused is not None:
            transport.abort()
            self._refusals.refused(refused, address)
            return
        runner = self.runner
        try:
            handler = _Handler(
                runner.server,  # type: ignore[arg-type]
                loop=asyncio.get_running_loop(),
                keepalive_timeout=runner.settings.request_timeout if address is not None else PROXY_KEEPALIVE,
                **runner.handler_args,
            )
        except BaseException:
            self._budget.release(address)
            transport.abort()
            raise
        handler._budget, handler._counted_as = self._budget, address
        transport.set_protocol(handler)
        handler.connection_made(transport)
