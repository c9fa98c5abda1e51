"""Websocket frames no browser or SDK sends, written byte by byte on a raw
socket: the server's own framing (RFC 6455) takes what the RFC allows and
closes on the rest with the RFC's code, and never waits for a payload it is
going to refuse. Each test ends with a bystander that still works."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import signal
import socket
import struct
import time
from collections.abc import Awaitable, Callable

from herald_presence.protocol import codec
from herald_presence.protocol.messages import Signal, Welcome
from herald_presence.server.core.connection import Connection
from herald_presence.server.core.wire import CLOSE_TIMEOUT
from herald_presence.server.web.keys import HUB

from ..harness import HeraldServer, sample, scrape, settings
from ..redis_server import RedisServer
from ..test_cluster import eventually
from .helpers import assert_bystanders_served, hello

KEY = base64.b64encode(b"0123456789abcdef").decode()
ACCEPT = base64.b64encode(hashlib.sha1(KEY.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()).decode()
BINARY, TEXT, CONTINUATION, CLOSE, PING, PONG = 0x2, 0x1, 0x0, 0x8, 0x9, 0xA


def upgrade_request(version: str = "13", key: str = KEY) -> bytes:
    return (
        f"GET /v1/visitor HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: {version}\r\n\r\n"
    ).encode()


def client_frame(opcode: int, payload: bytes, *, final: bool = True, rsv: int = 0, masked: bool = True) -> bytes:
    first = (0x80 if final else 0) | rsv | opcode
    size = len(payload)
    mask_bit = 0x80 if masked else 0
    if size < 126:
        header = struct.pack("!BB", first, mask_bit | size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", first, mask_bit | 126, size)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, size)
    if not masked:
        return header + payload
    mask = os.urandom(4)
    key = (mask * (size // 4 + 1))[:size]
    return header + mask + (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(size, "big")


class RawSocket:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def frame(self) -> tuple[int, bytes]:
        async with asyncio.timeout(5):
            first, second = await self.reader.readexactly(2)
            size = second & 0x7F
            if size == 126:
                size = int.from_bytes(await self.reader.readexactly(2), "big")
            elif size == 127:
                size = int.from_bytes(await self.reader.readexactly(8), "big")
            return first & 0x0F, await self.reader.readexactly(size)

    async def close_code(self) -> int:
        """The code of the server's close frame (skipping what came before it);
        the server then closes the socket."""
        while True:
            opcode, payload = await self.frame()
            if opcode == CLOSE:
                async with asyncio.timeout(5):
                    assert await self.reader.read() == b"", "the server closes the socket after its close frame"
                return int.from_bytes(payload[:2], "big")

    def send(self, data: bytes) -> None:
        self.writer.write(data)


async def upgraded(herald: HeraldServer, *, also: bytes = b"", receive_buffer: int | None = None) -> RawSocket:
    """A socket past its 101 (``also``: bytes sent in the same write as the
    request; ``receive_buffer``: its kernel buffer, set before connecting)."""
    sock = None
    if receive_buffer is not None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)  # before connect: sets the window
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", herald.port))
    reader, writer = await (
        asyncio.open_connection(sock=sock) if sock is not None else asyncio.open_connection("127.0.0.1", herald.port)
    )
    writer.write(upgrade_request() + also)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101 "), head
    assert f"Sec-WebSocket-Accept: {ACCEPT}".encode() in head, head
    return RawSocket(reader, writer)


def held(herald: HeraldServer, subject: str) -> list[Connection]:
    """The server's connections of ``subject`` (a visitor ID)."""
    return [conn for conn in herald.app[HUB].connections() if conn.subject == subject]


async def welcomed(sock: RawSocket) -> None:
    opcode, payload = await sock.frame()
    assert opcode == BINARY and isinstance(codec.decode(payload), Welcome), (opcode, payload)


async def test_a_hello_in_fragments_written_a_byte_at_a_time_with_a_ping_between_is_welcomed(
    herald: HeraldServer,
) -> None:
    sock = await upgraded(herald)
    frame = hello("frag")
    parts = (
        client_frame(BINARY, frame[:5], final=False)
        + client_frame(PING, b"between")
        + client_frame(CONTINUATION, frame[5:9], final=False)
        + client_frame(CONTINUATION, frame[9:])
    )
    for byte in parts:
        sock.send(bytes((byte,)))
        await sock.writer.drain()
    assert await sock.frame() == (PONG, b"between")
    await welcomed(sock)
    sock.writer.close()
    await assert_bystanders_served(herald.base_url)


async def test_a_hello_sent_with_the_upgrade_request_before_the_101_is_read(herald: HeraldServer) -> None:
    sock = await upgraded(herald, also=client_frame(BINARY, hello("eager")))
    await welcomed(sock)
    sock.writer.close()
    await assert_bystanders_served(herald.base_url)


async def test_frames_sent_before_the_welcome_are_answered_in_their_order(
    start_herald: Callable[..., Awaitable[HeraldServer]],
) -> None:
    """A client that does not wait for its welcome: more frames than the
    handshake holds before it stops reading (EARLY_FRAMES_MAX), all answered
    after the welcome and in the order they were sent."""
    herald = await start_herald(message_rate=1000, message_burst=1000, visitor_signal_burst=1000)
    signals = b"".join(
        client_frame(BINARY, codec.encode(Signal(event="early", data={}, id=number))) for number in range(1, 41)
    )
    sock = await upgraded(herald, also=client_frame(BINARY, hello("hasty")) + signals)
    await welcomed(sock)
    answered = []
    for _ in range(40):
        opcode, payload = await sock.frame()
        assert opcode == BINARY
        answered.append(getattr(codec.decode(payload), "id", None))
    assert answered == list(range(1, 41))
    sock.writer.close()
    await assert_bystanders_served(herald.base_url)


async def test_an_unmasked_client_frame_closes_with_1002(herald: HeraldServer) -> None:
    sock = await upgraded(herald)
    sock.send(client_frame(BINARY, hello("bare"), masked=False))
    assert await sock.close_code() == 1002
    await assert_bystanders_served(herald.base_url)


async def test_a_compressed_frame_never_negotiated_closes_with_1002(herald: HeraldServer) -> None:
    sock = await upgraded(herald)
    sock.send(client_frame(BINARY, hello("deflated"), rsv=0x40))
    assert await sock.close_code() == 1002
    await assert_bystanders_served(herald.base_url)


async def test_a_frame_declaring_an_exabyte_closes_with_1009_before_any_payload(herald: HeraldServer) -> None:
    sock = await upgraded(herald)
    sock.send(struct.pack("!BBQ", 0x80 | BINARY, 0x80 | 127, 1 << 60) + os.urandom(4))  # the header alone
    assert await sock.close_code() == 1009
    await assert_bystanders_served(herald.base_url)


async def test_fragments_adding_up_past_the_limit_close_with_1009(herald: HeraldServer) -> None:
    sock = await upgraded(herald)
    await welcomed_after_hello(sock, "fragments")
    limit = max(herald.settings.max_frame_bytes, herald.settings.max_session_frame_bytes)
    piece = b"x" * (limit // 4 + 1)
    sock.send(client_frame(BINARY, piece, final=False))
    for _ in range(4):
        sock.send(client_frame(CONTINUATION, piece, final=False))
    assert await sock.close_code() == 1009
    await assert_bystanders_served(herald.base_url)


async def welcomed_after_hello(sock: RawSocket, visitor: str) -> None:
    sock.send(client_frame(BINARY, hello(visitor)))
    await welcomed(sock)


async def test_text_that_is_not_utf8_closes_with_1007(herald: HeraldServer) -> None:
    sock = await upgraded(herald)
    await welcomed_after_hello(sock, "latin1")
    sock.send(client_frame(TEXT, "caf\u00e9".encode("latin-1")))
    assert await sock.close_code() == 1007
    await assert_bystanders_served(herald.base_url)


async def test_out_of_place_frames_close_with_1002(herald: HeraldServer) -> None:
    cases = {
        "a continuation with nothing to continue": client_frame(CONTINUATION, b"x"),
        "a new message inside a fragmented one": client_frame(BINARY, b"a", final=False) + client_frame(BINARY, b"b"),
        "a fragmented ping": client_frame(PING, b"x", final=False),
        "a ping over 125 bytes": client_frame(PING, b"x" * 126),
        "an unknown opcode": client_frame(0x3, b"x"),
        "a one-byte close": client_frame(CLOSE, b"\x03"),
        "a close code nobody may send": client_frame(CLOSE, (1005).to_bytes(2, "big")),
    }
    for what, frames in cases.items():
        sock = await upgraded(herald)
        await welcomed_after_hello(sock, "odd")
        sock.send(frames)
        assert await sock.close_code() == 1002, what
    await assert_bystanders_served(herald.base_url)


async def test_a_client_close_is_answered_with_its_code_and_the_socket_closed(herald: HeraldServer) -> None:
    sock = await upgraded(herald)
    await welcomed_after_hello(sock, "polite")
    sock.send(client_frame(CLOSE, (4321).to_bytes(2, "big") + b"bye"))
    assert await sock.close_code() == 4321
    await assert_bystanders_served(herald.base_url)


async def test_upgrades_that_are_not_rfc_6455_are_refused_with_400(herald: HeraldServer) -> None:
    for request in (upgrade_request(version="8"), upgrade_request(key="c2hvcnQ=")):
        reader, writer = await asyncio.open_connection("127.0.0.1", herald.port)
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 400 "), head
        writer.close()
    await assert_bystanders_served(herald.base_url)


async def test_a_client_that_sends_its_close_and_never_reads_is_let_go(
    start_herald: Callable[..., Awaitable[HeraldServer]],
) -> None:
    """Its close is answered, but our answer waits behind what it never read:
    the socket is dropped after CLOSE_TIMEOUT instead of waiting to drain
    for as long as the client likes, and the connection is let go of."""
    herald = await start_herald(message_rate=10_000, message_burst=10_000, max_queue=100_000)
    sock = await upgraded(herald, receive_buffer=4096)
    await welcomed_after_hello(sock, "deaf")
    agent = await herald.agent("alice")
    await agent.subscribe(["deaf"])
    data = {f"blob{i}": "x" * 2_000 for i in range(3)}
    for _ in range(50):  # ~6 MB the deaf client never reads: more than the kernels' buffers (4 MB) hold
        assert await asyncio.gather(*(agent.signal("deaf", "fill", data) for _ in range(20))) == [1] * 20
    sock.send(client_frame(CLOSE, (1000).to_bytes(2, "big")))
    await sock.writer.drain()

    assert held(herald, "deaf"), "still held while its close is answered"
    await eventually(lambda: not held(herald, "deaf"), CLOSE_TIMEOUT + 3, "the deaf client's connection let go of")
    sock.writer.close()
    await assert_bystanders_served(herald.base_url)


async def test_a_client_that_pings_and_never_reads_is_owed_one_pong_not_a_pile(
    start_herald: Callable[..., Awaitable[HeraldServer]],
) -> None:
    """Pings (within its rates) from a client that never reads: answered
    while the socket takes our writes; once it does not, only the latest
    ping's pong waits (RFC 6455 5.5.3), so what the server holds for the
    client stays bounded instead of growing by a pong per ping. When the
    client reads again, that latest pong comes."""
    herald = await start_herald(
        message_rate=1_000_000, message_burst=1_000_000, message_bytes_rate=10**9, message_bytes_burst=10**9
    )
    sock = await upgraded(herald, receive_buffer=4096)
    await welcomed_after_hello(sock, "pinger")
    pings, padding = 100_000, b"p" * 117  # 12.7 MB of pongs: more than the kernels' buffers (4 MB) hold
    for start in range(0, pings, 1_000):
        sock.send(b"".join(client_frame(PING, n.to_bytes(8, "big") + padding) for n in range(start, start + 1_000)))
        await sock.writer.drain()
    (conn,) = held(herald, "pinger")
    await eventually(
        lambda: conn.inbox is None and time.monotonic() - conn.heard > 0.5, 30, "every ping taken by the server"
    )
    assert conn.wire.transport.get_write_buffer_size() < 128 * 1024, "pongs piled up for a client that never reads"
    answered = 0
    while True:
        opcode, payload = await sock.frame()
        assert opcode == PONG
        answered += 1
        if payload[:8] == (pings - 1).to_bytes(8, "big"):
            break
    assert answered < pings // 2, answered
    sock.writer.close()
    await assert_bystanders_served(herald.base_url)


async def test_frames_sent_while_redis_stalls_take_no_more_than_the_byte_burst() -> None:
    """Redis frozen (SIGSTOP): a visitor's answer waits for it, and the
    visitor's next frames wait behind it. The server reads no more of them
    than the visitor may send at once (``message_bytes_burst``); the rest
    stays in the kernels' buffers. 30 frames of 60 KB cost the server
    256 KiB, not 1.8 MB (before: up to 64 frames of 64 KiB, 4 MiB, a
    connection, and an address may hold 256 of them). Redis back, the
    server serves a bystander."""
    redis = RedisServer()
    redis.start()
    assert redis.process is not None
    burst = 256 * 1024
    herald = await HeraldServer(
        settings(redis_url=redis.url, message_bytes_rate=64 * 1024, message_bytes_burst=burst)
    ).start()
    try:
        sock = await upgraded(herald)
        await welcomed_after_hello(sock, "stalled")
        (conn,) = held(herald, "stalled")

        def waiting() -> int:  # bytes of its frames read and not answered yet
            return sum(len(frame) for _opcode, frame in conn.inbox or ())

        os.kill(redis.process.pid, signal.SIGSTOP)
        try:
            sock.send(client_frame(BINARY, codec.encode_map({"type": "signal", "id": 1, "event": "terms", "data": {}})))
            big = client_frame(BINARY, b"\x00" * 60_000)
            for _ in range(30):
                sock.send(big)
            await eventually(lambda: waiting() >= burst, 5, "the visitor's frames read")
            await asyncio.sleep(0.3)  # what else the server would read, it has read by now
            assert waiting() < burst + 60_000, waiting()
        finally:
            os.kill(redis.process.pid, signal.SIGCONT)
        sock.writer.close()
        await assert_bystanders_served(herald.base_url)
    finally:
        await herald.stop()
        redis.stop()


async def test_a_client_that_never_reads_is_closed_at_the_queues_byte_bound(
    start_herald: Callable[..., Awaitable[HeraldServer]],
) -> None:
    """Signals of 6 KB for a visitor that never reads: once ``max_queue_bytes``
    (1 MB here) wait beyond its socket's buffers it is closed as a slow
    consumer (4001), long before ``max_queue`` (100,000) frames would: a
    connection's queue holds bytes, not frames of any size, 1024 times."""
    herald = await start_herald(max_queue=100_000, max_queue_bytes=1_000_000)
    sock = await upgraded(herald, receive_buffer=4096)
    await welcomed_after_hello(sock, "deaf")
    (conn,) = held(herald, "deaf")
    agent = await herald.agent("alice")
    await agent.subscribe(["deaf"])
    data = {f"blob{i}": "x" * 2_000 for i in range(3)}
    before = await scrape(herald.base_url)  # the process's counters: other tests' hits too
    for _ in range(150):  # 18 MB at most: the kernels' buffers (4 MB) and the queue's 1 MB, many times over
        if conn.closing:
            break
        # return_exceptions: once it is closed, what was in flight expires (it does not come back)
        await asyncio.gather(*(agent.signal("deaf", "fill", data) for _ in range(20)), return_exceptions=True)
    assert conn.closing, "a client that never reads is a slow consumer"
    after = await scrape(herald.base_url)

    def hits(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert hits("herald_limit_hits_total", limit="max_queue_bytes") == 1
    assert hits("herald_slow_consumer_disconnects_total", role="visitor") == 1  # closed 4001
    sock.writer.close()
    await assert_bystanders_served(herald.base_url)
