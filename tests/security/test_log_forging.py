"""What reaches the access log: never a short code, even in a path, and never
a line a client wrote (a ``%0A`` in a path must not start a forged line)."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from ..harness import SECRET
from ..processes import HERALD, start_server

CODE = "918273645546"  # digits only a code route carries


async def test_a_code_in_a_native_route_path_and_a_forged_log_line_never_reach_the_log(tmp_path: Path) -> None:
    server = start_server(tmp_path, str(HERALD), "serve", "--group", f"acme={SECRET}", "--log-level", "DEBUG")
    try:
        async with aiohttp.ClientSession() as http:
            for path in (f"/v1/groups/acme/codes/{CODE}", f"/v1/groups/acme/codes/{CODE}/agent"):
                async with http.get(server.base_url + path) as response:
                    assert response.status in (401, 403, 404)
            forged = "/v1/x%0A1999-01-01%2000:00:00,000%20INFO%20herald_presence.server.web.auth%20[-]:%20FORGED"
            async with http.get(aiohttp.client.URL(server.base_url + forged, encoded=True)) as response:
                assert response.status == 404
            async with http.get(server.base_url + "/healthz") as response:
                assert response.status == 200
    finally:
        server.stop()
    output = server.stdout() + server.stderr_path.read_text(errors="replace")
    assert "/v1/groups/acme/codes/<code>" in output, "the access log should be on at DEBUG"
    assert CODE not in output
    assert "FORGED" in output, "the request was logged"
    assert not [line for line in output.splitlines() if line.startswith("1999-01-01")], "no line the client wrote"
