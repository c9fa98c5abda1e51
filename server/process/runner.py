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
import errno
import gc
import logging
import os
import resource
import secrets
import signal
import socket
import sys
import time

from aiohttp import web

from herald_presence.server import __version__
from herald_presence.server.config import Settings
from herald_presence.server.core.wire import CLOSE_TIMEOUT
from herald_presence.server.web import health
from herald_presence.server.web.access_log import AccessLogger
from herald_presence.server.web.keys import HUB
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


class StartupError(Exception):
    """The instance could not start serving: one line for the operator, and the exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


EX_STARTUP = 78  # a worker that could not start (EX_CONFIG): the supervisor stops rather than restart it
BIND_ERRORS = {
    errno.EADDRINUSE: "the address is already in use (another herald, or another program?)",
    errno.EACCES: "permission denied (ports below 1024 need privileges)",
    errno.EADDRNOTAVAIL: "no such address on this machine",
}


def _run_instance(settings: Settings, reuse_port: bool) -> int:
    try:
        import uvloop  # optional: herald[fast]

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(_serve(settings, reuse_port))


async def _serve(settings: Settings, reuse_port: bool) -> int:
    """Start, serve until a stop signal, drain, clean up. A failure to start
    (a port in use, a signal while waiting for Redis) is a ``StartupError``."""
    loop = asyncio.get_running_loop()
    stop, signals, stopped_by = asyncio.Event(), 0, 0
    draining: asyncio.Task[float] | None = None

    def on_signal(signum: int) -> None:
        nonlocal signals, stopped_by
        signals += 1
        stopped_by = stopped_by or signum
        stop.set()
        if signals > 1 and draining is not None:  # asked twice: stop now
            draining.cancel()

    for signum in STOP_SIGNALS:  # from the start: a Ctrl-C while Redis is not answering is one
        loop.add_signal_handler(signum, on_signal, signum)
    app = make_app(settings)
    runner = HeraldRunner(app, settings, access_log_class=AccessLogger, shutdown_timeout=CLOSE_TIMEOUT)
    # The operators' listener: no access log (a scrape every few seconds), no client budgets.
    metrics_runner = web.AppRunner(health.metrics_app(app), access_log=None) if settings.metrics_port else None
    starting = asyncio.ensure_future(_start(settings, runner, metrics_runner, reuse_port))
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
        # Stopped before serving: nothing to drain. Cancelled again until it
        # ends, since a library may lose one cancellation (Python 3.11's
        # wait_for does when what it waits for completes at that moment).
        while stop.is_set() and not starting.done():
            starting.cancel()
            await asyncio.wait([starting], timeout=0.05)
        if stop.is_set():
            if not starting.cancelled():
                starting.exception()  # whatever it was, the signal came first (and it is not "never retrieved")
            waiting = " while waiting for Redis (not reachable yet)" if not app[HUB].backend.healthy else ""
            name = signal.Signals(stopped_by).name
            raise StartupError(f"stopped by {name}{waiting} before serving", 128 + stopped_by)
        site = starting.result()
    except BaseException:
        await _cleanup(runner, metrics_runner)
        raise
    finally:
        stopping.cancel()
    # Long-lived objects made so far never need collecting; keeping them out
    # of the GC's generations shortens the pauses that hurt tail latency.
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    print(f"herald listening on {listening(settings.host, site.port)} (pid {os.getpid()})", flush=True)
    log.info("herald %s instance %s ready", __version__, app[HUB].instance)
    try:
        await stop.wait()
        draining = asyncio.create_task(drain(app, [site]))  # the metrics listener stays up meanwhile
        with contextlib.suppress(asyncio.CancelledError):
            await draining
    finally:
        await _cleanup(runner, metrics_runner)  # closes whatever is left with 1001, then the hub
    return 0


ALL_INTERFACES = {"", "0.0.0.0", "::", "[::]"}


def local_url(host: str, port: int) -> str:
    """The URL a browser on this machine opens: a loopback address when the
    server listens on every interface (``http://0.0.0.0:…`` leads nowhere)."""
    if host in ALL_INTERFACES:
        host = "[::1]" if ":" in host else "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address in a URL
    return f"http://{host}:{port}"


def listening(host: str, port: int) -> str:
    """Where the server listens, as URLs that work: on every interface, the
    loopback one and the one with this machine's name."""
    if host not in ALL_INTERFACES:
        return local_url(host, port)
    return f"{local_url(host, port)} and http://{socket.gethostname()}:{port} (all interfaces)"


async def _start(
    settings: Settings, runner: HeraldRunner, metrics_runner: web.AppRunner | None, reuse_port: bool
) -> HeraldSite:
    """The instance started (the hub, then its listeners): "ready" follows only
    this. The public site is returned; the metrics one is its runner's."""
    await runner.setup()
    site = HeraldSite(runner, settings.host, settings.port, reuse_port=reuse_port)
    await _bind(site, settings.host, settings.port, "port")
    if metrics_runner is not None:
        await metrics_runner.setup()
        host = settings.metrics_host or settings.host
        metrics_site = web.TCPSite(metrics_runner, host, settings.metrics_port, reuse_port=reuse_port or None)
        await _bind(metrics_site, host, settings.metrics_port, "metrics_port")
        log.info("metrics and health on %s (/metrics, /healthz, /readyz)", listening(host, settings.metrics_port))
    return site


async def _bind(site: web.BaseSite, host: str, port: int, setting: str) -> None:
    try:
        await site.start()
    except OSError as exc:
        reason = BIND_ERRORS.get(exc.errno or 0) or exc.strerror or str(exc)
        raise StartupError(f"cannot listen on {host}:{port} ({setting}): {reason}") from None


async def _cleanup(runner: web.AppRunner, metrics_runner: web.AppRunner | None) -> None:
    if metrics_runner is not None:
        await metrics_runner.cleanup()
    await runner.cleanup()


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
            except StartupError as exc:
                print(f"herald: worker {number}: {exc}", file=sys.stderr, flush=True)
                code = EX_STARTUP if exc.code == 1 else exc.code
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
        if code == EX_STARTUP:  # it would fail again: stop them all
            forward(signal.SIGTERM, None)
            failed = True
            continue
        log.error("worker %d (pid %d) exited with %d; starting it again", number, pid, code)
        time.sleep(RESTART_PAUSE)
        if not stopping:
            start(number)
    return 1 if failed else 0
