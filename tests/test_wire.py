"""The websocket wire (``server/core/wire.py``) on a real loopback socket,
before any endpoint serves it: what a handshake that waits (for Redis, say)
holds of a client that does not wait for it."""

from __future__ import annotations

import asyncio
from typing import cast

from herald_presence.server.core.wire import BINARY, EARLY_BYTES_MAX, Wire

from .security.test_websocket_framing import client_frame
from .test_cluster import eventually

FRAME = 60_000


async def test_frames_sent_during_the_handshake_wait_in_the_kernel_past_its_byte_budget() -> None:
    """16 frames of 60 KB at once, none taken yet: the wire reads about 64 KiB
    of them and leaves the rest to TCP (the socket is not read); taken one by
    one, all 16 come, in order."""
    wires: list[Wire] = []

    def wire() -> Wire:
        wires.append(Wire(cast(asyncio.Transport, None), 100_000))  # its transport comes with connection_made
        return wires[-1]

    server = await asyncio.get_running_loop().create_server(wire, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"".join(client_frame(BINARY, bytes([n]) * FRAME) for n in range(16)))
        await eventually(lambda: bool(wires), 5, "the connection accepted")
        (taken,) = wires

        def early_bytes() -> int:
            return sum(len(payload) for _opcode, payload in taken._early or ())

        await eventually(lambda: early_bytes() >= EARLY_BYTES_MAX, 5, "frames read")
        await asyncio.sleep(0.3)  # what else the wire would read, it has read by now
        assert early_bytes() < EARLY_BYTES_MAX + FRAME
        received = [await asyncio.wait_for(taken.receive(), 5) for _ in range(16)]
        assert [(opcode, payload[0], len(payload)) for opcode, payload in received] == [
            (BINARY, n, FRAME) for n in range(16)
        ]
        writer.close()
    finally:
        server.close()
