"""Command-line flags with environment-variable defaults, shared by every program here.

Every setting is a flag; its default comes from an environment variable (Dynamo's name
where Dynamo has one), and an invalid value, from either source, stops the program with
one line naming the flag and the variable. No error line quotes a secret: URLs are shown
with their credentials masked, and argparse's own messages (which quote raw arguments) are
redacted before they are printed (fleet_runtime.redaction).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
from urllib.parse import urlsplit

from fleet_protocol import MAX_LABEL_LENGTH
from fleet_runtime.redaction import redact_message, redact_url

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_NATS_SCHEMES = {"nats", "tls", "ws", "wss"}


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag or variable in one line instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {redact_message(message)}\n")
        sys.exit(2)

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            # A mistyped secret flag's value would follow it: name the unknown flags, never the values.
            flags = [extra.split("=", 1)[0] for extra in extras if extra.startswith("-")]
            hidden = len(extras) - len(flags)
            self.error("unrecognized arguments: " + " ".join(flags)
                       + (f" (and {hidden} value{'s' if hidden > 1 else ''}, not shown)" if hidden else ""))
        return parsed


def env_flag(parser: argparse.ArgumentParser, flag: str, env: str | None, default, type, help: str, **kw):
    """Add `flag` whose default is `$env` (if set) else `default`; argparse validates both."""
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


def nats_token(value: str) -> str:
    if not _TOKEN.fullmatch(value):
        raise ValueError(f"{value!r} must be 1-64 letters, digits, '_' or '-' (one NATS subject token)")
    return value


def label_value(value: str) -> str:
    if not value or len(value) > MAX_LABEL_LENGTH:
        raise ValueError(f"must be 1-{MAX_LABEL_LENGTH} characters")
    return value


def nats_urls(value: str) -> str:
    urls = [u.strip() for u in value.split(",") if u.strip()]
    if not urls:
        raise ValueError("no NATS URL given")
    for number, url in enumerate(urls, 1):
        # Quoted as the whole value, redacted: a password holding a ',' is split across two "URLs".
        where = repr(redact_url(value.strip())) + (f", URL {number} of {len(urls)}," if len(urls) > 1 else "")
        parts = urlsplit(url)
        if parts.scheme not in _NATS_SCHEMES or not parts.hostname:
            raise ValueError(f"{where} is not a NATS URL like nats://host:4222")
        try:
            parts.port
        except ValueError:
            raise ValueError(f"{where} has an invalid port") from None
    return ",".join(urls)


def ip_address(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None
    return value


def port(value: str) -> int:
    number = int(value)
    if not 0 <= number <= 65535:
        raise ValueError(f"{number} is not a port (0-65535; 0 picks a free one)")
    return number


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

