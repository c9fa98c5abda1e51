"""STUN/TURN servers for the members of a support session, with short-lived
TURN credentials made for each member.

A group configures its servers (``config.check_ice_servers``: TOML or the
admin API). A TURN server is given with its shared secret, as coturn's
``use-auth-secret`` (``static-auth-secret``) and the TURN REST API have it:
Herald makes each member a username that names an expiry and a password
derived from both, which the TURN server checks with the same secret. So the
secret never leaves Herald, and what a browser gets stops working at its
expiry. Pure functions: the caller gives the time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

from herald_presence.protocol.messages import IceServer


def turn_credentials(secret: str, member: str, expires: int) -> tuple[str, str]:
    """coturn's ``use-auth-secret`` credentials: username ``"<unix expiry>:<member>"``,
    password ``base64(HMAC-SHA1(secret, username))``."""
    username = f"{expires}:{member}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode("ascii")


def ice_servers_for(servers: list[dict[str, Any]], member: str, now: float) -> list[IceServer] | None:
    """What one member gets (``session_joined``, ``session_connected``): the
    servers' URLs, a TURN server's with credentials for ``member`` (its
    connection ID) valid for the server's ``ttl`` from ``now``; None if the
    group has none."""
    out: list[IceServer] = []
    for server in servers:
        entry: IceServer = {"urls": list(server["urls"])}
        if server.get("secret"):
            entry["username"], entry["credential"] = turn_credentials(
                server["secret"], member, int(now) + int(server["ttl"])
            )
        out.append(entry)
    return out or None
