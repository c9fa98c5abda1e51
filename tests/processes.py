"""Herald as separate processes: what operators run, and what tests kill.

Each server gets a free loopback port and files for its output (a full pipe
would stall it); it is stopped by its own PID, never by name.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
HERALD = Path(sys.executable).parent / "herald"
START_TIMEOUT = 15.0  # seconds for a server to answer /healthz
STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL
CLI_TIMEOUT = 20.0  # seconds for a one-shot command


def required_binary(name: str, install: str) -> str:
    """A program the tests run (on PATH, or in /usr/sbin and /usr/local/bin
    where Debian puts daemons): a skip without it, a failure under CI=true,
    where everything the tests need must be installed."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/bin")
    if found is None:
        message = f"{name} is not installed ({install})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def stop_processes(processes: Iterable[subprocess.Popen[bytes]], timeout: float) -> None:
    """Stop the tests' own processes by PID: SIGCONT first (a test may have
    frozen one), SIGTERM to all, then wait, and SIGKILL what outlives ``timeout``."""
    processes = list(processes)
    for process in processes:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env() -> dict[str, str]:
    """This environment minus ``HERALD_*``, so the caller's settings never leak into a test server."""
    return {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}


def get_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


class HeraldProcess:
    """A server process; its output goes to files (a full pipe would stall it)."""

    def __init__(self, argv: list[str], port: int, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.argv, self.port = argv, port
        self.stdout_path = workdir / f"herald-{port}.stdout"
        self.stderr_path = workdir / f"herald-{port}.stderr"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                argv, cwd=REPO, env={**clean_env(), **(env or {})}, stdin=subprocess.DEVNULL, stdout=out, stderr=err
            )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def output(self) -> str:
        return f"$ {' '.join(self.argv)}\n--- stdout\n{self.stdout()}--- stderr\n" + self.stderr_path.read_text(
            errors="replace"
        )

    def wait_ready(self, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        """Poll /healthz until it answers; fail with the server's output if it dies or never does."""
        deadline = time.monotonic() + timeout
        while True:
            if (code := self.proc.poll()) is not None:
                pytest.fail(f"herald exited with {code} before answering /healthz\n{self.output()}")
            try:
                return dict(get_json(self.base_url + "/healthz", timeout=1.0))
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"herald did not answer /healthz within {timeout}s\n{self.output()}")
                time.sleep(0.05)

    def pause(self) -> None:
        """SIGSTOP: alive, its sockets open, doing nothing (a long GC pause, a starved VM)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: the instance dies without a word, as in an OOM kill."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)

    def stop(self) -> None:
        """SIGTERM this PID; SIGKILL if it has not exited after STOP_TIMEOUT."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)


StartServer = Callable[..., HeraldProcess]


def start_server(workdir: Path, *argv: str, env: dict[str, str] | None = None) -> HeraldProcess:
    """Start ``argv --port <free port>`` (with ``env`` added to a clean
    environment) and wait until it answers; stopped if it does not."""
    port = free_port()
    process = HeraldProcess([*argv, "--port", str(port)], port, workdir, env)
    try:
        process.wait_ready()
    except BaseException:
        process.stop()
        raise
    return process
