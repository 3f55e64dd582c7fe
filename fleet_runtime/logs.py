"""Logging through structlog, configured the way Dynamo configures its logs.

Human-readable on a terminal; JSON lines (one object per line, `time`, `level`,
`message` first) when DYN_LOGGING_JSONL is truthy. The level comes from DYN_LOG, whose
first directive is the default level (Dynamo's `info,target=debug` syntax).
Output goes to stderr, as Dynamo's does.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import structlog

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


def configure(environ: dict[str, str] | None = None) -> None:
    env = os.environ if environ is None else environ
    jsonl = env.get("DYN_LOGGING_JSONL", "").strip().lower() in _TRUTHY
    level = level_from_env(env.get("DYN_LOG"))
    processors: list = [
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
        cache_logger_on_first_use=False,
    )


class LogLimiter:
    """At most one log line per key per `interval` seconds, with a count of what was held back.

    Bad input arrives in floods; one line per bad message would bury everything else.
    """

    def __init__(self, interval: float = 10.0, max_keys: int = 10_000, clock=time.monotonic) -> None:
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
