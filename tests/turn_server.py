"""A private coturn (``turnserver``) for the tests, on a free loopback port,
and a small TURN client that asks it for a relay (an Allocate, RFC 8656).

coturn runs as Herald's TURN servers are meant to: ``use-auth-secret`` with
a ``static-auth-secret`` (the TURN REST API), so it accepts exactly the
credentials ``server/model/ice.py`` makes, until their expiry. It is started
without a config file (``-n``), in the foreground, logging to a file, and
stopped by its PID. Under CI=true a missing ``turnserver`` fails the test
instead of skipping it.

The client speaks STUN over UDP: an Allocate without credentials gets 401
with the realm and a nonce; again with USERNAME, REALM, NONCE and
MESSAGE-INTEGRITY (HMAC-SHA1 keyed with MD5("username:realm:password")),
it gets a success with the relayed address, or an error code.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .processes import required_binary

MAGIC = 0x2112A442
BINDING, ALLOCATE = 0x0001, 0x0003
REQUEST, SUCCESS, FAILURE = 0x0000, 0x0100, 0x0110  # the class bits of a message type
USERNAME, MESSAGE_INTEGRITY, ERROR_CODE, REALM, NONCE = 0x0006, 0x0008, 0x0009, 0x0014, 0x0015
XOR_RELAYED_ADDRESS, REQUESTED_TRANSPORT, XOR_MAPPED_ADDRESS = 0x0016, 0x0019, 0x0020
UDP = 17
STALE_NONCE = 438
START_TIMEOUT = 10.0  # seconds for turnserver to answer a Binding request
STOP_TIMEOUT = 5.0


def turnserver_binary() -> str:
    return required_binary("turnserver", "apt-get install coturn")


def free_udp_and_tcp_port() -> int:
    """A loopback port free for both UDP and TCP (coturn listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no loopback port free for both UDP and TCP")


# --- STUN messages ------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    kind: int  # method | class
    transaction: bytes
    attributes: list[tuple[int, bytes]]
    raw: bytes

    def first(self, attribute: int) -> bytes | None:
        return next((value for kind, value in self.attributes if kind == attribute), None)

    @property
    def error_code(self) -> int | None:
        value = self.first(ERROR_CODE)
        return None if value is None else (value[2] & 0x07) * 100 + value[3]


def _attribute(kind: int, value: bytes) -> bytes:
    return struct.pack("!HH", kind, len(value)) + value + b"\0" * (-len(value) % 4)


def encode(kind: int, transaction: bytes, attributes: list[tuple[int, bytes]], key: bytes | None = None) -> bytes:
    """A STUN message; with ``key``, MESSAGE-INTEGRITY last (its length counted in the header)."""
    body = b"".join(_attribute(k, v) for k, v in attributes)
    if key is None:
        return struct.pack("!HHI", kind, len(body), MAGIC) + transaction + body
    header = struct.pack("!HHI", kind, len(body) + 24, MAGIC) + transaction
    mac = hmac.new(key, header + body, hashlib.sha1).digest()
    return header + body + _attribute(MESSAGE_INTEGRITY, mac)


def decode(raw: bytes) -> Message:
    kind, length, cookie = struct.unpack_from("!HHI", raw)
    if cookie != MAGIC or len(raw) != 20 + length:
        raise ValueError(f"not a STUN message: {raw[:20].hex()}")
    attributes, at = [], 20
    while at < len(raw):
        attribute, size = struct.unpack_from("!HH", raw, at)
        attributes.append((attribute, raw[at + 4 : at + 4 + size]))
        at += 4 + size + (-size % 4)
    return Message(kind, raw[8:20], attributes, raw)


def integrity_holds(message: Message, key: bytes) -> bool:
    """The message's MESSAGE-INTEGRITY is HMAC-SHA1 under ``key`` of what precedes it."""
    at = 20
    while at < len(message.raw):
        attribute, size = struct.unpack_from("!HH", message.raw, at)
        if attribute == MESSAGE_INTEGRITY:
            header = struct.pack("!H", message.kind) + struct.pack("!H", at - 20 + 24) + message.raw[4:20]
            expected = hmac.new(key, header + message.raw[20:at], hashlib.sha1).digest()
            return hmac.compare_digest(expected, message.raw[at + 4 : at + 24])
        at += 4 + size + (-size % 4)
    return False


def xor_address(value: bytes) -> tuple[str, int]:
    family, port = value[1], struct.unpack_from("!H", value, 2)[0] ^ (MAGIC >> 16)
    if family != 0x01:
        raise ValueError("an IPv6 address; the tests' coturn relays on 127.0.0.1 only")
    address = struct.unpack_from("!I", value, 4)[0] ^ MAGIC
    return socket.inet_ntoa(struct.pack("!I", address)), port


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """RFC 8489's long-term credential key: MD5(username ":" realm ":" password)."""
    return hashlib.md5(f"{username}:{realm}:{password}".encode(), usedforsecurity=False).digest()


# --- the client -----------------------------------------------------------------------------


def transact(sock: socket.socket, server: tuple[str, int], message: bytes, timeout: float = 1.0) -> Message:
    """Send ``message`` and return the response with its transaction ID (UDP: sent again up to 3 times)."""
    transaction = message[8:20]
    for _ in range(3):
        sock.sendto(message, server)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                raw, _ = sock.recvfrom(2048)
            except TimeoutError:
                break
            response = decode(raw)
            if response.transaction == transaction:
                return response
    raise TimeoutError(f"no answer from the TURN server at {server}")


@dataclass(frozen=True)
class Allocation:
    """An Allocate's outcome: the relayed address, or the error code (401: the credentials were refused)."""

    relayed: tuple[str, int] | None
    error: int | None
    realm: str
    integrity_ok: bool  # the success response was signed with the same key (coturn derived the same password)


def allocate(server: tuple[str, int], username: str, password: str) -> Allocation:
    """Ask for a UDP relay with the long-term credential mechanism."""
    transport = (REQUESTED_TRANSPORT, bytes([UDP, 0, 0, 0]))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        challenge = transact(sock, server, encode(ALLOCATE | REQUEST, secrets.token_bytes(12), [transport]))
        assert challenge.error_code == 401, f"an Allocate without credentials: {challenge.error_code}"
        realm, nonce = challenge.first(REALM), challenge.first(NONCE)
        assert realm is not None and nonce is not None, "a 401 names the realm and a nonce"
        key = long_term_key(username, realm.decode(), password)
        for _ in range(2):  # a stale nonce (438) comes with a fresh one
            attributes = [(USERNAME, username.encode()), (REALM, realm), (NONCE, nonce), transport]
            answer = transact(sock, server, encode(ALLOCATE | REQUEST, secrets.token_bytes(12), attributes, key))
            if answer.error_code != STALE_NONCE:
                break
            nonce = answer.first(NONCE) or nonce
        relayed = answer.first(XOR_RELAYED_ADDRESS)
        return Allocation(
            relayed=xor_address(relayed) if relayed is not None else None,
            error=answer.error_code,
            realm=realm.decode(),
            integrity_ok=answer.kind == ALLOCATE | SUCCESS and integrity_holds(answer, key),
        )


def binding(server: tuple[str, int], timeout: float = 0.2) -> tuple[str, int]:
    """A Binding request: the address the server saw (no credentials needed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        answer = transact(sock, server, encode(BINDING | REQUEST, secrets.token_bytes(12), []), timeout)
        mapped = answer.first(XOR_MAPPED_ADDRESS)
        assert answer.kind == BINDING | SUCCESS and mapped is not None, answer
        return xor_address(mapped)


# --- the server -----------------------------------------------------------------------------


class TurnServer:
    """coturn on 127.0.0.1, relaying on 127.0.0.1, with ``use-auth-secret``."""

    def __init__(self, secret: str, realm: str = "herald.test") -> None:
        self.binary = turnserver_binary()
        self.secret, self.realm = secret, realm
        self.port = free_udp_and_tcp_port()
        self.dir = Path(tempfile.mkdtemp(prefix="herald-coturn-"))
        self.log_path = self.dir / "turnserver.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    @property
    def url(self) -> str:
        """The TURN URL a group configures (RFC 7065)."""
        return f"turn:127.0.0.1:{self.port}?transport=udp"

    def args(self) -> list[str]:
        return [
            self.binary, "-n",  # no config file: everything is here
            "--use-auth-secret", f"--static-auth-secret={self.secret}", f"--realm={self.realm}",
            "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1", f"--listening-port={self.port}",
            "--no-tls", "--no-dtls", "--no-cli", "--allow-loopback-peers", "--no-multicast-peers",
            "--log-file=stdout", "--simple-log",
            f"--pidfile={self.dir / 'turnserver.pid'}", f"--userdb={self.dir / 'turndb'}",
        ]  # fmt: skip

    def start(self) -> TurnServer:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(self.args(), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if (code := self.process.poll()) is not None:
                raise RuntimeError(f"turnserver exited with {code}:\n{self.log()}")
            try:
                binding(self.address)
                return self
            except (TimeoutError, OSError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"turnserver did not answer within {START_TIMEOUT}s:\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        """SIGTERM its PID; SIGKILL if it has not exited after STOP_TIMEOUT."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        shutil.rmtree(self.dir, ignore_errors=True)
