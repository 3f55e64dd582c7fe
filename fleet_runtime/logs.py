"""Logging through structlog, configured the way Dynamo configures its logs.

Human-readable on a terminal; JSON lines (one object per line, `time`, `level`,
`message` first) when DYN_LOGGING_JSONL is truthy. The level comes from DYN_LOG, whose
first directive is the default level (Dynamo's `info,target=debug` syntax).
Output goes to stderr, as Dynamo's does. Lines about bad input are rate-limited by one
processor of the chain (`RateLimit`): log them with `rate_limit=KEY`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Hashable

import structlog
from structlog.typing import EventDict

_TRUTHY = {"1", "true", "on", "yes"}
_LEVELS = {"error": logging.ERROR, "warn": logging.WARNING, "warning": logging.WARNING,
           "info": logging.INFO, "debug": logging.DEBUG, "trace": logging.DEBUG}


def level_from_env(value: str | None) -> int:
    if not value:
        return logging.INFO
    first = value.split(",", 1)[0].strip().lower()
    if "=" in first:  # only per-target directives: keep the default level
        return logging.INFO
    if first not in _LEVELS:
        raise ValueError(f"DYN_LOG: unknown level {first!r} (use error, warn, info, debug or trace)")
    return _LEVELS[first]


RATE_LIMIT = "rate_limit"


class RateLimit:
    """A structlog processor: at most one line per rate-limit key per `interval` seconds.

    Bad input arrives in floods; one line per bad message would bury everything else. An
    event that carries `rate_limit=KEY` (any hashable, e.g. (kind, reason, subject)) is
    dropped if a line with the same message and key went out less than `interval` seconds
    ago; else it goes out with `suppressed_since_last=N`, the lines held back since. Events
    without the key pass untouched. Memory stays bounded under hostile key churn: past
    `max_keys` keys the table starts over (a flood of new keys then logs one line per key,
    as it would anyway).
    """

    def __init__(self, interval: float = 10.0, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._clock = clock
        self._last: dict[Hashable, _Window] = {}

    def __len__(self) -> int:
        """How many keys it remembers (at most `max_keys`)."""
        return len(self._last)

    def __call__(self, logger: object, method_name: str, event_dict: EventDict) -> EventDict:
        key = event_dict.pop(RATE_LIMIT, None)
        if key is None:
            return event_dict
        key = (event_dict.get("event"), key)  # one line's key never holds back another line
        try:
            last = self._last.get(key)
        except TypeError:  # unhashable: still limited, by its text
            key = repr(key)
            last = self._last.get(key)
        now = self._clock()
        if last is not None and now - last.since < self.interval:
            last.held += 1
            raise structlog.DropEvent
        if last is None and len(self._last) >= self.max_keys:
            self._last.clear()
        self._last[key] = _Window(now)
        event_dict["suppressed_since_last"] = last.held if last is not None else 0
        return event_dict


class _Window:
    __slots__ = ("held", "since")

    def __init__(self, since: float) -> None:
        self.since = since  # when the key last logged a line
        self.held = 0  # lines dropped since


def configure(environ: dict[str, str] | None = None) -> None:
    env = os.environ if environ is None else environ
    jsonl = env.get("DYN_LOGGING_JSONL", "").strip().lower() in _TRUTHY
    level = level_from_env(env.get("DYN_LOG"))
    processors: list = [
        RateLimit(),  # first: a dropped line costs nothing more
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="time" if jsonl else "timestamp"),
    ]
    if jsonl:
        processors += [
            structlog.processors.EventRenamer("message"),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,  # a proxy binds once, not on every call (a dropped line stays cheap)
    )


class LogLimiter:
    """At most one log line per key per `interval` seconds, decided by the caller (`allow`).

    The discovery edge's form of `RateLimit`: it logs a summary of what was held back itself.
    """

    def __init__(self, interval: float = 10.0, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._clock = clock
        self._last: dict[object, tuple[float, int]] = {}

    def allow(self, key: object) -> int | None:
        """None to stay quiet; else the number of lines suppressed since the last one."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval:
            self._last[key] = (last[0], last[1] + 1)
            return None
        if last is None and len(self._last) >= self.max_keys:
            self._last.clear()  # hostile key churn must not grow memory
        self._last[key] = (now, 0)
        return last[1] if last else 0
