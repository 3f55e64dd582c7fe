"""Checks for settings dataclasses, shared by every program here; no argparse, no environment.

A settings dataclass declares each field's check next to its default (`field(default=10.0,
metadata=checked(within(0.1, 86400.0)))`) and calls `check_fields(self)` in `__post_init__`, as nats-py's
`micro.ServiceConfig` validates at construction. A bad value raises `ConfigError` naming
the field, so a command line can name the flag and its variable, and code that builds
a config directly gets the field's name.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Collection
from dataclasses import Field, fields
from typing import Any
from urllib.parse import urlsplit

from fleet_protocol import MAX_LABEL_LENGTH
from fleet_runtime.redaction import redact_url

Check = Callable[[Any], object]  # raises ValueError when the value cannot work; its result is ignored

_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")
NATS_SCHEMES = {"nats", "tls", "ws", "wss"}


class ConfigError(ValueError):
    """A setting that cannot work: `field` names it (`section.name` inside a bigger config).

    `problem` may name other fields as `{0}`, `{1}`... (the names in `related`), so whoever
    reports the error can call them what its user knows them as (a flag, a field).
    """

    def __init__(self, field: str, problem: str, related: tuple[str, ...] = ()) -> None:
        self.field = field
        self.problem = problem
        self.related = related
        super().__init__(f"{field}: {self.explain()}")

    def explain(self, name: Callable[[str], str] = str) -> str:
        # Only problems that name other fields are formatted; they carry numbers, not free text.
        return self.problem.format(*map(name, self.related)) if self.related else self.problem

    def within(self, section: str) -> ConfigError:
        """The same error, raised by a config that sits at `section` of a bigger one."""
        return ConfigError(f"{section}.{self.field}", self.problem, tuple(f"{section}.{r}" for r in self.related))


def checked(check: Check) -> dict[str, Check]:
    """A dataclass field's metadata saying how `check_fields` checks it: `field(default=.., metadata=checked(..))`."""
    return {"check": check}


def check_fields(config: Any) -> None:
    """Run every field's own check; the first failure raises ConfigError naming the field."""
    for item in fields(config):
        check_field(item, getattr(config, item.name))


def check_field(item: Field, value: Any) -> None:
    check = item.metadata.get("check")
    if check is None:
        return
    try:
        check(value)
    except (ValueError, TypeError) as error:
        raise ConfigError(item.name, str(error)) from None


def field_named(config_type: type, name: str) -> Field:
    for item in fields(config_type):
        if item.name == name:
            return item
    raise KeyError(f"{config_type.__name__} has no field {name!r}")


def shown(value: object) -> str:
    """A number as a person typed it: 0.0 reads 0, 0.5 reads 0.5."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


# Checks ---------------------------------------------------------------------------------


def within(low: float, high: float) -> Check:
    """A number in low..high; an int when both bounds are ints."""
    whole = isinstance(low, int) and isinstance(high, int)

    def check(value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
            raise TypeError(f"{value!r} is not {'a whole number' if whole else 'a number'}")
        if math.isnan(value) or not low <= value <= high:
            raise ValueError(f"{shown(value)} is outside {low}..{high}")

    return check


def one_of(options: Collection[str]) -> Check:
    def check(value: object) -> None:
        if value not in options:
            raise ValueError(f"{value!r} is not one of {', '.join(options)}")

    return check


def optional(check: Check) -> Check:
    """`check`, or None."""
    return lambda value: None if value is None else check(value)


def each(check: Check, *, what: str) -> Check:
    """A non-empty tuple, every item passing `check`."""

    def check_all(values: object) -> None:
        if not isinstance(values, tuple):
            raise TypeError(f"{values!r} is not a tuple of {what}s")
        if not values:
            raise ValueError(f"no {what} given")
        for value in values:
            check(value)

    return check_all


def text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("must be a string")  # not shown: it may be a secret
    if not value:
        raise ValueError("must not be empty")
    return value


def nats_token(value: str) -> str:
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise ValueError(f"{value!r} must be 1-64 letters, digits, '_' or '-' (one NATS subject token)")
    return value


def label_value(value: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_LABEL_LENGTH:
        raise ValueError(f"must be 1-{MAX_LABEL_LENGTH} characters")
    return value


def nats_url_problem(url: str) -> str | None:
    """Why `url` is not a NATS URL (words to follow the URL quoted), or None."""
    parts = urlsplit(url)
    if parts.scheme not in NATS_SCHEMES or not parts.hostname:
        return "is not a NATS URL like nats://host:4222"
    try:
        _ = parts.port  # raises for a port outside 0-65535 or not a number
    except ValueError:
        return "has an invalid port"
    return None


def nats_url(url: str) -> str:
    if not isinstance(url, str):
        raise TypeError(f"{url!r} is not a NATS URL like nats://host:4222")
    problem = nats_url_problem(url)
    if problem is not None:
        raise ValueError(f"{redact_url(url)!r} {problem}")  # named without its credentials: the error is printed
    return url


def ip_address(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None
    return value


def port_number(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{value!r} is not a port number")
    if not 0 <= value <= 65535:
        raise ValueError(f"{value} is not a port (0-65535; 0 picks a free one)")
    return value
