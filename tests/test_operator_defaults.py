"""What an operator meets when starting and running ``herald serve`` (issue
18), on real processes and ports: every way it cannot start is one
``herald: ...`` line and a non-zero exit; "ready" only once it listens;
unknown ``HERALD_*`` variables warned about with the closest name, refused
with ``strict_env``; ``/metrics`` off the public port with ``metrics_port``;
an X-Forwarded-For from a peer not trusted logged once, then counted;
``serve --help`` with defaults and environment names, in groups; ``herald
token`` with the secret never on the command line and never one the server
refuses; a group given twice refused; a banner with addresses that work; an
index page at ``/``; ``Server: herald``."""

from __future__ import annotations

import dataclasses
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from herald_presence.protocol import tokens
from herald_presence.server.config import Settings, unknown_environment
from herald_presence.server.process import cli
from herald_presence.server.web import pages

from .processes import (
    CLI_TIMEOUT,
    HERALD,
    REPO,
    START_TIMEOUT,
    STOP_TIMEOUT,
    HeraldProcess,
    clean_env,
    free_port,
    get_json,
    start_server,
)

GROUP = "--group=acme=operator-secret-0123456789"
SCALAR_FIELDS = [f.name for f in dataclasses.fields(Settings) if f.name != "groups"]


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``herald serve ARGS`` (on a free port unless ARGS name one) to its exit."""
    port = [] if "--port" in args else ["--port", str(free_port())]
    return subprocess.run(
        [str(HERALD), "serve", *port, *args],
        cwd=REPO,
        env={**clean_env(), **(env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


def assert_one_line_error(code: int | None, stderr: str, *expected: str) -> str:
    """A non-zero exit whose stderr ends with the one ``herald:`` line, which says ``expected``."""
    assert code not in (0, None), f"exit code {code}\n{stderr}"
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("herald: ")]
    assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0], stderr
    for text in expected:
        assert text in errors[0], stderr
    return errors[0]


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[HeraldProcess]]:
    """Servers a test starts; each stopped by its own PID afterwards."""
    started: list[HeraldProcess] = []
    yield started
    for process in started:
        process.stop()


def status(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as refused:
        return refused.code


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=2) as response:
        text = response.read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples if not s.labels}


# --- start-up errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("secret", "complaint"),
    [("not base64 at all!", "session_secret must be url-safe base64"), ("c2hvcnQ=", "must decode to 32 bytes")],
)
def test_a_bad_session_secret_is_one_line_before_anything_is_printed(secret: str, complaint: str) -> None:
    result = serve(f"--session-secret={secret}")  # no group: it would be demo mode
    assert_one_line_error(result.returncode, result.stderr, complaint)
    assert result.stdout == "", "nothing (no demo banner) before the error"


@pytest.mark.parametrize("which", ["port", "metrics_port"])
def test_a_port_in_use_is_one_line_and_ready_is_never_logged(which: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        args = ["--port", str(busy)] if which == "port" else ["--metrics-port", str(busy)]
        result = serve(GROUP, *args)
    assert_one_line_error(result.returncode, result.stderr, f"cannot listen on 127.0.0.1:{busy} ({which})", "in use")
    assert not re.search(r"instance \w+ ready", result.stderr) and "listening" not in result.stdout


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_while_redis_does_not_answer_at_start_is_one_line(tmp_path: Path, signum: int) -> None:
    """Redis here accepts connections and never answers: the instance is
    still starting (it waits a few seconds for Redis) when it is stopped."""
    with socket.socket() as silent_redis:
        silent_redis.bind(("127.0.0.1", 0))
        silent_redis.listen()
        silent_redis.settimeout(START_TIMEOUT)
        redis_url = f"redis://127.0.0.1:{silent_redis.getsockname()[1]}/0"
        port = free_port()
        process = HeraldProcess(
            [str(HERALD), "serve", GROUP, "--redis-url", redis_url, "--port", str(port)], port, tmp_path
        )
        try:
            connection, _ = silent_redis.accept()  # herald is connecting to Redis: it is starting
            with connection:
                process.proc.send_signal(signum)
                code = process.proc.wait(STOP_TIMEOUT)
        finally:
            process.kill()
    line = assert_one_line_error(code, process.stderr(), f"stopped by {signal.Signals(signum).name}", "Redis")
    assert code == 128 + signum, line
    assert not re.search(r"instance \w+ ready", process.stderr())


# --- HERALD_* variables that are no setting -----------------------------------------------


def test_an_unknown_variable_is_a_warning_naming_the_closest_setting(
    tmp_path: Path, servers: list[HeraldProcess]
) -> None:
    env = {"HERALD_REDIS_UR": "redis://127.0.0.1:1/0", "HERALD_GROUP": "acme=operator-secret-0123456789"}
    servers.append(process := start_server(tmp_path, str(HERALD), "serve", env=env))
    stderr = process.stderr()
    assert "HERALD_REDIS_UR is not a Herald setting (did you mean HERALD_REDIS_URL?)" in stderr, stderr
    assert "HERALD_GROUP is not a Herald setting (did you mean HERALD_GROUPS?)" in stderr, stderr
    assert "WARNING" in stderr.split("HERALD_REDIS_UR")[0].splitlines()[-1]
    assert "DEMO MODE" in process.stdout()  # what was warned about: the groups were not read
    assert get_json(process.base_url + "/readyz")["backend"] is True  # the memory backend


@pytest.mark.parametrize("strict", [{"HERALD_STRICT_ENV": "1"}, "--strict-env=true"])
def test_strict_env_refuses_an_unknown_variable(strict: dict[str, str] | str) -> None:
    env = {"HERALD_REDIS_UR": "redis://127.0.0.1:1/0", **(strict if isinstance(strict, dict) else {})}
    result = serve(GROUP, *([strict] if isinstance(strict, str) else []), env=env)
    assert_one_line_error(result.returncode, result.stderr, "HERALD_REDIS_UR", "did you mean HERALD_REDIS_URL?")
    assert "strict_env" in result.stderr


def test_strict_env_leaves_kubernetes_service_links_alone(tmp_path: Path, servers: list[HeraldProcess]) -> None:
    env = {
        "HERALD_STRICT_ENV": "true",
        "HERALD_REDIS_SERVICE_HOST": "10.0.0.12",
        "HERALD_REDIS_PORT": "tcp://10.0.0.12:6379",
        "HERALD_REDIS_PORT_6379_TCP_ADDR": "10.0.0.12",
    }
    servers.append(process := start_server(tmp_path, str(HERALD), "serve", GROUP, env=env))
    assert "not a Herald setting" not in process.stderr()


# --- the metrics listener ------------------------------------------------------------------


def test_metrics_port_takes_metrics_off_the_public_port(tmp_path: Path, servers: list[HeraldProcess]) -> None:
    metrics_port = free_port()
    servers.append(process := start_server(tmp_path, str(HERALD), "serve", GROUP, f"--metrics-port={metrics_port}"))
    metrics_url = f"http://127.0.0.1:{metrics_port}"
    assert status(process.base_url + "/metrics") == 404
    assert "herald_backend_up" in scrape(metrics_url + "/metrics")
    for base in (process.base_url, metrics_url):
        assert get_json(base + "/healthz")["status"] == "ok"
        assert get_json(base + "/readyz")["ready"] is True
    assert f"metrics and health on http://127.0.0.1:{metrics_port}" in process.stderr()


def test_without_metrics_port_metrics_stay_on_the_public_port(tmp_path: Path, servers: list[HeraldProcess]) -> None:
    servers.append(process := start_server(tmp_path, str(HERALD), "serve", GROUP))
    assert "herald_backend_up" in scrape(process.base_url + "/metrics")


# --- X-Forwarded-For from a peer not trusted -------------------------------------------------


def wait_for(predicate: Callable[[], bool], what: str, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.parametrize("trusted", [False, True])
def test_forwarded_for_from_an_untrusted_peer_is_logged_once_then_counted(
    tmp_path: Path, servers: list[HeraldProcess], trusted: bool
) -> None:
    metrics_port = free_port()
    trust = ["--trusted-proxies=127.0.0.1"] if trusted else []
    argv = [str(HERALD), "serve", GROUP, f"--metrics-port={metrics_port}", *trust]
    servers.append(process := start_server(tmp_path, *argv))
    for client in ("203.0.113.5", "203.0.113.6", "203.0.113.7"):
        assert status(process.base_url + "/healthz", {"X-Forwarded-For": client}) == 200
    counted = scrape(f"http://127.0.0.1:{metrics_port}/metrics")["herald_untrusted_forwarded_for_total"]
    warning = "carries X-Forwarded-For, but 127.0.0.1 is not in trusted_proxies"
    if trusted:
        assert counted == 0 and warning not in process.stderr()
        return
    assert counted == 3
    wait_for(lambda: warning in process.stderr(), "the warning is logged")
    assert process.stderr().count(warning) == 1, process.stderr()


# --- herald serve --help ----------------------------------------------------------------------


def test_serve_help_groups_every_flag_with_its_environment_name_and_default(capsys: pytest.CaptureFixture[str]) -> None:
    grouped = [name for names in cli.SECTIONS.values() for name in names]
    assert sorted(grouped) == sorted(SCALAR_FIELDS), "every setting in exactly one section of --help"
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    titles = [text.index(f"\n{title}:\n") for title in ("configuration sources", *cli.SECTIONS)]
    assert titles == sorted(titles), "the sections in their order"
    defaults = Settings()
    for title, names in cli.SECTIONS.items():
        section = text[text.index(f"\n{title}:\n") :]
        for name in names:
            flag = "--" + name.replace("_", "-")
            entry = re.search(rf"^  {flag} .*?(?=^  --|^\S|\Z)", section, re.MULTILINE | re.DOTALL)
            assert entry, f"{flag} is not in the section {title!r}"
            default = getattr(defaults, name)
            shown = str(default).lower() if isinstance(default, bool) else '""' if default == "" else str(default)
            assert f"[env HERALD_{name.upper()}; default: {shown}]" in " ".join(entry[0].split()), entry[0]
    assert "HERALD_GROUPS" in text and "defaults < TOML file (--config) < environment" in " ".join(text.split())


# --- herald token ---------------------------------------------------------------------------


def token_cli(*args: str, env: dict[str, str] | None = None, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HERALD), "token", *args],
        cwd=REPO,
        env={**clean_env(), **(env or {})},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


SECRET = "token-secret-0123456789"
VISITOR = ("visitor", "--group", "acme", "--id", "cust-42")


def assert_signed_with(result: subprocess.CompletedProcess[str], secret: str) -> None:
    assert result.returncode == 0, result.stderr
    tokens.verify_token([secret], "visitor", "acme", "cust-42", result.stdout.strip())


@pytest.mark.parametrize("source", ["HERALD_TOKEN_SECRET", "standard input", "HERALD_GROUPS", "--config"])
def test_token_reads_the_secret_from_the_environment_the_configuration_or_standard_input(
    tmp_path: Path, source: str
) -> None:
    config = tmp_path / "herald.toml"
    config.write_text(f'[groups.acme]\nsecrets = ["{SECRET}", "previous-secret-0123456789"]\n')
    result = {
        "HERALD_TOKEN_SECRET": lambda: token_cli(*VISITOR, env={"HERALD_TOKEN_SECRET": SECRET}),
        "standard input": lambda: token_cli(*VISITOR, stdin=SECRET + "\n"),
        "HERALD_GROUPS": lambda: token_cli(*VISITOR, env={"HERALD_GROUPS": f"beta={'b' * 16},acme={SECRET}"}),
        "--config": lambda: token_cli(*VISITOR, "--config", str(config)),  # the current (first) secret
    }[source]()
    assert_signed_with(result, SECRET)


def test_a_token_secret_in_the_environment_is_no_unknown_setting_for_the_server() -> None:
    assert unknown_environment({"HERALD_TOKEN_SECRET": SECRET, "HERALD_TOKEN_SECRETS": SECRET}) == [
        "HERALD_TOKEN_SECRETS is not a Herald setting (did you mean HERALD_TOKEN_SECRET?)"
    ]


@pytest.mark.parametrize(
    ("args", "env", "stdin", "complaint"),
    [
        (VISITOR, {"HERALD_TOKEN_SECRET": "short"}, "", "needs a secret of at least 16 characters"),
        (VISITOR, {}, "too-short\n", "needs a secret of at least 16 characters"),
        ((*VISITOR, "--secret", SECRET), {}, "", "readable by every user of the machine"),
        (("visitor", "--group", "no spaces", "--id", "v"), {"HERALD_TOKEN_SECRET": SECRET}, "", "group"),
        (("visitor", "--group", "acme"), {"HERALD_TOKEN_SECRET": SECRET}, "", "--id is required"),
        ((*VISITOR, "--ttl", "0"), {"HERALD_TOKEN_SECRET": SECRET}, "", "--ttl must be above 0"),
        ((*VISITOR, "--ttl", str(400 * 86400)), {"HERALD_TOKEN_SECRET": SECRET}, "", "--ttl must be above 0"),
    ],
    ids=["short-env", "short-stdin", "on-argv", "bad-group", "no-id", "ttl-0", "ttl-too-long"],
)
def test_token_refuses_what_the_server_would_refuse(
    args: tuple[str, ...], env: dict[str, str], stdin: str, complaint: str
) -> None:
    result = token_cli(*args, env=env, stdin=stdin)
    assert_one_line_error(result.returncode, result.stderr, complaint)
    assert result.stdout == "" and SECRET not in result.stderr


# --- groups given twice -------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["flags", "environment"])
def test_a_group_given_twice_is_an_error(where: str) -> None:
    pairs = ["acme=first-secret-0123456789", "acme=second-secret-0123456789"]
    if where == "flags":
        result = serve(*(f"--group={pair}" for pair in pairs))
    else:
        result = serve(env={"HERALD_GROUPS": ",".join(pairs)})
    assert_one_line_error(result.returncode, result.stderr, "group 'acme' is given twice")


# --- what a browser and a scanner see ----------------------------------------------------------


def test_on_all_interfaces_the_banner_prints_addresses_that_work(tmp_path: Path, servers: list[HeraldProcess]) -> None:
    servers.append(process := start_server(tmp_path, str(HERALD), "serve", "--host", "0.0.0.0"))
    stdout = process.stdout()
    assert "0.0.0.0" not in stdout, stdout
    assert f"http://127.0.0.1:{process.port}/console" in stdout  # demo credentials are for loopback names only
    assert f"herald listening on http://127.0.0.1:{process.port} and http://{socket.gethostname()}:{process.port}" in (
        stdout
    )


def test_the_root_is_an_index_page_under_the_pages_policy(tmp_path: Path, servers: list[HeraldProcess]) -> None:
    servers.append(process := start_server(tmp_path, str(HERALD), "serve", GROUP))
    with urllib.request.urlopen(process.base_url + "/", timeout=2) as response:
        page = response.read().decode()
        headers = response.headers
    assert headers["Content-Type"].startswith("text/html")
    assert headers["Content-Security-Policy"] == pages.CSP
    assert 'href="/console"' in page
    # The demo pages' links are there only for index.js to show in demo mode (it asks /demo/credentials).
    assert re.search(r'<section [^>]*id="demo"[^>]* hidden>', page)
    assert '<script type="module" src="/static/index.js">' in page


def raw_request(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer and (chunk := sock.recv(4096)):
            answer += chunk
    return answer


def test_every_answer_names_the_server_herald_without_versions(tmp_path: Path, servers: list[HeraldProcess]) -> None:
    metrics_port = free_port()
    servers.append(process := start_server(tmp_path, str(HERALD), "serve", GROUP, f"--metrics-port={metrics_port}"))
    answers = {
        "page": raw_request(process.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        "404": raw_request(process.port, b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        "unparsable": raw_request(process.port, b"GARBAGE\x01 / HTTP/1.1\r\n\r\n"),
        "metrics": raw_request(metrics_port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        "websocket": raw_request(
            process.port,
            b"GET /v1/visitor HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        ),
    }
    for what, answer in answers.items():
        head = answer.split(b"\r\n\r\n")[0].decode()
        servers_named = re.findall(r"^Server: (.*?)\r?$", head, re.MULTILINE | re.IGNORECASE)
        assert servers_named == ["herald"], f"{what}:\n{head}"
    assert re.match(rb"HTTP/1\.[01] 400 ", answers["unparsable"])
    assert "Unhandled exception" not in process.stderr(), "the access log takes an unparsable request as it is"
    assert answers["websocket"].startswith(b"HTTP/1.1 101")
