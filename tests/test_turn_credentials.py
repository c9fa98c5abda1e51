"""TURN credentials as coturn checks them, and a group's ICE servers in its
configuration (PROTOCOL.md §11.10).

coturn's ``use-auth-secret`` (``static-auth-secret``, the TURN REST API)
documents the algorithm: the username is ``"<unix expiry>:<user id>"`` and
the password ``base64(HMAC-SHA1(secret, username))``. The expected values
below were computed outside Python, with

    printf '%s' "1767229200:c50d9e2afb8fde980" | openssl dgst -binary -sha1 -hmac "coturn-static-auth-secret" | base64
"""

from __future__ import annotations

from pathlib import Path

import pytest

from herald_presence.protocol import checks
from herald_presence.server.config import ConfigError, check_ice_servers, load
from herald_presence.server.model.ice import ice_servers_for, turn_credentials

NOW = 1767225600  # 2026-01-01T00:00:00Z, as in PROTOCOL.md §4
SECRET = "coturn-static-auth-secret"


@pytest.mark.parametrize(
    ("secret", "member", "expires", "password"),
    [
        (SECRET, "c50d9e2afb8fde980", 1767229200, "g06AcALMlRjkk5Gm1cujEea/JJE="),
        ("north", "agent-7", 1767312000, "OG/ZiSJ8nLR/713vFKWe3kQT2sE="),
    ],
)
def test_credentials_are_coturns_use_auth_secret(secret: str, member: str, expires: int, password: str) -> None:
    assert turn_credentials(secret, member, expires) == (f"{expires}:{member}", password)


def test_a_member_gets_urls_and_credentials_valid_for_the_servers_ttl_from_now() -> None:
    servers = check_ice_servers(
        [
            {"urls": "stun:stun.acme.example:3478"},
            {"urls": ["turn:turn.acme.example:3478?transport=udp", "turns:turn.acme.example:5349"], "secret": SECRET},
            {"urls": ["turn:short.acme.example"], "secret": "north", "ttl": 86400},
        ]
    )
    given = ice_servers_for(servers, "c50d9e2afb8fde980", NOW + 0.9)
    assert given == [
        {"urls": ["stun:stun.acme.example:3478"]},
        {
            "urls": ["turn:turn.acme.example:3478?transport=udp", "turns:turn.acme.example:5349"],
            "username": "1767312000:c50d9e2afb8fde980",  # the default ttl: a day (the TURN REST API's advice)
            "credential": turn_credentials(SECRET, "c50d9e2afb8fde980", NOW + 86400)[1],
        },
        {
            "urls": ["turn:short.acme.example"],
            "username": "1767312000:c50d9e2afb8fde980",
            "credential": turn_credentials("north", "c50d9e2afb8fde980", NOW + 86400)[1],
        },
    ]
    assert checks.ice_servers(given, "ice_servers") == given  # what the SDKs accept
    assert ice_servers_for([], "c1", NOW) is None


@pytest.mark.parametrize(
    ("servers", "why"),
    [
        ([{"urls": ["turn:x"], "username": "u", "credential": "long-term"}], "never a fixed username and password"),
        ([{"urls": ["turn:x"]}], "needs its shared secret"),
        ([{"urls": ["turns:x"], "secret": ""}], "needs its shared secret"),
        ([{"urls": ["stun:x"], "secret": "s"}], "only a TURN server"),
        ([{"urls": ["https://x"]}], "stun:, stuns:, turn: or turns:"),
        ([{"urls": []}], "urls must be"),
        ([{"urls": ["turn:x"], "secret": "s", "ttl": 10}], "ttl must be"),
        ([{"urls": ["turn:x"], "secret": "s", "ttl": 1.5}], "ttl must be"),
        ([{"urls": ["stun:x"]}] * 9, "at most 8"),
        ("stun:x", "must be a list"),
    ],
)
def test_ice_servers_that_are_refused(servers: object, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        check_ice_servers(servers)


def test_a_group_configures_ice_servers_and_presence_fields_in_toml(tmp_path: Path) -> None:
    config = tmp_path / "herald.toml"
    config.write_text(
        """
[groups.acme]
secret = "current-secret-0123456789"
presence_fields = ["url", "title"]

[[groups.acme.ice_servers]]
urls = ["stun:stun.acme.example:3478"]

[[groups.acme.ice_servers]]
urls = ["turn:turn.acme.example:3478", "turns:turn.acme.example:5349"]
secret = "coturn-static-auth-secret"
ttl = 3600
"""
    )
    group = load(str(config), env={}).groups["acme"]
    assert group.ice_servers == [
        {"urls": ["stun:stun.acme.example:3478"]},
        {"urls": ["turn:turn.acme.example:3478", "turns:turn.acme.example:5349"], "secret": SECRET, "ttl": 3600},
    ]
    assert group.presence_fields == ["url", "title"]
    config.write_text('[groups.acme]\nsecret = "current-secret-0123456789"\n')
    assert load(str(config), env={}).groups["acme"].presence_fields is None  # every field


@pytest.mark.parametrize(
    "table",
    [
        '[[groups.acme.ice_servers]]\nurls = ["turn:x"]\nusername = "u"\ncredential = "p"',
        "[groups.acme]\npresence_fields = [1]",
        '[groups.acme]\npresence_fields = "url"',
    ],
)
def test_a_bad_group_table_stops_the_server(tmp_path: Path, table: str) -> None:
    config = tmp_path / "herald.toml"
    secret = '[groups.acme]\nsecret = "current-secret-0123456789"\n'
    config.write_text(table.replace("[groups.acme]\n", secret) if table.startswith("[groups") else secret + table)
    with pytest.raises(ConfigError, match="acme"):
        load(str(config), env={})
