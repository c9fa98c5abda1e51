"""The code base (deploy/ too) passes ruff's checks, is ruff-formatted, and keeps
its layers' dependency direction, with the project's own configuration
(pyproject.toml)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CODE = ["protocol", "server", "tests", "deploy"]


def run_tool(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a tool of the test extra from this virtualenv, in the repository."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        message = f"{name} is not installed at {path} (pip install -e '.[test]')"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)  # CI installs the test extras, so a missing tool is a broken setup
        pytest.skip(message)
    return subprocess.run(
        [str(path), *args],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_the_code_passes_ruff(command: list[str]) -> None:
    result = run_tool("ruff", *command, "--no-cache", *CODE)
    assert result.returncode == 0, f"ruff {command[0]} failed:\n{result.stdout}{result.stderr}"


def test_the_layers_keep_one_dependency_direction() -> None:
    """pyproject.toml's [tool.importlinter] contracts: process -> web -> core ->
    backends -> model -> foundation; the protocol below the server; a pure wire
    protocol; an SDK without the server's dependencies (ARCHITECTURE.md)."""
    result = run_tool("lint-imports", "--no-cache")
    assert result.returncode == 0, f"lint-imports failed:\n{result.stdout}{result.stderr}"
    assert "0 broken" in result.stdout
