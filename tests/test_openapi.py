"""The OpenAPI document (``GET /v1/openapi.json``) is true of the live server.

``test_every_route_is_in_the_document`` compares the document with the
application's router: no route undocumented, nothing documented that is not
served. ``test_schemathesis_finds_no_answer_outside_the_document`` runs
schemathesis against an in-process server (tests/harness.py): requests
generated from the document, with and without valid credentials, for the
test group or any other, must each get a status the document lists for the
operation, with its content type, headers and body schema, and never a 500.
``HERALD_OPENAPI_EXAMPLES`` (default 25) sets the examples per operation.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections import Counter
from typing import Any

import aiohttp
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from herald_presence.protocol import tokens
from herald_presence.server.web.openapi import PATH

from .harness import SECRET, HeraldServer
from .harness import settings as herald_settings

EXAMPLES = int(os.environ.get("HERALD_OPENAPI_EXAMPLES", "25"))
ADMIN_TOKEN = "admin-token-for-openapi-0123"
# Webhook endpoints the generated requests set go here (nobody listens): never to a generated host on the internet.
NOWHERE = "http://127.0.0.1:9/hook"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]

# Valid requests, and requests that break the document (wrong types, missing fields): both must be answered
# with a documented status (a 400 for the latter, mostly) and never a 500.
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
async def herald() -> Any:
    overrides = {"admin_token": ADMIN_TOKEN, "webhook_allow_private": "true"}
    server = await HeraldServer(herald_settings(consumer_codes=("acme",), **overrides)).start()
    yield server
    await server.stop()


async def fetch_document(herald: HeraldServer) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(herald.base_url + PATH) as response:
        assert response.status == 200 and response.content_type == "application/json"
        document: dict[str, Any] = await response.json()
        return document


async def test_every_route_is_in_the_document(herald: HeraldServer) -> None:
    document = await fetch_document(herald)
    assert document["openapi"].startswith("3.1")
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in herald.app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    documented = {(method, path) for path, item in document["paths"].items() for method in item}
    assert served - documented == set(), "routes the document does not describe"
    assert documented - served == set(), "operations the server does not serve"


async def test_schemathesis_finds_no_answer_outside_the_document(herald: HeraldServer) -> None:
    document = await fetch_document(herald)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        key = tokens.agent_key(SECRET, "acme", "alice")
        login = await http.post(
            herald.base_url + "/v1/agent/login", json={"group": "acme", "agent": "alice", "key": key}
        )
        assert login.status == 200
        cookie = login.cookies["HERALD_SESSION"].value
    failures, statuses = await asyncio.to_thread(run_schemathesis, document, herald.base_url, cookie)
    assert not failures, "\n\n".join(failures[:10])
    # The generated requests reached the handlers, not only their refusals.
    succeeded = {key.rsplit(" ", 1)[0] for key, count in statuses.items() if key.endswith((" 200", " 201"))}
    for operation in (
        "GET /v1/groups/{group}/visitors/{visitor}",
        "POST /v1/groups/{group}/visitors/{visitor}/disconnect",
        "POST /v1/groups/{group}/agents/{agent}/revoke",
        "GET /v1/admin/groups/{group}/settings",
        "PUT /v1/admin/groups/{group}/webhooks",
        "GET /v1/groups/{group}/events",
        "POST /v1/groups/{group}/codes",
        "GET /healthz",
    ):
        assert operation in succeeded, (operation, sorted(statuses.items()))


def credentials(operation: Any, cookie: str, rng: random.Random) -> dict[str, Any]:
    """Valid credentials for the operation's security scheme, most of the time."""
    if rng.random() < 0.25:
        return {}
    schemes = {name for requirement in operation.definition.raw.get("security", []) for name in requirement}
    if "apiKey" in schemes:
        return {"headers": {"Authorization": f"Bearer {tokens.api_key(SECRET, 'acme')}"}}
    if "adminToken" in schemes:
        return {"headers": {"Authorization": f"Bearer {ADMIN_TOKEN}"}}
    if "agentSession" in schemes:
        return {"cookies": {"HERALD_SESSION": cookie}}
    return {}


def run_schemathesis(document: dict[str, Any], base_url: str, cookie: str) -> tuple[list[str], Counter[str]]:
    """Every operation, EXAMPLES generated requests each: the failures found
    (one per operation) and the statuses answered, by operation."""
    schema = schemathesis.openapi.from_dict(document)
    failures: list[str] = []
    statuses: Counter[str] = Counter()
    rng = random.Random()
    session = requests.Session()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in MODES:
            try:
                exercise(operation, mode, base_url, session, cookie, rng, statuses)
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE  # nothing to break in an operation without inputs
            except Exception as exc:
                failures.append(f"{operation.method.upper()} {operation.path} ({mode.value} data): {exc}")
    return failures, statuses


def exercise(
    operation: Any,
    mode: GenerationMode,
    base_url: str,
    session: requests.Session,
    cookie: str,
    rng: random.Random,
    statuses: Counter[str],
) -> None:
    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def call(case: Any) -> None:
        if case.path_parameters and "group" in case.path_parameters and rng.random() < 0.7:
            case.path_parameters["group"] = "acme"  # mostly the test group, where the handlers do work
        if case.query and "group" in case.query and rng.random() < 0.7:
            case.query["group"] = "acme"
        if operation.path.endswith("/webhooks") and isinstance(case.body, dict):
            endpoints = case.body.get("endpoints")
            for endpoint in endpoints if isinstance(endpoints, list) else []:  # negative data: anything
                if isinstance(endpoint, dict) and isinstance(endpoint.get("url"), str):
                    endpoint["url"] = NOWHERE
        auth = credentials(operation, cookie, rng)
        response = case.call_and_validate(base_url=base_url, session=session, checks=CHECKS, **auth)
        statuses[f"{operation.method.upper()} {operation.path} {response.status_code}"] += 1

    call()
