"""Prometheus metrics, served at ``/metrics``.

One registry for the process (instances of a cluster are processes; tests
that run several apps in one process read deltas). What an operator needs
to see without reading logs: how many clients are here, what flows in and
out, how long deliveries take, what fails and why, and whether the backend
holds up. Hot paths count through children looked up once per label value.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from herald_presence.protocol.codec import frame_type

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)  # process_resident_memory_bytes, CPU seconds, open fds

LIMIT_HITS = Counter(
    "herald_limit_hits",
    "Frames, requests and connections refused or closed by a limit, by the setting that set it",
    ["limit"],
    registry=REGISTRY,
)
CONNECTIONS = Gauge("herald_connections", "Open websocket connections, by role", ["role"], registry=REGISTRY)
TCP_CONNECTIONS = Gauge(
    "herald_tcp_connections",
    "Client TCP connections open on this instance (websockets, HTTP, and sockets that sent nothing yet)",
    registry=REGISTRY,
)
CONNECTIONS_OPENED = Counter(
    "herald_connections_opened",
    "Websocket connections that completed the handshake, by role",
    ["role"],
    registry=REGISTRY,
)
MESSAGES_IN = Counter(
    "herald_messages_received",
    "Frames received from clients, by role and message type",
    ["role", "type"],
    registry=REGISTRY,
)
MESSAGES_OUT = Counter(
    "herald_messages_sent",
    "Frames written to clients, by role and message type",
    ["role", "type"],
    registry=REGISTRY,
)
ERRORS = Counter(
    "herald_errors",
    "Error answers (error frames, refused handshakes, HTTP errors), by error code",
    ["code"],
    registry=REGISTRY,
)
SIGNAL_DELIVERY = Histogram(
    "herald_signal_delivery_seconds",
    "From an agent's signal arriving to its answer (delivered count or error), by outcome",
    ["outcome"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0),
    registry=REGISTRY,
)
HELD_SIGNALS = Gauge(
    "herald_held_signals",
    "Signals this instance's agents sent that wait for a reconnecting visitor",
    registry=REGISTRY,
)
HELD_OUTCOMES = Counter(
    "herald_held_signals_resolved",
    "Held signals by how they ended: delivered or expired",
    ["outcome"],
    registry=REGISTRY,
)
SLOW_CONSUMERS = Counter(
    "herald_slow_consumer_disconnects",
    "Connections closed because they did not read their frames",
    ["role"],
    registry=REGISTRY,
)
BACKEND_UP = Gauge(
    "herald_backend_up", "1 while the backend is reachable and its bus subscription proven", registry=REGISTRY
)
BACKEND_RECONNECTS = Counter(
    "herald_backend_reconnects", "Times the cluster backend (Redis) came back after being lost", registry=REGISTRY
)
DRAINING = Gauge("herald_draining", "1 from SIGTERM until the process exits", registry=REGISTRY)
UNTRUSTED_FORWARDED = Counter(
    "herald_untrusted_forwarded_for",
    "Requests with an X-Forwarded-For header from a peer not in trusted_proxies (the header was ignored)",
    registry=REGISTRY,
)

EVENTS_RECORDED = Counter(
    "herald_events_recorded",
    "Events appended to their group's log (webhooks and the audit trail), by type",
    ["type"],
    registry=REGISTRY,
)
EVENTS_LOST = Counter(
    "herald_events_lost",
    "Events dropped before reaching the log (the backend was away longer than the retry queue lasts)",
    registry=REGISTRY,
)
WEBHOOK_EVENTS = Counter(
    "herald_webhook_events",
    "Events an endpoint was due, by how they ended: delivered, dead_lettered after webhook_retry_for, or "
    "abandoned (memory mode: still undelivered when the process stopped)",
    ["endpoint", "outcome"],
    registry=REGISTRY,
)
WEBHOOK_REQUESTS = Counter(
    "herald_webhook_requests",
    "Webhook POSTs by outcome: ok (2xx), http_error, timeout, network_error, refused_address (SSRF guard)",
    ["endpoint", "outcome"],
    registry=REGISTRY,
)
WEBHOOK_LAG = Histogram(
    "herald_webhook_lag_seconds",
    "From an event being recorded to its delivery to an endpoint (retries included)",
    ["endpoint"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0),
    registry=REGISTRY,
)
WEBHOOK_PENDING = Gauge(
    "herald_webhook_pending",
    "Events this instance holds for an endpoint, not delivered yet (queued, in flight or waiting to retry)",
    ["endpoint"],
    registry=REGISTRY,
)

# Children that exist from the start, so that dashboards show zeros, not gaps.
for _role in ("visitor", "agent"):
    CONNECTIONS.labels(role=_role)
    CONNECTIONS_OPENED.labels(role=_role)
    SLOW_CONSUMERS.labels(role=_role)
for _outcome in ("delivered", "error"):
    SIGNAL_DELIVERY.labels(outcome=_outcome)
for _outcome in ("delivered", "expired"):
    HELD_OUTCOMES.labels(outcome=_outcome)

# Label children of the metrics every message moves, by their label values:
# label look-ups are the slow part (a lock and a dict per call).
_children: dict[tuple[Counter | Histogram, tuple[str, ...]], Any] = {}


def _child(metric: Counter | Histogram, *values: str) -> Any:
    child = _children.get((metric, values))
    if child is None:
        child = _children[metric, values] = metric.labels(*values)
    return child


def event_recorded(event_type: str) -> None:
    _child(EVENTS_RECORDED, event_type).inc()


def signal_answered(outcome: str, seconds: float) -> None:
    """An agent's signal answered (``delivered`` or ``error``) ``seconds`` after it arrived."""
    _child(SIGNAL_DELIVERY, outcome).observe(seconds)


def limit_hit(limit: str) -> None:
    LIMIT_HITS.labels(limit=limit).inc()


def error(code: str) -> None:
    ERRORS.labels(code=code).inc()


def connection_opened(role: str) -> None:
    CONNECTIONS.labels(role=role).inc()
    CONNECTIONS_OPENED.labels(role=role).inc()


def received(role: str, message_type: str) -> None:
    _child(MESSAGES_IN, role, message_type).inc()


def sent(role: str, frame: bytes) -> None:
    _child(MESSAGES_OUT, role, frame_type(frame)).inc()


def exposition(backend_up: bool, draining: bool) -> tuple[bytes, str]:
    """The registry in Prometheus's text format, and its content type. Gauges
    of state are set from what is true when scraped, never kept in step by hand."""
    BACKEND_UP.set(1 if backend_up else 0)
    DRAINING.set(1 if draining else 0)
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
