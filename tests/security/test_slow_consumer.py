"""A visitor that never reads, while an agent floods it with the largest
signals allowed and 100 other visitor/agent pairs go about their business.

The server runs as a subprocess so that its memory can be read from /proc.
The slow client is a raw TCP socket with a small receive buffer that does the
websocket upgrade by hand, says hello, reads its welcome and then never reads
again. Its per-connection queue (``--max-queue 64``) must fill and the
server must drop it (close 4001, then abort the TCP connection when the close
frame cannot get through) within a bounded time, without the others' latency
or the server's memory noticing.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
import statistics
import struct
import time
from pathlib import Path

import aiohttp
import msgpack

from herald_presence.protocol import RequestFailed, codec, tokens
from herald_presence.protocol.client.agent import AgentClient
from herald_presence.protocol.client.visitor import VisitorClient
from herald_presence.protocol.messages import Hello

from ..harness import SECRET, sample, scrape
from ..processes import HERALD, start_server
from .helpers import assert_bystanders_served, show_terms_round_trip

PAIRS = 100
MAX_QUEUE = 64
FLOOD_IN_FLIGHT = 16  # signals the flooding agent keeps outstanding
FLOOD_LIMIT = 4000  # signals at most (32 MB), in case the server never closes
CLOSE_WITHIN = 10.0  # seconds from the first flood signal to the slow socket being closed
AFTER_CLOSE = 1.5  # seconds the pairs keep going after the close
P99_LIMIT = 0.250  # seconds, on a shared 2-core machine
RSS_LIMIT = 100 * 1024 * 1024
TCP_ESTABLISHED = 1
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def biggest_signal_data(limit: int = 8192) -> dict[str, str]:
    """A flat map whose msgpack encoding is exactly ``limit`` bytes."""
    data = {"a": "x" * 2048, "b": "x" * 2048, "c": "x" * 2048}
    used = len(msgpack.packb({**data, "d": ""}))
    data["d"] = "x" * (limit - used - 2)  # str16 header instead of the fixstr one
    assert len(msgpack.packb(data)) == limit
    return data


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of the socket (1 = established), read without reading data."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


def server_socket_inode(server_port: int, client_port: int) -> str:
    """The inode of the server's end of the connection between these ports.
    /proc/net/tcp is not read atomically and may list tens of thousands of
    sockets on a busy machine, so it is read (in a thread) only to find this."""
    needle = f" 0100007F:{server_port:04X} 0100007F:{client_port:04X} "
    for _ in range(20):
        table = Path("/proc/net/tcp").read_text()
        at = table.find(needle)
        if at >= 0:
            # after the addresses: st, queues, tr:tm, retrnsmt, uid, timeout, inode
            return table[at : table.find("\n", at)].split()[8]
    raise AssertionError("the server's socket is not in /proc/net/tcp")


def holds_socket(pid: int, inode: str) -> bool:
    """Whether process ``pid`` has socket ``inode`` open. (Once it lets go,
    the kernel may keep an orphan trying to deliver what was buffered, so the
    client's end can look established for minutes: the process is what has to
    let go.)"""
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) == f"socket:[{inode}]":
                return True
        except OSError:
            continue  # closed meanwhile
    return False


def masked_binary_frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", 0x82, 0x80 | size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", 0x82, 0x80 | 126, size)
    else:
        header = struct.pack("!BBQ", 0x82, 0x80 | 127, size)
    return header + mask + bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))


class NeverReadingVisitor:
    """A websocket visitor made by hand on a socket with a tiny receive buffer."""

    def __init__(self, port: int, visitor: str) -> None:
        self.port, self.visitor = port, visitor
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: sets the window
        self.sock.setblocking(False)
        self._buffer = b""
        self.server_inode = "?"

    async def _read_until(self, done: object) -> None:
        loop = asyncio.get_running_loop()
        while not done():  # type: ignore[operator]
            chunk = await loop.sock_recv(self.sock, 4096)
            assert chunk, "the server closed during the handshake"
            self._buffer += chunk

    async def connect(self) -> None:
        """Upgrade, hello, and read exactly the welcome frame; then never read again."""
        loop = asyncio.get_running_loop()
        await loop.sock_connect(self.sock, ("127.0.0.1", self.port))
        key = base64.b64encode(os.urandom(16))
        request = (
            f"GET /v1/visitor HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        await loop.sock_sendall(self.sock, request.encode())
        await self._read_until(lambda: b"\r\n\r\n" in self._buffer)
        head, _, self._buffer = self._buffer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        assert b"sec-websocket-accept: " + accept.lower() in head.lower(), head
        token = tokens.visitor_token(SECRET, "acme", self.visitor)
        hello = codec.encode(Hello(versions=[1], group="acme", visitor=self.visitor, token=token))
        await loop.sock_sendall(self.sock, masked_binary_frame(hello))
        await self._read_until(lambda: len(self._buffer) >= 4)
        assert self._buffer[0] == 0x82, self._buffer[:2]  # one unfragmented binary frame, unmasked
        size, start = self._buffer[1], 2
        assert size <= 126, "a welcome is small: 7- or 16-bit length"
        if size == 126:
            size, start = struct.unpack("!H", self._buffer[2:4])[0], 4
        await self._read_until(lambda: len(self._buffer) >= start + size)
        welcome = codec.decode(self._buffer[start : start + size])
        assert welcome.TYPE == "welcome" and welcome.visitor == self.visitor, welcome

    async def find_server_socket(self) -> None:
        self.server_inode = await asyncio.to_thread(server_socket_inode, self.port, self.sock.getsockname()[1])

    def dropped_by(self, pid: int) -> bool:
        """The server process has let go of this connection (or it is closed)."""
        return tcp_state(self.sock) != TCP_ESTABLISHED or not holds_socket(pid, self.server_inode)

    async def wait_dropped(self, pid: int, since: float) -> float:
        """Seconds from ``since`` until the server lets go of this connection."""
        while True:
            if self.dropped_by(pid):
                return time.monotonic() - since
            await asyncio.sleep(0.05)

    def close(self) -> None:
        self.sock.close()


async def _pair(base: str, index: int, visitors_http: aiohttp.ClientSession) -> tuple[AgentClient, VisitorClient]:
    visitor_id, agent_id = f"pair-v{index}", f"pair-a{index}"
    visitor = VisitorClient(
        base,
        "acme",
        visitor_id,
        tokens.visitor_token(SECRET, "acme", visitor_id),
        session=visitors_http,
        reconnect=False,
    )
    agent = AgentClient(base, "acme", agent_id, tokens.agent_key(SECRET, "acme", agent_id), reconnect=False)
    await visitor.connect()
    await agent.connect()
    await agent.subscribe([visitor_id])
    return agent, visitor


async def _keep_exchanging(agent: AgentClient, visitor: VisitorClient, stop: asyncio.Event, out: list[float]) -> None:
    while not stop.is_set():
        out.append(await show_terms_round_trip(agent, visitor))
        await asyncio.sleep(0.1)


async def test_never_reading_visitor_flooded_with_the_largest_signals(tmp_path: Path) -> None:
    server = start_server(
        tmp_path, str(HERALD), "serve", "--group", f"acme={SECRET}", "--max-queue", str(MAX_QUEUE),
        "--connections-per-address", "100000", "--message-rate", "100000", "--message-burst", "100000",
        "--message-bytes-rate", "100000000", "--message-bytes-burst", "100000000",
        "--max-connections-per-address", "100000",
        "--grace-period", "0.5", "--signal-hold", "0.5", "--log-level", "WARNING",
    )  # fmt: skip
    base, pid = server.base_url, server.proc.pid
    slow = NeverReadingVisitor(server.port, "slow-reader")
    pairs: list[tuple[AgentClient, VisitorClient]] = []
    visitors_http = aiohttp.ClientSession()
    flooder = AgentClient(base, "acme", "flooder", tokens.agent_key(SECRET, "acme", "flooder"), reconnect=False)
    try:
        async with asyncio.timeout(45):
            await slow.connect()
            pairs = list(await asyncio.gather(*(_pair(base, i, visitors_http) for i in range(PAIRS))))
            await flooder.connect()
            assert (await flooder.lookup("slow-reader"))["online"] is True
            await slow.find_server_socket()
            assert not slow.dropped_by(pid)
            rss_before = rss_bytes(pid)
            rss_peak = rss_before

            stop, latencies = asyncio.Event(), list[float]()
            exchanging = [asyncio.create_task(_keep_exchanging(a, v, stop, latencies)) for a, v in pairs]
            await asyncio.sleep(0.5)  # the pairs alone, for comparison
            quiet = len(latencies)

            data = biggest_signal_data()
            outcomes: dict[str, int] = {}
            in_flight: set[asyncio.Task[int]] = set()
            sent, flood_started, closed_after = 0, time.monotonic(), None
            dropped = asyncio.create_task(slow.wait_dropped(pid, flood_started))
            while not dropped.done() and sent < FLOOD_LIMIT and time.monotonic() - flood_started < CLOSE_WITHIN:
                while len(in_flight) < FLOOD_IN_FLIGHT and sent < FLOOD_LIMIT:
                    in_flight.add(asyncio.create_task(flooder.signal("slow-reader", "big", data, to="all")))
                    sent += 1
                done, in_flight = await asyncio.wait(in_flight, timeout=0.05, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    try:
                        outcome = f"delivered {task.result()}"
                    except RequestFailed as exc:
                        outcome = exc.code
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1
                rss_peak = max(rss_peak, rss_bytes(pid))
            for task in in_flight:
                task.cancel()
            # Flooded enough: the server still has the rest of its time to let go.
            await asyncio.wait({dropped}, timeout=max(0.0, CLOSE_WITHIN - (time.monotonic() - flood_started)))
            deadline = time.monotonic() + AFTER_CLOSE
            while time.monotonic() < deadline:
                rss_peak = max(rss_peak, rss_bytes(pid))
                await asyncio.sleep(0.1)
            stop.set()
            await asyncio.gather(*exchanging)

            # The slow visitor is gone for agents too (offline after its grace period).
            for _ in range(30):
                state = await flooder.lookup("slow-reader")
                if not state["online"]:
                    break
                await asyncio.sleep(0.1)
            await assert_bystanders_served(base)
            slow_disconnects = sample(await scrape(base), "herald_slow_consumer_disconnects_total", role="visitor")
            observed = time.monotonic() - flood_started
            if dropped.done():
                closed_after = dropped.result()
            else:
                dropped.cancel()
    finally:
        slow.close()
        for agent, visitor in pairs:
            await agent.close()
            await visitor.close()
        await flooder.close()
        await visitors_http.close()
        server.stop()

    ordered = sorted(latencies)
    p50, p99 = statistics.median(ordered), ordered[int(len(ordered) * 0.99) - 1]
    closed = f"not within {observed:.1f} s" if closed_after is None else f"{closed_after:.2f} s"
    print(
        f"\nslow consumer: the server let go of its socket {closed} after the flood began; {sent} signals of"
        f" {len(msgpack.packb(data))} B sent, answers {outcomes}; last state online={state['online']}"
        f" connections={len(state['connections'])}\n"
        f"pairs: {len(ordered)} show_terms round trips ({quiet} before the flood), "
        f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {ordered[-1] * 1000:.1f} ms\n"
        f"server RSS: {rss_before / 2**20:.1f} MiB before, {rss_peak / 2**20:.1f} MiB peak "
        f"(+{(rss_peak - rss_before) / 2**20:.1f} MiB)"
    )
    log = server.stdout() + server.stderr_path.read_text(errors="replace")
    problems: list[str] = []
    if "closing slow consumer <visitor acme/slow-reader" not in log:
        problems.append("the server never decided to close the slow consumer")
    if closed_after is None or closed_after > CLOSE_WITHIN:
        problems.append(f"the server had not let go of the slow consumer's socket {CLOSE_WITHIN} s after the flood")
    if slow_disconnects != 1:
        problems.append(f"herald_slow_consumer_disconnects_total{{role=visitor}} is {slow_disconnects}, not 1")
    if state["online"] or state["connections"]:
        problems.append(f"agents still see the slow consumer: {state}")
    if outcomes.get("delivered 0"):
        problems.append(f"{outcomes['delivered 0']} signals were acked with delivered 0 (must be >= 1 or an error)")
    if p99 >= P99_LIMIT:
        problems.append(f"the pairs' p99 was {p99 * 1000:.1f} ms")
    if rss_peak - rss_before >= RSS_LIMIT:
        problems.append(f"the server's RSS grew by {(rss_peak - rss_before) / 2**20:.1f} MiB")
    assert not problems, "\n".join(problems)
