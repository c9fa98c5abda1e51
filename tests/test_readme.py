"""The README is executable: its tour runs against a live server and prints
what it says, its configuration table is the code's, and its commands are the
ones the project actually provides."""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from herald_presence.server.config import Settings, load
from herald_presence.server.process import cli

from .processes import HERALD, REPO, clean_env, start_server

README = (REPO / "README.md").read_text()
SNIPPET_URL = '"http://127.0.0.1:8765"'
SNIPPET_TIMEOUT = 60.0
SCALAR_FIELDS = [f.name for f in dataclasses.fields(Settings) if f.name != "groups"]


def section(heading: str) -> str:
    """The body of the ``## <heading>...`` section, up to the next ``## ``."""
    match = re.search(rf"^## {re.escape(heading)}[^\n]*\n(.*?)(?=^## |\Z)", README, re.MULTILINE | re.DOTALL)
    assert match, f"README has no section starting '## {heading}'"
    return match[1]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)


def single(blocks: list[str], what: str) -> str:
    assert len(blocks) == 1, f"expected one {what}, found {len(blocks)}"
    return blocks[0]


# --- the two-minute tour


def test_the_two_minute_tour_prints_what_the_readme_says(tmp_path: Path) -> None:
    tour = section("A two-minute tour")
    command = shlex.split(single(code_blocks(tour, "sh"), "server command in the tour").strip())
    snippet = single(code_blocks(tour, "python"), "python block in the tour")
    printed = re.search(r"It prints:\s*```text\n(.*?)^```$", tour, re.MULTILINE | re.DOTALL)
    assert printed, "the tour has no 'It prints:' text block"
    assert command[:2] == [".venv/bin/herald", "serve"], command
    assert snippet.count(SNIPPET_URL) == 1, f"the tour no longer connects to {SNIPPET_URL}"

    # Exactly the README's command, on a free port and with a short grace period so the test is quick.
    herald = start_server(tmp_path, str(HERALD), *command[1:], "--grace-period", "0.5")
    try:
        script = tmp_path / "tour.py"
        script.write_text(snippet.replace(SNIPPET_URL, f'"{herald.base_url}"'))
        result = subprocess.run(
            [sys.executable, str(script)],
            cwd=REPO,
            env=clean_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=SNIPPET_TIMEOUT,
            check=False,
        )
    finally:
        herald.stop()
    assert result.returncode == 0, f"tour.py failed:\n{result.stdout}{result.stderr}\n{herald.output()}"
    assert result.stdout == printed[1], result.stderr


# --- the configuration table


def table() -> dict[str, list[str]]:
    """Rows of the configuration table, keyed by their first cell, backticks removed."""
    rows: dict[str, list[str]] = {}
    for line in section("Configuration").splitlines():
        if not line.startswith("|") or line.startswith("|---"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0] != "setting":  # the header
            rows[cells[0].strip("`")] = [cell.replace("`", "") for cell in cells]
    return rows


def rendered(value: Any) -> str:
    """A default as the table writes it: the empty string is ``""``, anything else as Python prints it."""
    return '""' if value == "" else str(value)


@pytest.mark.parametrize("name", SCALAR_FIELDS)
def test_configuration_table_documents_every_setting(name: str) -> None:
    rows = table()
    assert name in rows, f"the README's configuration table has no row for {name!r}"
    _, env, flag, default, meaning = rows[name]
    assert env == "HERALD_" + name.upper()
    assert flag == "--" + name.replace("_", "-")
    assert default == rendered(getattr(Settings(), name))
    assert meaning == cli.HELP[name], "the table and `herald serve --help` describe it differently"


def test_configuration_table_documents_nothing_that_does_not_exist() -> None:
    assert set(table()) == {*SCALAR_FIELDS, "groups"}


def test_configuration_table_documents_groups() -> None:
    _, env, flag, default, _ = table()["groups"]
    assert env.startswith("HERALD_GROUPS=") and flag.startswith("--group ")
    assert default == "demo group"


def test_every_flag_in_the_table_is_one_herald_serve_accepts(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--help"])
    assert exited.value.code == 0
    accepted = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", capsys.readouterr().out))
    flags = {row[2].split()[0] for row in table().values()}
    assert flags <= accepted, f"flags missing from `herald serve --help`: {sorted(flags - accepted)}"


def test_the_readme_toml_example_is_a_valid_config(tmp_path: Path) -> None:
    config = tmp_path / "herald.toml"
    config.write_text(single(code_blocks(section("Configuration"), "toml"), "TOML example"))
    settings = load(str(config), env={})
    assert settings.groups["acme"].secrets == ["current-secret-0123456789", "previous-secret-0123456789"]
    assert settings.groups["acme"].allowed_origins == ["https://crm.acme.example", "https://www.acme.example"]
    assert settings.groups["acme"].allow_anonymous is True


# --- quick start and CI


QUICK_START_SERVE = "python3 -m venv .venv && .venv/bin/pip install -q -e '.[server,fast]' && .venv/bin/herald serve"
QUICK_START_TEST = "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test,fast]' && .venv/bin/python -m pytest"


def test_quick_start_gives_the_command_to_run_the_server_and_the_one_to_run_the_tests() -> None:
    blocks = [block.strip() for block in code_blocks(section("Quick start"), "sh")]
    assert blocks == [QUICK_START_SERVE, QUICK_START_TEST]


def test_quick_start_commands_name_what_the_project_provides() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for command in (QUICK_START_SERVE, QUICK_START_TEST):
        for extras in re.findall(r"-e '\.\[([^\]]*)\]'", command):
            missing = set(extras.split(",")) - set(project["optional-dependencies"])
            assert not missing, f"{command!r} installs extras pyproject.toml does not define: {missing}"
    assert "herald" in project["scripts"]
    assert "pytest" in " ".join(project["optional-dependencies"]["test"])


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert QUICK_START_TEST in ci_lines
