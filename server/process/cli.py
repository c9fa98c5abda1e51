"""``herald serve`` and ``herald token``."""

from __future__ import annotations

import argparse
import getpass
import math
import os
import signal
import sys
import textwrap
from collections.abc import Sequence

from herald_presence.protocol import checks, tokens
from herald_presence.protocol.errors import ProtocolError
from herald_presence.server import __version__
from herald_presence.server.config import (
    TOKEN_SECRET_ENV,
    ConfigError,
    GroupConfig,
    Settings,
    check_group_id,
    check_group_secret,
    ensure_demo_group,
    load,
)

HELP = {
    "host": "address to listen on",
    "port": "port to listen on",
    "metrics_port": "port of a second listener for /metrics, /healthz and /readyz, for operators only; "
    "when set, /metrics leaves the public port (0: no such listener)",
    "metrics_host": "address the metrics listener binds (empty: the same as host)",
    "keepalive": "seconds of silence before a server ping (0.8-1x per connection); silent for 1.5x this closes",
    "handshake_timeout": "seconds a new connection has to send its hello",
    "grace_period": "seconds before a visitor whose last connection closed is announced offline",
    "signal_hold": "seconds a signal waits for a reconnecting visitor before it expires",
    "delivery_timeout": "seconds to wait for another instance to confirm a delivery",
    "max_frame_bytes": "largest accepted frame; bigger ones close the connection with 1009",
    "max_session_frame_bytes": "largest session_signal a support session's member may send (an SDP of up to "
    "64 KiB); other frames are held to max_frame_bytes",
    "max_queue": "outbound frames queued per connection before it is closed as a slow consumer",
    "max_queue_bytes": "outbound bytes queued per connection (beyond its socket's buffers) before it is closed as a "
    "slow consumer; a frame larger than this alone still waits",
    "message_rate": "frames per second a connection may send, sustained (token bucket)",
    "message_burst": "frames a connection may send at once above the rate",
    "message_bytes_rate": "bytes per second a connection may send, sustained (token bucket; pings count)",
    "message_bytes_burst": "bytes a connection may send at once above the rate (at least the largest frame)",
    "address_message_budget": "what one client address's connections may send together (per instance), in "
    "connections' worth of the frame rate, the byte budget and their bursts",
    "connections_per_address": "new websocket connections per client address per minute, per instance",
    "max_connections_per_address": "TCP connections one client address may hold open at once, per instance",
    "max_connections": "TCP connections open at once per instance (0: the open-file limit less 256)",
    "request_timeout": "seconds to send a request's headers (since connecting or the last answer), then its body",
    "max_connections_per_visitor": "connections (tabs, devices) one visitor may hold at once",
    "max_subscriptions_per_agent": "visitor IDs and session keys one agent connection may watch",
    "max_presence_bytes": "largest presence data of a connection (msgpack bytes)",
    "max_presence_fields": "most fields in a connection's presence data (at most the protocol's 32)",
    "presence_rate": "presence changes per second a connection makes; faster ones coalesce, latest wins",
    "max_signal_bytes": "largest data of one signal (msgpack bytes)",
    "visitor_signal_rate": "signals per second one visitor may send one agent connection (more are dropped)",
    "visitor_signal_burst": "signals one visitor may send one agent connection at once above the rate",
    "overload_lag": (
        "seconds the event loop may run late before agents' new signals are refused (overloaded); past a"
        " fifth of it, deliveries through other instances that all wait (the fastest of 60 ms) refuse the"
        " excess share of them, holding that wait near a tenth; 0: never"
    ),
    "max_signals_in_flight": "deliveries to other instances awaiting their reply before new signals are refused",
    "session_secret": "32 url-safe base64 bytes encrypting agent session cookies (random per start if empty)",
    "session_max_age": "seconds an agent login lasts",
    "cookie_secure": "mark the session cookie Secure (set it behind HTTPS)",
    "cookie_samesite": "SameSite of the session cookie: Strict, Lax or None",
    "session_ttl": "seconds a support session (and a claimed short code) lives at most",
    "code_length": "default digits of a short code (groups can change theirs at run time)",
    "code_ttl": "default seconds an unclaimed short code lives",
    "code_lookups_per_address": "short-code look-ups allowed per client address per minute",
    "failed_credentials_per_address": "refused agent logins or admin tokens allowed per client address per minute",
    "code_lookups_per_group": "short-code look-ups allowed per group per minute, all addresses together",
    "admin_token": "bearer token of the admin API (at least 16 characters); empty disables it",
    "trusted_proxies": "comma-separated addresses or CIDRs of proxies whose X-Forwarded-For names the client",
    "redis_url": (
        "Redis URL for cluster mode: redis[s]://[user:password@]host:port/db, redis+sentinel://host:port,.../service"
        " or redis+cluster://host:port,... (Redis Cluster seed nodes); empty keeps the embedded memory backend"
    ),
    "redis_prefix": "prefix of every Redis key and channel (several clusters can share a Redis)",
    "redis_ca_file": "PEM file of the CA that signs Redis's TLS certificate (rediss:// URLs); empty: the system's CAs",
    "instance_heartbeat": "seconds between an instance's heartbeats in Redis",
    "instance_dead_after": "seconds without a heartbeat before an instance's visitors are dropped",
    "drain_timeout": "seconds from SIGTERM to exit at most; clients are moved to other instances meanwhile",
    "drain_spread": "seconds over which a draining instance asks its connections to reconnect (at most half the drain)",
    "workers": "processes serving the port together (SO_REUSEPORT); more than 1 needs redis_url",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "log_format": "text, or json (one object per line, with connection IDs)",
    "strict_env": "refuse to start when a HERALD_* environment variable is not a setting (else a warning names it)",
    "webhooks": 'webhook endpoints as JSON {"<group>": [{"url", "secret", "events"?, "id"?, "concurrency"?}]}',
    "webhook_allow_private": "let webhooks reach loopback, private and link-local addresses (else refused: SSRF)",
    "webhook_timeout": "seconds a webhook POST may take before it counts as failed",
    "webhook_retry_first": "seconds before a failed webhook POST is retried; doubling with jitter, at most 300",
    "webhook_retry_for": "seconds after an event its webhook deliveries are retried; then it is dead-lettered",
    "webhook_batch": "events in one webhook POST at most (more than one only while the endpoint lags)",
    "webhook_concurrency": "webhook POSTs in flight per endpoint and instance (an endpoint may set its own)",
    "webhook_claim_after": "seconds before another instance delivers the events of one that stopped (died)",
    "event_retention": "seconds a group's events are kept for the audit trail (a group may set its own)",
    "event_log_max": "events kept per group at most (the oldest go first)",
}


# ``herald serve --help`` shows the settings in these groups, in this order;
# every setting is in exactly one (tests/test_cli.py checks).
SECTIONS: dict[str, tuple[str, ...]] = {
    "listening": ("host", "port", "metrics_port", "metrics_host", "workers", "trusted_proxies"),
    "connections and timeouts": (
        "keepalive",
        "handshake_timeout",
        "request_timeout",
        "grace_period",
        "signal_hold",
        "delivery_timeout",
        "drain_timeout",
        "drain_spread",
    ),
    "limits per client address and instance": (
        "connections_per_address",
        "max_connections_per_address",
        "max_connections",
        "code_lookups_per_address",
        "code_lookups_per_group",
        "failed_credentials_per_address",
    ),
    "limits per connection": (
        "max_frame_bytes",
        "max_session_frame_bytes",
        "max_queue",
        "max_queue_bytes",
        "message_rate",
        "message_burst",
        "message_bytes_rate",
        "message_bytes_burst",
        "address_message_budget",
        "max_connections_per_visitor",
        "max_subscriptions_per_agent",
        "max_presence_bytes",
        "max_presence_fields",
        "presence_rate",
        "max_signal_bytes",
        "visitor_signal_rate",
        "visitor_signal_burst",
    ),
    "overload": ("overload_lag", "max_signals_in_flight"),
    "agent sessions, cookies, short codes and the admin API": (
        "session_secret",
        "session_max_age",
        "cookie_secure",
        "cookie_samesite",
        "session_ttl",
        "code_length",
        "code_ttl",
        "admin_token",
    ),
    "Redis (cluster mode)": ("redis_url", "redis_prefix", "redis_ca_file", "instance_heartbeat", "instance_dead_after"),
    "webhooks and the audit trail": (
        "webhooks",
        "webhook_allow_private",
        "webhook_timeout",
        "webhook_retry_first",
        "webhook_retry_for",
        "webhook_batch",
        "webhook_concurrency",
        "webhook_claim_after",
        "event_retention",
        "event_log_max",
    ),
    "logging and start-up": ("log_level", "log_format", "strict_env"),
}

SERVE_DESCRIPTION = (
    "Run the server. Every setting has one name in four places; later sources win: "
    "defaults < TOML file (--config) < environment (HERALD_<NAME>) < flags. "
    "With no group configured it starts in demo mode."
)


def _shown(value: object) -> str:
    """A default as ``--help`` shows it."""
    if isinstance(value, bool):
        return str(value).lower()
    return '""' if value == "" else str(value)


def _metavar(value: object) -> str:
    if isinstance(value, bool):
        return "true|false"
    return "N" if isinstance(value, int | float) else "TEXT"


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's, wrapping each line of a flag's help on its own (the
    environment name and default go on a line of their own)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return [wrapped for line in text.splitlines() for wrapped in textwrap.wrap(line, width) or [""]]


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser(
        "serve",
        help="run the server",
        description=SERVE_DESCRIPTION,
        usage="herald serve [--config FILE] [--group ID=SECRET ...] [--<setting> VALUE ...]",
        formatter_class=_HelpFormatter,
    )
    sources = serve.add_argument_group("configuration sources")
    sources.add_argument("--config", metavar="FILE", help="TOML file with settings and [groups.<id>] tables")
    sources.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="ID=SECRET",
        help="add a group, its secret at least 16 characters (repeatable, each ID once)\n"
        "[env HERALD_GROUPS=id=secret,id2=secret2; default: a demo group]",
    )
    defaults = Settings()
    for title, names in SECTIONS.items():
        group = serve.add_argument_group(title)
        for name in names:
            default = getattr(defaults, name)
            group.add_argument(
                "--" + name.replace("_", "-"),
                dest=name,
                metavar=_metavar(default),
                help=f"{HELP[name]}\n[env HERALD_{name.upper()}; default: {_shown(default)}]",
            )


TOKEN_DESCRIPTION = (
    "Print a visitor token, agent login key or REST API key signed with the group's secret: "
    "Herald's own format, or with --jwt an HS256 JWT (claims sub, group, role, aud, iat, exp; PROTOCOL.md §4.2). "
    f"The secret is read from the environment ({TOKEN_SECRET_ENV}), else from the group's configuration "
    "(--config FILE or HERALD_GROUPS), else from standard input (asked for without echo on a terminal): "
    "never from the command line, where every user of the machine can read it (ps, shell history)."
)


def _token_parser(sub: argparse._SubParsersAction) -> None:
    token = sub.add_parser(
        "token", help="mint a visitor token, agent login key or REST API key", description=TOKEN_DESCRIPTION
    )
    token.add_argument("role", choices=[tokens.VISITOR, tokens.AGENT, tokens.API])
    token.add_argument("--group", required=True)
    token.add_argument("--id", help="the visitor or agent ID (not for api)")
    token.add_argument(
        "--config", metavar="FILE", help="the server's TOML file, to take the group's secret (and jwt_audience) from"
    )
    token.add_argument("--ttl", type=float, default=3600, help="seconds the token is valid (default: 3600)")
    token.add_argument(
        "--jwt",
        action="store_true",
        help="mint an HS256 JWT instead of Herald's own format (for a group whose jwt_algorithm is HS256)",
    )
    token.add_argument(
        "--audience",
        metavar="AUD",
        help=f"the JWT's aud claim (default: the group's jwt_audience when configured, else {tokens.JWT_AUDIENCE})",
    )
    token.add_argument("--secret", help=argparse.SUPPRESS)  # only "-" (standard input), as it used to be


def _configured_group(args: argparse.Namespace) -> GroupConfig | None:
    """The group's configuration when one is given (--config FILE or
    HERALD_GROUPS); a --config FILE without the group is an error."""
    if not (args.config or os.environ.get("HERALD_GROUPS")):
        return None
    group = load(args.config, warnings=[]).groups.get(args.group)
    if group is None and args.config:
        raise ConfigError(f"group {args.group!r} is not in {args.config} (nor in HERALD_GROUPS)")
    return group


def _token_secret(args: argparse.Namespace, configured: GroupConfig | None) -> str:
    """The secret to sign with, from the first place that has one
    (``TOKEN_DESCRIPTION``): the environment, the group's configuration,
    standard input."""
    secret = os.environ.get(TOKEN_SECRET_ENV)
    if secret is not None:
        return secret.strip()
    if configured is not None:
        return configured.secrets[0]  # the current one: the first during a rotation
    if sys.stdin is None:
        raise ConfigError(f"no secret: set {TOKEN_SECRET_ENV} or pipe it on standard input")
    if sys.stdin.isatty():
        return getpass.getpass(f"secret of group {args.group}: ").strip()
    secret = sys.stdin.readline().strip()
    if not secret:
        raise ConfigError(f"no secret on standard input (or set {TOKEN_SECRET_ENV}, or give --config)")
    return secret


def _token(args: argparse.Namespace) -> None:
    """``herald token``: refuses whatever the server would refuse, so a token it prints is one the server can take."""
    try:
        if args.secret not in (None, "-"):
            raise ConfigError(
                f"a secret on the command line is readable by every user of the machine (ps, shell history):"
                f" set {TOKEN_SECRET_ENV}, or pipe it on standard input"
            )
        check_group_id(args.group)
        if args.role != tokens.API:
            if args.id is None:
                raise ConfigError("--id is required for visitor and agent tokens")
            try:
                checks.identifier(args.id, "id")
            except ProtocolError as exc:
                raise ConfigError(str(exc)) from None
        if not (math.isfinite(args.ttl) and 0 < args.ttl <= tokens.MAX_TOKEN_LIFETIME):
            raise ConfigError(
                f"--ttl must be above 0 and at most {tokens.MAX_TOKEN_LIFETIME} seconds (what the server takes)"
            )
        if args.audience is not None and not args.jwt:
            raise ConfigError("--audience is for JWTs: add --jwt")
        needs_config = args.jwt or os.environ.get(TOKEN_SECRET_ENV) is None
        configured = _configured_group(args) if needs_config else None
        audience = _jwt_audience(args, configured) if args.jwt else ""
        secret = _token_secret(args, configured)
        check_group_secret(args.group, secret)
    except ConfigError as exc:
        sys.exit(f"herald: {exc}")
    subject = args.group if args.role == tokens.API else args.id
    if args.jwt:
        print(tokens.make_jwt(secret, args.role, args.group, subject, args.ttl, audience))
    elif args.role == tokens.API:
        print(tokens.api_key(secret, args.group, args.ttl))
    else:
        print(tokens.make_token(secret, args.role, args.group, subject, args.ttl))


def _jwt_audience(args: argparse.Namespace, configured: GroupConfig | None) -> str:
    """The ``aud`` of a JWT for the group; refused for a group that takes no HS256 JWTs."""
    if configured is not None and configured.jwt_algorithm != "HS256":
        raise ConfigError(
            f"group {args.group!r} takes {configured.jwt_algorithm} JWTs, signed with your private key;"
            " --jwt mints HS256 (the group's secret) only"
        )
    audience = args.audience or (configured.jwt_audience if configured is not None else tokens.JWT_AUDIENCE)
    if not audience.strip():
        raise ConfigError("--audience must not be empty")
    return audience


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="herald", description="Herald presence and signalling server")
    parser.add_argument("--version", action="version", version=f"herald {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _token_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "token":
        _token(args)
        return
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config", "group")}
    if args.group:
        flags["groups"] = ",".join(args.group)
    warnings: list[str] = []
    try:
        settings = load(args.config, flags=flags, warnings=warnings)
    except ConfigError as exc:
        sys.exit(f"herald: {exc}")
    serve(settings, warnings)


SERVER_EXTRA = ("aiohttp_session", "redis", "prometheus_client")  # the "server" extra's imports


def serve(settings: Settings, warnings: Sequence[str] = ()) -> None:
    """Run the server; every way it cannot start is one ``herald: ...`` line
    on stderr and a non-zero exit, never a traceback."""
    try:
        _serve(settings, warnings)
    except KeyboardInterrupt:  # before the server's own signal handling is in place
        print("herald: interrupted while starting", file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGINT)


def _serve(settings: Settings, warnings: Sequence[str]) -> None:
    import logging

    from herald_presence.server import logs

    try:
        from . import runner
    except ModuleNotFoundError as exc:
        if exc.name not in SERVER_EXTRA:
            raise
        sys.exit(f"herald: serving needs the server's dependencies: pip install 'herald-presence[server]' ({exc})")
    logs.setup(settings.log_level, settings.log_format)
    for warning in warnings:  # found while loading the settings, before logging was set up
        logging.getLogger("herald_presence.server.config").warning("%s", warning)
    demo = ensure_demo_group(settings)
    if demo is not None:
        # The demo pages get credentials only on this machine, by a loopback name: the URL says one.
        local = runner.local_url(settings.host, settings.port)
        print(
            "\n  DEMO MODE: no group is configured, so this server made a demo group for trying it out.\n"
            f"  group: {demo.id}\n  secret: {demo.secrets[0]}   (random, new at every start)\n"
            f"  visitor token: echo <secret> | herald token visitor --group {demo.id} --id <visitor>\n"
            f"  in a browser on this machine: {local}/console and {local}/demo/visitor\n"
            "  Configure real groups with --group ID=SECRET, HERALD_GROUPS or a TOML file.\n",
            flush=True,
        )
    try:
        code = runner.run(settings)
    except ConfigError as exc:  # found while building the app (a malformed redis_url)
        sys.exit(f"herald: {exc}")
    except runner.StartupError as exc:  # a port in use, a stop signal before serving
        print(f"herald: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.code)
    sys.exit(code)


if __name__ == "__main__":
    main()
