"""Writes the flag tables of docs/configuration.md from the programs' own argument parsers.

Run: python3 docs/generate_configuration.py   (tests/integration/test_docs.py fails while the file differs)

Only the blocks between the GENERATED markers are rewritten; the prose around them is
edited by hand. The tables come from the parsers themselves, so a flag added, renamed or
given another default shows here at the next run, and the test says when that run is due.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "docs" / "configuration.md"
COMMAND = "python3 docs/generate_configuration.py"

# Every program's environment variable is named in its flag's help as "(env NAME)" (or
# "env NAME," inside a longer parenthesis), which is also what `--help` shows.
_ENV = re.compile(r"\benv ([A-Z][A-Z0-9_]*)")
_ENV_PARENTHESIS = re.compile(r" ?\(env [A-Z][A-Z0-9_]*\)")
_ENV_IN_PARENTHESIS = re.compile(r"(?:; )?\benv [A-Z][A-Z0-9_]*(?:, )?")


def _parsers() -> dict[str, Callable[[], argparse.ArgumentParser]]:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from aggregator.cli import build_parser
    from fleet_demo.__main__ import parser as demo_parser
    from mock_worker.__main__ import parser as mock_worker_parser

    return {"aggregator": build_parser, "mock_worker": mock_worker_parser, "fleet_demo": demo_parser}


def env_name(action: argparse.Action) -> str | None:
    named = getattr(action, "env", None)
    if isinstance(named, str):
        return named
    found = _ENV.search(action.help or "")
    return found.group(1) if found else None


def _help(action: argparse.Action, parser: argparse.ArgumentParser) -> str:
    text = action.help or ""
    if "%" in text:  # argparse's own placeholders, as --help would show them
        text = text % {**vars(action), "prog": parser.prog, "default": action.default}
    text = _ENV_IN_PARENTHESIS.sub(", ", _ENV_PARENTHESIS.sub("", text)).replace(", )", ")")
    if "; default " in text:  # the default has its own column
        text = text.rpartition("; default ")[0]
    return text.strip()


def _default(action: argparse.Action) -> str:
    value = action.default
    if value is None or value == "" or isinstance(value, bool) or value == argparse.SUPPRESS:
        return ""
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


@contextmanager
def _without(names: set[str]) -> Iterator[None]:
    """The parsers read their env defaults when built: build them as on a machine with none set."""
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def table(build: Callable[[], argparse.ArgumentParser]) -> str:
    names = {env for action in options(build()) if (env := env_name(action))}
    with _without(names):
        parser = build()
    rows = ["| flag | env | default | meaning |", "|---|---|---|---|"]
    for action in options(parser):
        flag = ", ".join(f"`{o}`" for o in action.option_strings)
        env = env_name(action)
        meaning = _help(action, parser)
        if action.choices is not None and not isinstance(action.choices, dict):
            meaning += ("; " if meaning else "") + "one of " + ", ".join(f"`{c}`" for c in action.choices)
        rows.append(f"| {flag} | {f'`{env}`' if env else ''} | {_default(action)} | {_cell(meaning)} |")
    return "\n".join(rows)


def begin(name: str) -> str:
    return f"<!-- BEGIN GENERATED: {name} flags ({COMMAND}) -->"


def end(name: str) -> str:
    return f"<!-- END GENERATED: {name} flags -->"


def render(current: str) -> str:
    """`current` with every generated block rewritten from the parsers."""
    text = current
    for name, build in _parsers().items():
        start, stop = begin(name), end(name)
        head, found, rest = text.partition(start)
        if not found or stop not in rest:
            raise SystemExit(f"{TARGET}: markers for {name} missing ({start} ... {stop})")
        _, _, tail = rest.partition(stop)
        text = f"{head}{start}\n{table(build)}\n{stop}{tail}"
    return text


def main() -> None:
    current = TARGET.read_text()
    updated = render(current)
    if updated != current:
        TARGET.write_text(updated)
        print(f"rewrote {TARGET.relative_to(ROOT)}")
    else:
        print(f"{TARGET.relative_to(ROOT)} is up to date")


if __name__ == "__main__":
    main()
