"""Fuzzing a live server: random and mutated frames over real sockets.

Each test throws frames from ``tests/fuzz.py`` (valid messages, mutated and
mistyped ones, msgpack junk, random bytes, text frames, deep nesting, fields
and frames at and past their limits) at one endpoint and holds the server to
its contract (PROTOCOL.md §2, §3.1, §6) frame by frame:

- every server frame is binary and decodes; every ``error`` has a known
  ``ErrorCode`` (and never ``internal``: that is a server bug by definition);
- a frame the codec refuses gets an ``error`` with the codec's code and the
  request id the codec could read;
- a request with an ``id`` gets an answer with that ``id`` (except an agent's
  signal, which is answered asynchronously);
- the connection stays open unless the frame is over ``max_frame_bytes``:
  then it closes with 1009, and the test reconnects and goes on;
- on a fresh connection, a first frame that is not an acceptable ``hello`` is
  refused with one ``error`` and a 4xxx close code;
- afterwards the fuzzed connection still answers ``ping`` with ``pong``, and
  fresh SDK clients still connect and signal each other.

After each frame the test sends a ``ping`` and reads up to its ``pong``: the
server handles a connection's frames in order, so what comes before the
``pong`` is the answer to that frame.

Each test runs for ``HERALD_FUZZ_SECONDS`` (default 3) or ``HERALD_FUZZ_FRAMES``
frames (default 20000), whichever ends first, on both backends. The seed is
random per run and shown in every failure; ``HERALD_FUZZ_SEED=<seed>`` replays
it. A longer run:

    HERALD_FUZZ_SECONDS=300 .venv/bin/python -m pytest tests/test_fuzz_live.py
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from typing import Any, NoReturn

import aiohttp
import pytest

from herald_presence.protocol import codec, tokens
from herald_presence.protocol.errors import CloseCode, ErrorCode, ProtocolError
from herald_presence.protocol.messages import (
    Error,
    Hello,
    Message,
    Ping,
    Pong,
    SessionConnected,
    SessionSignal,
    Signal,
    Snapshot,
    StartSession,
    Subscribe,
    Welcome,
)
from herald_presence.server.config import Settings

from .fuzz import AGENT_TYPES, VISITOR_TYPES, Expected, Frame, Frames, expect
from .harness import HeraldServer, receive

SECONDS = float(os.environ.get("HERALD_FUZZ_SECONDS", "3"))
MAX_FRAMES = int(os.environ.get("HERALD_FUZZ_FRAMES", "20000"))
SEED = os.environ.get("HERALD_FUZZ_SEED") or str(secrets.randbits(32))
ANSWER_SECONDS = 5.0  # no answer for this long: the server counts as stuck

pytestmark = pytest.mark.timeout(SECONDS + 60)  # the project's 120 s would cut long runs short

WS = aiohttp.ClientWebSocketResponse
PING = codec.encode(Ping())
KNOWN_CODES = {code.value for code in ErrorCode} - {ErrorCode.INTERNAL.value}
HANDSHAKE_CLOSE_CODES = {code.value for code in CloseCode if 4000 <= code <= 4999}
NAMES = ("fuzz-visitor", "fuzz-agent", "peer-visitor", "peer-agent", "nobody")

# Anti-abuse limits, raised where this server has them: the fuzzer sends far
# faster than any client may and opens a connection per handshake, and what
# it checks is the frame contract, not the rate limiter.
UNTHROTTLED = {
    "message_rate": 1_000_000,
    "message_burst": 1_000_000,
    "connections_per_address": 1_000_000,
    "max_connections_per_address": 1_000_000,
}


def unthrottled() -> dict[str, Any]:
    known = {field.name for field in dataclasses.fields(Settings)}
    return {name: value for name, value in UNTHROTTLED.items() if name in known}


class Fuzzer:
    """One test's frames, its checks, and the failure report that replays it."""

    def __init__(self, request: pytest.FixtureRequest, herald: HeraldServer) -> None:
        self.test = request.node.name
        self.rng = random.Random(f"{SEED}:{self.test}")
        self.max_bytes = herald.settings.max_frame_bytes
        self.frames = Frames(self.rng, NAMES, self.max_bytes)
        self.sent = 0
        self.last: tuple[str, Frame] = ("none yet", b"")
        self.bystanders: list[asyncio.Task[None]] = []
        self.deadline = time.monotonic() + SECONDS

    def more(self) -> bool:
        return self.sent < MAX_FRAMES and time.monotonic() < self.deadline

    def fail(self, what: str) -> NoReturn:
        kind, frame = self.last
        if isinstance(frame, str):
            shown = f"text {frame[:200]!r}{'...' if len(frame) > 200 else ''} ({len(frame)} chars)"
        else:
            shown = shorten(frame)
        pytest.fail(
            f"{what}\n"
            f"  after frame #{self.sent} ({kind}): {shown}\n"
            f"  replay: HERALD_FUZZ_SEED={SEED} HERALD_FUZZ_FRAMES={self.sent} HERALD_FUZZ_SECONDS=300"
            f" .venv/bin/python -m pytest -p no:cacheprovider"
            f" 'tests/test_fuzz_live.py::{self.test}'",
            pytrace=False,
        )

    async def send(self, ws: WS, kind: str, frame: Frame) -> None:
        self.sent += 1
        self.last = (kind, frame)
        if isinstance(frame, str):
            await ws.send_str(frame)
        else:
            await ws.send_bytes(frame)

    async def read(
        self,
        ws: WS,
        waiting_for: str | None = "an answer",
        who: str = "the fuzzed connection",
    ) -> Message | None:
        """The server's next frame, checked; ``None`` once the connection closed.
        ``waiting_for`` None waits as long as it takes."""
        try:
            msg = await ws.receive(timeout=None if waiting_for is None else ANSWER_SECONDS)
        except TimeoutError:
            self.fail(f"nothing from the server for {ANSWER_SECONDS} s, waiting for {waiting_for}")
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
            return None
        if msg.type is not aiohttp.WSMsgType.BINARY:
            self.fail(f"the server sent {who} a {msg.type.name} frame: {msg.data!r}")
        try:
            message = codec.decode(msg.data, max_bytes=len(msg.data))
        except ProtocolError as exc:
            refusal = exc
        else:
            refusal = None
        if refusal is not None:
            self.fail(f"the server sent {who} a frame its own codec refuses ({refusal}): {shorten(msg.data)}")
        if isinstance(message, Error) and message.code not in KNOWN_CODES:
            self.fail(f"the server sent {who} an error with code {message.code!r}: {message}")
        return message

    @contextlib.asynccontextmanager
    async def watching(self, ws: WS, who: str) -> AsyncIterator[None]:
        """Check every frame a bystander gets (the fan-out of the fuzzed
        frames) in the background; closes its socket on the way out."""

        async def read_all() -> None:
            while await self.read(ws, waiting_for=None, who=who) is not None:
                pass
            if not closing:
                self.fail(f"the server closed {who} (close code {ws.close_code})")

        closing = False
        task = asyncio.create_task(read_all(), name=f"watch {who}")
        self.bystanders.append(task)
        try:
            yield
        finally:
            closing = True
            await ws.close()
            await asyncio.wait([task])
            found = task.exception()  # retrieved even when the test failed already
        if found is not None:
            raise found

    def check_bystanders(self) -> None:
        for task in self.bystanders:
            if task.done():
                task.result()  # raises what the bystander found

    async def pongs(self, ws: WS, count: int = 1) -> list[Message]:
        """Everything the server sends up to the ``count``-th pong."""
        answers: list[Message] = []
        while count:
            message = await self.read(ws, waiting_for="the pong")
            if message is None:
                self.fail(
                    f"the server closed the connection (close code {ws.close_code}); it should stay open"
                    f" (max_frame_bytes is {self.max_bytes})"
                )
            if isinstance(message, Pong):
                count -= 1
            else:
                answers.append(message)
        return answers

    async def run(self, connect: Callable[[], Awaitable[WS]], types: Sequence[str], role: str) -> WS:
        """Fuzz one role's connection until the budget is spent; the socket it ends on."""
        ws = await connect()
        while self.more():
            self.check_bystanders()
            kind, frame = self.frames.frame(types)
            expected = expect(frame, self.max_bytes)
            await self.send(ws, kind, frame)
            if expected.close is not None:
                while await self.read(ws, waiting_for="the close") is not None:
                    pass  # answers to earlier frames (an agent's signals) may still come
                if ws.close_code != expected.close:
                    self.fail(
                        f"a frame over {self.max_bytes} bytes must close the connection with {expected.close},"
                        f" not {ws.close_code}"
                    )
                ws = await connect()
                continue
            await ws.send_bytes(PING)
            answers = await self.pongs(ws, 2 if isinstance(expected.message, Ping) else 1)
            self.check_answers(expected, answers, role)
        return ws

    def check_answers(self, expected: Expected, answers: list[Message], role: str) -> None:
        if expected.error is not None:
            if not any(
                isinstance(a, Error) and (a.code, a.id) == (expected.error, expected.request_id) for a in answers
            ):
                self.fail(f"expected error {expected.error.value} with id {expected.request_id}, got {answers}")
            return
        request_id = getattr(expected.message, "id", None)
        if request_id is None or (role == "agent" and isinstance(expected.message, Signal)):
            return
        if isinstance(expected.message, SessionSignal):  # a member's is acknowledged off the frame loop
            return
        if not any(getattr(a, "id", None) == request_id for a in answers):
            self.fail(f"{expected.message} got no answer with id {request_id}: {answers}")

    def done(self) -> None:
        print(f"{self.test}: {self.sent} frames, seed {SEED}")  # shown with -s

    async def still_answers(self, ws: WS) -> None:
        await ws.send_bytes(PING)
        await self.pongs(ws)

    async def handshake(self, ws: WS, role: str, expected: Expected) -> None:
        """The fate of a fresh connection's first frame: welcomed, or refused
        with one error (no id) and the close code of PROTOCOL.md §3.1."""
        first = await self.read(ws)
        if expected.close is not None:
            if first is not None or ws.close_code != expected.close:
                self.fail(
                    f"a first frame over {self.max_bytes} bytes must close with {expected.close},"
                    f" got {first} (close code {ws.close_code})"
                )
            return
        hello = expected.message if isinstance(expected.message, Hello) else None
        speaks_v1 = hello is not None and 1 in hello.versions
        if isinstance(first, Welcome):
            if not speaks_v1:
                self.fail(f"welcomed after a first frame that is no acceptable hello: {first}")
            await self.still_answers(ws)
            return
        if first is None:
            self.fail(
                f"the server closed the connection (close code {ws.close_code}) without answering"
                f" (max_frame_bytes is {self.max_bytes})"
            )
        if not isinstance(first, Error) or first.id is not None:
            self.fail(
                f"a refused handshake must get one error frame without id, got {first} (close code {ws.close_code})"
            )
        after = await self.read(ws)
        if after is not None:
            self.fail(f"after refusing the handshake with {first} the server sent {after} instead of closing")
        if expected.error is not None:
            wanted: tuple[str, int] | None = (expected.error, CloseCode.HANDSHAKE_FAILED)
        elif hello is None:
            wanted = (ErrorCode.HANDSHAKE_REQUIRED, CloseCode.HANDSHAKE_FAILED)
        elif not speaks_v1:
            wanted = (ErrorCode.UNSUPPORTED_VERSION, CloseCode.UNSUPPORTED_VERSION)
        elif role == "agent":
            self.fail(f"a logged-in agent's hello for version 1 was refused: {first} (close code {ws.close_code})")
        else:
            wanted = None  # a visitor's credentials, presence data and connection count decide
        if wanted is not None and (first.code, ws.close_code) != wanted:
            self.fail(f"expected {wanted[0]} and close {wanted[1]}, got {first.code} and close {ws.close_code}")
        if ws.close_code not in HANDSHAKE_CLOSE_CODES:
            self.fail(f"refused with {first.code} and close code {ws.close_code}, not one of {HANDSHAKE_CLOSE_CODES}")


def shorten(frame: bytes) -> str:
    if len(frame) > 160:
        return f"{frame[:120].hex()} ... {frame[-16:].hex()} ({len(frame)} bytes)"
    return f"{frame.hex()} ({len(frame)} bytes)"


# --- connections ---------------------------------------------------------------


def visitor_hello(herald: HeraldServer, visitor: str, **presence: Any) -> Hello:
    token = tokens.visitor_token(herald.secret("acme"), "acme", visitor)
    return Hello(versions=[1], group="acme", visitor=visitor, token=token, **presence)


async def open_visitor(session: aiohttp.ClientSession, herald: HeraldServer, visitor: str) -> WS:
    ws = await session.ws_connect(herald.base_url + "/v1/visitor")
    await ws.send_bytes(codec.encode(visitor_hello(herald, visitor)))
    assert isinstance(await receive(ws), Welcome)
    return ws


async def login(session: aiohttp.ClientSession, herald: HeraldServer, agent: str) -> None:
    """A session cookie in ``session``'s jar (which must accept cookies for an IP)."""
    key = tokens.agent_key(herald.secret("acme"), "acme", agent)
    body = {"group": "acme", "agent": agent, "key": key}
    async with session.post(herald.base_url + "/v1/agent/login", json=body) as response:
        assert response.status == 200, await response.text()


async def open_agent(session: aiohttp.ClientSession, herald: HeraldServer) -> WS:
    ws = await session.ws_connect(herald.base_url + "/v1/agent")
    await ws.send_bytes(codec.encode(Hello(versions=[1])))
    assert isinstance(await receive(ws), Welcome)
    return ws


async def still_serving(herald: HeraldServer) -> None:
    """Fresh SDK clients connect and an agent's signal reaches its visitor."""
    agent = await herald.agent("alice")
    await herald.visitor("v1")
    assert await agent.show_terms("v1") == 1, f"seed {SEED}"


# --- tests ---------------------------------------------------------------------


async def test_fuzzed_visitor_frames_keep_the_contract(start_herald: Any, request: pytest.FixtureRequest) -> None:
    herald = await start_herald(**unthrottled())
    fuzz = Fuzzer(request, herald)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        await login(session, herald, "peer-agent")  # watches the group: gets the fuzzed presence and signals
        watcher = await open_agent(session, herald)
        await watcher.send_bytes(codec.encode(Subscribe(id=1, group=True)))
        assert isinstance(await receive(watcher), Snapshot)
        async with fuzz.watching(watcher, "the agent watching the group"):
            ws = await fuzz.run(partial(open_visitor, session, herald, "fuzz-visitor"), VISITOR_TYPES, "visitor")
            await fuzz.still_answers(ws)
    fuzz.done()
    await still_serving(herald)


async def test_fuzzed_agent_frames_keep_the_contract(start_herald: Any, request: pytest.FixtureRequest) -> None:
    herald = await start_herald(**unthrottled())
    fuzz = Fuzzer(request, herald)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        target = await open_visitor(session, herald, "peer-visitor")  # a live visitor to signal, with a session
        await target.send_bytes(codec.encode(StartSession(id=1, key_type="visitor")))
        assert isinstance(await receive(target), SessionConnected)
        await login(session, herald, "fuzz-agent")
        async with fuzz.watching(target, "the visitor the agent signals"):
            ws = await fuzz.run(partial(open_agent, session, herald), AGENT_TYPES, "agent")
            await fuzz.still_answers(ws)
    fuzz.done()
    await still_serving(herald)


async def test_fuzzed_first_frames_are_welcomed_or_refused(start_herald: Any, request: pytest.FixtureRequest) -> None:
    herald = await start_herald(**unthrottled())
    fuzz = Fuzzer(request, herald)
    rng, frames = fuzz.rng, fuzz.frames
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        await login(session, herald, "fuzz-agent")
        while fuzz.more():
            role = rng.choice(("visitor", "agent"))
            if rng.random() < 0.25:  # a hello the server should accept, sometimes mutated
                presence = {"data": frames.flat_map(), "visible": rng.random() < 0.5} if rng.random() < 0.5 else {}
                hello = visitor_hello(herald, f"hs-{fuzz.sent}", **presence) if role == "visitor" else Hello([1])
                kind, frame = "good hello", codec.encode(hello)
                if rng.random() < 0.3:
                    kind, frame = "mutated hello", frames.mutate(frame)
            else:
                kind, frame = frames.frame(("hello",))
            async with session.ws_connect(f"{herald.base_url}/v1/{role}") as ws:
                await fuzz.send(ws, f"{role} {kind}", frame)
                await fuzz.handshake(ws, role, expect(frame, fuzz.max_bytes))
    fuzz.done()
    await still_serving(herald)
