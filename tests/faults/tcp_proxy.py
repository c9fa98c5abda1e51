"""A loopback TCP proxy the tests own, that can be cut like a network partition.

``cut()`` makes the link a black hole in both directions without closing a
socket: the proxy stops reading (what it had already read waits), nothing
is forwarded, no FIN and no RST reach either side, and connections opened
meanwhile are accepted but not connected onward. The peers see what a
partition looks like from a host: writes that are never answered, until
their own timeouts fire. ``heal()`` forwards again, on the existing
connections too, in order: what was sent during the cut arrives late, as
TCP retransmissions would deliver it (a client that gave up and closed its
socket meanwhile still gets its unsent bytes delivered, then the FIN).

It runs on its own event loop in a background thread, so it serves
subprocess servers while the test's own loop is busy; ``stop()`` closes
every socket and joins the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

CHUNK = 65536
CALL_TIMEOUT = 5.0  # seconds for the proxy's loop to carry out cut(), heal() or stop()
CONNECT_TIMEOUT = 5.0  # seconds to reach the target once forwarding


class TcpProxy:
    """Listens on 127.0.0.1:<port> and forwards each connection to 127.0.0.1:<target_port>."""

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.host, self.target_port = host, target_port
        self.port = 0
        self.accepted = 0  # connections accepted so far
        self.forwarded = 0  # bytes forwarded so far, both directions
        self.cuts = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"tcp-proxy->{target_port}", daemon=True)
        self._server: asyncio.Server | None = None
        self._open: asyncio.Event | None = None  # set while forwarding
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def is_cut(self) -> bool:
        return self._open is not None and not self._open.is_set()

    @property
    def connections(self) -> int:
        """Client connections open right now."""
        return len(self._tasks)

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def cut(self) -> None:
        """Stop forwarding in both directions, closing nothing."""
        self._call(self._set_open(False))
        self.cuts += 1

    def heal(self) -> None:
        """Forward again, on the connections open through the cut as well."""
        self._call(self._set_open(True))

    def stop(self) -> None:
        """Close the listener and every connection; join the thread."""
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CALL_TIMEOUT)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- on the proxy's own loop

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(CALL_TIMEOUT)

    async def _start(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _set_open(self, forwarding: bool) -> None:
        assert self._open is not None
        if forwarding:
            self._open.set()
        else:
            self._open.clear()

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in list(self._writers):
            writer.transport.abort()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), CALL_TIMEOUT)

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(client_writer)
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            assert self._open is not None
            await self._open.wait()  # during a cut the connection is accepted, but leads nowhere yet
            upstream_reader, upstream_writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.target_port), CONNECT_TIMEOUT
            )
            self._writers.add(upstream_writer)
            pumps = [
                asyncio.create_task(self._pump(client_reader, upstream_writer)),
                asyncio.create_task(self._pump(upstream_reader, client_writer)),
            ]
            try:
                # Each direction ends on its own EOF (half-close passes through);
                # the connection ends when both have.
                await asyncio.gather(*pumps)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        except (OSError, TimeoutError, asyncio.CancelledError):
            # A cancelled handler (``stop()``) ends quietly: asyncio's stream
            # server would log a handler task that ends cancelled.
            pass
        finally:
            for writer in (client_writer, upstream_writer):
                if writer is not None:
                    self._writers.discard(writer)
                    writer.transport.abort()
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy one direction; while cut, neither read nor write (what was read waits)."""
        assert self._open is not None
        try:
            while True:
                await self._open.wait()
                data = await reader.read(CHUNK)
                await self._open.wait()
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
                self.forwarded += len(data)
        except OSError:
            # One side reset: the other side sees it go away too.
            writer.transport.abort()
            raise
