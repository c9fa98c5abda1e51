"""The house: every module imports on its own, and the installed packages
are the folders (the layers contract is checked in test_lint.py)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# The folders that install as herald_presence.<folder> (pyproject.toml's package-dir).
ROOTS = {"protocol": "herald_presence.protocol", "server": "herald_presence.server"}


def modules() -> list[str]:
    """Every module of the project, by its installed name."""
    found = []
    for folder, package in ROOTS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found.append(".".join((package, *parts)))
    return found


def packages() -> set[str]:
    """Every folder with an ``__init__.py``, by its installed name."""
    return {
        ".".join((package, *init.parent.relative_to(REPO / folder).parts))
        for folder, package in ROOTS.items()
        for init in (REPO / folder).rglob("__init__.py")
    }


def import_alone(module: str) -> tuple[str, str]:
    """Import ``module`` first thing in a fresh interpreter, outside the repository
    (so only the installed names resolve); its error output, if any."""
    result = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        cwd=BIN,  # not the repository: its folders must not stand in for the installed names
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return module, result.stderr if result.returncode else ""


def test_every_module_imports_on_its_own_in_a_fresh_interpreter() -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        failures = {module: error for module, error in pool.map(import_alone, modules()) if error}
    assert not failures, "\n".join(f"{module}:\n{error}" for module, error in failures.items())


def test_every_package_folder_is_installed() -> None:
    """A sub-package missing from pyproject.toml's list would import here, from the
    editable install, and be missing from a wheel."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(config["packages"]) == packages()
    assert config["package-dir"] == {package: folder for folder, package in ROOTS.items()}


def test_architecture_md_names_only_paths_that_exist() -> None:
    """ARCHITECTURE.md matches the code: every path it names is there."""
    text = (REPO / "ARCHITECTURE.md").read_text()
    code = set(re.findall(r"`([^`\s]+)`", text))
    paths = {name for name in code if "/" in name and not name.startswith("/") and not re.search(r"[<…:]", name)}
    files = {name for name in code if "/" not in name and re.fullmatch(r"[a-z_]+\.(py|md)", name)}
    assert paths and files
    missing = [path for path in sorted(paths) if not (REPO / path).exists()]
    sources = {path.name for folder in ROOTS for path in (REPO / folder).rglob("*") if path.is_file()}
    missing += [name for name in sorted(files) if name not in sources and not (REPO / name).exists()]
    assert not missing, f"ARCHITECTURE.md names what is not in the repository: {missing}"
