"""Configuration: defaults < TOML file < ``HERALD_*`` environment < flags.

Every setting has one name used in all four places (``grace_period`` is
``grace_period`` in TOML, ``HERALD_GRACE_PERIOD`` in the environment and
``--grace-period`` on the command line), so the README's table is the whole
story.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import difflib
import functools
import hashlib
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from herald_presence.protocol.checks import (
    MAX_DATA_FIELDS,
    MAX_FRAME_BYTES,
    MAX_ICE_SERVERS,
    MAX_ICE_URLS,
    MAX_KEY_CHARS,
    MAX_PAYLOAD_BYTES,
    MAX_VALUE_CHARS,
    identifier,
)
from herald_presence.protocol.errors import HeraldError, ProtocolError

DEMO_GROUP = "demo"

log = logging.getLogger(__name__)


class ConfigError(HeraldError):
    pass


@dataclass(slots=True)
class GroupConfig:
    """A customer's group: the secrets its back end signs tokens with (two
    at once during a rotation) and the browser origins allowed to connect."""

    id: str
    secrets: list[str]
    allowed_origins: list[str] = field(default_factory=list)
    allow_anonymous: bool = False  # visitors without an ID (pre-login pages) may connect
    allow_consumer_codes: bool = False  # pages without a back end may create and redeem short codes over REST
    enforce_expiry: bool = False  # a connection is closed when its credential expires, unless it sent a refresh
    jwt_algorithm: str = "HS256"  # the one JWT algorithm accepted: HS256 (the secrets), RS256 or ES256 (jwks_*)
    jwt_audience: str = "herald"  # the "aud" a JWT must carry
    jwks_file: str = ""  # the group's public keys (a JWKS document) for RS256/ES256 JWTs
    jwks_url: str = ""  # or where to fetch them (cached for 5 minutes)
    demo: bool = False
    ice_servers: list[dict[str, Any]] = field(default_factory=list)  # STUN/TURN for session members (check_ice_servers)
    presence_fields: list[str] | None = None  # the presence data fields agents may see; None: any
    webhooks: list[dict[str, Any]] = field(default_factory=list)  # endpoints events are posted to (check_webhooks)
    event_retention: float | None = None  # seconds its events are kept for the audit trail; None: the setting's


@dataclass(slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8765
    metrics_port: int = 0  # a second listener for /metrics, /healthz, /readyz; 0: none, /metrics on the public port
    metrics_host: str = ""  # where the metrics listener binds; empty: host
    keepalive: float = 25.0  # seconds between server pings; silence for 1.5x this closes
    handshake_timeout: float = 10.0  # a connection must say hello within this
    grace_period: float = 5.0  # a clean disconnect is announced after this
    signal_hold: float = 10.0  # a signal for a reconnecting visitor waits this long
    delivery_timeout: float = 3.0  # wait for another instance to confirm a delivery
    max_frame_bytes: int = MAX_FRAME_BYTES
    max_session_frame_bytes: int = MAX_PAYLOAD_BYTES + 16 * 1024  # a session member's session_signal (an SDP)
    max_queue: int = 1024  # outbound frames buffered per connection before "slow consumer"
    max_queue_bytes: int = 4 * 1024 * 1024  # ... or their bytes (beyond the socket's own buffers)
    message_rate: float = 50.0  # frames per second a connection may send, sustained
    message_burst: int = 100  # frames a connection may send at once above the rate
    message_bytes_rate: int = 64 * 1024  # bytes per second a connection may send, sustained (pings too)
    message_bytes_burst: int = 256 * 1024  # bytes a connection may send at once above it (>= the largest frame)
    address_message_budget: int = 10  # an address's connections together: this many connections' frames and bytes
    connections_per_address: int = 60  # new websockets per client address per minute (per instance)
    max_connections_per_address: int = 256  # TCP connections open at once from one untrusted address (per instance)
    max_connections: int = 0  # TCP connections open at once per instance; 0: the open-file limit less a reserve
    request_timeout: float = 10.0  # seconds to send a request's headers (since connecting or an answer), then its body
    max_connections_per_visitor: int = 10  # tabs and devices of one visitor at once
    max_subscriptions_per_agent: int = 1000  # visitor IDs and session keys one agent connection may watch
    max_presence_bytes: int = 4096  # a connection's presence data, msgpack-encoded
    max_presence_fields: int = MAX_DATA_FIELDS  # fields of a connection's presence data (the protocol allows 32)
    presence_rate: float = 4.0  # presence changes per second a connection makes; faster ones coalesce, latest wins
    max_signal_bytes: int = 8192  # a signal's data, msgpack-encoded
    visitor_signal_rate: float = 10.0  # signals per second one visitor may send one agent connection
    visitor_signal_burst: int = 20  # signals one visitor may send one agent connection at once
    overload_lag: float = 0.05  # event-loop lag (s) past which agents' new signals are refused; 0: never
    max_signals_in_flight: int = 1000  # deliveries waiting for other instances' replies before refusing more
    session_secret: str = ""  # 32 url-safe base64 bytes; random per start when empty
    session_max_age: int = 8 * 3600
    cookie_secure: bool = False
    cookie_samesite: str = "Lax"
    session_ttl: float = 8 * 3600  # a support session (and a claimed code) lives at most this long
    code_length: int = 6  # default digits of a short code; groups may change theirs at run time
    code_ttl: float = 300.0  # default seconds an unclaimed short code lives
    code_lookups_per_address: int = 10  # short-code look-ups per client address per minute
    failed_credentials_per_address: int = 30  # refused logins or admin tokens per client address per minute
    code_lookups_per_group: int = 300  # short-code look-ups per group per minute, all addresses together
    admin_token: str = ""  # bearer token of the admin API; empty disables it
    trusted_proxies: str = ""  # comma-separated addresses/CIDRs whose X-Forwarded-For names the client
    redis_url: str = ""
    redis_prefix: str = "herald"  # namespace of every key and channel
    redis_ca_file: str = ""  # PEM CA bundle that signs Redis's TLS certificate (rediss URLs); empty: the system's
    instance_heartbeat: float = 1.0  # seconds between an instance's heartbeats in Redis
    instance_dead_after: float = 8.0  # a silent instance's visitors are dropped after this
    drain_timeout: float = 20.0  # SIGTERM to exit, at most: clients are moved, then the process stops
    drain_spread: float = 5.0  # connections are told to reconnect at random moments over this many seconds
    workers: int = 1  # processes sharing the port (SO_REUSEPORT); more than one needs redis_url
    log_level: str = "INFO"
    log_format: str = "text"  # text, or json: one object per line with the connection ID
    strict_env: bool = False  # refuse to start on a HERALD_* variable that is no setting (else warn)
    webhooks: str = ""  # JSON {"<group>": [endpoint, ...]}: webhook endpoints added to the TOML's
    webhook_allow_private: bool = False  # let webhooks reach loopback and private addresses (else refused: SSRF)
    webhook_timeout: float = 10.0  # seconds a webhook POST may take
    webhook_retry_first: float = 1.0  # seconds before the first retry; doubling (with jitter) up to 300
    webhook_retry_for: float = 3600.0  # seconds after an event it is retried; then it is dead-lettered
    webhook_batch: int = 50  # events in one POST at most (one when the endpoint keeps up)
    webhook_concurrency: int = 4  # POSTs in flight per endpoint and instance (an endpoint may set its own)
    webhook_claim_after: float = 30.0  # seconds an instance's undelivered events wait before another takes them
    event_retention: float = 7 * 86400.0  # seconds a group's events are kept for the audit trail
    event_log_max: int = 100_000  # events kept per group at most
    groups: dict[str, GroupConfig] = field(default_factory=dict)

    @property
    def queue_limits(self) -> tuple[int, int]:
        """A connection's outbound queue: at most this many frames, and bytes."""
        return self.max_queue, self.max_queue_bytes


@functools.cache
def trusted_networks(spec: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """``trusted_proxies`` parsed (once per distinct value)."""
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in spec.split(",") if part.strip())


_SCALAR_FIELDS = {f.name: f for f in dataclasses.fields(Settings) if f.name != "groups"}


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _coerce(name: str, raw: Any) -> Any:
    """A setting's value from TOML (typed) or env/flags (text), strictly:
    no silent rounding, no booleans as numbers, only finite numbers."""
    kind = type(getattr(Settings(), name))
    value: Any = None
    if kind is bool:
        if isinstance(raw, bool):
            value = raw
        elif isinstance(raw, str) and raw.lower() in _TRUE + _FALSE:
            value = raw.lower() in _TRUE
    elif kind is int:
        if type(raw) is int:
            value = raw
        elif isinstance(raw, str) and re.fullmatch(r"-?[0-9]+", raw.strip()):
            value = int(raw)
    elif kind is float:
        if type(raw) in (int, float):
            value = float(raw)
        elif isinstance(raw, str):
            try:
                value = float(raw)
            except ValueError:
                value = None
        if value is not None and not math.isfinite(value):
            value = None
    elif isinstance(raw, str):
        value = raw
    if value is None:
        raise ConfigError(f"{name}: cannot read {raw!r} as {kind.__name__}")
    return value


def _parse_group_pairs(text: str) -> dict[str, GroupConfig]:
    """``"acme=s3cret,beta=other"`` -> groups (env var and --group flag form).
    A group named twice is an error: keeping one of the two secrets silently
    would refuse every token signed with the other."""
    groups: dict[str, GroupConfig] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        group_id, sep, secret = item.partition("=")
        if not sep or not secret:
            raise ConfigError(f"group {item!r}: expected id=secret")
        if group_id in groups:
            raise ConfigError(f"group {group_id!r} is given twice; give each group once")
        _add_group(groups, group_id, {"secret": secret})
    return groups


MIN_SECRET_LENGTH = 16  # a group's secret, and the admin token


def check_group_id(group_id: str) -> None:
    try:
        identifier(group_id, "group")
    except ProtocolError as exc:
        raise ConfigError(str(exc)) from None


def check_group_secret(group_id: str, secret: object) -> None:
    """What the server refuses in a group's secret (``herald token`` refuses the same)."""
    if not isinstance(secret, str) or len(secret) < MIN_SECRET_LENGTH:
        raise ConfigError(f"group {group_id!r}: needs a secret of at least {MIN_SECRET_LENGTH} characters")


_GROUP_KEYS = {
    "secret",
    "secrets",
    "allowed_origins",
    "allow_anonymous",
    "allow_consumer_codes",
    "enforce_expiry",
    "jwt_algorithm",
    "jwt_audience",
    "jwks_file",
    "jwks_url",
    "ice_servers",
    "presence_fields",
    "webhooks",
    "event_retention",
}
ICE_SCHEMES = ("stun:", "stuns:", "turn:", "turns:")
TURN_SCHEMES = ("turn:", "turns:")
DEFAULT_TURN_TTL = 86400  # seconds TURN credentials made for a member last (the TURN REST API's advice)
MIN_TURN_TTL, MAX_TURN_TTL = 60, 7 * 86400


def check_ice_servers(value: Any) -> list[dict[str, Any]]:
    """A group's STUN/TURN servers (TOML ``[[groups.<id>.ice_servers]]`` or the
    admin API), normalised, or ``ValueError`` saying what is wrong. A TURN
    server takes its shared ``secret`` (coturn's ``use-auth-secret``) and the
    ``ttl`` of the credentials made from it; never a fixed username and
    password, which would reach every member's browser."""
    if not isinstance(value, list) or len(value) > MAX_ICE_SERVERS:
        raise ValueError(f"ice_servers must be a list of at most {MAX_ICE_SERVERS} servers")
    servers = []
    for i, server in enumerate(value):
        where = f"ice_servers[{i}]"
        if not isinstance(server, Mapping):
            raise ValueError(f"{where} must be a table with urls")
        unknown = set(server) - {"urls", "secret", "ttl"}
        if unknown:
            raise ValueError(
                f"{where}: unknown keys {sorted(unknown)} (a TURN server takes its shared secret,"
                " never a fixed username and password)"
            )
        urls = server.get("urls")
        urls = [urls] if isinstance(urls, str) else urls
        if (
            not isinstance(urls, list)
            or not 0 < len(urls) <= MAX_ICE_URLS
            or not all(isinstance(u, str) and u.startswith(ICE_SCHEMES) and len(u) <= MAX_VALUE_CHARS for u in urls)
        ):
            raise ValueError(f"{where}.urls must be 1-{MAX_ICE_URLS} stun:, stuns:, turn: or turns: URLs")
        turn = any(url.startswith(TURN_SCHEMES) for url in urls)
        secret, ttl = server.get("secret"), server.get("ttl", DEFAULT_TURN_TTL)
        if turn and (not isinstance(secret, str) or not secret):
            raise ValueError(f"{where}: a TURN server needs its shared secret (coturn's static-auth-secret)")
        if not turn and ("secret" in server or "ttl" in server):
            raise ValueError(f"{where}: only a TURN server takes a secret and a ttl")
        if type(ttl) is not int or not MIN_TURN_TTL <= ttl <= MAX_TURN_TTL:
            raise ValueError(f"{where}.ttl must be {MIN_TURN_TTL}-{MAX_TURN_TTL} seconds")
        servers.append({"urls": list(urls), "secret": secret, "ttl": ttl} if turn else {"urls": list(urls)})
    return servers


def check_presence_fields(value: Any) -> list[str]:
    """A group's allow-list of presence data fields, or ``ValueError``."""
    if (
        not isinstance(value, list)
        or len(value) > MAX_DATA_FIELDS
        or not all(isinstance(key, str) and 0 < len(key) <= MAX_KEY_CHARS for key in value)
    ):
        raise ValueError(f"presence_fields must be a list of at most {MAX_DATA_FIELDS} field names")
    return list(value)


JWT_ALGORITHMS = ("HS256", "RS256", "ES256")  # one is pinned per group; "none" never

# -- webhooks ------------------------------------------------------------------
# The events a group's endpoints may ask for (PROTOCOL.md §13); model/events.py builds them.
EVENT_TYPES = (
    "visitor.online",
    "visitor.offline",
    "terms.requested",
    "terms.displayed",
    "terms.accepted",
    "terms.declined",
    "session.started",
    "session.joined",
    "session.left",
    "session.ended",
    "code.created",
    "code.redeemed",
    "code.expired",
)
TERMS_ANSWERS = ("displayed", "accepted", "declined")  # what a visitor's terms signal may say
MAX_WEBHOOKS = 16  # endpoints per group (TOML, environment and admin API together)
MAX_WEBHOOK_CONCURRENCY = 64
MAX_URL_CHARS = 2048
MIN_RETENTION = 60.0
_ENDPOINT_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def valid_event_pattern(pattern: object) -> bool:
    """An event type, a family (``session.*``) or every event (``*``)."""
    if not isinstance(pattern, str):
        return False
    if pattern == "*" or pattern in EVENT_TYPES:
        return True
    return pattern.endswith(".*") and any(t.startswith(pattern[:-1]) for t in EVENT_TYPES)


def public_address(address: str) -> bool:
    """Whether ``address`` is a public internet address: loopback, private,
    link-local (cloud metadata), carrier-grade NAT, multicast, reserved and
    unspecified ones are not, nor IPv4 addresses mapped or embedded in IPv6
    that are not."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None and not public_address(str(embedded)):
            return False
    return ip.is_global and not ip.is_multicast


def _literal_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def check_webhook_url(url: object, allow_private: bool) -> str:
    """An endpoint's URL: http(s), a host, no credentials in it (they would be
    logged and shown), and, unless ``allow_private``, no loopback or private
    address written in it (names are checked again each time they resolve)."""
    if not isinstance(url, str) or not 0 < len(url) <= MAX_URL_CHARS or not url.isascii():
        raise ValueError(f"url must be an http or https URL of at most {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        raise ValueError("url is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("url must be an http or https URL with a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("url must not carry credentials; the endpoint's secret signs every request")
    if any(c in url for c in " \r\n\t"):
        raise ValueError("url must not contain spaces or control characters")
    host = parts.hostname.rstrip(".").lower()
    private = host == "localhost" or host.endswith(".localhost") or (_literal_host(host) and not public_address(host))
    if private and not allow_private:
        raise ValueError(f"url {host} is a loopback or private address: refused (webhook_allow_private=true allows it)")
    return url


def check_webhooks(value: Any, allow_private: bool = True) -> list[dict[str, Any]]:
    """A group's webhook endpoints, normalised, or ``ValueError``: each
    ``{id?, url, events?, secret, concurrency?}``; ``events`` defaults to
    every type, ``id`` to one made from the URL. The address check of
    ``check_webhook_url`` is made once the settings are known
    (``check_webhook_addresses``): TOML may come before the setting."""
    if not isinstance(value, list) or len(value) > MAX_WEBHOOKS:
        raise ValueError(f"webhooks must be a list of at most {MAX_WEBHOOKS} endpoints")
    endpoints, ids = [], set()
    for i, endpoint in enumerate(value):
        where = f"webhooks[{i}]"
        if not isinstance(endpoint, Mapping):
            raise ValueError(f"{where} must be a table with url, secret and events")
        unknown = set(endpoint) - {"id", "url", "events", "secret", "concurrency"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        try:
            url = check_webhook_url(endpoint.get("url"), allow_private)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        endpoint_id = endpoint.get("id", hashlib.sha256(url.encode()).hexdigest()[:12])
        if not isinstance(endpoint_id, str) or not _ENDPOINT_ID.match(endpoint_id):
            raise ValueError(f"{where}.id must be 1-64 letters, digits, '.', '_' or '-'")
        if endpoint_id in ids:
            raise ValueError(f"{where}: the id {endpoint_id!r} is taken (give each endpoint its own id)")
        ids.add(endpoint_id)
        events = endpoint.get("events", ["*"])
        if not isinstance(events, list) or not events or len(events) > 32 or not all(map(valid_event_pattern, events)):
            raise ValueError(f"{where}.events must list event types ({', '.join(EVENT_TYPES)}), 'family.*' or '*'")
        secret = endpoint.get("secret")
        if not isinstance(secret, str) or not MIN_SECRET_LENGTH <= len(secret) <= 256:
            raise ValueError(f"{where}.secret must be {MIN_SECRET_LENGTH}-256 characters (it signs every request)")
        concurrency = endpoint.get("concurrency")
        limit = MAX_WEBHOOK_CONCURRENCY
        if concurrency is not None and (type(concurrency) is not int or not 1 <= concurrency <= limit):
            raise ValueError(f"{where}.concurrency must be 1-{MAX_WEBHOOK_CONCURRENCY}")
        endpoints.append(
            {"id": endpoint_id, "url": url, "events": list(events), "secret": secret, "concurrency": concurrency}
        )
    return endpoints


def _apply_webhooks(settings: Settings) -> None:
    """The ``webhooks`` setting (JSON, from the environment or a flag) added to
    the groups' TOML endpoints, and every endpoint's address checked against
    ``webhook_allow_private``."""
    if settings.webhooks.strip():
        try:
            by_group = json.loads(settings.webhooks)
        except ValueError:
            raise ConfigError('webhooks must be JSON: {"<group>": [{"url", "secret", "events"}, ...]}') from None
        if not isinstance(by_group, dict):
            raise ConfigError('webhooks must be a JSON object: {"<group>": [endpoint, ...]}')
        for group_id, endpoints in by_group.items():
            group = settings.groups.get(group_id)
            if group is None:
                raise ConfigError(f"webhooks: no group {group_id!r} is configured")
            try:
                group.webhooks = check_webhooks([*group.webhooks, *endpoints] if isinstance(endpoints, list) else None)
            except ValueError as exc:
                raise ConfigError(f"webhooks of group {group_id!r}: {exc}") from None
    for group in settings.groups.values():
        for endpoint in group.webhooks:
            try:
                check_webhook_url(endpoint["url"], settings.webhook_allow_private)
            except ValueError as exc:
                raise ConfigError(f"group {group.id!r}: webhook {endpoint['id']!r}: {exc}") from None


def _add_group(groups: dict[str, GroupConfig], group_id: str, table: Any) -> None:
    check_group_id(group_id)
    if not isinstance(table, Mapping):
        raise ConfigError(f"group {group_id!r}: expected a table with secret(s) and allowed_origins")
    unknown = set(table) - _GROUP_KEYS
    if unknown:
        raise ConfigError(f"group {group_id!r}: unknown keys {sorted(unknown)}")
    found = table.get("secrets") or ([table["secret"]] if table.get("secret") else [])
    if not isinstance(found, list) or not found:
        check_group_secret(group_id, None)
    for secret in found:
        check_group_secret(group_id, secret)
    origins = table.get("allowed_origins", [])
    if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
        raise ConfigError(f"group {group_id!r}: allowed_origins must be a list of strings")
    flags = {name: table.get(name, False) for name in ("allow_anonymous", "allow_consumer_codes", "enforce_expiry")}
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ConfigError(f"group {group_id!r}: {name} must be true or false")
    jwt = {name: table.get(name, default) for name, default in _JWT_DEFAULTS.items()}
    _check_jwt(group_id, jwt)
    retention = table.get("event_retention")
    if retention is not None and (type(retention) not in (int, float) or retention < MIN_RETENTION):
        raise ConfigError(f"group {group_id!r}: event_retention must be at least {MIN_RETENTION:.0f} seconds")
    try:
        ice = check_ice_servers(table.get("ice_servers", []))
        fields = None if table.get("presence_fields") is None else check_presence_fields(table["presence_fields"])
        hooks = check_webhooks(table.get("webhooks", []))
    except ValueError as exc:
        raise ConfigError(f"group {group_id!r}: {exc}") from None
    groups[group_id] = GroupConfig(
        group_id,
        list(found),
        list(origins),
        **flags,
        **jwt,
        ice_servers=ice,
        presence_fields=fields,
        webhooks=hooks,
        event_retention=None if retention is None else float(retention),
    )


_JWT_DEFAULTS = {"jwt_algorithm": "HS256", "jwt_audience": "herald", "jwks_file": "", "jwks_url": ""}


def _check_jwt(group_id: str, jwt: dict[str, Any]) -> None:
    """One algorithm per group: HS256 signs with the group's secrets (no
    public keys); RS256 and ES256 verify with the keys of exactly one of
    ``jwks_file`` and ``jwks_url`` (an https URL, or http on a loopback host)."""
    if not all(isinstance(value, str) for value in jwt.values()):
        raise ConfigError(f"group {group_id!r}: jwt_algorithm, jwt_audience, jwks_file and jwks_url are strings")
    algorithm, keys = jwt["jwt_algorithm"], [jwt["jwks_file"], jwt["jwks_url"]]
    if algorithm not in JWT_ALGORITHMS:
        raise ConfigError(f"group {group_id!r}: jwt_algorithm must be one of {', '.join(JWT_ALGORITHMS)}")
    if not jwt["jwt_audience"]:
        raise ConfigError(f"group {group_id!r}: jwt_audience must not be empty")
    if algorithm == "HS256" and any(keys):
        raise ConfigError(f"group {group_id!r}: HS256 signs with the group's secrets; jwks_file/jwks_url need RS/ES256")
    if algorithm != "HS256" and sum(bool(k) for k in keys) != 1:
        raise ConfigError(f"group {group_id!r}: {algorithm} needs exactly one of jwks_file and jwks_url")
    url = jwt["jwks_url"]
    loopback = re.match(r"http://(127\.[0-9.]+|localhost|\[::1\])(:[0-9]+)?/", url)
    if url and not (url.startswith("https://") or loopback):
        raise ConfigError(f"group {group_id!r}: jwks_url must be https (or http on a loopback address)")


# Variables Kubernetes sets for every Service of the namespace (service links):
# a Service "herald-redis" gives HERALD_REDIS_SERVICE_HOST, HERALD_REDIS_PORT=tcp://...
_SERVICE_LINK = re.compile(r"(_SERVICE_(HOST|PORT)|_PORT_\d+_(TCP|UDP|SCTP))(_\w+)?$")
_SERVICE_LINK_VALUE = re.compile(r"(tcp|udp|sctp)://", re.IGNORECASE)
TOKEN_SECRET_ENV = "HERALD_TOKEN_SECRET"  # what ``herald token`` signs with; no setting of the server


def unknown_environment(env: Mapping[str, str]) -> list[str]:
    """One sentence per ``HERALD_*`` variable that is no setting, naming the
    closest setting (a typo like ``HERALD_REDIS_UR`` would otherwise start
    the memory backend without a word). Kubernetes' service-link variables
    are not Herald's and are left alone."""
    known = [*_SCALAR_FIELDS, "groups", TOKEN_SECRET_ENV[7:].lower()]
    found = []
    for key in sorted(env):
        name = key[7:].lower()
        if not key.startswith("HERALD_") or name in known:
            continue
        if _SERVICE_LINK.search(key) or _SERVICE_LINK_VALUE.match(env[key]):
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f" (did you mean HERALD_{close[0].upper()}?)" if close else ""
        found.append(f"{key} is not a Herald setting{hint}")
    return found


def load(
    toml_path: str | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    warnings: list[str] | None = None,
) -> Settings:
    """The settings from every source. Unknown ``HERALD_*`` variables are
    refused with ``strict_env``, else each is a warning: appended to
    ``warnings`` when given (the CLI logs them once logging is set up), else
    logged here."""
    env = os.environ if env is None else env
    settings = Settings()
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if toml_path:
        try:
            data = tomllib.loads(Path(toml_path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{toml_path}: {exc}") from None
        group_tables = data.pop("groups", {})
        if not isinstance(group_tables, dict):
            raise ConfigError(f"{toml_path}: groups must be tables ([groups.<id>])")
        for group_id, table in group_tables.items():
            _add_group(settings.groups, group_id, table)
        layers.append((toml_path, data))
    layers.append(("environment", {k[7:].lower(): v for k, v in env.items() if k.startswith("HERALD_")}))
    layers.append(("flags", {k: v for k, v in (flags or {}).items() if v is not None}))
    for source, values in layers:
        for name, raw in values.items():
            if name == "groups":
                settings.groups.update(_parse_group_pairs(raw) if isinstance(raw, str) else raw)
            elif name in _SCALAR_FIELDS:
                setattr(settings, name, _coerce(name, raw))
            elif source != "environment":  # unknown HERALD_* variables: below, once strict_env is known
                raise ConfigError(f"{source}: unknown setting {name!r}")
    _validate(settings)
    _apply_webhooks(settings)
    unknown = unknown_environment(env)
    if unknown and settings.strict_env:
        raise ConfigError(f"{'; '.join(unknown)}; strict_env refuses unknown HERALD_* variables")
    for problem in unknown:
        message = f"{problem}: ignored (strict_env=true refuses to start instead)"
        if warnings is None:
            log.warning("%s", message)
        else:
            warnings.append(message)
    return settings


def session_key(secret: str) -> bytes:
    """``session_secret`` as the 32-byte key it must decode to."""
    try:
        key = base64.urlsafe_b64decode(secret.encode("ascii"))
    except (ValueError, binascii.Error):
        raise ConfigError("session_secret must be url-safe base64 (32 random bytes)") from None
    if len(key) != 32:
        raise ConfigError(f"session_secret must decode to 32 bytes, not {len(key)}")
    return key


def _validate(settings: Settings) -> None:
    for name in ("keepalive", "handshake_timeout", "delivery_timeout", "instance_heartbeat", "presence_rate"):
        if getattr(settings, name) <= 0:
            raise ConfigError(f"{name} must be positive")
    for name in ("grace_period", "signal_hold", "overload_lag"):
        if getattr(settings, name) < 0:
            raise ConfigError(f"{name} must not be negative")
    if settings.max_signals_in_flight < 1:
        raise ConfigError("max_signals_in_flight must be at least 1")
    if settings.visitor_signal_rate <= 0 or settings.visitor_signal_burst < 1:
        raise ConfigError("visitor_signal_rate must be positive and visitor_signal_burst at least 1")
    if not 1 <= settings.max_presence_fields <= MAX_DATA_FIELDS:
        raise ConfigError(f"max_presence_fields must be 1-{MAX_DATA_FIELDS} (the protocol's ceiling)")
    if not 4 <= settings.code_length <= 12:
        raise ConfigError("code_length must be 4-12")
    if settings.admin_token and len(settings.admin_token) < MIN_SECRET_LENGTH:
        raise ConfigError(f"admin_token must be at least {MIN_SECRET_LENGTH} characters")
    if not 0 <= settings.port <= 65535 or not 0 <= settings.metrics_port <= 65535:
        raise ConfigError("port and metrics_port must be between 0 and 65535")
    if settings.metrics_port and settings.metrics_port == settings.port:
        raise ConfigError("metrics_port must differ from port (or be 0: no metrics listener)")
    if settings.session_secret:
        session_key(settings.session_secret)
    if settings.drain_timeout <= 0 or settings.drain_spread < 0:
        raise ConfigError("drain_timeout must be positive and drain_spread not negative")
    if settings.workers < 1:
        raise ConfigError("workers must be at least 1")
    if settings.max_connections_per_address < 1 or settings.max_connections < 0:
        raise ConfigError("max_connections_per_address must be at least 1, max_connections not negative (0: automatic)")
    if settings.request_timeout <= 0:
        raise ConfigError("request_timeout must be positive")
    if settings.workers > 1 and not settings.redis_url:
        raise ConfigError("workers > 1 needs redis_url: each worker is an instance of a cluster")
    if settings.workers > 1 and settings.port == 0:
        raise ConfigError("workers > 1 needs a fixed port: the workers share it")
    try:
        trusted_networks(settings.trusted_proxies)
    except ValueError as exc:
        raise ConfigError(f"trusted_proxies: {exc}") from None
    if settings.log_format not in ("text", "json"):
        raise ConfigError("log_format must be text or json")
    if settings.max_frame_bytes < 1024 or settings.max_queue < 1 or settings.max_queue_bytes < 1024:
        raise ConfigError("max_frame_bytes and max_queue_bytes must be at least 1024 and max_queue at least 1")
    if settings.address_message_budget < 1:
        raise ConfigError("address_message_budget must be at least 1")
    if settings.max_session_frame_bytes < settings.max_frame_bytes:
        raise ConfigError("max_session_frame_bytes must be at least max_frame_bytes")
    largest = max(settings.max_frame_bytes, settings.max_session_frame_bytes)
    if settings.message_bytes_rate <= 0 or settings.message_bytes_burst < largest:
        raise ConfigError(
            "message_bytes_rate must be positive and message_bytes_burst at least max_frame_bytes"
            " and max_session_frame_bytes"
        )
    if settings.instance_dead_after < settings.instance_heartbeat * 3:
        raise ConfigError("instance_dead_after must be at least 3 heartbeats")
    if not settings.redis_prefix or any(c in settings.redis_prefix for c in "{} "):
        raise ConfigError("redis_prefix must be non-empty without braces or spaces")
    if settings.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError("log_level must be DEBUG, INFO, WARNING or ERROR")
    if settings.cookie_samesite not in ("Strict", "Lax", "None"):
        raise ConfigError("cookie_samesite must be Strict, Lax or None")
    if settings.webhook_timeout <= 0 or settings.webhook_retry_first <= 0 or settings.webhook_claim_after <= 0:
        raise ConfigError("webhook_timeout, webhook_retry_first and webhook_claim_after must be positive")
    if settings.webhook_retry_for < 0:
        raise ConfigError("webhook_retry_for must not be negative")
    if not 1 <= settings.webhook_batch <= 1000 or not 1 <= settings.webhook_concurrency <= MAX_WEBHOOK_CONCURRENCY:
        raise ConfigError(f"webhook_batch must be 1-1000 and webhook_concurrency 1-{MAX_WEBHOOK_CONCURRENCY}")
    if settings.event_retention < MIN_RETENTION or settings.event_log_max < 100:
        raise ConfigError(f"event_retention must be at least {MIN_RETENTION:.0f} s and event_log_max at least 100")


def ensure_demo_group(settings: Settings) -> GroupConfig | None:
    """With no group configured, add a demo group with a secret made now.

    A zero-config server therefore has no open door: whoever wants to
    connect needs the secret printed on this server's console.
    """
    if settings.groups:
        return None
    # The demo pages include the consumer short-code flow: the demo group opts in.
    group = GroupConfig(DEMO_GROUP, [secrets.token_urlsafe(24)], allow_consumer_codes=True, demo=True)
    settings.groups[DEMO_GROUP] = group
    return group
