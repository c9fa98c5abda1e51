"""What ``pip install`` puts on a user's machine: one import name of ours,
typed, and an SDK that installs and imports without the server's extra."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from herald_presence.server.web import pages

from .processes import clean_env

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 300  # seconds for a build or an install (packages come from the index)


def run(*argv: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(arg) for arg in argv],
        cwd=cwd,
        env={**clean_env(), **(env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, REPO, cwd=out)
    assert built.returncode == 0, built.stderr
    (found,) = out.glob("herald_presence-*.whl")
    return found


def test_the_wheel_installs_one_import_name_of_ours_and_is_typed(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"herald_presence"}
    assert {"herald_presence/protocol/py.typed", "herald_presence/server/py.typed"} <= set(names)
    for path, _content_type in pages.FILES.values():  # package-data must name every served file
        folder, *inside = path.relative_to(REPO).parts
        assert "/".join(("herald_presence", folder, *inside)) in names, path


def test_the_sdk_installs_without_the_servers_extra_beside_a_users_own_protocol_module(
    wheel: Path, tmp_path: Path
) -> None:
    """A user's project with its own ``protocol.py`` and ``server/`` shadows nothing of ours."""
    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    python, herald = env / "bin" / "python", env / "bin" / "herald"
    installed = run(python, "-m", "pip", "install", "-q", wheel, cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr
    project = tmp_path / "project"
    (project / "server").mkdir(parents=True)
    (project / "protocol.py").write_text("MINE = True\n")
    (project / "server" / "__init__.py").write_text("MINE = True\n")

    sdk = run(
        python,
        "-c",
        "import protocol, server; assert protocol.MINE and server.MINE\n"
        "from herald_presence.protocol.client import AgentClient, VisitorClient\n"
        "from herald_presence.protocol import tokens\n"
        "import importlib.util as u; assert u.find_spec('redis') is None and u.find_spec('aiohttp_session') is None\n"
        "print(tokens.visitor_token('s' * 16, 'acme', 'cust-42').count('.'))",
        cwd=project,
    )
    assert sdk.returncode == 0, sdk.stderr
    assert sdk.stdout.strip() == "1"

    secret = {"HERALD_TOKEN_SECRET": "s" * 16}  # never on the command line
    token = run(herald, "token", "visitor", "--group", "acme", "--id", "cust-42", cwd=project, env=secret)
    assert token.returncode == 0 and token.stdout.count(".") == 1, token.stderr
    serve = run(herald, "serve", "--port", "0", cwd=project)
    assert serve.returncode != 0
    assert serve.stderr.strip().splitlines() == [serve.stderr.strip()], "one line, not a traceback"
    assert "herald-presence[server]" in serve.stderr
