"""Herald as a process: listen, wait for a stop signal, drain, exit; or
supervise several worker processes that share the port.

``aiohttp.web.run_app`` stops at once on SIGTERM; an instance of a
cluster must instead move its clients elsewhere first (``drain``), so the
process runs its own loop here. With ``workers`` above one, the parent
forks that many copies of the same instance code, each its own cluster
instance with its own socket bound with SO_REUSEPORT, so the kernel
spreads new connections over them. The parent only forwards signals and
restarts a worker that dies while nobody asked it to stop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import logging
import os
import resource
import secrets
import signal
import time

from herald_presence.server.config import Settings
from herald_presence.server.core.connection import CLOSE_TIMEOUT
from herald_presence.server.web.access_log import AccessLogger
from herald_presence.server.web.listener import HeraldRunner, HeraldSite

from .app import make_app
from .drain import drain

log = logging.getLogger(__name__)

RESTART_PAUSE = 1.0  # seconds before a crashed worker is started again
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# CPython's default (700, 10, 10) runs a young collection every 700
# allocations, so whatever a request in flight holds survives two of them and
# is promoted to the oldest generation; those promotions trigger full
# collections, which walk every object of every connection held: 240-335 ms
# pauses every ~10 s at 2,000 round trips/s with 5,000 connections per
# instance (python -m tests.bench). Young collections 14x rarer let in-flight
# objects die young, and cost a few ms at most.
GC_THRESHOLDS = (10_000, 100, 10)


def run(settings: Settings) -> int:
    """Serve until stopped; the process's exit code."""
    _raise_open_file_limit()
    if settings.workers > 1:
        return _supervise(settings)
    return _run_instance(settings, reuse_port=False)


def _run_instance(settings: Settings, reuse_port: bool) -> int:
    try:
        import uvloop  # optional: herald[fast]

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_serve(settings, reuse_port))
    return 0


async def _serve(settings: Settings, reuse_port: bool) -> None:
    app = make_app(settings)
    runner = HeraldRunner(app, settings, access_log_class=AccessLogger, shutdown_timeout=CLOSE_TIMEOUT)
    await runner.setup()
    site = HeraldSite(runner, settings.host, settings.port, reuse_port=reuse_port)
    await site.start()
    # Long-lived objects made so far never need collecting; keeping them out
    # of the GC's generations shortens the pauses that hurt tail latency.
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    print(f"herald listening on http://{settings.host}:{settings.port} (pid {os.getpid()})", flush=True)
    stop, signals = asyncio.Event(), 0
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        stop.set()
        if signals > 1 and draining is not None:  # asked twice: stop now
            draining.cancel()

    draining: asyncio.Task[float] | None = None
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, on_signal)
    try:
        await stop.wait()
        draining = asyncio.create_task(drain(app, [site]))
        with contextlib.suppress(asyncio.CancelledError):
            await draining
    finally:
        await runner.cleanup()  # closes whatever is left with 1001, then the hub


def _raise_open_file_limit() -> None:
    """Every client connection is a file descriptor: take the soft limit up to
    the hard one (as Go programs do), so that ``max_connections``, which stays
    below it, is what the host allows rather than a shell's default of 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20  # Linux refuses an unlimited one
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)


def _share_random_secrets(settings: Settings) -> None:
    """Workers must agree on what is random per start, or a login cookie
    made by one would not open on another."""
    if not settings.session_secret:
        settings.session_secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()


def _supervise(settings: Settings) -> int:
    _share_random_secrets(settings)
    workers: dict[int, int] = {}  # pid -> worker number
    stopping = False

    def start(number: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker: its own loop, signals and exit
            os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the parent only, which asks once
            for signum in STOP_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            code = 1
            try:
                code = _run_instance(settings, reuse_port=True)
            except BaseException:
                log.exception("worker %d failed", number)
            finally:
                logging.shutdown()
                os._exit(code)
        workers[pid] = number

    def forward(_signum: int, _frame: object) -> None:
        """Every worker drains on the first signal and stops at once on the next."""
        nonlocal stopping
        stopping = True
        for pid in list(workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    for signum in STOP_SIGNALS:
        signal.signal(signum, forward)
    for number in range(settings.workers):
        start(number)
    log.info("supervising %d workers on port %d", settings.workers, settings.port)
    failed = False
    while workers:
        pid, status = os.wait()
        number = workers.pop(pid, None)
        if number is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            failed |= code != 0
            continue
        log.error("worker %d (pid %d) exited with %d; starting it again", number, pid, code)
        time.sleep(RESTART_PAUSE)
        if not stopping:
            start(number)
    return 1 if failed else 0
