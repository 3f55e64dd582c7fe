"""The README is the front door: its commands exist and every flag is documented there."""

from __future__ import annotations

import re
import tomllib

import pytest

from aggregator.cli import build_parser as aggregator_parser
from mock_worker.__main__ import parser as mock_worker_parser

from .support import ROOT

README = (ROOT / "README.md").read_text()


def options(parser) -> list[str]:
    return [action.option_strings[-1] for action in parser._actions
            if action.option_strings and action.option_strings[-1] != "--help"]


@pytest.mark.parametrize("parser", [aggregator_parser, mock_worker_parser], ids=["aggregator", "mock_worker"])
def test_every_flag_is_in_the_configuration_tables(parser):
    documented = set(re.findall(r"^\| `(--[a-z0-9-]+)` \|", README, flags=re.M))
    missing = [flag for flag in options(parser()) if flag not in documented]
    assert missing == []


def test_the_readme_commands_exist():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "python3 -m pip install -e . && llm-fleet-demo" in README
    assert "llm-fleet-demo" in scripts and "llm-aggregator" in scripts and "llm-mock-worker" in scripts
    test_command = "python3 -m pip install -e '.[test]' && python3 -m pytest"
    assert test_command in README
    # CI installs what that command installs (and the linters), and runs exactly its pytest.
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m pip install -q --disable-pip-version-check -e '.[test,lint,docs]'" in ci
    assert re.search(r"^step python3 -m pytest +(#.*)?$", ci, flags=re.M)
