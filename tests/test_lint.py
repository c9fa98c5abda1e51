"""The code base (deploy/ too) passes ruff with the project's own configuration (pyproject.toml)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUFF = Path(sys.executable).parent / "ruff"


def test_the_code_passes_ruff() -> None:
    if not RUFF.exists():
        message = f"ruff is not installed at {RUFF} (pip install -e '.[test]')"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)  # CI installs the test extras, so a missing ruff is a broken setup
        pytest.skip(message)
    result = subprocess.run(
        [str(RUFF), "check", "--no-cache", "protocol", "server", "tests", "deploy"],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"ruff check failed:\n{result.stdout}{result.stderr}"
