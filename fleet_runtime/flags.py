"""Command-line flags with environment-variable defaults, shared by every program here.

Every setting is a flag; its default comes from an environment variable (Dynamo's name
where Dynamo has one), and an invalid value, from either source, stops the program with
one line naming the flag and the variable. A flag turns text into a typed value; the
program's settings dataclass checks it (`fleet_runtime.config_checks`), and `config_error`
reports what the dataclass refused in that same one line.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from fleet_runtime.config_checks import ConfigError, nats_url_problem
from fleet_runtime.redaction import redact_message, redact_url


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag or variable in one line instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {redact_message(message)}\n")
        sys.exit(2)

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            # A mistyped secret flag's value would follow it: name the unknown flags, never the values.
            flags = [extra.split("=", 1)[0] for extra in extras if extra.startswith("-")]
            hidden = len(extras) - len(flags)
            self.error("unrecognized arguments: " + " ".join(flags)
                       + (f" (and {hidden} value{'s' if hidden > 1 else ''}, not shown)" if hidden else ""))
        return parsed


def env_flag(parser: argparse.ArgumentParser, flag: str, env: str | None, default, type, help: str, **kw):
    """Add `flag` whose default is `$env` (if set) else `default`; argparse runs both through `type`."""
    raw = os.environ.get(env) if env else None
    where = f" (env {env})" if env else ""

    def checked(value: str):
        try:
            return type(value)
        except (ValueError, TypeError) as error:
            raise argparse.ArgumentTypeError(f"{error}{where}") from None

    checked.__name__ = getattr(type, "__name__", "value")
    parser.add_argument(flag, default=raw if raw is not None else default, type=checked,
                        help=f"{help}{where}; default {default!r}", **kw)


@dataclass(frozen=True, slots=True)
class Flag:
    """One flag of a program whose settings are a dataclass: its variable, the field it sets, how its
    text becomes a value (the dataclass checks the value)."""

    name: str
    env: str | None
    field: str  # `name`, or `section.name` in a config made of sections
    parse: Callable[[str], Any]
    help: str
    group: str | None = None  # the --help section; None for the main one

    @property
    def dest(self) -> str:
        return self.name.removeprefix("--").replace("-", "_")

    def add_to(self, parser: Any, default: Any) -> None:
        """Add it to `parser` (or an argument group) with `default` when its variable is unset."""
        env_flag(parser, self.name, self.env, default, self.parse, self.help, dest=self.dest)


def field_flags(flags: Iterable[Flag]) -> dict[str, tuple[str, str | None]]:
    """Config field -> (flag, variable), to name them in an error (see config_error)."""
    return {flag.field: (flag.name, flag.env) for flag in flags}


def comma_list(value: str) -> tuple[str, ...]:
    """`a, b,,c` -> ('a', 'b', 'c'): how a list is written in one flag or variable."""
    return tuple(item.strip() for item in value.split(",") if item.strip())


def config_error(parser: argparse.ArgumentParser, error: ConfigError,
                 flags: Mapping[str, tuple[str, str | None]]) -> NoReturn:
    """Report a settings dataclass's ConfigError as the one line a bad flag gets.

    `flags` maps a config field (`section.name`) to its flag and environment variable.
    """
    def name(field: str) -> str:
        return flags.get(field, (field, None))[0]

    flag, env = flags.get(error.field, (error.field, None))
    where = f" (env {env})" if env else ""
    parser.error(f"argument {flag}: {error.explain(name)}{where}")


def bounded(kind, low, high):
    def parse(value: str):
        number = kind(value)
        if not (low <= number <= high) or number != number:
            raise ValueError(f"{value} is outside {low}..{high}")
        return number

    parse.__name__ = kind.__name__
    return parse


def choice(options):
    def parse(value: str) -> str:
        if value not in options:
            raise ValueError(f"{value!r} is not one of {', '.join(options)}")
        return value

    parse.__name__ = "choice"
    return parse


def nats_url_list(value: str) -> tuple[str, ...]:
    """The comma-separated URLs, each checked here rather than by NatsConfig: a password holding a
    ',' is split across two "URLs", so an error quotes the whole value, credentials masked."""
    urls = comma_list(value)
    for number, url in enumerate(urls, 1):
        problem = nats_url_problem(url)
        if problem is not None:
            where = repr(redact_url(value.strip())) + (f", URL {number} of {len(urls)}," if len(urls) > 1 else "")
            raise ValueError(f"{where} {problem}")
    return urls
